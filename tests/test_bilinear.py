"""The bilinear observation operator: exactness on linear fields, periodic seam, and
its ``Hᵀ R⁻¹ H`` terms inside the 13-point stencil."""

from __future__ import annotations

import numpy as np
import pytest

from mpda_dist import observations as obsmod
from mpda_dist.baselines import assemble_periodic, exact_solve
from mpda_dist.multigrid import schedule, sphere_level
from mpda_dist.stencil import build, observation_mass


def test_bilinear_reproduces_a_linear_field():
    ny, nx, extent = 17, 23, (2.0, 1.0)
    gy, gx = np.meshgrid(np.linspace(0, 1.0, ny), np.linspace(0, 2.0, nx), indexing="ij")
    field = 0.3 + 1.7 * gx - 2.2 * gy
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 2.0, 200), rng.uniform(0, 1.0, 200)
    x[:3], y[:3] = [0.0, 2.0, 1.0], [0.0, 1.0, 0.5]  # corners and an edge of the domain
    iy, ix, w = obsmod.bilinear_nodes(x, y, (ny, nx), extent)
    np.testing.assert_allclose(w.sum(axis=1), 1.0)
    np.testing.assert_allclose(
        obsmod.apply_bilinear(field, iy, ix, w), 0.3 + 1.7 * x - 2.2 * y, atol=1e-12
    )


def test_bilinear_on_the_sphere_wraps_in_longitude():
    ny, nx, lr = 11, 36, (-60.0, 60.0)
    lat = np.linspace(*lr, ny)
    lon = np.arange(nx) * 10.0
    field = 5.0 + 0.1 * lat[:, None] + np.cos(np.radians(lon))[None, :] * 0
    field = field + (lon == 0)[None, :] * 1.0  # a spike on the 0° column
    extent = (360.0, lr[1] - lr[0])
    # latitude is linear; 355° lies halfway between the last column (350°) and 0°
    iy, ix, w = obsmod.bilinear_nodes(
        np.array([355.0, -5.0, 715.0]), np.array([12.5, 12.5, 12.5]) - lr[0], (ny, nx), extent, True
    )
    got = obsmod.apply_bilinear(field, iy, ix, w)
    np.testing.assert_allclose(got, 5.0 + 0.1 * 12.5 + 0.5)
    assert set(ix[0]) == {nx - 1, 0}


def _rect_problem(operator: str):
    ny, nx, extent = 21, 25, (1.0, 1.0)
    levels = schedule(ny, nx, 1 / (ny - 1), 1 / (nx - 1), enabled=False)
    x = np.array([0.25, 0.5, 0.75])  # on nodes: multiples of 1/24 and 1/20
    y = np.array([0.25, 0.5, 0.75])
    value = np.array([0.3, -0.2, 0.5])
    prec = np.full(3, 1e4)
    if operator == "nearest":
        iy, ix = obsmod.nearest_nodes(x, y, (ny, nx), extent)
        obs = obsmod.NodeObservations(iy, ix, value, prec)
    else:
        iy, ix, w = obsmod.bilinear_nodes(x, y, (ny, nx), extent)
        obs = obsmod.BilinearObservations(iy, ix, w, value, prec)
    return levels[0], obs


def test_observation_on_a_node_same_analysis_nearest_and_bilinear():
    top, near = _rect_problem("nearest")
    _, bil = _rect_problem("bilinear")
    full = ((0, top.interior[0]), (0, top.interior[1]))
    a = exact_solve(build(top, 0.15, 1.1, near.at_level(1, top.interior), *full))
    b = exact_solve(build(top, 0.15, 1.1, bil.at_level(1, top.interior), *full))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * np.abs(a).max())


def test_bilinear_terms_fit_the_stencil():
    """Assembled from the stencil, Q − P equals Hᵀ R⁻¹ H built densely from H, for
    points anywhere (including cells across the periodic seam of the sphere)."""
    ny, nx, lr = 12, 20, (-60.0, 60.0)
    (lv,) = sphere_level(ny, nx, lr)
    rng = np.random.default_rng(3)
    n = 40
    lon = rng.uniform(-10, 370, n)
    lat = rng.uniform(lr[0], lr[1], n)
    lon[0] = 359.0  # across the seam
    iy, ix, w = obsmod.bilinear_nodes(lon, lat - lr[0], (ny, nx), (360.0, lr[1] - lr[0]), True)
    prec = rng.uniform(1.0, 3.0, n)
    innov = rng.standard_normal(n)
    obs = obsmod.BilinearObservations(iy, ix, w, innov, prec).at_level(1, lv.interior, True)
    none = obsmod.BilinearObservations(iy[:0], ix[:0], w[:0], innov[:0], prec[:0])
    full = ((0, ny - 2), (0, nx))
    st = build(lv, 1500.0, 1.9, obs, *full)
    p = build(lv, 1500.0, 1.9, none, *full)
    dq = (assemble_periodic(st) - assemble_periodic(p)).toarray()
    # dense H on the interior (clip rows dropped: held at the background)
    h = np.zeros((n, (ny - 2) * nx))
    for a in range(4):
        inside = (iy[:, a] >= 1) & (iy[:, a] <= ny - 2)
        np.add.at(
            h, (np.flatnonzero(inside), (iy[inside, a] - 1) * nx + ix[inside, a]), w[inside, a]
        )
    np.testing.assert_allclose(dq, h.T @ (prec[:, None] * h), atol=1e-12)
    np.testing.assert_allclose(st.rhs.ravel(), h.T @ (prec * innov), atol=1e-12)


@pytest.mark.parametrize("kind", ["nearest", "bilinear", "sphere"])
def test_observation_mass_is_the_row_sums_of_the_observation_term(kind):
    """``observation_mass`` (the coarse levels' lumped observations) equals the row
    sums of the stencil with observations minus the one without, on a block that
    cuts through the grid (observations outside it are left out)."""
    if kind == "sphere":
        ny, nx, lr = 12, 20, (-60.0, 60.0)
        (lv,) = sphere_level(ny, nx, lr)
        rng = np.random.default_rng(5)
        lon, lat = rng.uniform(-10, 370, 60), rng.uniform(lr[0], lr[1], 60)
        iy, ix, w = obsmod.bilinear_nodes(lon, lat - lr[0], (ny, nx), (360.0, lr[1] - lr[0]), True)
        prec, innov = rng.uniform(1.0, 3.0, 60), rng.standard_normal(60)
        obs = obsmod.BilinearObservations(iy, ix, w, innov, prec).at_level(1, lv.interior, True)
        ell, amp = 1500.0, 1.9
    else:
        lv, raw = _rect_problem(kind)
        obs = raw.at_level(1, lv.interior)
        ell, amp = 0.15, 1.1
    by, bx = lv.interior
    block = ((0, by), (3, bx))  # not the whole grid: some observations fall outside
    st = build(lv, ell, amp, obs, *block)
    bare = build(lv, ell, amp, _no_observations(obs), *block)
    want = (st.diag - bare.diag) + (st.weights - bare.weights).sum(axis=0)
    got = observation_mass(lv, obs, *block)
    assert np.abs(want).max() > 0  # observations fall inside the block
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


def _no_observations(obs):
    if isinstance(obs, obsmod.BilinearObservations):
        return obsmod.BilinearObservations(
            *(x[:0] for x in (obs.iy, obs.ix, obs.weight)), obs.innovation[:0], obs.precision[:0]
        )
    return obsmod.NodeObservations(obs.iy[:0], obs.ix[:0], obs.innovation[:0], obs.precision[:0])


@pytest.mark.parametrize("periodic", [False, True])
def test_nearest_nodes_wrap(periodic):
    iy, ix = obsmod.nearest_nodes(
        np.array([359.9]), np.array([0.0]), (5, 36), (360.0, 10.0), periodic
    )
    assert ix[0] == (0 if periodic else 35)


def test_rectangle_run_bilinear_equals_nearest_for_node_observations(tmp_path):
    """Synthetic observations sit on nodes, so both operators give the same analysis
    through the whole driver (QC, innovations, stencil)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import h5py

    mpda = Path(sys.executable).with_name("mpda")
    means = {}
    for op in ("nearest", "bilinear"):
        out = tmp_path / f"{op}.h5"
        proc = subprocess.run(
            [str(mpda), "run", "-o", str(out), "--set", "grid.nx=40", "--set", "grid.ny=33",
             "--set", "solver.method=exact", "--set", f"observations.operator={op}"],
            capture_output=True, text=True, timeout=240, env=dict(os.environ),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        with h5py.File(out) as f:
            means[op] = f["analysis/mean"][:]
    np.testing.assert_allclose(means["bilinear"], means["nearest"], rtol=0, atol=1e-9)
