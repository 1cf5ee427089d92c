"""The launch scripts without GPUs, MPI or Slurm: ``launch/bind_gpu.sh`` with the
variables a launcher would set, ``launch/mpirun.sh --dry-run``, the Slurm batch scripts
run directly with bash against a fake venv (a fake ``mpda``/``mpiexec``/``python``),
and ``benchmarks/scaling.py``'s CSV with a fake launch.  Each test takes well under a
second or two; tests/test_slurm.py runs the batch script under a real Slurm.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIND = ROOT / "launch" / "bind_gpu.sh"
MPIRUN = ROOT / "launch" / "mpirun.sh"
ASSIMILATE = ROOT / "launch" / "slurm" / "assimilate.sbatch"
SCALING_SBATCH = ROOT / "launch" / "slurm" / "scaling.sbatch"
VENV = Path(sys.executable).parent.parent
SHOW = 'echo "[$CUDA_VISIBLE_DEVICES] $XLA_PYTHON_CLIENT_MEM_FRACTION"'
# Launcher, Slurm and GPU variables of the environment pytest runs in: never passed on.
_OURS = re.compile(
    r"^(SLURM_|MPI_LOCAL|OMPI_|PALS_|MV2_|PMI_|CUDA_|XLA_|MPDA_|CONFIG$|OUTPUT$|LAUNCHER$)"
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _OURS.match(k)}
    env.update(extra)
    return env


def bind(want: str, *cmd: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(BIND), want, *cmd],
        capture_output=True,
        text=True,
        timeout=20,
        env=clean_env(**env),
    )


def bind_all(want: str, ranks: int, **env: str) -> list[str]:
    """What each of ``ranks`` MPICH local ranks gets: "[GPU] FRACTION"."""
    out = []
    for r in range(ranks):
        p = bind(want, "sh", "-c", SHOW, MPI_LOCALRANKID=str(r), MPI_LOCALNRANKS=str(ranks), **env)
        assert p.returncode == 0, p.stderr
        out.append(p.stdout.strip())
    return out


# ---------------------------------------------------------------------------- bind_gpu.sh


def test_bind_fewer_gpus_than_allocated_shares_by_the_gpus_used():
    # 4 ranks on 2 of the 4 allocated GPUs: two ranks per GPU, 0.45 each (was 0.9).
    got = bind_all("2", 4, CUDA_VISIBLE_DEVICES="0,1,2,3", SLURM_GPUS_ON_NODE="4")
    assert got == ["[0] 0.450", "[1] 0.450", "[0] 0.450", "[1] 0.450"]


def test_bind_slurm_narrowed_per_task_still_counts_the_node_gpus():
    # --gpus-per-task=1: each task sees one GPU; 8 ranks over 4 GPUs, 2 per GPU
    got = bind(
        "auto",
        "sh",
        "-c",
        SHOW,
        SLURM_LOCALID="1",
        SLURM_TASKS_PER_NODE="8",
        SLURM_NODEID="0",
        SLURM_GPUS_ON_NODE="4",
        CUDA_VISIBLE_DEVICES="3",
    )
    assert got.returncode == 0, got.stderr
    assert got.stdout.split() == ["[3]", "0.450"]


def test_bind_visible_devices_with_spaces():
    got = bind_all("auto", 3, CUDA_VISIBLE_DEVICES="4, 5")
    assert got == ["[4] 0.450", "[5] 0.900", "[4] 0.450"]


@pytest.mark.parametrize(
    "rank_vars",
    [
        {"PALS_LOCAL_RANKID": "3", "PALS_LOCAL_SIZE": "4"},
        {"MV2_COMM_WORLD_LOCAL_RANK": "3", "MV2_COMM_WORLD_LOCAL_SIZE": "4"},
    ],
)
def test_bind_cray_pals_and_mvapich_local_rank(rank_vars):
    got = bind("2", "sh", "-c", SHOW, **rank_vars)
    assert got.returncode == 0, got.stderr
    assert got.stdout.split() == ["[1]", "0.450"]


@pytest.mark.parametrize("launched", [False, True])
def test_bind_bad_gpu_count_is_an_error(launched):
    env = {"MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1"} if launched else {}
    got = bind("bogus", "echo", "ran", **env)
    assert got.returncode == 2
    assert "'bogus'" in got.stderr
    assert "ran" not in got.stdout


# ------------------------------------------------------------------------------ mpirun.sh


def mpirun_dry(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(MPIRUN), *args, "--dry-run"],
        capture_output=True,
        text=True,
        timeout=20,
        cwd=tmp_path,
        env=clean_env(MPDA_VENV=str(VENV), **env),
    )


def printed_command(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("+ ")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_mpirun_launcher_with_arguments_and_srun_binding(tmp_path):
    got = mpirun_dry(
        tmp_path, "-n", "2", "-t", "2", "--bind", "core", MPDA_MPIEXEC="srun  --mpi=pmi2"
    )
    assert got.returncode == 0, got.stderr
    line = printed_command(got.stderr)
    assert line.startswith("+ srun --mpi=pmi2 -n 2 --cpus-per-task=2 --cpu-bind=cores "), line
    assert "-bind-to" not in line


def test_mpirun_srun_bind_none_and_a_hydra_launcher_with_arguments(tmp_path):
    got = mpirun_dry(tmp_path, "-n", "2", "--bind", "none", MPDA_MPIEXEC="srun --mpi=pmi2")
    assert got.returncode == 0, got.stderr
    assert " --cpu-bind=none " in printed_command(got.stderr)
    mpiexec = VENV / "bin" / "mpiexec"
    got = mpirun_dry(tmp_path, "-n", "2", "--bind", "core", MPDA_MPIEXEC=f"{mpiexec} -v")
    assert got.returncode == 0, got.stderr
    assert printed_command(got.stderr).startswith(f"+ {mpiexec} -v -n 2 -bind-to core ")


def test_mpirun_launcher_path_with_a_blank_is_one_word(tmp_path):
    """A launcher given by a path that holds a blank is not split (review helper)."""
    launcher = tmp_path / "my mpi" / "mpiexec"
    launcher.parent.mkdir()
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    got = mpirun_dry(tmp_path, "-n", "2", MPDA_MPIEXEC=str(launcher))
    assert got.returncode == 0, got.stderr
    assert printed_command(got.stderr).startswith("+ " + str(launcher).replace(" ", "\\ "))


def test_mpirun_blank_launcher_is_an_error(tmp_path):
    got = mpirun_dry(tmp_path, "-n", "2", MPDA_MPIEXEC="   ")
    assert got.returncode == 2
    assert "MPDA_MPIEXEC" in got.stderr


# Arrays that may be empty must be expanded as ${a[@]+"${a[@]}"}: bash < 4.4 (RHEL 7)
# calls an empty "${a[@]}" unbound under set -u.  Listed: the arrays that are never
# empty where they are expanded (or only after a length check).
_NEVER_EMPTY = {
    "mpirun.sh": {"cmd", "mpiexec", "rank_env"},
    "bind_gpu.sh": {"gpus"},
    "assimilate.sbatch": {"cmd", "rank_cmd", "bind", "mpda_args", "jemalloc_env", "args"},
    "scaling.sbatch": {"cmd"},
}


@pytest.mark.parametrize("script", sorted(_NEVER_EMPTY))
def test_scripts_expand_possibly_empty_arrays_safely(script):
    path = next((ROOT / "launch").rglob(script))
    text = path.read_text()
    bare = set(re.findall(r'(?<!\+)"\$\{(\w+)\[@\]\}"', text))
    assert bare <= _NEVER_EMPTY[script], f"{path}: unguarded {sorted(bare - _NEVER_EMPTY[script])}"


# -------------------------------------------------------------- the batch scripts, no Slurm


def fake_venv(tmp_path: Path, mpda_body: str) -> Path:
    """A venv whose ``mpda`` runs ``mpda_body`` (bash; its arguments are saved to
    mpda.args), whose ``mpiexec`` drops its own options and runs the rank command, and
    whose ``python`` is the real one."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    scripts = {
        "mpda": f'#!/bin/bash\nprintf "%s\\n" "$@" > "{tmp_path}/mpda.args"\n{mpda_body}\n',
        # -n N, then -bind-to X
        "mpiexec": '#!/bin/bash\nshift 4\nexec "$@"\n',
        "python": f'#!/bin/sh\nexec "{sys.executable}" "$@"\n',
    }
    for name, text in scripts.items():
        (venv / "bin" / name).write_text(text)
        (venv / "bin" / name).chmod(0o755)
    return venv


def assimilate_env(tmp_path: Path, venv: Path, **env: str) -> dict[str, str]:
    base = {
        "MPDA_VENV": str(venv),
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_JOB_ID": "777",
        "SLURM_NTASKS": "1",
        "CONFIG": "",
    }
    return clean_env(**(base | env))


def run_assimilate(tmp_path, *args, mpda_body="exit 0", **env) -> subprocess.CompletedProcess:
    venv = fake_venv(tmp_path, mpda_body)
    return subprocess.run(
        ["bash", str(ASSIMILATE), *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env=assimilate_env(tmp_path, venv, **env),
    )


def usr1_when(script: Path, env: dict[str, str], marker: Path, then: Path | None = None):
    """Run the batch ``script`` with bash, send it SIGUSR1 once ``marker`` exists (then
    create ``then``, if given), and return ``(process, stdout, stderr)`` at its end."""
    proc = subprocess.Popen(
        ["bash", str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=marker.parent,
        env=env,
    )
    try:
        deadline = time.monotonic() + 20
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, f"no {marker.name}"
            time.sleep(0.02)
        proc.send_signal(signal.SIGUSR1)
        if then is not None:
            then.touch()
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    return proc, out, err


def mpda_args(tmp_path: Path) -> list[str]:
    return (tmp_path / "mpda.args").read_text().splitlines()


def test_assimilate_reports_the_exit_code_when_a_signal_comes_as_mpda_ends(tmp_path):
    # mpda (here: the fake) ends while the script's USR1 trap runs: wait has returned
    # 128 + 10 for the signal, and the job must still exit with mpda's own code.
    got = run_assimilate(tmp_path, mpda_body="sleep 0.3\nkill -USR1 $PPID\nexit 3")
    assert "SIGUSR1" in got.stderr, got.stderr
    assert got.returncode == 3, got.stdout + got.stderr


@pytest.mark.parametrize(("forward", "passed"), [("USR1", "USR1"), ("none", "-")])
def test_assimilate_a_warning_during_its_set_up_reaches_mpda_as_it_starts(
    tmp_path, forward, passed
):
    """Slurm's SIGUSR1 while the script still sets up (here: while it reads the config's
    checkpoint with the venv's python, which waits for the test) ended bash there, with
    an empty job log (a CI run of tests/test_slurm.py under load).  Now it is recorded
    and mpda gets it as its ranks start (``MPDA_EARLY_SIGNAL``), unless
    ``MPDA_FORWARD_SIGNAL=none``."""
    venv = fake_venv(tmp_path, f'echo "${{MPDA_EARLY_SIGNAL:--}}" > "{tmp_path}/early"\nexit 5')
    (venv / "bin" / "python").write_text(
        f': > "{tmp_path}/in-set-up"\n'
        f'while [ ! -e "{tmp_path}/go" ]; do sleep 0.05; done\n'
        f'exec "{sys.executable}" "$@"\n'
    )
    env = assimilate_env(tmp_path, venv, MPDA_FORWARD_SIGNAL=forward)
    proc, out, err = usr1_when(ASSIMILATE, env, tmp_path / "in-set-up", tmp_path / "go")
    assert proc.returncode == 5, out + err  # mpda's (the fake's) code: the script ran on
    assert "SIGUSR1" in err and "time limit is near" in err, err
    assert ("forwarding SIGUSR1 to the ranks as they start" in err) == (forward != "none"), err
    assert (tmp_path / "early").read_text().strip() == passed


def test_assimilate_a_warning_just_before_the_launch_is_passed_on(tmp_path):
    """A SIGUSR1 after the script's last look at its early warning and before it knows
    mpda's pid (a window of microseconds, widened here by a pause in a copy of the
    script) found nobody to pass it to and was lost (review helper); it is passed on at
    the first poll, as one that comes then."""
    launch = '"${cmd[@]}" &\n'
    text = ASSIMILATE.read_text()
    assert text.count(launch) == 1
    script = tmp_path / "assimilate.sbatch"
    script.write_text(text.replace(launch, f': > "{tmp_path}/window"; sleep 1\n{launch}'))
    body = (
        f"trap 'echo got >> \"{tmp_path}/sig\"' USR1\n"
        "for i in $(seq 30); do sleep 0.1; done\n"
        f'[ -e "{tmp_path}/sig" ] && exit 5 || exit 0'
    )
    venv = fake_venv(tmp_path, body)
    proc, out, err = usr1_when(script, assimilate_env(tmp_path, venv), tmp_path / "window")
    assert "forwarding SIGUSR1 to the ranks" in err, err
    assert proc.returncode == 5, out + err  # the fake mpda got it


def test_scaling_sbatch_reports_the_exit_code_when_a_signal_comes_as_it_ends(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("#!/bin/bash\nsleep 0.3\nkill -USR1 $PPID\nexit 3\n")
    (venv / "bin" / "python").chmod(0o755)
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "scaling.py").write_text("")
    got = subprocess.run(
        ["bash", str(SCALING_SBATCH)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        env=clean_env(MPDA_VENV=str(venv), SLURM_SUBMIT_DIR=str(tmp_path), SLURM_NTASKS="1"),
    )
    assert "SIGUSR1" in got.stderr, got.stderr
    assert got.returncode == 3, got.stdout + got.stderr


def test_assimilate_bad_forward_signal_is_an_error_at_start(tmp_path):
    got = run_assimilate(tmp_path, MPDA_FORWARD_SIGNAL="USR9")
    assert got.returncode == 2
    assert "MPDA_FORWARD_SIGNAL=USR9" in got.stderr
    assert not (tmp_path / "mpda.args").exists()  # mpda never started
    assert run_assimilate(tmp_path, MPDA_FORWARD_SIGNAL="SIGTERM").returncode == 0


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--set", "grid.nx=40"], {}, "checkpoint.file=mpda-777.ckpt.h5"),  # per job
        (["--set", "checkpoint.file=mine.h5"], {}, None),  # the user's, among the arguments
        (["--set=checkpoint.file=mine.h5"], {}, None),
        ([], {"MPDA_CHECKPOINT": "env.h5"}, "checkpoint.file=env.h5"),
        ([], {"CONFIG": "job.yaml"}, None),  # the config's
        (["job.yaml"], {}, None),  # the config's, given as an argument (review helper)
        ([], {"CONFIG": "default.yaml"}, None),  # named, though it is the default's name
        (["--set", "checkpoint.file=checkpoint.h5"], {}, None),  # likewise
        # the script's default config, the demo, names none (it did: jobs shared one)
        ([], {"CONFIG": str(ROOT / "configs" / "demo.yaml")}, "checkpoint.file=mpda-777.ckpt.h5"),
    ],
)
def test_assimilate_checkpoint_is_per_job_unless_chosen(tmp_path, args, env, expected):
    (tmp_path / "job.yaml").write_text("checkpoint:\n  file: cfg.h5\n")
    (tmp_path / "default.yaml").write_text("checkpoint:\n  file: checkpoint.h5\n")
    got = run_assimilate(tmp_path, *args, **env)
    assert got.returncode == 0, got.stderr
    ours = [a for a in mpda_args(tmp_path) if a.startswith("checkpoint.file=")]
    ours = [a for a in ours if a not in args]
    assert ours == ([expected] if expected else [])
    assert "--resume" not in mpda_args(tmp_path)


@pytest.mark.parametrize(
    ("restart", "checkpoint", "args", "env", "resumes"),
    [
        ("1", True, [], {}, "mpda-777.ckpt.h5"),  # requeued: continue
        ("1", False, [], {}, None),  # requeued before any checkpoint: a fresh start
        ("0", True, [], {}, None),  # the first run of the job
        ("1", True, [], {"MPDA_AUTO_RESUME": "0"}, None),
        ("1", True, ["--resume", "first.h5"], {}, "mpda-777.ckpt.h5"),  # last one wins
        ("1", False, ["--resume", "first.h5"], {}, "first.h5"),
    ],
)
def test_assimilate_requeued_job_resumes_from_its_checkpoint(
    tmp_path, restart, checkpoint, args, env, resumes
):
    if checkpoint:
        (tmp_path / "mpda-777.ckpt.h5").write_bytes(b"")
    got = run_assimilate(tmp_path, *args, SLURM_RESTART_COUNT=restart, **env)
    assert got.returncode == 0, got.stderr
    got_args = mpda_args(tmp_path)
    if resumes is None:
        assert "--resume" not in got_args
    else:  # argparse: the last --resume counts
        last = len(got_args) - 1 - got_args[::-1].index("--resume")
        assert got_args[last + 1] == resumes


# ------------------------------------------------------------------ benchmarks/scaling.py


def load_scaling():
    spec = importlib.util.spec_from_file_location(
        "scaling_under_test", ROOT / "benchmarks" / "scaling.py"
    )
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    return scaling


def test_scaling_writes_the_csv_after_every_point(tmp_path, monkeypatch):
    scaling = load_scaling()
    calls = []

    def launch(args, kind, p, cores, tmp):
        calls.append(p)
        if len(calls) == 2:  # the time limit, in the middle of the second point
            raise KeyboardInterrupt
        return {"ranks": p, "kind": kind, "error": "fake point"}

    monkeypatch.setattr(scaling, "launch", launch)
    csv = tmp_path / "out" / "s.csv"
    argv = ["--max-ranks", "2", "--kinds", "strong", "--wait-quiet", "0", "--csv", str(csv)]
    with pytest.raises(KeyboardInterrupt):
        scaling.main(argv)
    assert "partial: 1 of 2 points" in csv.read_text()
    side = json.loads(csv.with_suffix(".csv.json").read_text())
    assert [p["ranks"] for p in side["meta"]["points"]] == [1]
    assert sorted(f.name for f in csv.parent.iterdir()) == ["s.csv", "s.csv.json"]


def test_scaling_launcher_with_arguments(tmp_path, monkeypatch):
    scaling = load_scaling()
    seen = []

    def run(cmd, **kwargs):
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "")

    monkeypatch.setattr(scaling.subprocess, "run", run)
    args = SimpleNamespace(
        mpiexec="srun --mpi=pmi2",
        no_bind=False,
        global_size=64,
        block=32,
        iterations=1,
        check_every=1,
        warmup=0,
        fraction=0.05,
        dtype="float32",
        modes=["sync"],
        timeout=10,
    )
    assert "error" in scaling.launch(args, "strong", 2, 4, tmp_path)
    assert seen[0][:5] == ["srun", "--mpi=pmi2", "-n", "2", "--cpu-bind=cores"]


def test_assimilate_requeue_takes_only_a_checkpoint_of_this_job(tmp_path):
    """A checkpoint older than the job's first run (an earlier job's, under a name the
    user chose) is not resumed from on a requeue; the job's own, written after that
    first run began, is (review helper).  A job that ends with 0 removes its marker."""
    named = ["--set", "checkpoint.file=mine.h5"]
    (tmp_path / "mine.h5").write_bytes(b"")  # an earlier job's
    old = time.time() - 60
    os.utime(tmp_path / "mine.h5", (old, old))
    first = run_assimilate(tmp_path, *named, mpda_body="exit 5")  # checkpointed, requeued
    assert first.returncode == 5
    marker = tmp_path / ".mpda-777.started"
    assert marker.exists()
    got = run_assimilate(tmp_path, *named, SLURM_RESTART_COUNT="1")
    assert got.returncode == 0 and "--resume" not in mpda_args(tmp_path)
    assert not marker.exists()  # done
    marker.write_bytes(b"")
    os.utime(marker, (old - 60, old - 60))  # the job began before mine.h5 was written
    got = run_assimilate(tmp_path, *named, SLURM_RESTART_COUNT="1")
    assert mpda_args(tmp_path)[-2:] == ["--resume", "mine.h5"]


# --------------------------------------------------------------- benchmarks/gpu_bench.py


def test_gpu_bench_summarises_the_alternated_settings(monkeypatch):
    """``gpu.sh``'s alternated stages label each run ``<setting> rN``; the report gives
    each setting's mean, min and max, in order of appearance, and leaves the rest out."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "gpu_bench_under_test", ROOT / "benchmarks" / "gpu_bench.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [
        ("solve", "1024 5% X=0 r1", "first_wall", "4.0", "s"),
        ("solve", "1024 5% X=0 r1", "warm_wall", "0.3", "s"),
        ("solve", "1024 5% X=default r1", "first_wall", "6.0", "s"),
        ("solve", "1024 5% X=0 r2", "first_wall", "5.0", "s"),
        ("solve", "1024 5% X=0 r2", "warm_wall", "", "s"),  # not measured: left out
        ("solve", "1024 10%", "first_wall", "9.0", "s"),  # not alternated
        ("big", "4096 5% r1", "first_wall", "9.0", "s"),
    ]
    text = bench.alternated(rows)
    lines = [ln for ln in text.splitlines() if ln.startswith("| 1024")]
    assert lines == [
        "| 1024 5% X=0 | 2 | 4.50 (4.00–5.00) | – | – | 0.30 (0.30–0.30) |",
        "| 1024 5% X=default | 1 | 6.00 (6.00–6.00) | – | – | – |",
    ]
    assert bench.alternated(rows[5:]) == ""
