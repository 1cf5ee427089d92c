"""Anderson-type extrapolation of the means at a level's convergence checks.

Between two checks a level runs ``check_every`` message-passing iterations and (with
multigrid) one coarse-grid correction; the residual then falls by a roughly constant
factor per check (about 0.5 at 256² with 10 % observations).  The residuals
``s_j = D⁻¹(h − Q μ_j)`` are affine in the means, so the affine combination of the
last ``depth + 1`` check means with the smallest residual,

    μ̃ = μ₀ − Σᵢ γᵢ (μ₀ − μᵢ),   γ = argmin ‖s₀ − Σᵢ γᵢ (s₀ − sᵢ)‖,

is known exactly from sums the check computes anyway (a ``depth × depth`` Gram matrix
and ``depth`` products, carried in the check's one global reduction: no extra
synchronisation).  The level then moves its mean to ``μ̃`` the way a coarse-grid
correction moves it (its ``b`` messages shift, :func:`kernel.messages_from_mean`), and
the correction starts from ``μ̃`` and its residual.  This is Anderson mixing of type II
(DIIS) on the means; the fixed point, and so the answer, is unchanged.  With depth 2 it
saves 25–35 % of the finest level's iterations (benchmarks/RESULTS.md §12).

The history lives on the device as two ``(depth + 1, by, bx)`` stacks (one program per
block shape, whatever the number of valid entries).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mpda_dist import kernel
from mpda_dist.programs import jit, zeros

Array = jax.Array
MAX_COEFFICIENT = 5.0  # |γᵢ| above this: the history is nearly degenerate, start it afresh
# A mix fails when the residual at the next check is no lower than the one it mixed at
# and above GROWTH x the level's lowest so far; after MAX_FAILED_MIXES failed mixes the
# level mixes no more.  Without heavy-ball momentum (solver.momentum 0, or 0.01) the
# check residuals swing up and down, the restart rule let every other check mix, and
# each pair of checks grew the residual by about 1.3: the bundled demo diverged.  A
# rule without GROWTH (any mix not followed by a fall) stopped that, but also stopped the
# mixing that sparse observations need (0.05 % of the demo's nodes diverged, 0.1 %
# stalled).  With GROWTH 3 every case measured takes the steps it took before, and the
# demo without momentum converges (benchmarks/anderson_cases.py, RESULTS §31).
GROWTH = 3.0
MAX_FAILED_MIXES = 2


@jit
def record(
    means: Array, scaled: Array, mu: Array, frame: Array, op: kernel.Operator
) -> tuple[Array, Array, Array]:
    """Push ``μ`` and its scaled residual; local ``[Σ s₀², bad, FᵀF (row-major), Fᵀs₀]``
    with ``Fᵢ = s₀ − sᵢ``."""
    s0, sums = kernel.scaled_residual(mu, frame, op)
    means = jnp.concatenate([mu[None], means[:-1]])
    scaled = jnp.concatenate([s0[None], scaled[:-1]])
    f = [s0 - scaled[i] for i in range(1, scaled.shape[0])]
    # FᵀF is symmetric: each product once (d(d+1)/2 reductions), placed twice
    upper = {(i, j): jnp.sum(f[i] * f[j]) for i in range(len(f)) for j in range(i, len(f))}
    ftf = [upper[min(i, j), max(i, j)] for i in range(len(f)) for j in range(len(f))]
    fts = [jnp.sum(fi * s0) for fi in f]
    extra = [jnp.stack([*ftf, *fts])] if f else []  # none at depth 0
    return means, scaled, jnp.concatenate([sums, *extra])


@jit
def mixed(means: Array, scaled: Array, gamma: Array, diag: Array) -> tuple[Array, Array, Array]:
    """The mixed mean, its (unscaled) residual ``h − Q μ̃`` and the move ``μ̃ − μ₀``."""
    g = gamma.astype(means.dtype)
    depth = range(1, means.shape[0])
    move = _combination(g, [means[i] - means[0] for i in depth], means[0])
    s = scaled[0] - _combination(g, [scaled[0] - scaled[i] for i in depth], means[0])
    return means[0] + move, s * diag, move


def _combination(g: Array, terms: list[Array], like: Array) -> Array:
    """``Σᵢ gᵢ termsᵢ`` (zeros like ``like`` when there are none) as products and sums,
    like the sums of :func:`record`: not as dot products, which JAX computes in
    TensorFloat-32 on recent NVIDIA GPUs (10 bits of mantissa) and XLA autotunes when
    it compiles them (about a third of ``record``'s compile time on an H200, RESULTS
    §26)."""
    out = jnp.zeros_like(like)
    for i, term in enumerate(terms):
        out = out + g[i] * term
    return out


class Extrapolation:
    """The check history of one level on this rank (every rank keeps its own block)."""

    def __init__(self, depth: int, shape: tuple[int, int], dtype: Any) -> None:
        self.depth = depth
        self.means = zeros((depth + 1, *shape), dtype)
        self.scaled = zeros((depth + 1, *shape), dtype)
        self.count = 0  # valid history entries, the newest included
        self.last = math.inf  # the residual at the previous check
        self.mixed_at = math.inf  # the residual at the previous check if it mixed
        self.failed = 0  # mixes that failed (see MAX_FAILED_MIXES)

    @property
    def extra(self) -> int:
        """Values this level adds to the check's reduction."""
        return self.depth * self.depth + self.depth

    def restore(
        self,
        means: Any,
        scaled: Any,
        count: int,
        last: float,
        mixed_at: float = math.inf,
        failed: int = 0,
    ) -> None:
        """Continue a checkpointed history (ignored when its depth differs)."""
        self.last, self.mixed_at, self.failed = last, mixed_at, failed
        if means is None or means.shape != self.means.shape:
            return
        self.means = jax.device_put(np.asarray(means, self.means.dtype))
        self.scaled = jax.device_put(np.asarray(scaled, self.scaled.dtype))
        self.count = count

    def reset(self) -> None:
        self.count = 0

    def check(self, mu: Array, frame: Array, op: kernel.Operator) -> np.ndarray:
        """Record this check's mean; local sums ``[Σ s₀², bad, extra…]`` (float64)."""
        self.means, self.scaled, sums = record(self.means, self.scaled, mu, frame, op)
        self.count = min(self.count + 1, self.depth + 1)
        return np.asarray(sums, np.float64)

    def coefficients(self, extra: np.ndarray, residual: float, best: float) -> np.ndarray | None:
        """``γ`` from the globally summed ``extra`` sums of :meth:`check`; None when
        there is no history yet, when the ``residual`` (the stopping rule's) did not
        fall since the last check or the system is degenerate: then the history
        restarts from this check.  The check-to-check map is not a function of the mean
        alone (the messages carry more), so a mix can overshoot; near a rounding floor
        the residual would then grow by a constant factor per check.  The restart stops
        that.  None for good once :data:`MAX_FAILED_MIXES` mixes failed: the next
        check's residual was no lower and above :data:`GROWTH` × ``best``, the level's
        lowest residual so far (residuals that swing and grow from check to check)."""
        if self.mixed_at < math.inf and not residual < self.mixed_at and residual > GROWTH * best:
            self.failed += 1
        self.mixed_at = math.inf
        if not residual < self.last or self.failed >= MAX_FAILED_MIXES:
            self.count = min(self.count, 1)
        self.last = residual
        m = self.count - 1
        if m < 1 or self.failed >= MAX_FAILED_MIXES:
            return None
        d = self.depth
        ftf = np.asarray(extra[: d * d]).reshape(d, d)[:m, :m]
        fts = np.asarray(extra[d * d : d * d + d])[:m]
        if not (np.all(np.isfinite(ftf)) and np.all(np.isfinite(fts))):
            self.reset()
            return None
        gamma = np.linalg.lstsq(ftf, fts, rcond=1e-6)[0]
        if not np.all(np.isfinite(gamma)) or np.max(np.abs(gamma)) > MAX_COEFFICIENT:
            self.count = 1  # keep the newest entry only
            return None
        full = np.zeros(d)
        full[:m] = gamma
        self.mixed_at = residual
        return full

    def mix(self, gamma: np.ndarray, diag: Array) -> tuple[Array, Array, Array]:
        """``(μ̃, h − Q μ̃, μ̃ − μ₀)`` for the coefficients of :meth:`coefficients`."""
        return mixed(
            self.means, self.scaled, jax.device_put(np.asarray(gamma, self.means.dtype)), diag
        )
