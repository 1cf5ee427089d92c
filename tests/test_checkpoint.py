"""Checkpoint on a signal, then resume on another number of ranks: the same answer."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

BIN = Path(sys.executable).parent
SMALL = Path(__file__).parents[1] / "configs" / "small.yaml"
ARGS = [
    "--set",
    "grid.nx=40",
    "--set",
    "grid.ny=40",
    "--set",
    "solver.multigrid.min_size=20",
    "--set",
    "solver.exchange.mode=sync",
    "--set",
    "solver.tol=1e-11",
]


def mpda(tmp: Path, *args: str, ranks: int = 1) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "mpda"), "run", str(SMALL), *ARGS, *args]
    if ranks > 1:
        cmd = [str(BIN / "mpiexec"), "-n", str(ranks), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp)


def _start_and_wait_for(cmd, fh, log: Path, text: str, cwd: Path) -> subprocess.Popen:
    """Start ``cmd`` with its output in ``fh`` (the file ``log``) and wait until the
    output holds ``text`` (at most 120 s)."""
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd)
    deadline = time.monotonic() + 120
    while text not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    if text not in log.read_text():
        proc.kill()
        pytest.fail(f"no {text!r} in the output within 120 s:\n{log.read_text()}")
    return proc


def test_signal_checkpoint_and_resume_equal_an_uninterrupted_run(tmp_path):
    full = mpda(tmp_path, "-o", "full.h5")
    assert full.returncode == 0, full.stderr

    ckpt = tmp_path / "ckpt.h5"
    # SIGUSR1 to rank 1 only, at its third check of level 2 (tests/fault_run.py): the
    # reduction tells rank 0.
    cmd = [
        str(BIN / "mpiexec"),
        "-n",
        "2",
        sys.executable,
        str(Path(__file__).parent / "fault_run.py"),
        "signal",
        "1",
        "3",
        str(SMALL),
        *ARGS,
        "-o",
        "interrupted.h5",
        "--set",
        f"checkpoint.file={ckpt}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    rc = proc.returncode
    text = proc.stdout + proc.stderr
    assert rc == 5, text
    assert "checkpoint written to" in text and ckpt.exists()
    assert not (tmp_path / "interrupted.h5").exists()
    from mpda_dist import checkpoint
    from mpda_dist.driver import _stored_digest

    assert len(_stored_digest(checkpoint.read(str(ckpt)).config) or "") == 64  # the inputs'

    resumed = mpda(
        tmp_path,
        "-o",
        "resumed.h5",
        "--resume",
        str(ckpt),
        "--set",
        f"checkpoint.file={tmp_path / 'c2.h5'}",
    )
    assert resumed.returncode == 0, resumed.stderr
    with h5py.File(tmp_path / "full.h5") as f, h5py.File(tmp_path / "resumed.h5") as g:
        a, b = f["analysis/mean"][:], g["analysis/mean"][:]
        np.testing.assert_array_equal(f.attrs["iterations"], g.attrs["iterations"])
        assert "resumed_from" not in f.attrs
        # the resumed file says so (review helper): from which checkpoint, where, and
        # the ranks that wrote it
        r = g.attrs
        assert r["resumed_from"] == str(ckpt) and r["resumed_level"] == 2
        assert 0 < r["resumed_iteration"] < r["iterations"][-1]
        assert r["resumed_from_ranks"] == 2 and r["ranks"] == 1
        assert (
            f"mpda run on 1 rank(s), resumed from {ckpt} at level 2, iteration "
            f"{r['resumed_iteration']} (a checkpoint of 2 rank(s))"
        ) in r["history"]
    assert np.abs(a - b).max() <= 1e-12 * np.abs(a).max()


def test_resume_from_a_bad_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    proc = mpda(tmp_path, "-o", "o.h5", "--resume", str(bad))
    assert proc.returncode == 2
    assert "bad.h5" in proc.stderr
    assert not (tmp_path / "o.h5").exists()


def test_signal_handlers_are_put_back_after_a_run():
    """A run leaves the handlers as it found them: an ignored SIGTERM (what a finished
    solve sets) outlived the run and passed on to every child of the process, where it
    kept a baseline run from ending (review helper).  A baseline sets SIGTERM's default
    action whatever it inherited."""
    from mpda_dist import checkpoint

    before = {sig: signal.getsignal(sig) for sig in checkpoint.SIGNALS}
    with checkpoint.handlers_kept():
        requests = checkpoint.Requests()
        requests.install()
        requests.uninstall()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        requests.install(can_checkpoint=False)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    assert {sig: signal.getsignal(sig) for sig in checkpoint.SIGNALS} == before


@pytest.mark.parametrize("error", [RuntimeError, TypeError])
def test_a_damaged_checkpoint_is_an_input_error(tmp_path, monkeypatch, error):
    """h5py raises RuntimeError or TypeError on some damage (broken heaps, a garbled
    datatype): that is a bad file too, exit 2 naming it, not a crash (review helper)."""
    from mpda_dist import checkpoint, io

    def damaged(*_args, **_kwargs):
        raise error("damaged")

    monkeypatch.setattr(checkpoint.h5py, "File", damaged)
    with pytest.raises(io.InputError, match="c.h5: cannot read checkpoint"):
        checkpoint.read(str(tmp_path / "c.h5"))


def test_a_signal_ends_a_baseline_run(tmp_path):
    """The baselines cannot checkpoint: SIGUSR1 (Slurm's warning before a time limit)
    lets them run on, and SIGTERM ends them at once with no output.  SIGTERM used to be
    caught for message passing's checkpoint and never looked at, so a cg run went on to
    the end (review helper)."""
    # 160² in float64 to a tolerance under the floor: cg runs for tens of seconds
    cmd = [str(BIN / "mpda"), "run", str(SMALL), "-o", "o.h5"]
    cmd += ["--set", "grid.nx=160", "--set", "grid.ny=160"]
    cmd += ["--set", "solver.method=cg", "--set", "solver.tol=1e-300"]
    cmd += ["--set", "solver.max_iterations=10000000", "--set", "solver.dtype=float64"]
    log = tmp_path / "log.txt"
    with open(log, "w") as fh:
        proc = _start_and_wait_for(cmd, fh, log, "cg on", tmp_path)
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(1.0)
        assert proc.poll() is None, log.read_text()
        os.kill(proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=60)
    assert rc == -signal.SIGTERM, log.read_text()
    assert not (tmp_path / "o.h5").exists()


def test_a_sigterm_before_the_start_ends_a_baseline_run(tmp_path):
    """A SIGTERM that the batch script got during its set-up reaches the ranks as
    ``MPDA_EARLY_SIGNAL``: a baseline ends as the signal itself would end it, with no
    output, instead of running on (review helper)."""
    cmd = [str(BIN / "mpda"), "run", str(SMALL), "-o", "o.h5", "--set", "solver.method=cg"]
    env = dict(os.environ, MPDA_EARLY_SIGNAL="TERM")
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGTERM, proc.stderr[-2000:]
    assert not (tmp_path / "o.h5").exists()


def test_a_signal_after_the_analysis_is_written_leaves_the_exit_status(tmp_path):
    """Once the analysis is written the run is over: a signal while the ranks shut down
    (here SIGUSR1 to mpiexec, which passes it on, after the summary line) turned its
    exit status into the signal's, 10 (15 for SIGTERM; review helper), and a Slurm job
    failed after writing its output.  Both signals are handled alike
    (``checkpoint.SIGNALS``)."""
    cmd = [str(BIN / "mpiexec"), "-n", "2", str(BIN / "mpda"), "run", str(SMALL), *ARGS]
    cmd += ["-o", "late.h5"]
    log = tmp_path / "log.txt"
    with open(log, "w") as fh:
        proc = _start_and_wait_for(cmd, fh, log, "done in", tmp_path)
        proc.send_signal(signal.SIGUSR1)
        rc = proc.wait(timeout=60)
    assert rc == 0, log.read_text()
    assert (tmp_path / "late.h5").exists()


def test_resume_on_another_grid_is_a_clear_error(tmp_path):
    """A checkpoint of a 40 x 40 run (levels 20 and 40) given to a 36 x 36 one: exit 2
    naming the file and the shapes, not a divergence or a traceback."""
    from mpda_dist import checkpoint

    msgs = np.zeros((12, 38, 38))
    state = checkpoint.State(1, 100, msgs, msgs, None, levels=2)
    ckpt = tmp_path / "other.h5"
    checkpoint.write(str(ckpt), state, "")
    proc = mpda(tmp_path, "-o", "o.h5", "--resume", str(ckpt), "--set", "grid.nx=36")
    assert proc.returncode == 2, proc.stderr
    assert f"{ckpt}: level 2 holds messages for 38 x 38 interior nodes" in proc.stderr
    assert "34 x 38" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o.h5").exists()


def test_checkpoint_file_that_cannot_be_written_is_refused_up_front(tmp_path):
    """A signal or the timer would write it hours into the run: checked at the start."""
    proc = mpda(tmp_path, "-o", "o.h5", "--set", "checkpoint.file=nodir/ck.h5")
    assert proc.returncode == 2, proc.stderr
    assert "checkpoint.file: nodir/ck.h5: output directory 'nodir' does not exist" in proc.stderr
    assert "level 1/" not in proc.stderr + proc.stdout  # nothing was solved


def _solve_with_checkpoints(tmp_path, monkeypatch, requests):
    """A small solve whose checkpoints cannot be written (the disk reads as full)."""
    import shutil

    from _problems import problem
    from mpi4py import MPI

    from mpda_dist import io
    from mpda_dist.solver import Settings, solve

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(io.shutil, "disk_usage", lambda _: usage._replace(free=0))
    _, nodes, levels, exact = problem(40, 40, 0.1)
    s = Settings(dtype="float32", tol=1e-5)
    path = str(tmp_path / "ck.h5")
    res = solve(
        MPI.COMM_WORLD, levels, nodes, 0.15, 1.1, s, checkpoint_path=path, requests=requests
    )
    return res, exact


def test_a_checkpoint_that_fails_on_the_timer_does_not_stop_the_solve(
    tmp_path, monkeypatch, caplog
):
    from mpda_dist.checkpoint import Requests
    from mpda_dist.solver import CONVERGED

    res, exact = _solve_with_checkpoints(tmp_path, monkeypatch, Requests(every_seconds=1e-9))
    assert res.status == CONVERGED
    assert "checkpoint: cannot write" in caplog.text and "needs about" in caplog.text
    assert np.sqrt(np.mean((res.anomaly - exact) ** 2)) < 1e-3 * np.sqrt(np.mean(exact**2))
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_that_fails_on_a_signal_is_an_error(tmp_path, monkeypatch):
    """Exit 5 says a checkpoint was written: when it was not, the stop is an error
    naming the file (the driver makes it exit 2)."""

    from mpda_dist.checkpoint import Requests
    from mpda_dist.solver import CheckpointError

    with pytest.raises(CheckpointError, match=r"cannot write .*ck\.h5 .*needs about"):
        _solve_with_checkpoints(tmp_path, monkeypatch, Requests(signal_name="SIGTERM"))
    assert list(tmp_path.iterdir()) == []


def test_a_resume_with_another_check_interval_still_checks(tmp_path):
    """A checkpoint from another rank count (each has its own exchange chunk) or another
    `solver.check_every` need not sit on a multiple of the resumed run's check interval:
    the resumed level then never checked again and ran to max_iterations, deaf to
    signals (review helper: 2 ranks -> 1 with exchange.every 3)."""
    from dataclasses import replace

    from _problems import problem
    from mpi4py import MPI

    from mpda_dist import checkpoint
    from mpda_dist.checkpoint import Requests
    from mpda_dist.solver import CONVERGED, INTERRUPTED, Settings, solve

    _, nodes, levels, exact = problem(40, 40, 0.1)
    path = str(tmp_path / "ck.h5")
    s = Settings(dtype="float32", tol=1e-5, check_every=50)
    stop = Requests(signal_name="SIGUSR1")
    res = solve(MPI.COMM_WORLD, levels, nodes, 0.15, 1.1, s, checkpoint_path=path, requests=stop)
    assert (res.levels[-1].status, res.levels[-1].iterations) == (INTERRUPTED, 50)
    again = replace(s, check_every=40, max_iterations=3000)  # 50 + 40k: never a multiple
    res = solve(MPI.COMM_WORLD, levels, nodes, 0.15, 1.1, again, resume=checkpoint.read(path))
    assert res.status == CONVERGED
    assert res.levels[1].iterations < 1000  # the resumed level (it ran to 3000 before)
    assert np.sqrt(np.mean((res.anomaly - exact) ** 2)) < 1e-3 * np.sqrt(np.mean(exact**2))


def test_resume_with_another_problem_is_a_clear_error(tmp_path):
    """The checkpoint holds its config: another problem (here another observation draw)
    is exit 2 naming the keys, not a false divergence at the first check (exit 3,
    review helper).  A new tolerance or checkpoint file is fine."""
    from mpda_dist import checkpoint
    from mpda_dist.config import dump_config, load_config
    from mpda_dist.driver import _config_changes

    written = load_config(str(SMALL), overrides=[a for a in ARGS if a != "--set"])
    msgs = np.zeros((12, 38, 38))
    ckpt = tmp_path / "ck.h5"
    checkpoint.write(
        str(ckpt), checkpoint.State(1, 100, msgs, msgs, None, levels=2), dump_config(written)
    )
    same = load_config(
        str(SMALL), overrides=[*(a for a in ARGS if a != "--set"), "solver.tol=1e-6"]
    )
    assert _config_changes(dump_config(written), same) == []
    proc = mpda(
        tmp_path, "-o", "o.h5", "--resume", str(ckpt), "--set", "observations.synthetic.seed=7"
    )
    assert proc.returncode == 2, proc.stderr
    assert (
        f"{ckpt}: written for another problem (observations.synthetic.seed differ)" in proc.stderr
    )
    assert not (tmp_path / "o.h5").exists()


def test_resume_after_the_inputs_changed_is_a_clear_error(tmp_path):
    """The checkpoint holds a digest of what the run read from files, the observation
    file's rows and a background file's field: a file rewritten between the runs under
    the same name is exit 2 naming it, not a resume that cannot converge (review
    helper).  The digest follows every value; what the config generates (a synthetic
    draw) it leaves to the config's own comparison."""
    import h5py

    from mpda_dist import checkpoint
    from mpda_dist.config import config_from_dict, dump_config, load_config
    from mpda_dist.driver import _DIGEST_LINE, _inputs_digest, _stored_digest, build_problem

    obs = tmp_path / "obs.h5"

    def digest(value: float) -> str:
        with h5py.File(obs, "w") as f:
            for k, v in {"x": 0.3, "y": 0.6, "value": value, "noise": 0.1}.items():
                f[k] = np.array([v, 0.5])
        cfg = config_from_dict({"grid": {"nx": 12, "ny": 12}, "observations": {"file": str(obs)}})
        return _inputs_digest(cfg, build_problem(cfg))

    assert digest(1.0) == digest(1.0) != digest(np.nextafter(1.0, 2.0))
    text = dump_config(load_config(str(SMALL), overrides=[a for a in ARGS if a != "--set"]))
    assert _stored_digest(text) is None  # (a checkpoint from before: not compared)
    assert _stored_digest(f"{text}{_DIGEST_LINE}{digest(1.0)}\n") == digest(1.0)

    msgs = np.zeros((12, 38, 38))
    ckpt = tmp_path / "ck.h5"
    state = checkpoint.State(1, 100, msgs, msgs, None, levels=2)
    checkpoint.write(str(ckpt), state, f"{text}{_DIGEST_LINE}{'0' * 64}\n")
    proc = mpda(tmp_path, "-o", "o.h5", "--resume", str(ckpt))
    assert proc.returncode == 2, proc.stderr
    assert (
        f"{ckpt}: written for another problem (the observations' or the background's "
        "contents differ)" in proc.stderr
    )
    assert not (tmp_path / "o.h5").exists()


def test_resume_at_another_depth_says_which_min_size_would_match(tmp_path):
    """A checkpoint from a run whose blocks stopped the levels sooner (here 1 level;
    this run has 2) is refused, and the message gives the min_size that stops this run
    at that depth too (review helper: a 3-rank checkpoint could not be resumed on 1 or
    2 ranks, and the message did not say how)."""
    from mpda_dist import checkpoint
    from mpda_dist.multigrid import schedule

    msgs = np.zeros((12, 38, 38))
    ckpt = tmp_path / "shallow.h5"
    checkpoint.write(str(ckpt), checkpoint.State(0, 100, msgs, msgs, None, levels=1), "")
    proc = mpda(tmp_path, "-o", "o.h5", "--resume", str(ckpt))
    assert proc.returncode == 2, proc.stderr
    assert f"{ckpt}: the checkpoint was written with 1 multigrid levels but this run has 2" in (
        proc.stderr
    )
    assert "stop this run's levels there too: --set solver.multigrid.min_size=40" in proc.stderr
    assert len(schedule(40, 40, 1.0, 1.0, 40)) == 1 and len(schedule(40, 40, 1.0, 1.0, 20)) == 2
    assert not (tmp_path / "o.h5").exists()


def test_level_summaries_from_another_version_still_resume():
    """Format 3 added the levels' ``stopped_by``: format 2 checkpoints are still read,
    and a summary key this version does not know is dropped, not a TypeError."""
    from dataclasses import asdict

    from mpda_dist import checkpoint
    from mpda_dist.solver import LevelResult, _tuples

    level = LevelResult((5, 7), 1, (1, 1), "converged", 30, 1e-6, stopped_by="residual")
    summary = asdict(level) | {"from_a_later_version": 1}
    summary["shape"] = list(summary["shape"])  # as JSON gives it back
    back = LevelResult(**_tuples(summary))
    assert (back.shape, back.iterations, back.residual) == ((5, 7), 30, 1e-6)
    assert back.stopped_by == "residual"
    assert "mpda_dist checkpoint 2" in checkpoint.READABLE


def test_the_anderson_state_survives_a_checkpoint(tmp_path):
    """Write and read back: the history's count, last residual, the residual of a pending
    mix and the failed mixes (a resumed level stops mixing as the uninterrupted one);
    a checkpoint without them reads as none pending, none failed."""
    from mpda_dist import checkpoint

    msgs = np.zeros((12, 6, 6))
    hist = (np.ones((3, 6, 6)), np.full((3, 6, 6), 2.0))
    state = checkpoint.State(
        1, 100, msgs, msgs, None, levels=2, history=hist, history_count=2,
        history_last=0.25, history_mixed_at=0.5, history_failed=1,
    )  # fmt: skip
    path = str(tmp_path / "c.h5")
    checkpoint.write(path, state, "")
    back = checkpoint.read(path)
    assert (back.history_count, back.history_last) == (2, 0.25)
    assert (back.history_mixed_at, back.history_failed) == (0.5, 1)
    np.testing.assert_array_equal(back.history[1], hist[1])
    with h5py.File(path, "a") as f:
        del f.attrs["history_mixed_at"], f.attrs["history_failed"]
    back = checkpoint.read(path)
    assert (back.history_mixed_at, back.history_failed) == (math.inf, 0)


def test_a_resumed_level_continues_its_failed_mixes(tmp_path, monkeypatch):
    """The resumed level's Anderson history gets the checkpoint's failed mixes and
    pending mix (review helper: dropping them passed every test), so it stops mixing
    where the uninterrupted level would."""
    from dataclasses import replace

    from _problems import problem
    from mpi4py import MPI

    from mpda_dist import anderson, checkpoint
    from mpda_dist.checkpoint import Requests
    from mpda_dist.solver import INTERRUPTED, Settings, solve

    _, nodes, levels, _ = problem(40, 40, 0.1)
    path = str(tmp_path / "ck.h5")
    s = Settings(dtype="float32", tol=1e-5, check_every=50)
    stop = Requests(signal_name="SIGUSR1")
    res = solve(MPI.COMM_WORLD, levels, nodes, 0.15, 1.1, s, checkpoint_path=path, requests=stop)
    assert res.levels[-1].status == INTERRUPTED
    state = replace(checkpoint.read(path), history_mixed_at=0.25, history_failed=1)
    restored = []
    real = anderson.Extrapolation.restore

    def spy(self, *args):
        real(self, *args)
        restored.append((self.mixed_at, self.failed))

    monkeypatch.setattr(anderson.Extrapolation, "restore", spy)
    solve(MPI.COMM_WORLD, levels, nodes, 0.15, 1.1, replace(s, max_iterations=100), resume=state)
    assert restored == [(0.25, 1)]
