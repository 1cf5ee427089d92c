"""Multigrid levels and the prolongation of messages between them (DESIGN §2).

Level ``l`` keeps every ``2^l``-th node of the target grid, counted from node 0, so a
coarse node *is* a fine node and an observation on it is used there as it is.  The
coarse grid keeps the fine spacing ×2 (its far edge may sit up to one fine cell inside
the domain); coarse levels only provide a starting point, so the target level's fixed
point does not depend on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Level:
    """One grid of the schedule: ``ny × nx`` points including the boundary.

    ``domain`` is ``"rectangle"`` (Dirichlet boundary on all four sides) or ``"sphere"``
    (a lat/lon grid, :mod:`mpda_dist.sphere`: clip rows at ``lat_range`` held at the
    background, longitude periodic, so every column is an unknown and the interior is
    ``(ny-2, nx)``; ``dy, dx`` in degrees).
    """

    ny: int
    nx: int
    stride: int  # target-grid nodes per node of this level
    dy: float
    dx: float
    domain: str = "rectangle"
    lat_range: tuple[float, float] | None = None  # sphere only, degrees

    @property
    def periodic_x(self) -> bool:
        return self.domain == "sphere"

    @property
    def periodic(self) -> tuple[bool, bool]:
        """``(y, x)`` periodicity of the process grid for this level."""
        return (False, self.periodic_x)

    @property
    def interior(self) -> tuple[int, int]:
        return (self.ny - 2, self.nx if self.periodic_x else self.nx - 2)


def sphere_level(ny: int, nx: int, lat_range: tuple[float, float]) -> list[Level]:
    """The single level of a sphere run.  Multigrid is off on the sphere: halving a
    periodic longitude axis needs an even ``nx`` at every level and the coarse clip rows
    would move, so the schedule is the target grid alone."""
    lo, hi = (float(v) for v in lat_range)
    return [Level(ny, nx, 1, (hi - lo) / (ny - 1), 360.0 / nx, "sphere", (lo, hi))]


def schedule(
    ny: int, nx: int, dy: float, dx: float, min_size: int = 32, enabled: bool = True
) -> list[Level]:
    """Levels from coarsest to the target, halving while the longest side > ``min_size``."""
    levels = [Level(ny, nx, 1, dy, dx)]
    while enabled:
        top = levels[-1]
        if max(top.ny, top.nx) <= min_size:
            break
        cy, cx = (top.ny - 1) // 2 + 1, (top.nx - 1) // 2 + 1
        if min(cy, cx) < 6:  # a block needs 4 interior nodes per side (decomposition)
            break
        levels.append(Level(cy, cx, top.stride * 2, top.dy * 2, top.dx * 2))
    return levels[::-1]


def coarse_index(n_fine: int, n_coarse: int) -> np.ndarray:
    """For each fine interior index, the coarse interior index nearest below it."""
    full = np.arange(1, n_fine + 1)
    return np.clip(full // 2 - 1, 0, n_coarse - 1)


def prolong(messages: np.ndarray, fine_interior: tuple[int, int], mask: np.ndarray) -> np.ndarray:
    """Coarse messages ``(..., nc_y, nc_x)`` → a fine start ``(..., n_y, n_x)``.

    Each fine node takes the messages of the coarse node at (or just before) it, and
    messages on edges that do not exist at the fine level (``mask`` false, shape of the
    result) are zeroed.
    """
    iy = coarse_index(fine_interior[0], messages.shape[-2])
    ix = coarse_index(fine_interior[1], messages.shape[-1])
    return messages[..., iy[:, None], ix[None, :]] * mask


def _interp_axis(values: np.ndarray, n_fine: int, axis: int) -> np.ndarray:
    """Linear interpolation along ``axis`` from a coarse interior (its boundary 0) to
    ``n_fine`` fine interior nodes; fine full index ``F`` sits at coarse ``F/2``."""
    nc = values.shape[axis]
    padded = np.moveaxis(values, axis, -1)
    padded = np.concatenate(
        [np.zeros(padded.shape[:-1] + (1,)), padded, np.zeros(padded.shape[:-1] + (1,))], -1
    )
    pos = np.minimum(np.arange(1, n_fine + 1) / 2.0, nc + 1)
    lo = np.minimum(np.floor(pos).astype(int), nc)
    frac = pos - lo
    out = padded[..., lo] * (1 - frac) + padded[..., np.minimum(lo + 1, nc + 1)] * frac
    return np.moveaxis(out, -1, axis)


def prolong_mean(mean: np.ndarray, fine_interior: tuple[int, int]) -> np.ndarray:
    """Bilinear interpolation of a coarse interior mean ``(nc_y, nc_x)`` to the fine
    interior ``(n_y, n_x)`` (zero anomaly on the boundary)."""
    return _interp_axis(_interp_axis(mean, fine_interior[0], 0), fine_interior[1], 1)
