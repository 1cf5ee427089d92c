"""What crosses a block border, as pure arithmetic (no MPI, no JAX).

A block of shape ``(by, bx)`` has up to 8 neighbours, named by direction
``(sy, sx)`` with ``sy, sx ∈ {-1, 0, 1}`` (``sy = +1``: the block whose rows follow).
A *piece* is a rectangle cut from the source block's arrays; the receiver of the
pieces from direction ``D`` unpacks them in the same order as the sender at ``D``
packed them, so both sides derive the layout from the same function of ``D``.
Shapes only use the block side that sender and receiver share (blocks in one process
row have the same rows), so both sides agree without communicating.

Two kinds of halo:

* message halos: for each slot ``k`` with offset ``d = (dy, dx)``, the receiver needs
  the cavity parameters ``α_k, β_k`` at ``j + d`` for its nodes ``j`` whose neighbour
  lies outside the block: an x strip (``by × |dx|``) from ``(0, sign dx)``, a y strip
  (``|dy| × bx``) from ``(sign dy, 0)`` and a corner (``|dy| × |dx|``) from
  ``(sign dy, sign dx)``.  Source arrays are ``α_0..α_11, β_0..β_11`` (24 arrays).
* field halos: a frame of ``width`` nodes around ``nfields`` fields (for ``Q x``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from mpda_dist._offsets import NSLOTS, OFFSETS

Direction = tuple[int, int]
DIRECTIONS: tuple[Direction, ...] = (
    (-1, -1),
    (-1, 0),
    (-1, 1),
    (0, -1),
    (0, 1),
    (1, -1),
    (1, 0),
    (1, 1),
)


def _sign(v: int) -> int:
    return (v > 0) - (v < 0)


def _edge(sign: int, n: int, size: int) -> slice:
    """Rows (or columns) of a source at ``sign`` that the receiver needs: its first
    ``n`` when it lies after the receiver, its last ``n`` before, all of them when level."""
    if sign > 0:
        return slice(0, n)
    if sign < 0:
        return slice(size - n, size)
    return slice(0, size)


@dataclass(frozen=True)
class Piece:
    """Rectangle ``source[array][rows, cols]`` of a source block, with its shape."""

    array: int
    rows: slice
    cols: slice
    kind: str  # "x", "y", "corner" for message halos; "frame" for field halos
    slot: int  # message slot (field index for field halos)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows.stop - self.rows.start, self.cols.stop - self.cols.start)

    @property
    def size(self) -> int:
        h, w = self.shape
        return h * w


@lru_cache(maxsize=256)
def message_pieces(source: Direction, by: int, bx: int) -> tuple[Piece, ...]:
    """Pieces a receiver takes from its neighbour at ``source`` (see module doc).

    ``by, bx`` are the shape of a block on either side; only the shared side is used.
    """
    pieces: list[Piece] = []
    for beta in (0, 1):
        for k, (dy, dx) in enumerate(OFFSETS):
            sy, sx = _sign(dy), _sign(dx)
            array = k + beta * NSLOTS
            if dx and source == (0, sx):
                pieces.append(Piece(array, slice(0, by), _edge(sx, abs(dx), bx), "x", k))
            if dy and source == (sy, 0):
                pieces.append(Piece(array, _edge(sy, abs(dy), by), slice(0, bx), "y", k))
            if dx and dy and source == (sy, sx):
                pieces.append(
                    Piece(array, _edge(sy, abs(dy), by), _edge(sx, abs(dx), bx), "corner", k)
                )
    return tuple(pieces)


@lru_cache(maxsize=256)
def field_pieces(
    source: Direction, by: int, bx: int, width: int, nfields: int = 1
) -> tuple[Piece, ...]:
    """Pieces of a ``width``-wide frame around ``nfields`` fields from ``source``."""
    sy, sx = source
    return tuple(
        Piece(f, _edge(sy, width, by), _edge(sx, width, bx), "frame", f) for f in range(nfields)
    )


def buffer_size(pieces: tuple[Piece, ...]) -> int:
    return sum(p.size for p in pieces)


def opposite(direction: Direction) -> Direction:
    return (-direction[0], -direction[1])


@dataclass(frozen=True)
class Layout:
    """Where each direction's pieces sit in one flat incoming and one flat outgoing buffer.

    ``incoming[i]`` are the pieces received from ``DIRECTIONS[i]``; ``outgoing[i]`` the
    pieces sent to ``DIRECTIONS[i]`` (what that neighbour takes from its opposite side).
    """

    incoming: tuple[tuple[Piece, ...], ...]
    outgoing: tuple[tuple[Piece, ...], ...]
    fill: tuple[float, ...]  # per source array: the value at a domain edge

    @staticmethod
    def _offsets(groups: tuple[tuple[Piece, ...], ...]) -> tuple[int, ...]:
        out = [0]
        for g in groups:
            out.append(out[-1] + buffer_size(g))
        return tuple(out)

    @property
    def in_offsets(self) -> tuple[int, ...]:
        return self._offsets(self.incoming)

    @property
    def out_offsets(self) -> tuple[int, ...]:
        return self._offsets(self.outgoing)

    def fill_segment(self, i: int) -> np.ndarray:
        """Flat constant payload for direction ``i`` when there is no neighbour."""
        return np.concatenate(
            [np.full(p.size, self.fill[p.array]) for p in self.incoming[i]] or [np.zeros(0)]
        )


@lru_cache(maxsize=64)
def message_layout(by: int, bx: int) -> Layout:
    """Cavity halo layout; at a domain edge ``α = 1, β = 0`` so the message there is 0
    (its weight is 0)."""
    return Layout(
        incoming=tuple(message_pieces(d, by, bx) for d in DIRECTIONS),
        outgoing=tuple(message_pieces(opposite(d), by, bx) for d in DIRECTIONS),
        fill=(1.0,) * NSLOTS + (0.0,) * NSLOTS,
    )


@lru_cache(maxsize=64)
def field_layout(by: int, bx: int, width: int = 2, nfields: int = 1) -> Layout:
    """Frame layout for fields; 0 outside the domain (the Dirichlet anomaly)."""
    return Layout(
        incoming=tuple(field_pieces(d, by, bx, width, nfields) for d in DIRECTIONS),
        outgoing=tuple(field_pieces(opposite(d), by, bx, width, nfields) for d in DIRECTIONS),
        fill=(0.0,) * nfields,
    )
