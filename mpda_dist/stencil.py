"""The 13-point posterior stencil ``Q = P + Hᵀ R⁻¹ H`` and ``h`` on a block (DESIGN §1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mpda_dist import prior, sphere
from mpda_dist._offsets import SLOT
from mpda_dist.multigrid import Level
from mpda_dist.observations import CORNERS, BilinearObservations, NodeObservations


@dataclass(frozen=True)
class BlockStencil:
    """Arrays on the block: ``diag (by, bx)``, ``weights (12, by, bx)``, ``rhs (by, bx)``;
    ``weights[k][j] = Q[j, j + OFFSETS[k]]``.  float64, the weights unless built as
    another dtype (:func:`build`)."""

    diag: np.ndarray
    weights: np.ndarray
    rhs: np.ndarray


def build(
    level: Level,
    lengthscale: float,
    amplitude: float,
    obs: NodeObservations | BilinearObservations,
    rows: tuple[int, int],
    cols: tuple[int, int],
    weights_dtype: Any = np.float64,
) -> BlockStencil:
    """Posterior stencil on interior rows ``rows`` × cols ``cols`` of ``level``, its
    weights as ``weights_dtype`` (the solver's own dtype: no float64 copy to convert).

    ``obs`` must already be restricted to the level (:meth:`NodeObservations.at_level`).
    A point observation at a node adds ``1/σ²`` to ``Q_ii`` and ``(y − f_b)/σ²`` to ``h_i``;
    a bilinear one adds ``w_a w_b/σ²`` to ``Q_ab`` for every pair of its four nodes and
    ``w_a (y − H f_b)/σ²`` to ``h_a`` (:func:`_add_bilinear`).
    """
    if level.domain == "sphere":
        diag, weights = sphere.sphere_stencil(
            (level.ny, level.nx), level.lat_range, lengthscale, amplitude, rows, cols
        )
        weights = weights.astype(weights_dtype, copy=False)
    else:
        diag, weights = prior.rectangle_stencil(
            level.interior, (level.dy, level.dx), lengthscale, amplitude, rows, cols, weights_dtype
        )
    rhs = np.zeros_like(diag)
    # Full-grid index -> interior index: the sphere has no boundary columns.
    x0 = 0 if level.periodic_x else 1
    if isinstance(obs, BilinearObservations):
        _add_bilinear(diag, weights, rhs, obs, rows, cols, x0)
        return BlockStencil(diag, weights, rhs)
    iy, ix = obs.iy - 1 - rows[0], obs.ix - x0 - cols[0]
    mine = (iy >= 0) & (iy < rows[1] - rows[0]) & (ix >= 0) & (ix < cols[1] - cols[0])
    np.add.at(diag, (iy[mine], ix[mine]), obs.precision[mine])
    np.add.at(rhs, (iy[mine], ix[mine]), (obs.innovation * obs.precision)[mine])
    return BlockStencil(diag, weights, rhs)


def observation_mass(
    level: Level,
    obs: NodeObservations | BilinearObservations,
    rows: tuple[int, int],
    cols: tuple[int, int],
) -> np.ndarray:
    """The row sums ``Hᵀ R⁻¹ H 1`` of the observation term on the block (float64,
    ``(by, bx)``), what :func:`build` adds to ``diag`` and ``weights`` summed over the
    slots: ``1/σ²`` at a point observation's node; ``w_a Σ_b w_b / σ²`` at corner ``a``
    of a bilinear one.  From the observations alone, without building the prior twice
    and subtracting 13 full-size arrays."""
    by, bx = rows[1] - rows[0], cols[1] - cols[0]
    mass = np.zeros((by, bx))
    x0 = 0 if level.periodic_x else 1
    iy, ix = obs.iy - 1 - rows[0], obs.ix - x0 - cols[0]
    mine = (iy >= 0) & (iy < by) & (ix >= 0) & (ix < bx)
    if isinstance(obs, BilinearObservations):
        total = obs.weight.sum(axis=1) * obs.precision
        for a in range(len(CORNERS)):
            m = mine[:, a] & (obs.weight[:, a] != 0)
            np.add.at(mass, (iy[m, a], ix[m, a]), obs.weight[m, a] * total[m])
    else:
        np.add.at(mass, (iy[mine], ix[mine]), obs.precision[mine])
    return mass


def _add_bilinear(
    diag: np.ndarray,
    weights: np.ndarray,
    rhs: np.ndarray,
    obs: BilinearObservations,
    rows: tuple[int, int],
    cols: tuple[int, int],
    x0: int,
) -> None:
    """``Hᵀ R⁻¹ H`` and ``Hᵀ R⁻¹ (y − H f_b)`` of bilinear rows, in place on the block.

    Two corners of one cell are ``(0, ±1)``, ``(±1, 0)`` or ``(±1, ±1)`` apart, all
    stencil offsets, so the terms land in existing slots and the graph keeps its shape.
    The offset comes from the corners' places in the cell, so it is right across the
    periodic seam too (where the column indices wrap).
    """
    by, bx = diag.shape
    iy = obs.iy - 1 - rows[0]
    ix = obs.ix - x0 - cols[0]
    mine = (iy >= 0) & (iy < by) & (ix >= 0) & (ix < bx)
    for a, (ay, ax) in enumerate(CORNERS):
        m = mine[:, a] & (obs.weight[:, a] != 0)
        ja, ia = iy[m, a], ix[m, a]
        wa = obs.weight[m, a] * obs.precision[m]
        np.add.at(rhs, (ja, ia), wa * obs.innovation[m])
        for b, (by_, bx_) in enumerate(CORNERS):
            val = wa * obs.weight[m, b]
            if a == b:
                np.add.at(diag, (ja, ia), val)
            else:
                np.add.at(weights[SLOT[(by_ - ay, bx_ - ax)]], (ja, ia), val)
