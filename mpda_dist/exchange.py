"""Non-blocking border exchange with the 8 neighbours (DESIGN §3). All point-to-point
MPI of the solver lives here.

Each *round* sends one contiguous buffer per neighbour (``Isend``) and posts one
``Irecv`` per neighbour into a fresh host buffer whose edge segments (no neighbour)
already hold the layout's fill values.  Rounds are posted in the same order on every
rank, so MPI's non-overtaking rule pairs them; a caller may keep up to ``max_pending``
rounds in flight and computes on the newest halo that has arrived (bounded staleness).
``max_pending = 0`` is the synchronous exchange.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import numpy as np
from mpi4py import MPI

from mpda_dist.decomposition import Decomposition
from mpda_dist.halo import DIRECTIONS, Layout, opposite

_INDEX = {d: i for i, d in enumerate(DIRECTIONS)}


class HaloExchange:
    """Rounds of halo exchange for one :class:`~mpda_dist.halo.Layout`."""

    def __init__(self, decomp: Decomposition, layout: Layout, dtype: Any, tag: int) -> None:
        self.comm = decomp.comm
        self.neighbours = decomp.neighbours
        self.tag = tag
        self.in_off = layout.in_offsets
        self.out_off = layout.out_offsets
        self.edge = np.concatenate([layout.fill_segment(i) for i in range(len(DIRECTIONS))]).astype(
            dtype
        )
        self.rounds: deque[tuple[list[MPI.Request], np.ndarray, np.ndarray]] = deque()
        self.wait_seconds = 0.0
        self.bytes_sent = 0
        self.rounds_posted = 0

    def frame_edge(self) -> np.ndarray:
        """The flat field frame that a block's programs take when nothing comes in:
        :attr:`edge` (the domain edge's 0 where no neighbour sends), or, for a block
        without neighbours, an empty one, which :func:`mpda_dist.kernel.framed` reads
        as 0 without cutting it into eight pieces (fewer operations to trace and
        compile in every field program)."""
        return self.edge if any(nb is not None for nb in self.neighbours) else self.edge[:0]

    def post(self, send: np.ndarray) -> None:
        """Start a round sending ``send`` (laid out by ``layout.outgoing``)."""
        recv = self.edge.copy()
        reqs: list[MPI.Request] = []
        for i, d in enumerate(DIRECTIONS):
            nb = self.neighbours[i]
            if nb is None:
                continue
            lo, hi = self.in_off[i], self.in_off[i + 1]
            # The neighbour at d sent this toward the opposite direction.
            reqs.append(self.comm.Irecv(recv[lo:hi], source=nb, tag=self.tag + _INDEX[opposite(d)]))
            lo, hi = self.out_off[i], self.out_off[i + 1]
            reqs.append(self.comm.Isend(send[lo:hi], dest=nb, tag=self.tag + i))
            self.bytes_sent += (hi - lo) * send.itemsize
        self.rounds.append((reqs, recv, send))
        self.rounds_posted += 1

    def poll(self, max_pending: int) -> np.ndarray | None:
        """The newest completed halo, or None; waits while more than ``max_pending``
        rounds are in flight."""
        t0 = time.perf_counter()
        latest = None
        while self.rounds:
            reqs, recv, _ = self.rounds[0]
            if len(self.rounds) > max_pending:
                MPI.Request.Waitall(reqs)
            elif not MPI.Request.Testall(reqs):
                break
            self.rounds.popleft()
            latest = recv
        self.wait_seconds += time.perf_counter() - t0
        return latest

    def drain(self) -> np.ndarray | None:
        """Complete every round in flight; the newest halo, or None if none was."""
        return self.poll(0)

    def exchange(self, send: np.ndarray) -> np.ndarray:
        """A synchronous round."""
        self.post(send)
        out = self.poll(0)
        assert out is not None
        return out


def allreduce_max(comm: Any, value: float) -> float:
    """Global maximum of one number."""
    out = np.empty(1)
    comm.Allreduce(np.array([value], dtype=np.float64), out, op=MPI.MAX)
    return float(out[0])


def allreduce_sum(comm: Any, values: np.ndarray) -> np.ndarray:
    """Global sums of a small float64 vector."""
    out = np.empty_like(values)
    comm.Allreduce(np.ascontiguousarray(values), out, op=MPI.SUM)
    return out
