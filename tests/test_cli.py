"""The ``mpda`` command end to end: outputs, and bad input that writes nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

MPDA = Path(sys.executable).with_name("mpda")
DEMO = Path(__file__).parents[1] / "configs" / "demo.yaml"
MPIEXEC = Path(sys.executable).with_name("mpiexec")
SMALL = ["--set", "grid.nx=40", "--set", "grid.ny=40", "--set", "solver.multigrid.min_size=20"]


def mpda(*args: str, cwd: Path | None = None, ranks: int = 1, timeout: float = 240):
    cmd = [str(MPDA), *args]
    if ranks > 1:
        cmd = [str(MPIEXEC), "-n", str(ranks), *cmd]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=dict(os.environ)
    )


def write_obs(path: Path, **cols) -> Path:
    base = {
        "x": [0.25, 0.5, 0.75],
        "y": [0.5, 0.5, 0.25],
        "value": [0.1, -0.2, 0.3],
        "noise": [1e-3, 1e-3, 1e-3],
    }
    base.update(cols)
    with h5py.File(path, "w") as f:
        for k, v in base.items():
            if v is not None:
                f[k] = np.asarray(v, dtype=float)
    return path


def test_run_writes_the_documented_layout(tmp_path):
    out = tmp_path / "a.h5"
    proc = mpda(
        "run", "-o", str(out), *SMALL, "--set", "observations.synthetic.fraction=0.2", ranks=2
    )
    assert proc.returncode == 0, proc.stderr
    with h5py.File(out) as f:
        mean, truth, bg = f["analysis/mean"][:], f["truth"][:], f["background"][:]
        assert mean.shape == (40, 40) and f["grid/x"].shape == (40,)
        assert np.all(mean[0] == bg[0])  # the boundary holds the background
        for k in ("x", "y", "value", "noise"):
            assert f[f"observations/{k}"].shape == f["observations/x"].shape
        assert f.attrs["ranks"] == 2 and f.attrs["status"] == "converged"
        assert "grid:" in f.attrs["config"] and len(f.attrs["iterations"]) >= 1
        rmse = np.sqrt(np.mean((mean - truth) ** 2))
        assert rmse < 0.5 * np.sqrt(np.mean((bg - truth) ** 2))
    assert "RMSE vs truth" in proc.stderr
    # the start-up table: each rank with the cores it may use (the launcher's binding)
    cores = len(os.sched_getaffinity(0))
    for r in (0, 1):
        assert re.search(rf"rank +{r} +\S+ +cpu:0 +{cores} core\(s\)", proc.stderr), proc.stderr
    assert "usable core(s) each" not in proc.stderr  # the warning is for GPU ranks only
    assert not list(tmp_path.glob(".*tmp*"))
    check_diagnostics_and_cf(out)
    check_provenance(out)


def check_provenance(out: Path) -> None:
    """What the file says about how it was made (review helper): the effective config
    (the tolerance in force, the file written), a digest of the inputs, the stopping
    rule that ended the run, the versions and the commit, and the levels as strict JSON
    (null, not NaN) with the coarsest level's true residual."""
    import json

    import yaml

    from mpda_dist import __version__
    from mpda_dist.config import DEFAULT_TOL

    with h5py.File(out) as f:
        a = dict(f.attrs)
    cfg = yaml.safe_load(a["config"])
    assert cfg["solver"]["tol"] == a["tol"] == DEFAULT_TOL["float32"]
    assert cfg["output"]["file"] == str(out)
    assert re.fullmatch(r"[0-9a-f]{64}", a["inputs_sha256"])
    assert a["stopping"] == "residual" and a["residual"][-1] < a["tol"]

    def no_constant(name: str) -> None:
        raise AssertionError(f"bare {name} in the levels attribute")

    levels = json.loads(a["levels"], parse_constant=no_constant)
    assert levels[-1]["stopped_by"] == "residual"
    coarse = levels[0]
    assert coarse["delta"] is None  # NaN: the direct solve has no δ
    assert coarse["solver"] == "exact" and coarse["stopped_by"] == "direct"
    assert 0.0 < coarse["residual"] < 1e-4 and a["residual"][0] == coarse["residual"]
    assert a["version"] == __version__
    for name in ("jax", "jaxlib", "numpy", "scipy", "h5py", "mpi4py"):
        assert a[f"version_{name}"]
    assert a["mpi_library"] and a["jax_backend"] == "cpu" and a["jax_device_kind"]
    # the flags the run compiled with: the tests' own (tests/conftest.py), and any
    # that the rank added (runtime.configure_jax_env)
    assert set(os.environ["XLA_FLAGS"].split()) <= set(a["xla_flags"].split())
    head = subprocess.run(
        ["git", "-C", str(Path(__file__).parents[1]), "rev-parse", "HEAD"],
        capture_output=True,
        text=True,
    )
    if head.returncode == 0:  # a git checkout (an exported tree has no commit)
        assert a["git_commit"] == head.stdout.strip()
    assert "resumed_from" not in a and "resumed" not in a["history"]


def check_diagnostics_and_cf(out: Path) -> None:
    """Observation diagnostics, QC attributes, and the netCDF/CF view through xarray."""
    xr = pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    with h5py.File(out) as f:
        mean, bg = f["analysis/mean"][:], f["background"][:]
        np.testing.assert_allclose(f["analysis/increment"][:], mean - bg)
        o = {k: f[f"observations/{k}"][()] for k in f["observations"]}
        n = len(o["x"])
        assert f.attrs["qc_read"] == n and f.attrs["qc_count_ok"] == f.attrs["qc_used"]
        assert f.attrs["qc_flag_meanings"].split()[0] == "ok"
        for key in ("omb_rmse", "omb_bias", "oma_rmse", "oma_bias", "jo_over_n"):
            assert np.isfinite(f.attrs[key])
        assert 0.5 < f.attrs["desroziers_ratio"] < 2.0  # synthetic data: the model is right
        assert f.attrs["oma_rmse"] < f.attrs["omb_rmse"]
    ok = o["flag"] == 0
    np.testing.assert_array_equal(o["used"], ok)
    ix = np.rint(o["x"][ok] * (mean.shape[1] - 1)).astype(int)
    iy = np.rint(o["y"][ok] * (mean.shape[0] - 1)).astype(int)
    np.testing.assert_array_equal(o["hmu"][ok], mean[iy, ix])
    np.testing.assert_array_equal(o["hfb"][ok], bg[iy, ix])
    with xr.open_dataset(out, engine="h5netcdf") as root:
        assert root["background"].dims == ("y", "x")
        assert root.attrs["Conventions"].startswith("CF-")
        assert root.attrs["qc_used"] == ok.sum()
    with xr.open_dataset(out, engine="h5netcdf", group="analysis") as ana:
        assert ana["mean"].dims == ("y", "x") and ana["increment"].dims == ("y", "x")
        for c in ("x", "y"):
            assert ana[c].attrs["units"] and ana[c].attrs["long_name"]
            assert ana[c].attrs["axis"] == c.upper()
        np.testing.assert_array_equal(ana["x"], np.linspace(0, 1, mean.shape[1]))
        np.testing.assert_array_equal(ana["mean"].sel(x=ana["x"][3], y=ana["y"][5]), mean[5, 3])
    with xr.open_dataset(out, engine="h5netcdf", group="observations") as ob:
        assert set(ob.coords) >= {"obs", "x", "y"}
        assert ob["flag"].attrs["flag_meanings"].split()[1] == "coordinate_not_finite"
        assert list(ob["flag"].attrs["flag_values"]) == list(range(9))


def test_simulate_then_run_consumes_the_file(tmp_path):
    prob = tmp_path / "problem.h5"
    assert mpda("simulate", str(DEMO), "-o", str(prob), *SMALL).returncode == 0
    out = tmp_path / "b.h5"
    proc = mpda("run", "-o", str(out), *SMALL, "--set", f"observations.file={prob}")
    assert proc.returncode == 0, proc.stderr
    with h5py.File(out) as f, h5py.File(prob) as p:
        np.testing.assert_array_equal(f["truth"][:], p["truth"][:])


def test_simulate_writes_the_drawn_noise_and_a_truth_on_another_grid_is_dropped(tmp_path):
    """observations.noise is an assumed error for the solve: the problem file keeps the
    noise the values were drawn with.  Solved on another grid, its truth is not used
    (it gave a meaningless RMSE)."""
    prob = tmp_path / "problem.h5"
    sim = ["--set", "observations.noise=0.5", "--set", "observations.synthetic.noise=0.01"]
    assert mpda("simulate", str(DEMO), "-o", str(prob), *SMALL, *sim).returncode == 0
    with h5py.File(prob) as p:
        np.testing.assert_array_equal(p["noise"][:], 0.01)
    proc = mpda(
        "run",
        *SMALL,
        "--set",
        "grid.extent=[2.0,1.0]",
        "--set",
        f"observations.file={prob}",
        "--set",
        "solver.method=exact",
        "-o",
        str(tmp_path / "a.h5"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "/grid/x has 40 points [0, 1]; the run's grid has 40 [0, 2]" in proc.stderr
    assert "no RMSE against the file's truth" in proc.stderr
    with h5py.File(tmp_path / "a.h5") as f:
        assert "truth" not in f


def test_exact_method_matches_mp(tmp_path):
    outs = {}
    for method in ("exact", "mp"):
        outs[method] = tmp_path / f"{method}.h5"
        proc = mpda(
            "run",
            "-o",
            str(outs[method]),
            *SMALL,
            "--set",
            f"solver.method={method}",
            "--set",
            "solver.dtype=float64",
            "--set",
            "solver.tol=1e-12",
        )
        assert proc.returncode == 0, proc.stderr
    with h5py.File(outs["exact"]) as e, h5py.File(outs["mp"]) as m:
        a, b = e["analysis/mean"][:], m["analysis/mean"][:]
        assert np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(a**2)) < 1e-8


@pytest.mark.parametrize(
    "setting,needle",
    [
        ("solver.dampin=0.5", "solver.dampin"),
        ("solver.dtype=float16", "float16"),
        ("grid.nx=true", "grid.nx"),
    ],
)
def test_bad_config_is_named_and_writes_nothing(tmp_path, setting, needle):
    out = tmp_path / "o.h5"
    proc = mpda("run", "-o", str(out), "--set", setting)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "cols,needle",
    [
        ({"value": None}, "value"),
        ({"value": [0.1, np.nan, 0.3]}, "value[1]"),
        ({"x": [0.25, 1.5, 0.75]}, "row 1"),
        ({"noise": [1e-3, 0.0, 1e-3]}, "noise[1]"),
    ],
)
def test_bad_observation_file_is_named_and_writes_nothing(tmp_path, cols, needle):
    obs = write_obs(tmp_path / "obs.h5", **cols)
    out = tmp_path / "o.h5"
    proc = mpda(
        "run",
        "-o",
        str(out),
        *SMALL,
        "--set",
        f"observations.file={obs}",
        "--set",
        "qc.on_error=fail",  # the default, flag, flags such rows and goes on (test_qc_cli)
        ranks=2,
    )
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "obs.h5" in proc.stderr
    assert not out.exists()


def test_divergence_is_an_error_and_writes_nothing(tmp_path):
    out = tmp_path / "o.h5"
    proc = mpda(
        "run",
        "-o",
        str(out),
        *SMALL,
        "--set",
        "solver.c=1.0",
        "--set",
        "solver.damping=1.0",
        "--set",
        "solver.momentum=0.0",
    )
    assert proc.returncode == 3, proc.stderr
    assert "diverged" in proc.stderr
    assert not out.exists()


def test_bilinear_divergence_names_the_cause(tmp_path):
    """One bilinear row of noise 0.01 inside a cell: message passing with c = 10
    diverges (the corners' coupling is nearly rank one); the error says what to set."""
    obs = write_obs(tmp_path / "b.h5", x=[0.3], y=[0.3], value=[1.0], noise=[0.01])
    out = tmp_path / "o.h5"
    sets = [f"observations.file={obs}", "observations.operator=bilinear"]
    proc = mpda("run", "-o", str(out), *SMALL, *[a for kv in sets for a in ("--set", kv)])
    assert proc.returncode == 3, proc.stderr
    assert "bilinear observations with a small noise" in proc.stderr
    assert "solver.c: 100" in proc.stderr and not out.exists()


def test_iteration_cap_is_an_error_and_writes_nothing(tmp_path):
    """Nothing written, and an earlier run's file at the output's name is left as it
    was: the message says so, with its time, so that it is not taken for this run's
    result (review helper)."""
    out = tmp_path / "o.h5"
    out.write_bytes(b"an earlier run's analysis")
    os.utime(out, (1e9, 1e9))  # 2001-09-09 01:46:40 UTC
    proc = mpda("run", "-o", str(out), *SMALL, "--set", "solver.max_iterations=50")
    assert proc.returncode == 4, proc.stderr
    assert "not converged" in proc.stderr
    assert (
        f"no output was written: {out} is an earlier file (modified 2001-09-09 01:46:40 UTC), "
        "left as it was, not this run's result"
    ) in proc.stderr
    assert out.read_bytes() == b"an earlier run's analysis"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.h5"]


def test_a_failed_run_without_an_earlier_file_says_only_that_nothing_was_written(tmp_path):
    from mpda_dist.driver import _nothing_written

    assert _nothing_written(str(tmp_path / "none.h5")) == "no output was written"


def test_a_lower_level_that_did_not_converge_is_a_warning(caplog):
    """A level below the last one that reached max_iterations (or stalled) shows in
    the output's ``levels`` alone: rank 0 warns, naming it (review helper)."""
    from mpda_dist.driver import _warn_unconverged_levels
    from mpda_dist.solver import CAPPED, CONVERGED, STALLED, LevelResult

    def level(n: int, status: str, iterations: int, residual: float) -> LevelResult:
        return LevelResult((n, n), 1, (1, 1), status, iterations, residual)

    done = level(9, CONVERGED, 0, 1e-9)
    with caplog.at_level("WARNING", logger="mpda_dist"):
        _warn_unconverged_levels([done, level(17, CONVERGED, 40, 1e-6)], 1e-5)
        assert caplog.text == ""
        _warn_unconverged_levels(
            [done, level(17, CAPPED, 50, 3e-3), level(33, STALLED, 900, 2e-5), done], 1e-5
        )
    lines = caplog.text.splitlines()
    assert len(lines) == 2
    assert (
        "level 2 (17 x 17 points) reached solver.max_iterations after 50 iterations at "
        in (lines[0])
    )
    assert "residual 3.000e-03 > tol 1.0e-05" in lines[0]
    assert "level 3 (33 x 33 points) stalled after 900 iterations" in lines[1]


def test_unwritable_output_directory_fails_before_solving(tmp_path):
    out = tmp_path / "missing" / "o.h5"
    proc = mpda("run", "-o", str(out), *SMALL)
    assert proc.returncode == 2
    assert "missing" in proc.stderr


@pytest.mark.parametrize(
    "var,value,needle",
    [
        ("MPDA_MALLOC", "jemalloc", "expected keep or system"),
        ("MPDA_KERNEL_FORM", "bogus", "expected one of strips, pads, fused"),
        ("MPDA_COMPILE_THREADS", "abc", "expected a whole number of threads"),
        ("MPDA_LOWER_PROCESSES", "four", "expected a whole number of processes"),
        ("MPDA_MLIR_CONTEXTS", "shared", "expected one of reuse, fresh"),
        ("MPDA_GC", "off", "expected freeze or python"),
    ],
)
def test_a_bad_environment_variable_is_an_input_error(tmp_path, monkeypatch, var, value, needle):
    """One line naming the variable and exit 2 at start-up, not a traceback later."""
    monkeypatch.setenv(var, value)
    out = tmp_path / "o.h5"
    proc = mpda("run", "-o", str(out), *SMALL)
    assert proc.returncode == 2, proc.stderr
    assert f"error: {var}={value!r}: {needle}" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_a_run_freezes_the_collectors_objects_before_its_programs(tmp_path):
    """``mpda run`` settles the garbage collector (runtime.settle_gc) before its
    programs are traced and its inputs read; the debug log says so, ahead of them."""
    out = tmp_path / "o.h5"
    proc = mpda("run", "-o", str(out), *SMALL, "--set", "logging.level=debug")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    frozen = [i for i, line in enumerate(lines) if "objects frozen out of the garbage" in line]
    read = [i for i, line in enumerate(lines) if "observations used" in line]
    assert len(frozen) == 1 and read and frozen[0] < read[0], proc.stderr
    assert int(lines[frozen[0]].split()[1]) > 1000


def test_a_run_with_lowering_helpers_names_them_and_leaves_none(tmp_path, monkeypatch):
    """``MPDA_LOWER_PROCESSES=1`` (helpers on a CPU too): two ranks, each with its helper;
    the start-up table says so, the run writes its output, and no helper outlives it."""
    import uuid

    from _procs import kill_marked, pids_with_env, wait_gone

    mark = uuid.uuid4().hex
    monkeypatch.setenv("MPDA_LOWER_PROCESSES", "1")
    monkeypatch.setenv("MPDA_TEST_MARK", mark)  # the helpers inherit it
    out = tmp_path / "o.h5"
    try:
        proc = mpda("run", "-o", str(out), *SMALL, ranks=2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "1 lowering helper process(es) per rank" in proc.stderr + proc.stdout
        assert out.exists()
        # (each rank ends its helpers at exit; a moment's grace on a loaded machine)
        assert wait_gone(pids_with_env("MPDA_TEST_MARK", mark), 5.0) == []
    finally:
        kill_marked("MPDA_TEST_MARK", mark)


@pytest.mark.parametrize(
    "error, code, needle",
    [
        (OSError(28, "No space left on device"), 2, "No space"),  # ENOSPC: the machine's
        (ValueError("VLEN strings do not support embedded NULLs"), 1, "ValueError: VLEN"),
    ],
)
def test_a_failed_write_is_a_clean_error_and_leaves_nothing(
    tmp_path, monkeypatch, error, code, needle
):
    """Disk full while writing: exit code 2 naming the file, no temporary, and an
    earlier file at the path left as it was and named as such.  A value h5py refuses (an
    H200's MPI version string ended in a NUL) is the package's fault: exit code 1, the
    same otherwise."""
    from mpi4py import MPI

    from mpda_dist import driver
    from mpda_dist.config import load_config

    real = h5py.Group.create_dataset

    def full(self, name, *args, **kwargs):
        if name == "hmu":
            raise error
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", full)
    cfg = load_config(None, ["grid.nx=24", "grid.ny=24", "solver.multigrid.enabled=false"])
    out = tmp_path / "o.h5"
    out.write_bytes(b"an earlier run")
    with pytest.raises(driver.RunError, match=rf"{out}: cannot write the analysis .*{needle}") as e:
        driver.execute(MPI.COMM_SELF, cfg, str(out))
    assert e.value.code == code
    assert f"{out} is an earlier file" in str(e.value)
    assert list(tmp_path.iterdir()) == [out] and out.read_bytes() == b"an earlier run"


@pytest.mark.parametrize("command", [["run"], ["simulate"], ["plot", "x.h5"]])
def test_an_empty_output_name_is_a_usage_error(command, capsys):
    """``-o ""`` once meant the config's output.file without a word."""
    from mpda_dist import cli

    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args([*command, "-o", ""])
    assert exit_.value.code == 2
    assert "argument -o/--output: empty file name" in capsys.readouterr().err


def _background(path: Path, n: int = 40) -> Path:
    with h5py.File(path, "w") as f:
        f["background"] = np.zeros((n, n))
    return path


def test_a_run_does_not_write_over_its_inputs(tmp_path):
    """The files a run writes are not the files it reads, nor each other (review
    helper: an analysis replaced its observation file; a checkpoint named like the
    output looked like a finished analysis), and ``o/`` is not a file name.  One case
    end to end, the rest through the check ``mpda run`` makes first."""
    from mpda_dist.config import load_config
    from mpda_dist.driver import _check_paths
    from mpda_dist.io import InputError

    obs = write_obs(tmp_path / "obs.h5")
    bg = _background(tmp_path / "bg.h5")
    before = {p: p.read_bytes() for p in (obs, bg)}
    inputs = ["--set", f"observations.file={obs}", "--set", f"prior.background={bg}"]
    proc = mpda("run", "-o", str(obs), *SMALL, *inputs)
    assert proc.returncode == 2, proc.stderr
    assert f"output.file (-o) = {obs} is also observations.file: the run would" in proc.stderr
    assert "level 1/" not in proc.stderr  # refused before solving
    assert {p: p.read_bytes() for p in (obs, bg)} == before

    out, ckpt = str(tmp_path / "o.h5"), str(tmp_path / "ck.h5")
    cases = [
        (str(bg), ckpt, None, "is also prior.background: the run would overwrite"),
        (out, str(obs), None, f"checkpoint.file = {obs} is also observations.file"),
        (out, out, None, "output.file (-o) and checkpoint.file are the same file"),
        (f"{tmp_path}/o/", ckpt, None, "o/: a directory name; give a file name"),
        (ckpt + "x", ckpt, ckpt + "x", "is also --resume"),
    ]
    for target, checkpoint_file, resume, needle in cases:
        sets = [a for a in (*SMALL, *inputs) if a != "--set"]
        cfg = load_config(None, [*sets, f"checkpoint.file={checkpoint_file}"])
        with pytest.raises(InputError, match=re.escape(needle)):
            _check_paths(cfg, target, resume)
    cfg = load_config(None, [a for a in (*SMALL, *inputs) if a != "--set"])
    _check_paths(cfg, out, cfg.checkpoint.file)  # resuming from its own checkpoint file
    config = tmp_path / "run.yaml"
    config.write_text("grid: {nx: 40, ny: 40}\n")
    with pytest.raises(InputError, match=re.escape("is also the config file")):
        _check_paths(cfg, str(tmp_path / "." / "run.yaml"), None, config)
    # mpda simulate writes no checkpoint: its -o may be named like checkpoint.file
    _check_paths(cfg, cfg.checkpoint.file, None, config, checkpoint=False)


def test_run_and_simulate_do_not_write_over_their_config_or_a_directory(tmp_path):
    """``-o`` naming the config file (review helper: ``mpda run s.yaml -o s.yaml`` put
    an HDF5 file in its place); ``mpda simulate`` makes the same checks as ``run``."""
    config = tmp_path / "s.yaml"
    config.write_text("grid: {nx: 40, ny: 40}\nsolver: {multigrid: {min_size: 20}}\n")
    for command in ("run", "simulate"):
        proc = mpda(command, str(config), "-o", str(config))
        assert proc.returncode == 2, proc.stderr
        assert f"= {config} is also the config file" in proc.stderr
    proc = mpda("simulate", str(config), "-o", f"{tmp_path}/new/")
    assert proc.returncode == 2, proc.stderr
    assert "new/: a directory name; give a file name" in proc.stderr
    assert config.read_text().startswith("grid:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]


def test_an_input_error_names_an_earlier_file_at_the_output(tmp_path):
    """An input error found after the paths are checked (observations that all fail
    QC) says, as exit codes 3 to 5 do, that the file at ``-o`` is an earlier one."""
    out = tmp_path / "o.h5"
    out.write_bytes(b"an earlier run's analysis")
    os.utime(out, (1e9, 1e9))  # 2001-09-09 01:46:40 UTC
    obs = write_obs(tmp_path / "obs.h5", noise=[-1.0, -1.0, -1.0])
    proc = mpda("run", "-o", str(out), *SMALL, "--set", f"observations.file={obs}")
    assert proc.returncode == 2, proc.stderr
    assert "no usable observation remains after quality control" in proc.stderr
    assert f"no output was written: {out} is an earlier file (modified 2001-09-09" in proc.stderr
    assert out.read_bytes() == b"an earlier run's analysis"


def test_a_process_grid_for_other_ranks_is_refused_for_every_method(tmp_path):
    """``exact`` runs on rank 0 alone, but a process grid of 9 blocks on 1 rank is a
    mistake all the same (as for mp and cg); the error names the config and the
    ``--set`` it came from."""
    out = tmp_path / "o.h5"
    grid = "decomposition.process_grid=[3,3]"
    proc = mpda("run", "-o", str(out), *SMALL, "--set", grid, "--set", "solver.method=exact")
    assert proc.returncode == 2, proc.stderr
    assert f"demo.yaml), --set grid.nx=40, --set grid.ny=40, --set {grid}:" in proc.stderr
    assert "has 9 blocks but the job has 1 MPI ranks" in proc.stderr
    assert not out.exists()


def test_per_rank_logs_where_they_cannot_be_written_are_an_input_error(tmp_path):
    """``logging.per_rank`` writes ``mpda-rankNNNN.log`` in the working directory: one
    that cannot hold it is exit 2 naming the file, on every rank, not a traceback."""
    out = tmp_path / "o.h5"
    proc = mpda(
        "run", "-o", str(out), *SMALL, "--set", "logging.per_rank=true", cwd=Path("/proc"), ranks=2
    )
    assert proc.returncode == 2, proc.stderr
    assert "logging.per_rank: cannot write /proc/mpda-rank0000.log" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_an_analysis_file_as_background_warns(tmp_path, caplog):
    """``prior.background = OUT.h5`` reads OUT.h5's ``/background``, the earlier run's
    background, not its analysis: said in a warning, which names the dataset that
    cycling wants (review helper); a named dataset, or a plain field file, is silent."""
    from mpda_dist.driver import _warn_if_analysis_file

    out = tmp_path / "out.h5"
    with h5py.File(out, "w") as f:
        f["analysis/mean"] = np.ones((4, 4))
        f["background"] = np.zeros((4, 4))
    plain = _background(tmp_path / "bg.h5", 4)
    with caplog.at_level("WARNING", logger="mpda_dist"):
        for spec in (f"{out}:analysis/mean", f"{out}:background", str(plain)):
            _warn_if_analysis_file(spec)
        assert caplog.text == ""
        _warn_if_analysis_file(str(out))
    assert f"give {out}:analysis/mean" in caplog.text


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(monkeypatch, capsys):
    """SIGINT in the first seconds (MPI's start, the imports: before the run's own
    handling, review helper) is the same one line and exit 130 as mid-solve, not a
    traceback and exit 1."""
    from mpda_dist import cli, runtime

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runtime, "start_checked", interrupted)
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "-o", "never.h5"])
    assert exc.value.code == runtime.SIGINT_EXIT == 130
    err = capsys.readouterr().err
    assert "interrupted (SIGINT): stopped without a checkpoint" in err
    assert "Traceback" not in err


def test_a_grid_too_thin_to_halve_is_named_at_the_start(tmp_path):
    """9 points along y: no coarser level can have 4 interior points there, so the run
    has no multigrid; the log says so before solving (review helper: a 9 x 257 run
    stalled far from the answer, and the message blamed float32's rounding)."""
    out = tmp_path / "o.h5"
    thin = ["--set", "grid.nx=120", "--set", "grid.ny=9", "--set", "solver.max_iterations=20"]
    proc = mpda("run", "-o", str(out), *thin)
    assert "no coarser level: the 120 x 9 grid is too thin to halve" in proc.stderr
    wide = ["--set", "grid.nx=120", "--set", "grid.ny=12", "--set", "solver.max_iterations=20"]
    proc = mpda("run", "-o", str(out), *wide)
    assert "no coarser level" not in proc.stderr and "level 1/2" in proc.stderr, proc.stderr
