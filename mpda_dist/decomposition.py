"""The process grid: one object owns the Cartesian communicator and the block arithmetic.

The interior ``(n, m)`` (y, x) is cut into ``Py × Px`` non-overlapping blocks; block
extents are pure functions of the coordinates (remainders spread over the first
blocks), so any rank can answer for any other without communicating.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mpda_dist.halo import DIRECTIONS

MIN_BLOCK = 4  # messages reach 2 nodes; a block needs room for that on both sides


class DecompositionError(ValueError):
    """A process grid that does not fit the problem or the number of ranks."""


def chunk(n: int, parts: int, index: int) -> tuple[int, int]:
    """Half-open range of part ``index`` when ``n`` items are split into ``parts``."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


def auto_grid(size: int, interior: tuple[int, int]) -> tuple[int, int]:
    """``(Py, Px)`` with ``Py·Px = size`` that cuts the fewest edges (square-ish blocks)."""
    n, m = interior
    best: tuple[float, int, int] | None = None
    for py in range(1, size + 1):
        if size % py:
            continue
        px = size // py
        cut = (px - 1) * n + (py - 1) * m
        if best is None or cut < best[0]:
            best = (cut, py, px)
    assert best is not None
    return best[1], best[2]


def check_ranks(grid: tuple[int, int], size: int) -> None:
    """A process grid ``(Py, Px)`` must have one block per rank."""
    py, px = grid
    if py * px != size:
        raise DecompositionError(
            f"decomposition.process_grid = [{px}, {py}] has {px * py} blocks but the job "
            f"has {size} MPI ranks; use [Px, Py] with Px·Py = {size}, or 'auto'"
        )


def check_grid(grid: tuple[int, int], size: int, interior: tuple[int, int]) -> None:
    check_ranks(grid, size)
    py, px = grid
    n, m = interior
    if n // py < MIN_BLOCK or m // px < MIN_BLOCK:
        if py * px == 1:
            raise DecompositionError(
                f"grid interior {m}x{n} (x by y) is too small for solver.method mp, cg or "
                f"3dvar: they need at least {MIN_BLOCK} interior nodes per side (grid.nx and "
                f"grid.ny of {MIN_BLOCK + 2} or more); use a finer grid or solver.method: "
                "exact or amg_cg"
            )
        raise DecompositionError(
            f"grid interior {m}x{n} (x by y; grid.nx, grid.ny) is too small for a {px}x{py} "
            f"process grid: blocks need at least {MIN_BLOCK} nodes per side; use fewer ranks "
            "or a finer grid"
        )


@dataclass(frozen=True)
class Blocks:
    """Pure block arithmetic for an interior ``(n, m)`` on a ``(Py, Px)`` grid."""

    interior: tuple[int, int]
    grid: tuple[int, int]
    periodic: tuple[bool, bool] = (False, False)
    # Explicit block boundaries per axis ``(y cuts, x cuts)``, each ``0 … n``; None:
    # even chunks.  Coarse multigrid levels use the cuts that keep their nodes in the
    # fine level's blocks (multigrid.coarse_cuts).
    cuts: tuple[tuple[int, ...], tuple[int, ...]] | None = None

    def axis_cuts(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if self.cuts is not None:
            return self.cuts
        return tuple(  # type: ignore[return-value]
            tuple(chunk(n, p, i)[0] for i in range(p)) + (n,)
            for n, p in zip(self.interior, self.grid, strict=True)
        )

    @property
    def size(self) -> int:
        return self.grid[0] * self.grid[1]

    def coords(self, rank: int) -> tuple[int, int]:
        return divmod(rank, self.grid[1])  # row-major, as Create_cart without reorder

    def extent(self, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
        cy, cx = self.coords(rank)
        if self.cuts is not None:
            (ys, xs) = self.cuts
            return (ys[cy], ys[cy + 1]), (xs[cx], xs[cx + 1])
        return chunk(self.interior[0], self.grid[0], cy), chunk(self.interior[1], self.grid[1], cx)

    def min_side(self) -> int:
        return min(min(np.diff(c)) for c in self.axis_cuts())

    def shape(self, rank: int) -> tuple[int, int]:
        (r0, r1), (c0, c1) = self.extent(rank)
        return r1 - r0, c1 - c0

    def neighbour(self, rank: int, direction: tuple[int, int]) -> int | None:
        """Rank of the neighbour in ``direction``, or None at a non-periodic edge."""
        cy, cx = self.coords(rank)
        ny, nx = cy + direction[0], cx + direction[1]
        py, px = self.grid
        if not 0 <= ny < py:
            if not self.periodic[0]:
                return None
            ny %= py
        if not 0 <= nx < px:
            if not self.periodic[1]:
                return None
            nx %= px
        return ny * px + nx

    def assemble(self, blocks: list[np.ndarray]) -> np.ndarray:
        """Place per-rank blocks ``(..., by, bx)`` into the whole interior."""
        lead = blocks[0].shape[:-2]
        out = np.empty(lead + tuple(self.interior), dtype=blocks[0].dtype)
        for r, blk in enumerate(blocks):
            (r0, r1), (c0, c1) = self.extent(r)
            out[..., r0:r1, c0:c1] = blk
        return out

    def split(self, whole: np.ndarray) -> list[np.ndarray]:
        """The per-rank blocks of a whole-interior array ``(..., n, m)``."""
        out = []
        for r in range(self.size):
            (r0, r1), (c0, c1) = self.extent(r)
            out.append(np.ascontiguousarray(whole[..., r0:r1, c0:c1]))
        return out


class Decomposition:
    """This rank's view: the Cartesian communicator, its block and its neighbours."""

    def __init__(
        self,
        comm: Any,
        interior: tuple[int, int],
        grid: tuple[int, int] | None = None,
        periodic: tuple[bool, bool] = (False, False),
        cuts: tuple[tuple[int, ...], tuple[int, ...]] | None = None,
    ) -> None:
        size = comm.Get_size()
        grid = grid or auto_grid(size, interior)
        if cuts is None:
            check_grid(grid, size, interior)
        self.blocks = Blocks(tuple(interior), tuple(grid), tuple(periodic), cuts)
        if self.blocks.min_side() < MIN_BLOCK:
            raise DecompositionError(
                f"blocks of {self.blocks.min_side()} nodes: need at least {MIN_BLOCK} per side"
            )
        # reorder=False keeps cart rank == rank in comm, which Blocks.coords assumes.
        self.comm = comm.Create_cart(dims=list(grid), periods=list(periodic), reorder=False)
        self.rank = self.comm.Get_rank()
        self.extent = self.blocks.extent(self.rank)
        self.shape = self.blocks.shape(self.rank)
        self.neighbours = tuple(self.blocks.neighbour(self.rank, d) for d in DIRECTIONS)

    @property
    def has_neighbours(self) -> bool:
        return any(n is not None for n in self.neighbours)

    def gather(self, block: np.ndarray, root: int = 0) -> np.ndarray | None:
        """Whole-interior array on ``root`` from every rank's ``(..., by, bx)`` block."""
        block = np.ascontiguousarray(block)
        lead = block.shape[:-2]
        sizes = [
            int(np.prod(lead)) * int(np.prod(self.blocks.shape(r))) for r in range(self.blocks.size)
        ]
        recv = None
        if self.rank == root:
            flat = np.empty(sum(sizes), dtype=block.dtype)
            recv = [flat, (sizes, _displacements(sizes))]
        self.comm.Gatherv(block.ravel(), recv, root=root)
        if self.rank != root:
            return None
        parts = np.split(flat, np.cumsum(sizes)[:-1])
        return self.blocks.assemble(
            [p.reshape(lead + self.blocks.shape(r)) for r, p in enumerate(parts)]
        )

    def scatter(
        self, whole: np.ndarray | None, lead: tuple[int, ...], dtype: Any, root: int = 0
    ) -> np.ndarray:
        """This rank's block ``lead + (by, bx)`` of a whole-interior array held by ``root``."""
        mine = np.empty(lead + self.shape, dtype=dtype)
        send = None
        if self.rank == root:
            assert whole is not None
            parts = [p.astype(dtype, copy=False).ravel() for p in self.blocks.split(whole)]
            sizes = [p.size for p in parts]
            send = [np.concatenate(parts), (sizes, _displacements(sizes))]
        self.comm.Scatterv(send, mine, root=root)
        return mine

    def free(self) -> None:
        self.comm.Free()


def _displacements(sizes: list[int]) -> list[int]:
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
