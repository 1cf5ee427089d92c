"""Distributed CG and 3D-Var under ``mpiexec -n P`` subprocesses, each with a hard
timeout: the same answer on 1, 2 and 4 ranks (cases in tests/mpi_baselines.py)."""

from __future__ import annotations

import subprocess

import _procs
import pytest
from _procs import MPIEXEC

pytestmark = pytest.mark.skipif(not MPIEXEC.exists(), reason="mpiexec not in the venv")


def mpirun(n: int, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return _procs.mpirun(n, "mpi_baselines.py", *args, timeout=timeout)


@pytest.mark.parametrize("n,px,py", [(1, 1, 1), (2, 0, 0), (4, 2, 2)])
def test_cg_and_3dvar_same_answer_on_1_2_4_ranks(n, px, py):
    proc = mpirun(n, "same_on_ranks", "30", "26", str(px), str(py))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("OK") == 2, proc.stdout + proc.stderr
