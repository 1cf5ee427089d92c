"""Multigrid: the transfers between levels, the hierarchy on a process grid, and the
coarse-grid correction (FAS) against message passing without it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _problems import globe_problem, problem, rel_rmse
from hypothesis import given, settings
from hypothesis import strategies as st
from mpi4py import MPI

from mpda_dist import kernel
from mpda_dist.cycle import Hierarchy
from mpda_dist.multigrid import (
    coarse_cuts,
    odd_cells_advice,
    schedule,
    sphere_odd_cells,
    sphere_schedule,
)
from mpda_dist.solver import CONVERGED, Settings, solve


def hierarchy(levels, nodes, ell=0.15, amp=1.1):
    per = levels[-1].periodic
    return Hierarchy(
        MPI.COMM_SELF, levels, nodes, ell, amp, None, per, kernel.Params(10.0, 0.6), 0.5, np.float64
    )


@pytest.mark.parametrize("domain", ["rectangle", "sphere"])
def test_restriction_is_the_transpose_of_prolongation(domain):
    with jax.enable_x64(True):
        if domain == "sphere":
            _, nodes, _, _, (ell, amp) = globe_problem(25, 32)
            h = hierarchy(sphere_schedule(25, 32, (-70.0, 70.0), 8), nodes, ell, amp)
        else:
            _, nodes, levels, _ = problem(27, 30, 0.1)
            h = hierarchy(levels, nodes)
        assert len(h.levels) >= 2
        rng = np.random.default_rng(3)
        for i in range(1, len(h.levels)):
            t = h.transfers[i]
            f = jnp.asarray(rng.standard_normal(h.levels[i].interior))
            c = jnp.asarray(rng.standard_normal(h.levels[i - 1].interior))
            pc = t.prolong(h.frames[i - 1].framed(c))
            rf = t.restrict(h.frames[i].framed(f))
            assert pc.shape == f.shape and rf.shape == c.shape
            np.testing.assert_allclose(float(jnp.vdot(pc, f)), float(jnp.vdot(c, rf)), rtol=1e-12)
            # Injection picks the fine node that each coarse node is.
            assert np.array_equal(np.asarray(t.inject(f)), np.asarray(f)[1::2, t.x.inject])
        h.free()


def test_prolongation_is_linear_interpolation():
    """A field linear in the full-grid indices is reproduced away from the far edge
    (where the coarse boundary may lie one fine node inside the domain)."""
    _, nodes, levels, _ = problem(33, 41, 0.05)  # odd sides: coarse boundary = fine boundary
    with jax.enable_x64(True):
        h = hierarchy(levels, nodes)
        for i in range(1, len(h.levels)):
            nc, mc = h.levels[i - 1].interior
            n, m = h.levels[i].interior
            fy, fx = np.meshgrid(np.arange(1, n + 1), np.arange(1, m + 1), indexing="ij")
            cy, cx = np.meshgrid(2 * np.arange(1, nc + 1), 2 * np.arange(1, mc + 1), indexing="ij")
            lin = lambda y, x: 0.3 * y - 0.7 * x + 2.0  # noqa: E731
            got = np.asarray(
                h.transfers[i].prolong(h.frames[i - 1].framed(jnp.asarray(lin(cy, cx))))
            )
            inner = (slice(1, -1), slice(1, -1))  # next to the boundary the field is 0
            np.testing.assert_allclose(got[inner], lin(fy, fx)[inner], atol=1e-12)
        h.free()


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(8, 200),
    parts=st.integers(1, 6),
    offset=st.sampled_from([0, 1]),
    data=st.data(),
)
def test_coarse_cuts_keep_each_coarse_node_with_its_fine_node(n, parts, offset, data):
    if offset == 0 and n % 2:
        n += 1  # the periodic axis halves an even number of columns
    inner = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=parts - 1)))
    cuts = (0, *inner, n)
    nc = n // 2 if offset == 0 else (n + 1) // 2 - 1
    cc = coarse_cuts(cuts, offset, nc)
    assert cc[0] == 0 and cc[-1] == nc and list(cc) == sorted(cc)
    for k in range(len(cuts) - 1):
        for coarse in range(cc[k], cc[k + 1]):
            assert cuts[k] <= 2 * coarse + offset < cuts[k + 1]


def _run(levels, nodes, ell=0.15, amp=1.1, **kw):
    s = Settings(**({"dtype": "float64", "tol": 1e-9, "mode": "sync", "momentum": 0.5} | kw))
    with jax.enable_x64(True):
        return solve(MPI.COMM_SELF, levels, nodes, ell, amp, s)


def test_coarse_corrections_cut_the_iterations_and_keep_the_answer():
    _, nodes, levels, exact = problem(66, 66, 0.02, seed=4)
    fas = _run(levels, nodes, cycle="fas")
    nested = _run(levels, nodes, cycle="nested", max_iterations=4000)
    assert fas.status == CONVERGED and fas.levels[0].solver == "exact"
    assert fas.levels[-1].corrections > 0 and nested.levels[-1].corrections == 0
    assert rel_rmse(fas.anomaly, exact) <= 1e-7
    for lv in fas.levels:  # corrections are part of solving, without compile waits
        assert 0 <= lv.correction_seconds <= lv.solve_seconds, lv
    # The same fixed point, reached in a fraction of the iterations.
    assert 3 * fas.levels[-1].iterations < nested.levels[-1].iterations, (
        fas.levels[-1].iterations,
        nested.levels[-1].iterations,
    )


def test_sphere_multigrid_equals_exact():
    _, nodes, _, exact, (ell, amp) = globe_problem(33, 64)
    levels = sphere_schedule(33, 64, (-70.0, 70.0), 16)
    assert len(levels) >= 3
    res = _run(levels, nodes, ell, amp, c=-2.0, damping=0.7, tol=1e-10)
    assert res.status == CONVERGED and len(res.levels) == len(levels)
    assert np.abs(res.anomaly - exact).max() / np.abs(exact).max() <= 1e-7


@pytest.mark.parametrize(("ny", "lat"), [(34, 70.0), (376, 80.0), (181, 80.0), (97, 88.0)])
def test_sphere_coarse_levels_keep_both_clip_rows(ny, lat):
    levels = sphere_schedule(ny, 64, (-lat, lat), 8)
    for coarse, fine in zip(levels[:-1], levels[1:], strict=True):
        assert coarse.lat_range == pytest.approx(fine.lat_range)
        assert coarse.dy == 2 * fine.dy and (fine.ny - 1) % 2 == 0
    # An odd number of latitude cells stops the halving, and says so.
    assert sphere_odd_cells(levels) == ((levels[0].ny - 1) % 2 == 1)
    assert sphere_odd_cells(levels) == (ny in (34, 376, 181))  # 181: 180 → 90 → 45 cells


@pytest.mark.parametrize(
    ("ny", "nx", "min_size", "choices", "times"),
    [(34, 64, 8, "33 or 37", 2), (34, 128, 64, "33 or 35", 1), (182, 360, 32, "177 or 185", 3)],
)
def test_odd_latitude_cells_warn_with_a_better_ny(ny, nx, min_size, choices, times):
    """The advice names the nearest ny below and above that halves as often as the
    longitudes and min_size allow (review helper: it suggested 129 for 34 x 128, which
    min_size 64 stops after one halving anyway), and each does coarsen that often."""
    advice = odd_cells_advice(sphere_schedule(ny, nx, (-70.0, 70.0), min_size), min_size)
    assert f"{ny - 2} latitude cells is odd" not in advice  # (the coarse level's count)
    assert f"grid.ny = {choices} " in advice and f"coarsen at least {times} time(s)" in advice
    for good in map(int, choices.split(" or ")):
        levels = sphere_schedule(good, nx, (-70.0, 70.0), min_size)
        assert len(levels) == times + 1 and odd_cells_advice(levels, min_size) is None
    assert odd_cells_advice(sphere_schedule(33, 64, (-70.0, 70.0), 8), 8) is None


def test_schedule_halves_down_to_min_size():
    levels = schedule(257, 129, 1.0, 1.0, 32)
    assert [(lv.ny, lv.nx) for lv in levels] == [(17, 9), (33, 17), (65, 33), (129, 65), (257, 129)]
    sph = sphere_schedule(177, 360, (-80.0, 80.0), 32)
    assert [lv.nx for lv in sph] == [45, 90, 180, 360]
    assert all(lv.lat_range[0] == -80.0 for lv in sph)


class _StopAt:
    """Checkpoint requests that ask for a checkpoint and a stop at the n-th check."""

    def __init__(self, n: int) -> None:
        self.n, self.calls, self.last = n, 0, 0.0

    def flags(self, is_root: bool) -> tuple[float, float]:
        self.calls += 1
        hit = float(self.calls == self.n)
        return hit, hit


def test_checkpoint_on_the_finest_level_resumes_exactly(tmp_path):
    """Stopped on the finest of 4 levels, the checkpoint carries the coarser levels' warm
    messages: the resumed run ends with the uninterrupted run's mean and iterations.
    So does a run prepared (laid out, its programs compiling) before the observations
    were known, as ``mpda run`` prepares it while it reads them."""
    import dataclasses

    from mpda_dist import checkpoint
    from mpda_dist.solver import INTERRUPTED, prepare

    _, nodes, levels, _ = problem(66, 66, 0.02, seed=4)
    s = Settings(dtype="float64", tol=1e-9, mode="sync", momentum=0.5)
    path = str(tmp_path / "ckpt.h5")
    with jax.enable_x64(True):
        full = solve(MPI.COMM_SELF, levels, nodes, 0.15, 1.1, s)
        # Stop at the finest level's third-last check: the next check mixes the
        # Anderson history from before the stop.
        checks = [r.iterations // s.check_every for r in full.levels if r.solver == "mp"]
        assert checks[-1] >= s.anderson + 3, checks
        stop = solve(
            MPI.COMM_SELF, levels, nodes, 0.15, 1.1, s, checkpoint_path=path,
            requests=_StopAt(sum(checks) - 2),
        )  # fmt: skip
        assert stop.status == INTERRUPTED and len(stop.levels) == len(levels)
        state = checkpoint.read(path)
        assert state.level == len(levels) - 1 and len(state.coarse) == len(levels) - 2
        again = solve(MPI.COMM_SELF, levels, nodes, 0.15, 1.1, s, resume=state)
        prepared = prepare(MPI.COMM_SELF, levels, s)
        early = solve(MPI.COMM_SELF, levels, nodes, 0.15, 1.1, s, prepared=prepared)
        with pytest.raises(ValueError, match="solved already"):
            solve(MPI.COMM_SELF, levels, nodes, 0.15, 1.1, s, prepared=prepared)
        assert prepared.hier is None  # freed as the solve ended
        other = prepare(MPI.COMM_SELF, levels, dataclasses.replace(s, tol=1e-8))
        with pytest.raises(ValueError, match="prepared for another solve"):
            solve(MPI.COMM_SELF, levels, nodes, 0.15, 1.1, s, prepared=other)
        assert other.hier is None
    single = prepare(MPI.COMM_SELF, levels, s)  # float64 settings, x64 off: float32 frames
    with jax.enable_x64(True), pytest.raises(ValueError, match="jax_enable_x64"):
        solve(MPI.COMM_SELF, levels, nodes, 0.15, 1.1, s, prepared=single)
    for run in (again, early):
        assert [r.iterations for r in run.levels] == [r.iterations for r in full.levels]
        assert np.array_equal(run.anomaly, full.anomaly)
