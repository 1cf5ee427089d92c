"""Anderson mixing of the check means (mpda_dist/anderson.py): the mixed residual is
the true residual of the mixed mean, the coefficients minimise it, and the solver
reaches the same answer in fewer iterations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from _problems import problem, rel_rmse
from mpi4py import MPI

from mpda_dist import anderson, kernel
from mpda_dist.halo import field_layout
from mpda_dist.solver import CONVERGED, Settings, solve


def _operator(rng, by, bx):
    w = -rng.uniform(0.1, 1.0, (12, by, bx))
    return kernel.Operator(
        jnp.asarray(np.abs(w).sum(0) + rng.uniform(0.5, 2.0, (by, bx))),
        jnp.asarray(w),
        jnp.asarray(rng.standard_normal((by, bx))),
    )


def test_mixed_residual_is_the_residual_of_the_mixed_mean_and_is_least():
    rng = np.random.default_rng(7)
    by, bx, depth = 9, 11, 3
    with jax.enable_x64(True):
        op = _operator(rng, by, bx)
        frame = jnp.asarray(rng.standard_normal(field_layout(by, bx).in_offsets[-1]))
        acc = anderson.Extrapolation(depth, (by, bx), np.float64)
        mus = [jnp.asarray(rng.standard_normal((by, bx))) for _ in range(depth + 2)]
        for k, mu in enumerate(mus):
            sums = acc.check(mu, frame, op)
            s0 = (op.rhs - kernel.apply_operator(mu, frame, op)) / op.diag
            assert np.isclose(sums[0], float(jnp.sum(s0 * s0)))
            assert acc.count == min(k + 1, depth + 1)
        gamma = acc.coefficients(sums[2:], 1.0, 1.0)
        assert gamma is not None and gamma.shape == (depth,)
        x, r, move = acc.mix(gamma, op.diag)
        # affine: the mixed residual is h - Q x for the mixed mean x
        np.testing.assert_allclose(r, kernel.residual(x, frame, op), atol=1e-10)
        np.testing.assert_allclose(move, x - mus[-1], atol=1e-12)
        # least: no other combination of the last depth + 1 means has a smaller one
        scaled = [(op.rhs - kernel.apply_operator(m, frame, op)) / op.diag for m in mus[-4:]]
        f = np.stack([np.ravel(scaled[-1] - s) for s in scaled[-2::-1]], 1)
        best = np.linalg.lstsq(f, np.ravel(scaled[-1]), rcond=None)[0]
        np.testing.assert_allclose(gamma, best, rtol=1e-8)
        assert np.linalg.norm(r / op.diag) <= np.linalg.norm(scaled[-1])


def test_no_dot_products():
    """The check's sums and the mix are products and sums, not dot products: JAX
    computes float32 dots in TensorFloat-32 on recent NVIDIA GPUs, and XLA autotunes
    them when it compiles.  (The solver's other programs have none either; the Krylov
    baselines' dots ask for full precision.)"""
    rng = np.random.default_rng(5)
    by, bx, depth = 5, 6, 2
    op = _operator(rng, by, bx)
    frame = jnp.zeros(field_layout(by, bx).in_offsets[-1], jnp.float32)
    stack = jnp.zeros((depth + 1, by, bx), jnp.float32)
    mu = jnp.ones((by, bx), jnp.float32)
    texts = {
        "record": anderson.record.lower(stack, stack, mu, frame, op).as_text(),
        "mixed": anderson.mixed.lower(stack, stack, jnp.zeros(depth), op.diag).as_text(),
    }
    for name, text in texts.items():
        assert "dot_general" not in text, name
    one = stack[:1]  # depth 0 (Anderson off never calls them): they still trace
    assert anderson.record.lower(one, one, mu, frame, op).out_info[2].shape == (2,)
    assert anderson.mixed.lower(one, one, jnp.zeros(0), op.diag).out_info[2].shape == (by, bx)
    from mpda_dist import krylov

    text = krylov._lbfgs_direction.lower(stack, mu, jnp.ones(depth + 2), 1.0).as_text()
    assert "dot_general" in text and "HIGHEST" in text


def test_degenerate_history_restarts():
    rng = np.random.default_rng(8)
    with jax.enable_x64(True):
        op = _operator(rng, 6, 6)
        frame = jnp.zeros(field_layout(6, 6).in_offsets[-1])
        acc = anderson.Extrapolation(2, (6, 6), np.float64)
        mu = jnp.asarray(rng.standard_normal((6, 6)))
        assert acc.coefficients(acc.check(mu, frame, op)[2:], 2.0, 2.0) is None  # no history yet
        sums = acc.check(mu, frame, op)  # the same mean twice: F = 0
        gamma = acc.coefficients(sums[2:], 1.0, 1.0)
        assert gamma is None or not np.any(gamma)
        # a residual that did not fall restarts the history from the newest check
        acc.check(mu + 1.0, frame, op)
        assert acc.count == 3 and acc.coefficients(sums[2:], 1.0, 1.0) is None and acc.count == 1
        acc.check(mu - 1.0, frame, op)
        bad = sums.copy()
        bad[2] = np.nan
        assert acc.coefficients(bad[2:], 0.5, 0.5) is None and acc.count == 0


def _run(levels, nodes, depth):
    s = Settings(dtype="float64", tol=1e-9, mode="sync", momentum=0.5, anderson=depth)
    with jax.enable_x64(True):
        return solve(MPI.COMM_SELF, levels, nodes, 0.15, 1.1, s)


def test_mixing_cuts_the_iterations_and_keeps_the_answer():
    _, nodes, levels, exact = problem(66, 66, 0.05, seed=2)
    mixed, plain = _run(levels, nodes, 2), _run(levels, nodes, 0)
    assert mixed.status == plain.status == CONVERGED
    assert mixed.levels[-1].extrapolations > 0 and plain.levels[-1].extrapolations == 0
    # the same fixed point: as close to exact as the unmixed solve at the same tolerance
    assert mixed.levels[-1].residual < 1e-9
    assert rel_rmse(mixed.anomaly, exact) <= max(2 * rel_rmse(plain.anomaly, exact), 1e-8)
    its = [r.iterations for r in mixed.levels[-1:] + plain.levels[-1:]]
    assert its[0] < 0.85 * its[1], its


def test_mixes_that_do_not_help_stop_mixing_for_the_level():
    """A mix fails when the next check's residual is no lower than the one it mixed at
    and above ``GROWTH`` x the level's lowest; after ``MAX_FAILED_MIXES`` the level mixes
    no more (review helper: residuals swinging and growing, mixed every other check).
    Residuals that swing while they fall (few observations) keep their mixing."""

    def mixes(up: float) -> tuple[list[bool], anderson.Extrapolation]:
        rng = np.random.default_rng(3)
        with jax.enable_x64(True):
            op = _operator(rng, 6, 6)
            frame = jnp.zeros(field_layout(6, 6).in_offsets[-1])
            acc = anderson.Extrapolation(2, (6, 6), np.float64)
            mixed, residual, best = [], 1.0, np.inf
            for k in range(16):
                sums = acc.check(jnp.asarray(rng.standard_normal((6, 6))), frame, op)
                residual *= 0.5 if k % 2 == 0 else up  # down, up, down, ...
                best = min(best, residual)
                mixed.append(acc.coefficients(sums[2:], residual, best) is not None)
        return mixed, acc

    growing, acc = mixes(2.5)  # x1.25 per pair of checks
    assert 0 < sum(growing) and acc.failed == anderson.MAX_FAILED_MIXES
    assert not any(growing[-6:]), growing
    falling, acc = mixes(1.5)  # x0.75 per pair: never above GROWTH x the lowest
    assert acc.failed == 0 and sum(falling) >= 6 and any(falling[-4:]), falling


def test_without_momentum_the_mixed_level_converges_to_the_answer():
    """``solver.momentum: 0`` with Anderson mixing (the default depth): the check
    residuals swing, and mixing every other check diverged (the bundled demo did, exit
    3); the failed mixes now stop it, and the answer is the exact one."""
    _, nodes, levels, exact = problem(66, 66, 0.05, seed=1)
    s = Settings(dtype="float32", tol=1e-5, momentum=0.0, anderson=2, max_iterations=5000)
    res = solve(MPI.COMM_SELF, levels, nodes, 0.15, 1.1, s)
    assert res.status == CONVERGED, [(r.status, r.iterations) for r in res.levels]
    assert res.levels[-1].extrapolations > 0
    assert res.levels[-1].iterations < 1000
    assert rel_rmse(res.anomaly, exact) < 2e-3
