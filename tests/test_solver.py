"""Message passing on one process (a 1 × 1 process grid) against the exact solve."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from _problems import AMPLITUDE, LENGTHSCALE, problem, rel_rmse
from mpi4py import MPI

from mpda_dist.baselines import assemble, scaled_residual
from mpda_dist.solver import (
    CONVERGED,
    DIVERGED,
    STALL,
    STALLED,
    UNFREEZE_AFTER,
    Settings,
    Stall,
    solve,
)
from mpda_dist.stencil import build


def run(levels, nodes, **kw):
    s = Settings(**({"max_iterations": 40000} | kw))
    with jax.enable_x64(s.dtype == "float64"):
        return solve(MPI.COMM_WORLD, levels, nodes, 0.15, 1.1, s)


@pytest.mark.parametrize(
    "ny,nx,fraction,extent,c,damping,momentum",
    [
        (24, 32, 0.05, (1.0, 1.0), 10.0, 0.6, 0.5),
        (30, 22, 0.5, (1.5, 0.8), 10.0, 0.6, 0.0),
        (40, 40, 0.01, (1.0, 1.0), 10.0, 0.6, 0.5),
        (24, 32, 0.2, (1.0, 1.0), -2.0, 0.7, 0.5),
        (26, 26, 0.1, (1.0, 1.0), 5.0, 0.5, 0.3),
    ],
)
def test_mp_equals_exact_float64(ny, nx, fraction, extent, c, damping, momentum):
    """The answer is exact, and the residual the solver reports (and stopped on) is the
    true one of the mean it returns, recomputed from the assembled ``Q`` (review
    helper: a residual reported 10x too small, or a stop at 30x the tolerance, passed
    every test but one)."""
    _, nodes, levels, exact = problem(ny, nx, fraction, extent)
    tol = 1e-12
    res = run(levels, nodes, c=c, damping=damping, momentum=momentum, dtype="float64", tol=tol)
    assert res.status == CONVERGED
    top = levels[-1]
    st = build(top, LENGTHSCALE, AMPLITUDE, nodes, (0, top.interior[0]), (0, top.interior[1]))
    true = scaled_residual(assemble(st), st, res.anomaly)
    assert true == pytest.approx(res.levels[-1].residual, rel=1e-3, abs=1e-15)
    assert true < tol
    assert rel_rmse(res.anomaly, exact) <= 1e-8


def test_mp_equals_exact_float32():
    _, nodes, levels, exact = problem(32, 32, 0.05)
    res = run(levels, nodes, dtype="float32", tol=5e-7, max_iterations=20000)
    assert res.levels[-1].residual < 1e-6
    assert res.anomaly.dtype == np.float64
    assert rel_rmse(res.anomaly, exact) <= 1e-4


def test_a_block_without_neighbours_sends_nothing(monkeypatch):
    """One rank, no neighbours: the update programs compute no outgoing cavities
    (``neighbours=False``), so :func:`kernel.pack_cavities` is never traced; the field
    programs (the mean, residuals, shifts, the transfers between levels) neither cut
    an incoming frame nor pack an outgoing one, which takes a field layout; and the
    answer is still exact.  A grid no other test uses and no program store: every
    program of the finest level is traced here."""
    from mpda_dist import kernel, programs

    traced = []
    for name in ("pack_cavities", "field_layout"):
        real = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *a, _n=name, _f=real: traced.append(_n) or _f(*a))
    monkeypatch.setattr(programs, "_STORE", programs.Store(None))
    # traced here, not in lowering helpers (MPDA_LOWER_PROCESSES), which this patch misses
    monkeypatch.setattr(programs.Jit, "_lowered_elsewhere", lambda self, *a: None)
    _, nodes, levels, exact = problem(23, 21, 0.1)
    assert len(levels) >= 2  # a coarse-grid correction: restrictions and prolongations
    res = run(levels, nodes, dtype="float32", tol=5e-7, max_iterations=20000)
    assert res.levels[-1].residual < 1e-6
    assert res.levels[-1].corrections > 0
    assert rel_rmse(res.anomaly, exact) <= 1e-4
    assert traced == []


def test_bilinear_rows_touching_the_boundary_mp_equals_exact():
    """Bilinear observations in cells with corners on the boundary (held at the
    background): the corners there carry no weight in the model.  The message-passing
    hierarchy once kept their couplings, which reached outside the block, and stalled
    at a residual of 0.5 where the direct solve converged."""
    from mpda_dist import observations as obsmod
    from mpda_dist.baselines import exact_solve
    from mpda_dist.multigrid import schedule
    from mpda_dist.stencil import build

    ny, nx = 26, 30
    rng = np.random.default_rng(4)
    # two rows next to each side of the unit square, and a few inside
    edge = np.array([0.01, 0.02, 0.98, 0.99])
    x = np.concatenate([edge, rng.uniform(0.1, 0.9, 4), [0.5, 0.31], rng.uniform(0, 1, 6)])
    y = np.concatenate([rng.uniform(0.1, 0.9, 4), edge, [0.015, 0.985], rng.uniform(0, 1, 6)])
    iy, ix, w = obsmod.bilinear_nodes(x, y, (ny, nx), (1.0, 1.0))
    innovation, precision = rng.standard_normal(len(x)), np.full(len(x), 1e2)
    nodes = obsmod.BilinearObservations(iy, ix, w, innovation, precision)
    levels = schedule(ny, nx, 1 / (ny - 1), 1 / (nx - 1), 8)
    top = levels[-1]
    lobs = nodes.at_level(1, top.interior)
    assert np.any(lobs.weight == 0)  # some corners lie on the boundary
    exact = exact_solve(build(top, 0.15, 1.1, lobs, (0, top.interior[0]), (0, top.interior[1])))
    res = run(levels, nodes, dtype="float64", tol=1e-12)
    assert res.status == CONVERGED
    assert rel_rmse(res.anomaly, exact) <= 1e-8


def test_multigrid_reaches_the_single_level_fixed_point():
    _, nodes, levels, exact = problem(34, 34, 0.1)
    assert len(levels) >= 2
    multi = run(levels, nodes, dtype="float64", tol=1e-12)
    single = run(levels[-1:], nodes, dtype="float64", tol=1e-12)
    assert all(lv.status == CONVERGED for lv in multi.levels)
    assert rel_rmse(multi.anomaly, single.anomaly) <= 1e-8
    assert rel_rmse(multi.anomaly, exact) <= 1e-8


def test_delta_rule_stops_early_and_is_less_accurate():
    _, nodes, levels, exact = problem(24, 32, 0.05)
    delta = run(levels[-1:], nodes, dtype="float64", stopping="delta", momentum=0.0, tol=1e-4)
    resid = run(levels[-1:], nodes, dtype="float64", tol=1e-12, momentum=0.0)
    assert delta.status == CONVERGED
    # which rule ended each (the output's `stopping`: a δ stop says nothing of accuracy)
    assert delta.levels[-1].stopped_by in ("delta", "delta_stall")
    assert resid.levels[-1].stopped_by == "residual"
    assert delta.levels[-1].iterations < resid.levels[-1].iterations
    assert rel_rmse(resid.anomaly, exact) < rel_rmse(delta.anomaly, exact)
    # solver.tol is the rule's ratio δ/δ₀ (it was ignored: always 1e-4)
    loose = run(levels[-1:], nodes, dtype="float64", stopping="delta", momentum=0.0, tol=1e-2)
    assert loose.status == CONVERGED
    assert loose.levels[-1].iterations < delta.levels[-1].iterations


def test_stall_counts_checks_without_a_fall_from_the_last_fall():
    """The stall counters (the unfreeze safety net: 10 % over 10 checks; the δ rule: a
    new low, 1 %, within 5 checks) do not fire on a slow steady fall.  The residual's
    used to compare each check with the one before, so 2 % per check counted as
    stalled after 10 checks (it unfroze at a residual far above the floor)."""
    steady = Stall(0.9)
    assert max(steady.update(0.98**k) for k in range(200)) < UNFREEZE_AFTER
    slow = Stall(0.99)  # δ falling 1.6 % per check: no stop
    assert max(slow.update(0.984**k) for k in range(200)) == 0
    floor = Stall(0.99)  # δ wandering on a floor: stops
    rng = np.random.default_rng(0)
    counts = [floor.update(1e-7 * (1 + 0.05 * rng.standard_normal())) for _ in range(60)]
    assert max(counts) >= STALL


def test_diverging_setting_is_reported():
    _, nodes, levels, _ = problem(24, 24, 0.05)
    res = run(levels[-1:], nodes, dtype="float64", c=1.0, damping=1.0, momentum=0.0)
    assert res.status == DIVERGED
    assert res.levels[-1].iterations <= 200


def test_iteration_cap_is_reported():
    _, nodes, levels, _ = problem(24, 24, 0.05)
    res = run(levels[-1:], nodes, dtype="float64", tol=1e-14, max_iterations=100)
    assert res.status == "max_iterations" and res.levels[-1].iterations == 100


def test_a_tolerance_under_the_dtype_floor_stalls_early():
    """float32 cannot reach 1e-9: after the safety net has moved ``a`` again, a level
    with no 10 % fall for solver.stall_checks checks stops as stalled, not at max_iterations
    (it used to run all 20000)."""
    _, nodes, levels, _ = problem(24, 24, 0.05)
    res = run(levels[-1:], nodes, dtype="float32", tol=1e-9, max_iterations=20000)
    lv = res.levels[-1]
    assert res.status == STALLED and lv.unfrozen_at > 0, lv
    assert lv.iterations < 5000 and 1e-9 < lv.residual < 1e-5, lv


def test_frozen_precisions_update_equals_the_coupled_update():
    """Once ``a`` is at its fixed point, ``iterate_b`` with ``gains(a)`` is one step of
    the coupled update (same ``b``; the coupled ``a`` does not move)."""
    from mpda_dist import kernel
    from mpda_dist.decomposition import Decomposition
    from mpda_dist.exchange import HaloExchange
    from mpda_dist.halo import message_layout
    from mpda_dist.stencil import build

    _, nodes, levels, _ = problem(24, 32, 0.1)
    lv = levels[-1]
    n, m = lv.interior
    st = build(lv, 0.15, 1.1, nodes, (0, n), (0, m))
    with jax.enable_x64(True):
        op = kernel.Operator(*(jax.numpy.asarray(v) for v in (st.diag, st.weights, st.rhs)))
        ex = HaloExchange(Decomposition(MPI.COMM_SELF, (n, m)), message_layout(n, m), float, 1)
        halo = jax.numpy.asarray(ex.edge)
        p = kernel.Params(10.0, 0.6)
        z = np.zeros((12, n, m))
        a, b, bp, _, _ = kernel.iterate(
            *(jax.numpy.asarray(z) for _ in range(3)), op, halo, p, n=300, momentum=0.5
        )
        g = kernel.gains(a, op, halo, p)
        a0, b0, bp0 = np.asarray(a), np.asarray(b), np.asarray(bp)
        ca, cb, cp, _, _ = kernel.iterate(a, b, bp, op, halo, p, n=1, momentum=0.5, delta=False)
        fa, fb, fp, _, _ = kernel.iterate_b(
            *(jax.numpy.asarray(x) for x in (a0, b0, bp0)), g, op, halo, p, n=1, momentum=0.5
        )
    assert np.abs(np.asarray(ca) - a0).max() <= 1e-13 * np.abs(a0).max()
    np.testing.assert_allclose(
        np.asarray(fb), np.asarray(cb), rtol=0, atol=1e-12 * np.abs(cb).max()
    )
    np.testing.assert_array_equal(np.asarray(fa), a0)
    np.testing.assert_array_equal(np.asarray(fp), np.asarray(cp))


def test_freezing_precisions_keeps_the_answer():
    _, nodes, levels, exact = problem(40, 40, 0.05)
    on = run(levels, nodes, dtype="float64", tol=1e-11, momentum=0.5)
    off = run(levels, nodes, dtype="float64", tol=1e-11, momentum=0.5, freeze_precisions=False)
    assert on.status == off.status == CONVERGED
    assert on.levels[-1].precision_iterations > 0 and off.levels[-1].precision_iterations == 0
    assert rel_rmse(on.anomaly, exact) <= 1e-8 and rel_rmse(off.anomaly, exact) <= 1e-8


@pytest.mark.parametrize(
    "grid,size,interior,needle",
    [
        ((1, 1), 1, (62, 3), "too small for solver.method mp, cg or 3dvar: they need at least"),
        ((1, 2), 2, (62, 6), "too small for a 2x1 process grid: blocks need at least 4 nodes"),
        ((2, 1), 1, (62, 8), "has 2 blocks but the job has 1 MPI ranks"),
    ],
)
def test_check_grid_says_what_to_change(grid, size, interior, needle):
    """One rank gets no advice to use fewer ranks; several do."""
    from mpda_dist.decomposition import DecompositionError, check_grid

    check_grid((1, 1), 1, (4, 4))  # the smallest that fits
    check_grid((1, 2), 2, (62, 8))
    with pytest.raises(DecompositionError, match=needle):
        check_grid(grid, size, interior)


def test_a_second_try_restores_the_coarse_levels_and_their_counts():
    """A level solved again in lockstep starts the coarser levels from their warm
    messages of before the first try, and their iteration counts too: the first try's
    visits were reported as the levels' work (15780 against 11540 in sync mode)."""
    from types import SimpleNamespace as NS

    from mpda_dist.solver import _restore_warm_states, _warm_states

    smoothers = [
        NS(a=np.full(2, float(i)), b=None, bp=None, g=None, iterations=10 * i) for i in range(4)
    ]
    hier = NS(smoothers=smoothers)
    warm = _warm_states(hier, 3)  # level 3 retried: levels 1 and 2 are its coarser MP levels
    for sm in smoothers:
        sm.a, sm.iterations = np.zeros(2), sm.iterations + 500
    _restore_warm_states(hier, warm)
    assert [sm.iterations for sm in smoothers] == [500, 10, 20, 530]
    np.testing.assert_array_equal(smoothers[2].a, [2.0, 2.0])


def test_settings_tolerance_follows_the_dtype_and_the_rule():
    """As the config's ``solver.tol`` (config.DEFAULT_TOL): a float64 solve through the
    API stops at 1e-10, not at float32's 1e-5 (review helper)."""
    from mpda_dist.config import DEFAULT_DELTA_TOL, DEFAULT_TOL

    assert Settings().tol == DEFAULT_TOL["float32"] == 1e-5
    assert Settings(dtype="float64").tol == DEFAULT_TOL["float64"] == 1e-10
    assert Settings(stopping="delta").tol == DEFAULT_DELTA_TOL
    assert Settings(dtype="float64", tol=3e-3).tol == 3e-3
