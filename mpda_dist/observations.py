"""Observation sets and the nearest-node operator ``H`` (DESIGN §1, §5).

Coordinates are in domain units; grid node ``(iy, ix)`` sits at ``(ix·dx, iy·dy)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class ObservationError(ValueError):
    """Observations that cannot be used; the message names the row."""


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


def check_values(obs: Observations, source: str) -> None:
    """Reject rows that cannot be assimilated, naming the first offending row."""
    for name, arr in (("x", obs.x), ("y", obs.y), ("value", obs.value), ("noise", obs.noise)):
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise ObservationError(
                f"{source}: {name}[{bad[0]}] = {arr[bad[0]]!r} is not finite "
                f"({bad.size} such row(s))"
            )
    bad = np.flatnonzero(obs.noise <= 0)
    if bad.size:
        raise ObservationError(
            f"{source}: noise[{bad[0]}] = {obs.noise[bad[0]]!r} must be > 0 "
            f"({bad.size} such row(s))"
        )


def nearest_nodes(
    obs: Observations, shape: tuple[int, int], extent: tuple[float, float], source: str
) -> tuple[np.ndarray, np.ndarray]:
    """Full-grid indices ``(iy, ix)`` of the node nearest to each observation.

    A coordinate exactly on a node maps to it.  Coordinates outside the domain
    ``[0, Lx] × [0, Ly]`` are an error naming the row.
    """
    ny, nx = shape
    lx, ly = extent
    for name, coord, length in (("x", obs.x, lx), ("y", obs.y, ly)):
        tol = 1e-9 * length
        bad = np.flatnonzero((coord < -tol) | (coord > length + tol))
        if bad.size:
            raise ObservationError(
                f"{source}: row {bad[0]} has {name} = {coord[bad[0]]!r}, outside the domain "
                f"[0, {length}] ({bad.size} such row(s))"
            )
    ix = np.clip(np.rint(obs.x / lx * (nx - 1)).astype(np.int64), 0, nx - 1)
    iy = np.clip(np.rint(obs.y / ly * (ny - 1)).astype(np.int64), 0, ny - 1)
    return iy, ix


def to_nodes(
    obs: Observations,
    shape: tuple[int, int],
    extent: tuple[float, float],
    background: np.ndarray | float,
    source: str,
) -> tuple[NodeObservations, np.ndarray]:
    """Map observations to interior nodes; returns them and a boolean ``used`` per row.

    Observations whose nearest node is on the boundary are not used: the boundary is
    held at the background (Dirichlet), so they cannot change the analysis.
    """
    check_values(obs, source)
    iy, ix = nearest_nodes(obs, shape, extent, source)
    ny, nx = shape
    used = (iy >= 1) & (iy <= ny - 2) & (ix >= 1) & (ix <= nx - 2)
    fb = background[iy, ix] if isinstance(background, np.ndarray) else np.full(len(obs), background)
    nodes = NodeObservations(iy[used], ix[used], (obs.value - fb)[used], 1.0 / obs.noise[used] ** 2)
    return nodes, used


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
