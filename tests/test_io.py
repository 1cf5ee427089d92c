"""HDF5 input/output: round trips, atomic writes and every input error."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpda_dist.io import (
    InputError,
    OtherGrid,
    atomic_output,
    check_writable,
    read_field,
    read_observations,
    read_truth,
    split_field_spec,
    write_analysis,
    write_problem,
)
from mpda_dist.observations import ObservationError

NX, NY = 7, 5  # deliberately unequal: catches x/y mix-ups


def grid() -> tuple[np.ndarray, np.ndarray]:
    return np.linspace(0.0, 2.0, NX), np.linspace(0.0, 1.0, NY)


def obs(n: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "x": rng.uniform(0, 2, n),
        "y": rng.uniform(0, 1, n),
        "value": rng.normal(size=n),
        "noise": np.full(n, 1e-3),
    }


def make_obs_file(path: Path, **datasets: object) -> Path:
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)
    return path


def no_temporaries(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if ".tmp-" in p.name or ".probe-" in p.name]


# ------------------------------------------------------------------------ observations


def test_read_observations_round_trip(tmp_path: Path) -> None:
    o = obs()
    path = make_obs_file(tmp_path / "o.h5", **o)
    got = read_observations(path)
    assert set(got) == {"x", "y", "value", "noise"}
    for k in o:
        assert got[k].dtype == np.float64 and got[k].ndim == 1
        np.testing.assert_array_equal(got[k], o[k])


def test_integer_datasets_become_float64(tmp_path: Path) -> None:
    path = make_obs_file(
        tmp_path / "o.h5",
        x=np.arange(3),
        y=np.arange(3, dtype=np.int16),
        value=[1, 2, 3],
        noise=np.ones(3, dtype=np.float32),
    )
    got = read_observations(path)
    assert all(v.dtype == np.float64 for v in got.values())
    np.testing.assert_array_equal(got["y"], [0.0, 1.0, 2.0])


def test_scalar_noise_attribute_is_broadcast(tmp_path: Path) -> None:
    o = obs(5)
    del o["noise"]
    path = make_obs_file(tmp_path / "o.h5", **o)
    with h5py.File(path, "a") as f:
        f.attrs["noise"] = 0.25
    np.testing.assert_array_equal(read_observations(path)["noise"], np.full(5, 0.25))


def test_default_noise_when_file_has_none(tmp_path: Path) -> None:
    o = obs(3)
    del o["noise"]
    path = make_obs_file(tmp_path / "o.h5", **o)
    with pytest.raises(InputError, match=rf"{path}: missing dataset 'noise'"):
        read_observations(path)
    np.testing.assert_array_equal(read_observations(path, default_noise=0.5)["noise"], [0.5] * 3)


def test_config_noise_stands_in_and_replaces(tmp_path: Path) -> None:
    """``observations.noise`` gives the noise of a file without one (README: "or the
    config may set observations.noise"), and replaces that of synthetic observations,
    whose values keep the noise they were drawn with."""
    from mpda_dist.config import config_from_dict
    from mpda_dist.driver import build_problem

    o = obs(3)
    del o["noise"]
    path = make_obs_file(tmp_path / "o.h5", **o)
    grid = {"nx": NX, "ny": NY}
    cfg = config_from_dict({"grid": grid, "observations": {"file": str(path), "noise": 0.2}})
    np.testing.assert_array_equal(build_problem(cfg).observations.noise, [0.2] * 3)
    syn = {"synthetic": {"fraction": 0.2, "noise": 1e-3, "seed": 1}}
    plain = build_problem(config_from_dict({"grid": grid, "observations": syn}))
    assumed = build_problem(config_from_dict({"grid": grid, "observations": syn | {"noise": 0.3}}))
    np.testing.assert_array_equal(plain.observations.noise, 1e-3)
    np.testing.assert_array_equal(assumed.observations.noise, 0.3)
    np.testing.assert_array_equal(assumed.observations.value, plain.observations.value)
    # a noise QC refuses names the key it came from (review helper: it named the file)
    tiny = {"grid": grid, "observations": syn | {"noise": 1e-16}, "solver": {"dtype": "float32"}}
    with pytest.raises(ObservationError, match=r"\(noise from observations.noise = 1e-16\)"):
        build_problem(config_from_dict(tiny))


def test_values_are_not_checked_here(tmp_path: Path) -> None:
    o = obs(3)
    o["value"][1] = np.nan
    o["noise"][0] = -1.0
    got = read_observations(make_obs_file(tmp_path / "o.h5", **o))
    assert np.isnan(got["value"][1]) and got["noise"][0] == -1.0


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.h5"
    with pytest.raises(InputError, match=rf"^{path}: no such file$"):
        read_observations(path)
    with pytest.raises(InputError, match=rf"^{path}: no such file$"):
        read_truth(path)
    with pytest.raises(InputError, match="not a regular file"):
        read_observations(tmp_path)


def test_not_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "o.h5"
    path.write_text("x,y,value\n0.1,0.2,3\n")
    with pytest.raises(InputError, match=rf"^{path}: cannot open as HDF5"):
        read_observations(path)


def test_null_dataspace(tmp_path: Path) -> None:
    o = obs()
    o["value"] = h5py.Empty("f8")
    path = make_obs_file(tmp_path / "o.h5", **o)
    with pytest.raises(InputError, match=rf"{path}: dataset 'value' is empty \(null dataspace\)"):
        read_observations(path)


def test_damaged_metadata_is_an_input_error(tmp_path: Path) -> None:
    """Zeroed blocks through the file: whatever h5py raises becomes an InputError."""
    path = make_obs_file(tmp_path / "o.h5", **obs(50))
    good = path.read_bytes()
    errors = 0
    for at in range(0, len(good), 48):
        data = bytearray(good)
        data[at : at + 16] = bytes(16)
        path.write_bytes(bytes(data))
        try:
            read_observations(path)
        except InputError as exc:
            assert str(path) in str(exc)
            errors += 1
    assert errors > 0


def test_truncated_file(tmp_path: Path) -> None:
    path = make_obs_file(tmp_path / "o.h5", **obs(20000))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=str(path)):
        read_observations(path)


@pytest.mark.parametrize("name", ["x", "y", "value"])
def test_missing_dataset(tmp_path: Path, name: str) -> None:
    o = obs()
    del o[name]
    path = make_obs_file(tmp_path / "o.h5", **o)
    with pytest.raises(InputError, match=rf"^{path}: missing dataset '{name}'$"):
        read_observations(path)


def test_group_instead_of_dataset(tmp_path: Path) -> None:
    o = obs()
    del o["value"]
    path = make_obs_file(tmp_path / "o.h5", **o)
    with h5py.File(path, "a") as f:
        f.create_group("value")
    with pytest.raises(InputError, match="'value' is a group, expected a dataset"):
        read_observations(path)


def test_wrong_shape(tmp_path: Path) -> None:
    o = obs()
    o["x"] = np.zeros((2, 2))
    path = make_obs_file(tmp_path / "o.h5", **o)
    with pytest.raises(InputError, match=r"dataset 'x' has shape \(2, 2\); expected 1 dimension"):
        read_observations(path)


@pytest.mark.parametrize(
    "bad", [np.array([b"a", b"b", b"c", b"d"]), np.array([1 + 1j, 2, 3, 4]), np.ones(4, bool)]
)
def test_non_numeric_dtype(tmp_path: Path, bad: np.ndarray) -> None:
    o = obs()
    o["value"] = bad
    path = make_obs_file(tmp_path / "o.h5", **o)
    with pytest.raises(InputError, match=rf"{path}: dataset 'value' has dtype .*expected real"):
        read_observations(path)


def test_length_mismatch(tmp_path: Path) -> None:
    o = obs(4)
    o["y"] = o["y"][:3]
    path = make_obs_file(tmp_path / "o.h5", **o)
    with pytest.raises(InputError, match=r"differ in length: x has 4, y has 3, value has 4"):
        read_observations(path)


def test_lengths_are_compared_before_reading(tmp_path: Path) -> None:
    """A 4 kB file may declare a dataset of 2³⁴ values that it never wrote: reading it
    first asked for 128 GiB (a MemoryError and a traceback, review helper)."""
    path = make_obs_file(tmp_path / "o.h5", **{k: v[:3] for k, v in obs(3).items() if k != "x"})
    with h5py.File(path, "a") as f:
        f.create_dataset("x", shape=(2**34,), dtype="f8")
    assert path.stat().st_size < 100_000
    with pytest.raises(InputError, match=r"differ in length: x has 17179869184, y has 3"):
        read_observations(path)
    with h5py.File(path, "a") as f:
        f.create_dataset("background", shape=(2**20, 2**14), dtype="f8")
    with pytest.raises(InputError, match=r"has shape \(1048576, 16384\); expected"):
        read_field(str(path), (NY, NX))


def test_noise_attribute_must_be_one_number(tmp_path: Path) -> None:
    o = obs(3)
    del o["noise"]
    path = make_obs_file(tmp_path / "o.h5", **o)
    with h5py.File(path, "a") as f:
        f.attrs["noise"] = [1.0, 2.0]
    with pytest.raises(InputError, match="root attribute 'noise'"):
        read_observations(path)


# -------------------------------------------------------------------------- fields


def test_read_field_default_and_named_dataset(tmp_path: Path) -> None:
    bg = np.arange(NY * NX, dtype=np.float32).reshape(NY, NX)
    path = tmp_path / "bg.h5"
    with h5py.File(path, "w") as f:
        f["background"] = bg
        f["other"] = 2 * bg
    np.testing.assert_array_equal(read_field(str(path), (NY, NX)), bg)
    got = read_field(f"{path}:other", (NY, NX))
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, 2 * bg)


def test_split_field_spec(tmp_path: Path) -> None:
    assert split_field_spec("a.h5") == (Path("a.h5"), "background")
    assert split_field_spec("a.h5:f") == (Path("a.h5"), "f")
    assert split_field_spec("dir/a.h5:") == (Path("dir/a.h5"), "background")
    odd = tmp_path / "odd:name.h5"  # an existing file with a colon keeps its full name
    odd.touch()
    assert split_field_spec(str(odd)) == (odd, "background")


def test_read_field_errors(tmp_path: Path) -> None:
    path = tmp_path / "bg.h5"
    with h5py.File(path, "w") as f:
        f["background"] = np.zeros((NX, NY))
        f["flat"] = np.zeros(NX * NY)
    with pytest.raises(InputError, match=r"expected \(ny, nx\) = \(5, 7\) \(transposed\?"):
        read_field(str(path), (NY, NX))
    with pytest.raises(InputError, match=r"has shape \(7, 5\); expected \(ny, nx\) = \(5, 5\)$"):
        read_field(str(path), (5, 5))
    with pytest.raises(InputError, match="'flat' has shape"):
        read_field(f"{path}:flat", (NY, NX))
    with pytest.raises(InputError, match="missing dataset 'nope'"):
        read_field(f"{path}:nope", (NY, NX))
    with pytest.raises(InputError, match="no such file"):
        read_field(str(tmp_path / "absent.h5"), (NY, NX))


# ------------------------------------------------------------------- atomic writing


def test_atomic_output_renames_on_success(tmp_path: Path) -> None:
    final = tmp_path / "out.h5"
    with atomic_output(final) as tmp:
        assert tmp.parent == final.parent
        assert tmp.name == f".out.h5.tmp-{socket.gethostname()}-{os.getpid()}"
        tmp.write_text("done")
        assert not final.exists()
    assert final.read_text() == "done"
    assert no_temporaries(tmp_path)


def test_atomic_output_leaves_old_file_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "out.h5"
    final.write_text("previous result")
    with pytest.raises(RuntimeError, match="boom"), atomic_output(final) as tmp:
        tmp.write_text("half written")
        raise RuntimeError("boom")
    assert final.read_text() == "previous result"
    assert no_temporaries(tmp_path)


def test_atomic_output_cleans_up_on_keyboard_interrupt(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), atomic_output(tmp_path / "o.h5") as tmp:
        tmp.write_text("x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_check_writable(tmp_path: Path) -> None:
    check_writable(tmp_path / "out.h5")
    assert no_temporaries(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        check_writable(tmp_path / "missing" / "out.h5")
    with pytest.raises(InputError, match="is a directory"):
        check_writable(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to read-only directories")
def test_check_writable_read_only_directory(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(InputError, match="not writable"):
            check_writable(ro / "out.h5")
    finally:
        ro.chmod(0o755)


# -------------------------------------------------------------------- analysis file


def analysis_inputs() -> dict:
    x, y = grid()
    rng = np.random.default_rng(0)
    return dict(
        mean=rng.normal(size=(NY, NX)).astype(np.float32),
        x=x,
        y=y,
        observations=obs() | {"noise": 1e-3, "hfb": np.zeros(4)},
        background=np.full((NY, NX), 0.5),
        truth=rng.normal(size=(NY, NX)),
        attrs={
            "config": "grid: {nx: 7}\n",
            "iterations": np.array([120, 80]),
            "final_residual": [1e-6, 2e-7],
            "ranks": 4,
            "wall_time_s": 1.5,
            "converged": True,
            "levels": {"0": {"status": "converged"}},
        },
    )


_FAILING_WRITE = """
import resource, sys
import numpy as np
from mpda_dist import checkpoint, io
n = 96
x = np.linspace(0, 1, n)
field = np.random.default_rng(0).normal(size=(n, n))
obs = {k: np.ones(300) for k in ("x", "y", "value", "noise")}
resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))  # writes past 50 kB fail
for what in ("analysis", "checkpoint"):
    try:
        if what == "analysis":
            io.write_analysis(sys.argv[1] + "/a.h5", x=x, y=x, mean=field, background=field,
                              observations=obs, attrs={})
        else:
            a = np.zeros((12, n, n))
            checkpoint.write(sys.argv[1] + "/c.h5", checkpoint.State(0, 0, a, a, None), "")
    except OSError as exc:
        print(what, "OSError", exc.errno)
"""


def test_a_failed_write_is_an_os_error_and_leaves_nothing(tmp_path: Path) -> None:
    """A write that fails half-way (here the file-size limit; a full disk or a quota
    alike) is an OSError that the driver turns into exit 2.  Written by HDF5 directly,
    h5py raised RuntimeError from the close, and freeing the file's objects afterwards
    could crash the process in HDF5 (a segmentation fault)."""
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_FAILING_WRITE), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split("\n")[:2] == ["analysis OSError 27", "checkpoint OSError 27"]
    assert list(tmp_path.iterdir()) == []


def test_not_enough_space_is_refused_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from mpda_dist import io

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(io.shutil, "disk_usage", lambda _: usage._replace(free=100_000))
    with pytest.raises(OSError, match=r"needs about 0\.3 MiB, 0\.1 MiB free"):
        write_analysis(tmp_path / "out.h5", **analysis_inputs())
    assert list(tmp_path.iterdir()) == []


def test_write_analysis_layout(tmp_path: Path) -> None:
    inp = analysis_inputs()
    path = tmp_path / "out.h5"
    write_analysis(path, **inp)
    assert no_temporaries(tmp_path)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["analysis/mean"][()], inp["mean"])
        assert f["analysis/mean"].dtype == np.float64 and f["analysis/mean"].shape == (NY, NX)
        np.testing.assert_allclose(f["analysis/increment"][()], inp["mean"] - 0.5)
        np.testing.assert_array_equal(f["grid/x"][()], inp["x"])
        np.testing.assert_array_equal(f["grid/y"][()], inp["y"])
        np.testing.assert_array_equal(f["background"][()], inp["background"])
        np.testing.assert_array_equal(f["truth"][()], inp["truth"])
        for k in ("x", "y", "value"):
            np.testing.assert_array_equal(f[f"observations/{k}"][()], inp["observations"][k])
        np.testing.assert_array_equal(f["observations/noise"][()], np.full(4, 1e-3))
        assert f["observations/hfb"].shape == (4,)
        a = f.attrs
        assert a["config"] == "grid: {nx: 7}\n"
        np.testing.assert_array_equal(a["iterations"], [120, 80])
        np.testing.assert_array_equal(a["final_residual"], [1e-6, 2e-7])
        assert a["ranks"] == 4 and a["wall_time_s"] == 1.5 and a["converged"] == 1
        assert json.loads(a["levels"]) == {"0": {"status": "converged"}}
    assert read_truth(path) is not None


def test_write_analysis_without_truth_and_with_increment(tmp_path: Path) -> None:
    inp = analysis_inputs()
    del inp["truth"]
    inc = np.ones((NY, NX))
    path = tmp_path / "out.h5"
    write_analysis(path, increment=inc, **inp)
    with h5py.File(path, "r") as f:
        assert "truth" not in f
        np.testing.assert_array_equal(f["analysis/increment"][()], inc)
    assert read_truth(path) is None


def test_write_analysis_rejects_wrong_shapes(tmp_path: Path) -> None:
    inp = analysis_inputs()
    inp["mean"] = inp["mean"].T
    with pytest.raises(
        ValueError, match=r"mean has shape \(7, 5\); expected \(ny, nx\) = \(5, 7\)"
    ):
        write_analysis(tmp_path / "out.h5", **inp)
    inp = analysis_inputs()
    inp["observations"]["value"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"observations\['value'\] has shape \(3,\)"):
        write_analysis(tmp_path / "out.h5", **inp)
    assert list(tmp_path.iterdir()) == []


def test_analysis_opens_in_xarray(tmp_path: Path) -> None:
    xr = pytest.importorskip("xarray")
    pytest.importorskip("h5netcdf")
    inp = analysis_inputs()
    path = tmp_path / "out.h5"
    write_analysis(path, **inp)
    with xr.open_dataset(path, engine="h5netcdf") as root:
        assert root["truth"].dims == ("y", "x")
        np.testing.assert_array_equal(root["x"], inp["x"])
    with xr.open_dataset(path, engine="h5netcdf", group="analysis") as ana:
        assert ana["mean"].dims == ("y", "x")
        np.testing.assert_array_equal(ana["mean"], inp["mean"])
        np.testing.assert_array_equal(ana["x"], inp["x"])  # the group has coordinates
        np.testing.assert_array_equal(ana["y"], inp["y"])
        assert ana["x"].attrs["axis"] == "X" and ana["x"].attrs["units"] == "1"
        assert "long_name" in ana["y"].attrs and "long_name" in ana["increment"].attrs
    with xr.open_dataset(path, engine="h5netcdf", group="observations") as ob:
        assert ob["value"].dims == ("obs",)
        assert "x" in ob.coords and "y" in ob.coords  # auxiliary coordinates (CF)


def test_observation_column_attributes(tmp_path: Path) -> None:
    inp = analysis_inputs()
    inp["observations"]["flag"] = np.zeros(4, np.int8)
    flags = {"flag_values": np.arange(3, dtype=np.int8), "flag_meanings": "ok a b"}
    path = tmp_path / "out.h5"
    write_analysis(path, observation_attrs={"flag": flags, "absent": {"x": 1}}, **inp)
    with h5py.File(path, "r") as f:
        ds = f["observations/flag"]
        assert ds.dtype == np.int8 and ds.attrs["flag_meanings"] == "ok a b"
        assert ds.attrs["flag_values"].dtype == np.int8
        assert f["observations/value"].attrs["long_name"] == "observed value"
        assert "absent" not in f["observations"]


# --------------------------------------------------------------------- problem file


def test_problem_file_is_an_observation_file(tmp_path: Path) -> None:
    x, y = grid()
    o = obs()
    truth = np.random.default_rng(3).normal(size=(NY, NX))
    path = tmp_path / "problem.h5"
    write_problem(
        path,
        truth=truth,
        x=x,
        y=y,
        observations=o,
        background=np.zeros((NY, NX)),
        attrs={"seed": 3},
    )
    assert no_temporaries(tmp_path)
    got = read_observations(path)
    for k in o:
        np.testing.assert_array_equal(got[k], o[k])
    np.testing.assert_array_equal(read_truth(path), truth)
    np.testing.assert_array_equal(read_field(str(path), (NY, NX)), np.zeros((NY, NX)))
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["grid/x"][()], x)
        np.testing.assert_array_equal(f["grid/y"][()], y)
        assert f.attrs["seed"] == 3
    # the truth is the run's only on the same grid: shape and coordinates
    np.testing.assert_array_equal(read_truth(path, (x, y)), truth)
    other = r"/grid/x has 7 points \[0, 2\]; the run's grid has 7 \[0, 1\]"
    with pytest.raises(OtherGrid, match=other):
        read_truth(path, (x / 2, y))
    with pytest.raises(
        OtherGrid, match=r"/truth has \(ny, nx\) = \(5, 7\), the run's grid \(5, 6\)"
    ):
        read_truth(path, (x[:6], y))


@pytest.mark.parametrize("shape", [(NX,), (2, NY, NX), ()])
def test_a_truth_that_is_not_2d_is_another_grid(tmp_path: Path, shape: tuple[int, ...]) -> None:
    """A 1-D (or 3-D, scalar) /truth stopped the run with exit 2, while a 2-D one of the
    wrong shape only cost the RMSE: the truth is optional, so both are OtherGrid."""
    x, y = grid()
    path = make_obs_file(tmp_path / "o.h5", **obs(), truth=np.zeros(shape))
    said = re.escape(f"o.h5: /truth has shape {shape}, not 2-D (ny, nx)")
    with pytest.raises(OtherGrid, match=said + r", the run's grid \(5, 7\)$"):
        read_truth(path, (x, y))
    with pytest.raises(OtherGrid, match=said + "$"):
        read_truth(path)
    # what stays an input error: a truth that is no array of numbers
    strings = make_obs_file(tmp_path / "s.h5", **obs(), truth=np.array(["a", "b"], dtype="S1"))
    with pytest.raises(InputError, match="dataset 'truth' has dtype") as err:
        read_truth(strings, (x, y))
    assert not isinstance(err.value, OtherGrid)


def test_a_truth_that_is_not_2d_only_warns_in_a_run(tmp_path: Path, caplog) -> None:
    """build_problem (what ``mpda run`` does first) warns naming the file and the shape,
    and goes on without the truth."""
    from mpda_dist.config import config_from_dict
    from mpda_dist.driver import build_problem

    path = make_obs_file(tmp_path / "o.h5", **obs(), truth=np.zeros(NX))
    cfg = config_from_dict(
        {"grid": {"nx": NX, "ny": NY, "extent": [2.0, 1.0]}, "observations": {"file": str(path)}}
    )
    with caplog.at_level("WARNING", logger="mpda_dist"):
        problem = build_problem(cfg)
    assert problem.truth is None
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"{path}: /truth has shape ({NX},)" in m and "no RMSE" in m for m in warned)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 9.969209968386869e36, -1e20])
def test_a_background_that_is_not_finite_or_a_fill_value_is_an_input_error(tmp_path, bad):
    """A fill value in the background (netCDF's 9.97e36) was kept at its node and made
    the analysis 1e36 there, with exit 0 (review helper); like NaN and inf it is an
    input error naming the file and the node."""
    import h5py

    from mpda_dist.config import config_from_dict
    from mpda_dist.driver import build_problem
    from mpda_dist.io import InputError

    field = np.zeros((NY, NX))
    field[2, 3] = bad
    path = tmp_path / "bg.h5"
    with h5py.File(path, "w") as f:
        f["background"] = field
    grid = {"nx": NX, "ny": NY, "extent": [2.0, 1.0]}
    cfg = config_from_dict({"grid": grid, "prior": {"background": str(path)}})
    with pytest.raises(InputError, match=rf"^{path}: the background is not finite, or a fill "):
        build_problem(cfg)
    field[2, 3] = 1e6  # a large physical value is fine
    with h5py.File(path, "w") as f:
        f["background"] = field
    assert build_problem(cfg).background[2, 3] == 1e6


def test_json_attributes_are_strict_json(tmp_path: Path) -> None:
    """A NaN or an infinity inside a JSON attribute (a level's δ under ``stopping:
    residual``) is ``null``: bare ``NaN`` is not JSON, and readers outside Python
    refuse it (review helper)."""
    inp = analysis_inputs()
    inp["attrs"] = {
        "levels": [
            {"delta": np.nan, "residual": np.float32(np.inf), "shape": (5, 7), "n": np.int64(3)},
            {"delta": -np.inf, "residual": 1e-6, "ok": np.bool_(True)},
        ],
        "extra": {"limit": np.float64(np.nan), "nested": [1.5, float("inf")]},
    }
    path = tmp_path / "out.h5"
    write_analysis(path, **inp)

    def no_constant(name: str) -> None:
        raise AssertionError(f"bare {name} in a JSON attribute")

    with h5py.File(path, "r") as f:
        levels = json.loads(f.attrs["levels"], parse_constant=no_constant)
        extra = json.loads(f.attrs["extra"], parse_constant=no_constant)
    assert levels == [
        {"delta": None, "residual": None, "shape": [5, 7], "n": 3},
        {"delta": None, "residual": 1e-6, "ok": True},
    ]
    assert extra == {"limit": None, "nested": [1.5, None]}


def test_version_strings_are_one_line_without_nuls(tmp_path: Path, monkeypatch) -> None:
    """Open MPI's library version ends in a NUL, which h5py refuses inside a string: on
    an H200 ``mpda run`` solved and then failed to write its file.  The provenance keeps
    the first line without it, and any string attribute loses its NULs when written."""
    from mpi4py import MPI

    from mpda_dist import provenance

    ompi = "Open MPI v4.1.6, package: Debian OpenMPI, ident: 4.1.6, Sep 30, 2023\x00"
    want = "Open MPI v4.1.6, package: Debian OpenMPI, ident: 4.1.6, Sep 30, 2023"
    assert provenance.one_line(ompi) == want
    assert provenance.one_line("MPICH Version:      5.0.2\nMPICH Release date: x\n") == (
        "MPICH Version: 5.0.2"
    )
    assert provenance.one_line("\x00") == ""
    monkeypatch.setattr(MPI, "Get_library_version", lambda: ompi)
    attrs = provenance.attributes()
    assert attrs["mpi_library"] == want
    path = tmp_path / "out.h5"
    inp = analysis_inputs()
    write_analysis(path, **inp | {"attrs": inp["attrs"] | attrs | {"note": "a\x00b"}})
    with h5py.File(path, "r") as f:
        assert f.attrs["mpi_library"] == want and f.attrs["note"] == "ab"


def test_git_commit_reads_the_checkout_without_git(tmp_path: Path) -> None:
    """The analysis records the package's commit where its source is a git checkout:
    read from ``.git`` (a branch's loose or packed ref, a detached HEAD, a worktree's
    ``gitdir`` file), None where there is none or it is unreadable."""
    from mpda_dist.provenance import git_commit

    sha, other = "1" * 40, "ab" * 20
    assert git_commit(tmp_path) is None  # not a checkout
    repo = tmp_path / "repo"
    (repo / ".git" / "refs" / "heads").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    assert git_commit(repo) is None  # a branch without commits
    (repo / ".git" / "packed-refs").write_text(f"# pack-refs\n{other} refs/heads/main\n")
    assert git_commit(repo) == other
    (repo / ".git" / "refs" / "heads" / "main").write_text(sha + "\n")
    assert git_commit(repo) == sha  # a loose ref wins over the packed one
    (repo / ".git" / "HEAD").write_text(other + "\n")
    assert git_commit(repo) == other  # detached
    (repo / ".git" / "HEAD").write_text("garbage\n")
    assert git_commit(repo) is None
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    wt = tmp_path / "wt"
    gitdir = repo / ".git" / "worktrees" / "wt"
    gitdir.mkdir(parents=True)
    (gitdir / "HEAD").write_text("ref: refs/heads/main\n")
    (gitdir / "commondir").write_text("../..\n")
    wt.mkdir()
    (wt / ".git").write_text(f"gitdir: {gitdir}\n")
    assert git_commit(wt) == sha  # the ref lies in the common directory


def test_the_write_probe_takes_names_as_long_as_the_temporary_one(tmp_path: Path) -> None:
    """The up-front probe uses a name as long as the temporary output name (the host and
    process in it): a name whose temporary one just fits the file system's 255 bytes is
    accepted, one byte more is refused before any solving (review helpers: refused too
    early, then accepted and lost after the solve)."""
    from mpda_dist.io import temporary_path

    extra = len(temporary_path(tmp_path / "x.h5").name) - len("x.h5")
    fits = tmp_path / ("a" * (255 - extra - 3) + ".h5")
    assert len(temporary_path(fits).name) == 255
    check_writable(fits)
    with pytest.raises(InputError, match="not writable"):
        check_writable(tmp_path / ("a" * (256 - extra - 3) + ".h5"))
    assert list(tmp_path.iterdir()) == []
