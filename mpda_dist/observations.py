"""Observation sets and the operators ``H``: nearest node and bilinear (DESIGN §1, §5).

Coordinates are in domain units; grid node ``(iy, ix)`` sits at ``(ix·dx, iy·dy)``.
On the sphere ``x`` is longitude in degrees (any value; taken modulo 360) and ``y``
latitude in degrees; the driver passes ``y − lat_min`` as ``y`` and ``(360, lat_max −
lat_min)`` as the extent, with ``periodic_x`` set.
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

    def at_level(
        self, stride: int, interior: tuple[int, int], periodic_x: bool = False
    ) -> NodeObservations:
        """The observations that coincide with nodes of a level of this stride,
        with that level's full-grid indices.  ``periodic_x``: every column is an
        unknown (the sphere), so column indices run ``0..interior[1]-1``."""
        keep = (self.iy % stride == 0) & (self.ix % stride == 0)
        iy, ix = self.iy[keep] // stride, self.ix[keep] // stride
        x0 = 0 if periodic_x else 1
        inside = (iy >= 1) & (iy <= interior[0]) & (ix >= x0) & (ix < interior[1] + x0)
        sel = np.flatnonzero(keep)[inside]
        return NodeObservations(iy[inside], ix[inside], self.innovation[sel], self.precision[sel])


def nearest_nodes(
    x: np.ndarray,
    y: np.ndarray,
    shape: tuple[int, int],
    extent: tuple[float, float],
    periodic_x: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Full-grid indices ``(iy, ix)`` (int64) of the node nearest to each ``(x, y)``.

    This is the operator ``H``.  A coordinate exactly on a node maps to it.  Coordinates
    must be finite; ones just outside the domain (within rounding) map to the boundary.
    Checking them is quality control's job (:func:`mpda_dist.qc.quality_control`).
    With ``periodic_x`` the ``nx`` columns sit at ``i·Lx/nx`` and ``x`` wraps modulo
    ``Lx`` (longitude on the sphere).
    """
    ny, nx = shape
    lx, ly = extent
    if periodic_x:
        ix = np.mod(np.rint(np.mod(np.asarray(x), lx) / lx * nx), nx).astype(np.int64)
    else:
        ix = np.clip(np.rint(np.asarray(x) / lx * (nx - 1)), 0, nx - 1).astype(np.int64)
    iy = np.clip(np.rint(np.asarray(y) / ly * (ny - 1)), 0, ny - 1).astype(np.int64)
    return iy, ix


# The four nodes of a bilinear cell, in this order: (row step, column step).
CORNERS: tuple[tuple[int, int], ...] = ((0, 0), (0, 1), (1, 0), (1, 1))


def bilinear_nodes(
    x: np.ndarray,
    y: np.ndarray,
    shape: tuple[int, int],
    extent: tuple[float, float],
    periodic_x: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bilinear operator ``H``: full-grid indices ``iy, ix`` and weights ``w`` of the
    four nodes of the cell holding each ``(x, y)``, each of shape ``(N, 4)`` in the
    order of :data:`CORNERS`.  Weights are ``≥ 0`` and sum to 1; a point on a node
    puts weight 1 on it.  With ``periodic_x`` the cell east of the last column wraps to
    column 0.  Coordinates must be inside the domain (quality control checks that)."""
    ny, nx = shape
    lx, ly = extent
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if periodic_x:
        fx = np.mod(x, lx) / lx * nx
        i0 = np.minimum(np.floor(fx), nx - 1)
    else:
        fx = np.clip(x / lx * (nx - 1), 0, nx - 1)
        i0 = np.minimum(np.floor(fx), nx - 2)
    fy = np.clip(y / ly * (ny - 1), 0, ny - 1)
    j0 = np.minimum(np.floor(fy), ny - 2)
    tx, ty = fx - i0, fy - j0
    i0, j0 = i0.astype(np.int64), j0.astype(np.int64)
    iy = np.stack([j0 + sy for sy, _ in CORNERS], axis=1)
    ix = np.stack([i0 + sx for _, sx in CORNERS], axis=1)
    if periodic_x:
        ix %= nx
    w = np.stack([(ty if sy else 1 - ty) * (tx if sx else 1 - tx) for sy, sx in CORNERS], axis=1)
    return iy, ix, w


def apply_bilinear(field: np.ndarray, iy: np.ndarray, ix: np.ndarray, w: np.ndarray):
    """``H f`` for a whole-grid field ``(ny, nx)`` and :func:`bilinear_nodes` output."""
    return np.sum(w * field[iy, ix], axis=1)


@dataclass(frozen=True)
class BilinearObservations:
    """Observations with the bilinear operator: each row touches the four nodes of its
    cell (full-grid indices ``iy, ix`` and weights ``weight``, ``(N, 4)`` in the order
    of :data:`CORNERS`).  Nodes held at the background (the boundary) carry weight 0
    here; ``innovation = y − H f_b`` was taken with the full weights."""

    iy: np.ndarray
    ix: np.ndarray
    weight: np.ndarray
    innovation: np.ndarray
    precision: np.ndarray

    def at_level(
        self, stride: int, interior: tuple[int, int], periodic_x: bool = False
    ) -> BilinearObservations:
        """The rows whose weighted nodes all lie on a level of this stride, with that
        level's full-grid indices and boundary nodes' weights set to 0."""
        on = (self.weight == 0) | ((self.iy % stride == 0) & (self.ix % stride == 0))
        keep = np.all(on, axis=1)
        iy, ix = self.iy[keep] // stride, self.ix[keep] // stride
        x0 = 0 if periodic_x else 1
        inside = (iy >= 1) & (iy <= interior[0]) & (ix >= x0) & (ix < interior[1] + x0)
        w = np.where(inside, self.weight[keep], 0.0)
        used = np.any(w != 0, axis=1)
        return BilinearObservations(
            iy[used],
            ix[used],
            w[used],
            self.innovation[keep][used],
            self.precision[keep][used],
        )


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
