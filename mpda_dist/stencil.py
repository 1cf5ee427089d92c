"""The 13-point posterior stencil ``Q = P + Hᵀ R⁻¹ H`` and ``h`` on a block (DESIGN §1)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpda_dist import prior
from mpda_dist.multigrid import Level
from mpda_dist.observations import NodeObservations


@dataclass(frozen=True)
class BlockStencil:
    """float64 arrays on the block: ``diag (by, bx)``, ``weights (12, by, bx)``,
    ``rhs (by, bx)``; ``weights[k][j] = Q[j, j + OFFSETS[k]]``."""

    diag: np.ndarray
    weights: np.ndarray
    rhs: np.ndarray


def build(
    level: Level,
    lengthscale: float,
    amplitude: float,
    obs: NodeObservations,
    rows: tuple[int, int],
    cols: tuple[int, int],
) -> BlockStencil:
    """Posterior stencil on interior rows ``rows`` × cols ``cols`` of ``level``.

    ``obs`` must already be restricted to the level (:meth:`NodeObservations.at_level`).
    A point observation at a node adds ``1/σ²`` to ``Q_ii`` and ``(y − f_b)/σ²`` to ``h_i``.
    """
    diag, weights = prior.rectangle_stencil(
        level.interior, (level.dy, level.dx), lengthscale, amplitude, rows, cols
    )
    rhs = np.zeros_like(diag)
    iy, ix = obs.iy - 1 - rows[0], obs.ix - 1 - cols[0]
    mine = (iy >= 0) & (iy < rows[1] - rows[0]) & (ix >= 0) & (ix < cols[1] - cols[0])
    np.add.at(diag, (iy[mine], ix[mine]), obs.precision[mine])
    np.add.at(rhs, (iy[mine], ix[mine]), (obs.innovation * obs.precision)[mine])
    return BlockStencil(diag, weights, rhs)
