"""Distributed CG and 3D-Var cases run under ``mpiexec -n P`` by
tests/test_mpi_baselines.py; each exits 0 and prints OK on success.

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
from _problems import AMPLITUDE, LENGTHSCALE, problem, rel_rmse  # noqa: E402
from mpi4py import MPI  # noqa: E402

from mpda_dist import krylov  # noqa: E402
from mpda_dist.solver import CONVERGED  # noqa: E402

RANK = comm.Get_rank()


def _solve(c, method, level, nodes, grid=None, dtype="float64"):
    tol = 1e-10 if dtype == "float64" else 1e-5
    s = krylov.KrylovSettings(tol=tol, dtype=dtype, max_iterations=5000)
    with jax.enable_x64(dtype == "float64"):
        return krylov.solve(c, level, nodes, LENGTHSCALE, AMPLITUDE, method, s, grid)


def same_on_ranks(ny: str, nx: str, px: str = "0", py: str = "0") -> None:
    """CG and 3D-Var on this process grid give the 1-rank answer (and the exact one)."""
    grid = (int(px), int(py)) if int(px) else None
    _, nodes, levels, exact = problem(int(ny), int(nx), 0.08, seed=3)
    level = levels[-1]
    for method in krylov.METHODS:
        res, dist = _solve(comm, method, level, nodes, grid)
        assert res.status == CONVERGED, res
        assert res.ranks == comm.Get_size(), res
        if RANK == 0:
            one, serial = _solve(MPI.COMM_SELF, method, level, nodes)
            diff = rel_rmse(dist, serial)
            err = rel_rmse(dist, exact)
            assert abs(res.iterations - one.iterations) <= 2, (res.iterations, one.iterations)
            assert diff <= 1e-8, (method, diff)
            assert err <= 1e-8, (method, err)
            print(
                f"OK {method} on {res.process_grid}: {res.iterations} iterations "
                f"(1 rank: {one.iterations}), {res.reductions} reductions, "
                f"{res.halo_exchanges} halo exchanges, vs 1 rank {diff:.1e}, vs exact {err:.1e}"
            )
        assert np.isfinite(res.residual)


if __name__ == "__main__":
    globals()[sys.argv[1]](*sys.argv[2:])
