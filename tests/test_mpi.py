"""Distributed runs under ``mpiexec -n P`` subprocesses, each with a hard timeout."""

from __future__ import annotations

import subprocess
import time

import _procs
import pytest
from _procs import MPIEXEC

pytestmark = pytest.mark.skipif(not MPIEXEC.exists(), reason="mpiexec not in the venv")


def mpirun(n: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return _procs.mpirun(n, "mpi_cases.py", *args, timeout=timeout)


def check(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout, proc.stdout + proc.stderr
    return proc.stdout


# split along y, along x, both (corners); a row of blocks with a middle one is the
# three-rank test below (4 x 1 added nothing to it but a compile)
@pytest.mark.parametrize(
    "n,px,py",
    [(2, 1, 2), (2, 2, 1), (4, 2, 2)],
)
def test_sync_equals_one_rank(n, px, py):
    check(mpirun(n, "sync_equals_serial", "26", "30", str(px), str(py)))


def test_uneven_blocks_three_ranks():
    """28 interior columns in 3 blocks (10, 9, 9); the grid of the tests above, so the
    one-rank solve's programs are stored already."""
    out = check(mpirun(3, "sync_equals_serial", "26", "30", "3", "1"))
    assert "grid=(3, 1)" in out, out


def test_async_converges_to_exact():
    """Exchanging every 2 iterations: the level solves run two updates per call
    between exchanges."""
    check(mpirun(4, "async_equals_exact", "30", "30", "2"))


@pytest.mark.parametrize("n,px,py", [(1, 1, 1), (2, 2, 1), (3, 3, 1), (4, 2, 2)])
def test_periodic_seam_exchange(n, px, py):
    check(mpirun(n, "periodic_seam", "13", "23", str(px), str(py)))


@pytest.mark.parametrize("n,px,py", [(2, 2, 1), (3, 3, 1)])
def test_sphere_sync_equals_one_rank(n, px, py):
    """Split in longitude: the process grid wraps across the 0/360 seam."""
    check(mpirun(n, "sphere_sync_equals_serial", "30", "48", str(px), str(py)))


def test_failure_on_one_rank_ends_the_job():
    t0 = time.perf_counter()
    proc = mpirun(4, "fail_on_rank1", timeout=60)
    elapsed = time.perf_counter() - t0
    assert proc.returncode != 0
    assert elapsed < 30, elapsed
    assert "[rank 1]" in proc.stderr and "injected failure on rank 1" in proc.stderr
