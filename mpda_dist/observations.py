"""Observation sets and the nearest-node operator ``H`` (DESIGN §1, §5).

Coordinates are in domain units; grid node ``(iy, ix)`` sits at ``(ix·dx, iy·dy)``.
Quality control (a flag per row) is in :mod:`mpda_dist.qc`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


class ObservationError(ValueError):
    """Observations that cannot be used; the message names the source (file) and the
    row."""


@dataclass(frozen=True)
class Observations:
    """Point observations: 1-D float64 arrays of equal length."""

    x: np.ndarray
    y: np.ndarray
    value: np.ndarray
    noise: np.ndarray  # standard deviation σ_y per observation

    def __len__(self) -> int:
        return len(self.value)


@dataclass(frozen=True)
class NodeObservations:
    """Observations mapped to interior nodes of the target grid (full-grid indices)."""

    iy: np.ndarray  # int64, 1..ny-2
    ix: np.ndarray
    innovation: np.ndarray  # y − H f_b
    precision: np.ndarray  # 1/σ_y²

    def at_level(self, stride: int, interior: tuple[int, int]) -> NodeObservations:
        """The observations that coincide with nodes of a level of this stride,
        with that level's full-grid indices."""
        keep = (self.iy % stride == 0) & (self.ix % stride == 0)
        iy, ix = self.iy[keep] // stride, self.ix[keep] // stride
        inside = (iy >= 1) & (iy <= interior[0]) & (ix >= 1) & (ix <= interior[1])
        sel = np.flatnonzero(keep)[inside]
        return NodeObservations(iy[inside], ix[inside], self.innovation[sel], self.precision[sel])


def nearest_nodes(
    x: np.ndarray, y: np.ndarray, shape: tuple[int, int], extent: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Full-grid indices ``(iy, ix)`` (int64) of the node nearest to each ``(x, y)``.

    This is the operator ``H``.  A coordinate exactly on a node maps to it.  Coordinates
    must be finite; ones just outside the domain (within rounding) map to the boundary.
    Checking them is quality control's job (:func:`mpda_dist.qc.quality_control`).
    """
    ny, nx = shape
    lx, ly = extent
    ix = np.clip(np.rint(np.asarray(x) / lx * (nx - 1)), 0, nx - 1).astype(np.int64)
    iy = np.clip(np.rint(np.asarray(y) / ly * (ny - 1)), 0, ny - 1).astype(np.int64)
    return iy, ix


def to_nodes(
    obs: Observations,
    shape: tuple[int, int],
    extent: tuple[float, float],
    background: np.ndarray | float,
    source: str,
    **qc_options: Any,
) -> tuple[NodeObservations, np.ndarray]:
    """Quality-control the observations and map the usable ones to interior nodes.

    Returns the node observations and a boolean ``used`` per row.  ``qc_options`` go
    to :func:`mpda_dist.qc.quality_control` (``on_error``, ``duplicates``,
    ``gross_error_k``); its report, with a flag per row, is what the driver keeps.
    Rows nearest a boundary node are never used: the boundary is held at the
    background (Dirichlet), so they cannot change the analysis.
    """
    from mpda_dist import qc  # qc builds on this module's types

    report = qc.quality_control(obs, shape, extent, background, source, **qc_options)
    return report.nodes(), report.used


def synthetic(
    truth: np.ndarray,
    extent: tuple[float, float],
    fraction: float,
    noise: float,
    rng: np.random.Generator,
) -> Observations:
    """A ``fraction`` of the interior nodes, chosen without replacement, observed with
    ``N(0, noise²)`` errors; coordinates are the nodes' positions."""
    ny, nx = truth.shape
    n_int = (ny - 2) * (nx - 2)
    count = max(1, int(round(fraction * n_int)))
    flat = rng.choice(n_int, size=count, replace=False)
    iy, ix = np.divmod(flat, nx - 2)
    iy, ix = iy + 1, ix + 1
    lx, ly = extent
    x = ix * (lx / (nx - 1))
    y = iy * (ly / (ny - 1))
    value = truth[iy, ix] + noise * rng.standard_normal(count)
    return Observations(x, y, value, np.full(count, float(noise)))
