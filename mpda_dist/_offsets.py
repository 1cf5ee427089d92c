"""The 12 neighbour offsets of the 13-point posterior stencil, by slot.

Arrays are laid out y first: an offset is ``(dy, dx)`` in grid nodes.  Message and
weight arrays have shape ``(12, by, bx)``; slot ``k`` of node ``j`` refers to the
neighbour ``j + OFFSETS[k]``.  ``OPPOSITE[k]`` is the slot of ``-OFFSETS[k]``.
"""

from __future__ import annotations

OFFSETS: tuple[tuple[int, int], ...] = (
    (0, 1),
    (0, -1),
    (1, 0),
    (-1, 0),
    (0, 2),
    (0, -2),
    (2, 0),
    (-2, 0),
    (1, 1),
    (-1, -1),
    (1, -1),
    (-1, 1),
)
NSLOTS = len(OFFSETS)
OPPOSITE: tuple[int, ...] = tuple(OFFSETS.index((-dy, -dx)) for dy, dx in OFFSETS)
SLOT: dict[tuple[int, int], int] = {d: k for k, d in enumerate(OFFSETS)}
