"""Cases run under ``mpiexec -n P`` by tests/test_mpi.py; each exits 0 on success.

A failed assertion on any rank aborts the whole job through the runtime's excepthook,
so the test sees a non-zero exit with the rank-tagged traceback instead of a hang.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from mpda_dist import runtime  # noqa: E402  (start() must run before JAX is imported)

comm = runtime.start()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from _problems import globe_problem, problem, rel_rmse  # noqa: E402
from mpi4py import MPI  # noqa: E402

from mpda_dist.decomposition import Decomposition  # noqa: E402
from mpda_dist.exchange import HaloExchange  # noqa: E402
from mpda_dist.halo import DIRECTIONS, field_layout, message_layout  # noqa: E402
from mpda_dist.solver import CONVERGED, Settings, solve  # noqa: E402

RANK = comm.Get_rank()


def _solve(c, levels, nodes, grid=None, **kw):
    s = Settings(**({"dtype": "float64", "tol": 1e-9, "max_iterations": 40000} | kw))
    with jax.enable_x64(True):
        return solve(c, levels, nodes, 0.15, 1.1, s, process_grid=grid)


def sync_equals_serial(ny: str, nx: str, px: str = "0", py: str = "0") -> None:
    """Sync mode on this process grid gives the 1-rank iterates (same iterations) when
    both have the same multigrid levels; with fewer levels (a coarse level's blocks
    would be under 4 nodes a side) both still equal the exact solve."""
    grid = (int(px), int(py)) if int(px) else None
    _, nodes, levels, exact = problem(int(ny), int(nx), 0.08, seed=1)
    dist = _solve(comm, levels, nodes, grid, mode="sync")
    if RANK == 0:
        serial = _solve(MPI.COMM_SELF, levels, nodes, mode="sync")
        assert dist.levels[-1].ranks == comm.Get_size(), dist.levels[-1]
        its = [lv.iterations for lv in dist.levels]
        diff = np.abs(dist.anomaly - serial.anomaly).max() / np.abs(serial.anomaly).max()
        err = np.abs(dist.anomaly - exact).max() / np.abs(exact).max()
        assert err <= 1e-7, err
        if len(dist.levels) == len(serial.levels):
            assert its == [lv.iterations for lv in serial.levels], (its, serial.levels)
            assert diff <= 1e-12, diff
        else:
            assert len(dist.levels) < len(serial.levels), (dist.levels, serial.levels)
            assert diff <= 1e-7, diff
        print(
            f"OK sync grid={dist.levels[-1].process_grid} levels={len(dist.levels)}/"
            f"{len(serial.levels)} iterations={its} diff={diff:.2e} vs exact {err:.2e}"
        )


def sphere_sync_equals_serial(ny: str, nx: str, px: str, py: str) -> None:
    """On a small globe (x periodic: the process grid wraps in longitude), sync mode on
    this process grid gives the 1-rank iterates, and both equal the exact solve."""
    from mpda_dist.solver import Settings as S

    _, nodes, levels, exact, (ell, amp) = globe_problem(int(ny), int(nx))
    s = S(c=-2.0, damping=0.7, dtype="float64", tol=1e-10, max_iterations=20000, mode="sync")
    with jax.enable_x64(True):
        dist = solve(comm, levels, nodes, ell, amp, s, process_grid=(int(px), int(py)))
        if RANK == 0:
            serial = solve(MPI.COMM_SELF, levels, nodes, ell, amp, s)
    if RANK == 0:
        assert dist.levels[-1].process_grid == (int(px), int(py)), dist.levels[-1]
        assert dist.levels[-1].iterations == serial.levels[-1].iterations
        diff = np.abs(dist.anomaly - serial.anomaly).max() / np.abs(serial.anomaly).max()
        assert diff <= 1e-12, diff
        err = np.abs(dist.anomaly - exact).max() / np.abs(exact).max()
        assert err <= 1e-7, err
        print(
            f"OK sphere sync grid={px}x{py} iterations={dist.levels[-1].iterations} "
            f"diff={diff:.2e} vs exact {err:.2e}"
        )


def async_equals_exact(ny: str, nx: str, every: str = "1") -> None:
    """Async mode, exchanging every ``every`` iterations in the level solves,
    converges to the exact solve."""
    _, nodes, levels, exact = problem(int(ny), int(nx), 0.08, seed=2)
    res = _solve(comm, levels, nodes, mode="async", max_staleness=1, tol=1e-12, every=int(every))
    assert all(lv.status == CONVERGED for lv in res.levels), res.levels
    if RANK == 0:
        err = rel_rmse(res.anomaly, exact)
        assert err <= 1e-8, err
        its = [lv.iterations for lv in res.levels]
        print(f"OK async every {every}: rel rmse {err:.2e} iterations {its}")


def periodic_seam(ny: str, nx: str, px: str, py: str) -> None:
    """Halo pieces across a periodic x axis (and an ordinary y axis) are the right ones."""
    interior = (int(ny), int(nx))
    decomp = Decomposition(comm, interior, (int(py), int(px)), periodic=(False, True))
    (r0, r1), (c0, c1) = decomp.extent
    by, bx = decomp.shape

    def source(nrank: int, arrays: int) -> np.ndarray:
        (s0, s1), (t0, t1) = decomp.blocks.extent(nrank)
        g = np.arange(arrays)[:, None, None] * 1e6
        return g + np.arange(s0, s1)[None, :, None] * 1e3 + np.arange(t0, t1)[None, None, :]

    for layout, arrays in ((message_layout(by, bx), 24), (field_layout(by, bx, 2), 1)):
        mine = source(RANK, arrays)
        send = np.concatenate(
            [mine[p.array][p.rows, p.cols].ravel() for g in layout.outgoing for p in g]
        )
        got = HaloExchange(decomp, layout, np.float64, tag=300).exchange(send)
        off = layout.in_offsets
        for i, d in enumerate(DIRECTIONS):
            nb = decomp.neighbours[i]
            seg = got[off[i] : off[i + 1]]
            if nb is None:
                assert d[0] != 0, (d, "x is periodic: every x neighbour exists")
                expect = layout.fill_segment(i)
            else:
                # What the neighbour sends toward us, cut with its own block shape.
                theirs = source(nb, arrays)
                nby, nbx = decomp.blocks.shape(nb)
                sent = message_layout(nby, nbx) if arrays == 24 else field_layout(nby, nbx, 2)
                pieces = sent.outgoing[DIRECTIONS.index((-d[0], -d[1]))]
                expect = np.concatenate([theirs[p.array][p.rows, p.cols].ravel() for p in pieces])
            np.testing.assert_array_equal(seg, expect, err_msg=f"rank {RANK} direction {d}")
    # Across the seam the west neighbour of column block 0 is the last column block.
    if decomp.blocks.coords(RANK)[1] == 0:
        west = decomp.neighbours[DIRECTIONS.index((0, -1))]
        assert decomp.blocks.coords(west)[1] == int(px) - 1
    comm.Barrier()
    if RANK == 0:
        print(f"OK periodic seam on {px}x{py}, blocks {by}x{bx} at {r0},{c0}..{r1},{c1}")


def fail_on_rank1() -> None:
    if RANK == 1:
        raise RuntimeError("injected failure on rank 1")
    comm.Barrier()  # would hang for ever without the abort


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
