"""The global use case end to end: configs/global.yaml through ``mpda run`` and
``mpda plot``, the periodic seam, and the synthetic global problem's parts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpda_dist import globe, sphere

MPDA = Path(sys.executable).with_name("mpda")
GLOBAL = Path(__file__).parents[1] / "configs" / "global.yaml"
GLOBAL_FULL = Path(__file__).parents[1] / "configs" / "global_full.yaml"
# A small globe: a 4-degree grid, the config's satellite swaths.
SMALL = ["--set", "grid.nx=90", "--set", "grid.ny=41", "--set", "solver.exchange.every=1"]


def mpda(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(MPDA), *args], capture_output=True, text=True, timeout=timeout, env=dict(os.environ)
    )


def test_global_configs_validate():
    for path in (GLOBAL, GLOBAL_FULL):
        proc = mpda("config", str(path))
        assert proc.returncode == 0, proc.stderr
        assert "domain: sphere" in proc.stdout


@pytest.fixture(scope="module")
def global_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("global")
    outs = {}
    for method in ("exact", "mp"):
        outs[method] = tmp / f"{method}.h5"
        proc = mpda(
            "run", str(GLOBAL), "-o", str(outs[method]), *SMALL, "--set", f"solver.method={method}"
        )
        assert proc.returncode == 0, proc.stderr
        outs[method + "_log"] = proc.stderr
    return outs


def test_global_run_writes_lonlat_grid_and_area_weighted_rmse(global_runs):
    with h5py.File(global_runs["mp"]) as f:
        x, y = f["grid/x"][:], f["grid/y"][:]
        np.testing.assert_allclose(x, np.arange(90) * 4.0)
        np.testing.assert_allclose(y[[0, -1]], [-80.0, 80.0])
        mean, bg, truth = f["analysis/mean"][:], f["background"][:], f["truth"][:]
        np.testing.assert_array_equal(mean[[0, -1]], bg[[0, -1]])  # clip rows
        assert f.attrs["rmse_weighting"] == "cos(latitude)"
        ra, rb = f.attrs["rmse_analysis"], f.attrs["rmse_background"]
        assert ra == pytest.approx(sphere.area_rmse(mean, truth, (-80.0, 80.0)))
        assert ra < 0.8 * rb
        assert 0.03 < f.attrs["coverage_nodes"] < 0.2
        assert 200 < bg.mean() < 320  # kelvin
    assert "area-weighted RMSE" in global_runs["mp_log"]
    assert "coverage" in global_runs["mp_log"]


def test_global_mp_rmse_within_2_percent_of_exact(global_runs):
    with h5py.File(global_runs["mp"]) as m, h5py.File(global_runs["exact"]) as e:
        assert m.attrs["rmse_analysis"] == pytest.approx(e.attrs["rmse_analysis"], rel=0.02)


def test_plot_writes_a_png(global_runs, tmp_path):
    out = tmp_path / "map.png"
    proc = mpda("plot", str(global_runs["mp"]), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_names_a_bad_file(tmp_path):
    bad = tmp_path / "bad.h5"
    with h5py.File(bad, "w") as f:
        f["x"] = 1
    proc = mpda("plot", str(bad), "-o", str(tmp_path / "m.png"))
    assert proc.returncode == 2 and "bad.h5" in proc.stderr


def test_bilinear_global_run_matches_exact(tmp_path):
    outs = {}
    for method in ("exact", "mp"):
        outs[method] = tmp_path / f"{method}.h5"
        proc = mpda(
            "run",
            str(GLOBAL),
            "-o",
            str(outs[method]),
            *SMALL,
            "--set",
            "observations.operator=bilinear",
            "--set",
            f"solver.method={method}",
            "--set",
            "solver.dtype=float64",
            "--set",
            "solver.tol=1e-10",
        )
        assert proc.returncode == 0, proc.stderr
    with h5py.File(outs["mp"]) as m, h5py.File(outs["exact"]) as e:
        a, b = m["analysis/mean"][:], e["analysis/mean"][:]
        inc = e["analysis/increment"][:]
        assert np.abs(a - b).max() < 1e-6 * np.abs(inc).max()


def test_sphere_rejects_unwired_methods(tmp_path):
    out = tmp_path / "x.h5"
    proc = mpda("run", str(GLOBAL), "-o", str(out), *SMALL, "--set", "solver.method=cg")
    assert proc.returncode == 2 and "use mp or exact" in proc.stderr, proc.stderr
    assert not out.exists()


def test_periodic_seam_roll():
    """Rolling the truth and the observations by k columns rolls the analysis by k."""
    import scipy.sparse.linalg as spla

    from mpda_dist.baselines import assemble_periodic
    from mpda_dist.multigrid import sphere_level
    from mpda_dist.observations import NodeObservations
    from mpda_dist.stencil import build

    ny, nx, lr, k = 20, 36, (-70.0, 70.0), 11
    (lv,) = sphere_level(ny, nx, lr)
    rng = np.random.default_rng(5)
    truth = sphere.sample((ny, nx), lr, 1500.0, 1.9, rng)
    mask = globe.random_mask((ny, nx), 0.1, rng)
    mask[5, nx - 1] = mask[6, 0] = True  # on both sides of the seam

    def analysis(t, m):
        iy, ix = np.nonzero(m)
        nodes = NodeObservations(iy, ix, t[iy, ix], np.full(len(iy), 100.0))
        st = build(lv, 1500.0, 1.9, nodes, (0, ny - 2), (0, nx))
        return spla.spsolve(assemble_periodic(st).tocsc(), st.rhs.ravel()).reshape(ny - 2, nx)

    base = analysis(truth, mask)
    rolled = analysis(np.roll(truth, k, axis=1), np.roll(mask, k, axis=1))
    np.testing.assert_allclose(rolled, np.roll(base, k, axis=1), atol=1e-10)


def test_satellite_tracks_are_sun_synchronous_polar_orbits():
    t = np.linspace(0, 101 * 60, 2000)
    lon, lat = globe.ground_track(t, 0.0, 0.0)
    assert lat.max() == pytest.approx(180 - 98.7, abs=0.05)  # highest latitude 81.3°
    # one orbit later the Earth has turned ~25° under the (nearly fixed) orbit plane
    shift = (lon[0] - lon[-1]) % 360
    assert shift == pytest.approx(101 * 60 * 360 / globe.SIDEREAL_DAY_S, abs=0.5)


def test_satellite_coverage_is_about_eight_percent():
    mask = globe.satellite_swaths((91, 180), (-80.0, 80.0), 4, 120.0, 3.0)
    nodes, area = globe.coverage(mask, (-80.0, 80.0))
    assert 0.05 < nodes < 0.11 and 0.04 < area < 0.1, (nodes, area)
