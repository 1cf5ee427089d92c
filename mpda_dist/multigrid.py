"""Multigrid levels and the index maps between a level and the next coarser one
(DESIGN §2; the cycle itself is in :mod:`mpda_dist.cycle`).

Level ``l`` keeps every other node of level ``l-1``: along an axis with a boundary
(x and y on the rectangle, latitude on the sphere) coarse interior node ``I`` is fine
interior node ``2I + 1`` (full index ``2I + 2``: boundary nodes stay boundary nodes);
along the periodic longitude it is fine column ``2I`` (the sphere halves only an even
number of columns, and an even number of latitude cells).  The coarse grid keeps the fine
spacing × 2; on the rectangle, with an odd number of fine cells, its far edge sits one
fine cell inside the domain, where the coarse correction is held at 0.

Between levels: *injection* (a coarse node takes its fine node's value),
*prolongation* ``P`` (linear interpolation along each axis) and *restriction* ``Pᵀ``
(its transpose, full weighting).  A coarse block holds the coarse nodes that lie in the
fine block (:func:`coarse_cuts`), so all three are local to a block plus a one-node
frame that the field exchange provides.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpda_dist.config import MIN_SIZE


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

    @property
    def offsets(self) -> tuple[int, int]:
        """Per axis ``(y, x)``: the fine interior index of coarse node 0."""
        return (1, 0 if self.periodic_x else 1)

    def coarser(self) -> Level | None:
        """The next coarser level, or None when this one cannot be halved.

        With an odd number of fine cells along an axis with a boundary, the coarse far
        edge cannot fall on the fine one.  On the rectangle it moves one fine cell
        inside (the coarse correction is held at 0 on the last interior row).  On the
        sphere the hierarchy stops there instead: at the strongly anisotropic clip rows
        a misplaced coarse edge made corrections 2-4x weaker (edge inside) or made the
        level diverge (edge outside; benchmarks/RESULTS.md §9), so the sphere halves
        only an even number of latitude cells (:func:`sphere_odd_cells`).
        """
        cy = (self.ny - 1) // 2 + 1  # the far edge on or inside the fine one
        if self.periodic_x:
            if self.nx % 2 or (self.ny - 1) % 2:
                return None
            cx = self.nx // 2
            lo = self.lat_range[0]
            lr = (lo, lo + 2 * self.dy * (cy - 1))
        else:
            cx, lr = (self.nx - 1) // 2 + 1, None
        out = Level(cy, cx, self.stride * 2, self.dy * 2, self.dx * 2, self.domain, lr)
        if min(out.interior) < 4:  # a block needs 4 nodes per side (decomposition)
            return None
        return out


def hierarchy(target: Level, min_size: int = MIN_SIZE, enabled: bool = True) -> list[Level]:
    """Levels from coarsest to ``target``, halving while the longest side > ``min_size``."""
    levels = [target]
    while enabled and max(levels[-1].ny, levels[-1].nx) > min_size:
        nxt = levels[-1].coarser()
        if nxt is None:
            break
        levels.append(nxt)
    return levels[::-1]


def schedule(
    ny: int, nx: int, dy: float, dx: float, min_size: int = MIN_SIZE, enabled: bool = True
) -> list[Level]:
    """Rectangle levels from coarsest to the target (:func:`hierarchy`)."""
    return hierarchy(Level(ny, nx, 1, dy, dx), min_size, enabled)


def sphere_schedule(
    ny: int,
    nx: int,
    lat_range: tuple[float, float],
    min_size: int = MIN_SIZE,
    enabled: bool = True,
) -> list[Level]:
    """Sphere levels from coarsest to the target (:func:`hierarchy`)."""
    lo, hi = (float(v) for v in lat_range)
    target = Level(ny, nx, 1, (hi - lo) / (ny - 1), 360.0 / nx, "sphere", (lo, hi))
    return hierarchy(target, min_size, enabled)


def sphere_odd_cells(levels: list[Level]) -> bool:
    """True when a sphere hierarchy stopped early on an odd number of latitude cells
    (``ny − 1``) that could otherwise have been halved further."""
    c = levels[0]
    return c.periodic_x and (c.ny - 1) % 2 == 1 and c.nx % 2 == 0


def _halves(cells: int, nx: int, min_size: int) -> bool:
    """Whether :func:`hierarchy` would halve a sphere level of ``cells`` latitude cells
    (were it even) and ``nx`` longitudes: above ``min_size``, with 4 interior nodes a
    side after."""
    return max(nx, cells + 1) > min_size and cells // 2 - 1 >= 4 and nx // 2 >= 4


def odd_cells_advice(levels: list[Level], min_size: int) -> str | None:
    """A warning for a sphere hierarchy that stopped on an odd number of latitude cells
    (:func:`sphere_odd_cells`) above ``min_size``, naming the nearest ``grid.ny`` below
    and above whose cells halve as often as the longitudes and ``min_size`` allow;
    None when it did not stop so."""
    c, f = levels[0], levels[-1]
    if not sphere_odd_cells(levels) or not _halves(c.ny - 1, c.nx, min_size):
        return None  # (min_size, or a block's 4 nodes, stopped it)
    cells, most = f.ny - 1, (f.nx & -f.nx).bit_length() - 1  # halvings the longitudes allow
    k = 0  # halvings down to min_size, as hierarchy() counts them
    while k < most and _halves(cells >> k, f.nx >> k, min_size):
        k += 1
    step = 2**k
    below, above = cells // step * step + 1, -(-cells // step) * step + 1
    choices = " or ".join(str(v) for v in dict.fromkeys((below, above)) if v - 1 >= step)
    return (
        f"multigrid stops at {c.nx} x {c.ny} points: {c.ny - 1} latitude cells is odd, and "
        f"the sphere halves only an even number; grid.ny = {choices} (ny - 1 divisible by "
        f"{step}) would coarsen at least {k} time(s), down to solver.multigrid.min_size {min_size}"
    )


def sphere_level(ny: int, nx: int, lat_range: tuple[float, float]) -> list[Level]:
    """The target sphere grid alone (one level)."""
    return sphere_schedule(ny, nx, lat_range, enabled=False)


def coarse_range(lo: int, hi: int, offset: int, n_coarse: int) -> tuple[int, int]:
    """Coarse nodes ``I`` whose fine node ``2I + offset`` lies in fine range ``[lo, hi)``."""
    a, b = -((offset - lo) // 2), -((offset - hi) // 2)  # ceil((lo - offset) / 2), ...
    return min(max(a, 0), n_coarse), min(max(b, 0), n_coarse)


def coarse_cuts(cuts: tuple[int, ...], offset: int, n_coarse: int) -> tuple[int, ...]:
    """Block boundaries of the coarse level that keep every coarse node in the block
    of its fine node (``cuts``: the fine boundaries, ``0 … n_fine``)."""
    out = [coarse_range(c, c, offset, n_coarse)[0] for c in cuts]
    out[-1] = n_coarse
    return tuple(out)


@dataclass(frozen=True)
class AxisMap:
    """Static local indices along one axis between a fine block and its coarse block.

    Indices into *framed* arrays count from the start of a 2-node frame (a block index
    ``i`` is framed index ``i + 2``).
    """

    inject: np.ndarray  # (bc,) block index in the fine block of each coarse node
    restrict: np.ndarray  # (bc, 3) framed fine indices: centre, before, after
    prolong: np.ndarray  # (bf, 2) framed coarse indices of each fine node's two parents
    weight: np.ndarray  # (bf, 2) their weights (1, 0) or (½, ½)


def axis_map(fine: tuple[int, int], coarse: tuple[int, int], offset: int) -> AxisMap:
    """``fine = (f0, f1)``, ``coarse = (c0, c1)`` (global interior ranges)."""
    f0, f1 = fine
    c0, c1 = coarse
    centre = 2 * np.arange(c0, c1) + offset - f0
    framed = centre + 2
    restrict = np.stack([framed, framed - 1, framed + 1], axis=1)
    i = np.arange(f0, f1) - offset
    lo = np.floor_divide(i, 2)
    odd = (i % 2).astype(bool)
    parents = np.stack([lo, lo + odd], axis=1) - c0 + 2
    weight = np.where(odd[:, None], 0.5, np.array([1.0, 0.0])[None, :])
    return AxisMap(centre, restrict, parents, weight)
