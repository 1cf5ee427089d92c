"""Faults: a rank that raises, a rank killed with SIGKILL, a launch without MPI wiring.

Each case is a real ``mpda run`` under ``mpiexec -n 2`` (tests/fault_run.py injects the
fault), watched with hard deadlines; whatever is left is killed by PID afterwards (every
process of the job carries a marker in its environment).  An exception on one rank is
also covered at the MPI level by test_mpi.py::test_failure_on_one_rank_ends_the_job.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from _procs import alive, kill_marked, pids_with_env, wait_gone

HERE = Path(__file__).parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
MPIEXEC, MPDA = BIN / "mpiexec", BIN / "mpda"
MARKER = "MPDA_FAULT_TEST"

# A run that would go on for ever (tol 1e-30 is never met, no stall stop): every rank
# is iterating and exchanging messages when the fault comes.  One level, both ranks
# busy on it.
FOREVER = [
    str(ROOT / "configs" / "small.yaml"),
    *("--set", "grid.nx=40", "--set", "grid.ny=40"),
    *("--set", "solver.multigrid.enabled=false"),
    *("--set", "solver.tol=1e-30", "--set", "solver.max_iterations=1000000000"),
    *("--set", "solver.stall_checks=0"),
]
START_TIMEOUT = 150  # s until the solve runs (JAX import and compilation included)
EXIT_BOUND = 15  # s allowed from the fault to the launcher's exit (seen: < 1 s)


def _clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without a surrounding job's Slurm or MPI wiring."""
    drop = ("SLURM_", "PMI_", "PMIX_", "HYDRA_", "MPIR_", "OMPI_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Job:
    """``mpiexec -n 2 python fault_run.py ...`` with its stdout read line by line."""

    def __init__(self, tmp_path: Path, mode: str, rank: int = 1, checks: int = 3) -> None:
        self.token = uuid.uuid4().hex
        self.stderr_path = tmp_path / "stderr.txt"
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        self.stdout: list[str] = []
        args = [*FOREVER, "-o", str(tmp_path / "out.h5")]
        args += ["--set", f"checkpoint.file={tmp_path / 'ckpt.h5'}"]
        cmd = [str(MPIEXEC), "-n", "2", sys.executable, str(HERE / "fault_run.py")]
        cmd += [mode, str(rank), str(checks), *args]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=_clean_env(**{MARKER: self.token}),
                start_new_session=True,
            )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            # Lines of different ranks may still arrive glued together: split on the
            # markers fault_run.py prints.
            for part in re.split(r"(?=ITERATING |FAULT )", line.rstrip("\n")):
                if part:
                    self.lines.put((time.time(), part.strip()))

    def expect(self, prefix: str, count: int = 1, timeout: float = START_TIMEOUT) -> list[str]:
        """The first ``count`` stdout lines starting with ``prefix`` (fails after timeout)."""
        deadline = time.monotonic() + timeout
        while len(found := [x for x in self.stdout if x.startswith(prefix)]) < count:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None and self.lines.empty():
                pytest.fail(f"no {count} x {prefix!r} within {timeout} s\n{self.output()}")
            try:
                self.stdout.append(self.lines.get(timeout=min(left, 0.5))[1])
            except queue.Empty:
                continue
        return found[:count]

    def wait(self, timeout: float) -> tuple[int, float]:
        """Exit code and the wall-clock time of the exit."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"mpiexec still running {timeout} s after the fault\n{self.output()}")
        return rc, time.time()

    def settle(self, timeout: float = 10.0) -> list[int]:
        """Wait until every process of the job is gone; returns those still alive.
        hydra's mpiexec can exit before its proxy has passed on the ranks' last output
        (and before the ranks are reaped), so read stderr only after this."""
        return wait_gone(pids_with_env(MARKER, self.token), timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def output(self) -> str:
        while not self.lines.empty():
            self.stdout.append(self.lines.get()[1])
        return "--- stdout\n" + "\n".join(self.stdout) + "\n--- stderr\n" + self.stderr()

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        kill_marked(MARKER, self.token)


def _fields(line: str) -> dict[str, str]:
    return dict(word.split("=", 1) for word in line.split()[1:])


pytestmark = pytest.mark.skipif(not MPIEXEC.exists(), reason="mpiexec not in the venv")


@pytest.mark.timeout(240)
def test_exception_mid_solve_ends_every_rank(tmp_path):
    job = Job(tmp_path, "raise", rank=1)
    try:
        pids = [int(_fields(x)["pid"]) for x in job.expect("ITERATING", 2)]
        t_fault = float(_fields(job.expect("FAULT")[0])["t"])
        rc, t_exit = job.wait(EXIT_BOUND + 30)
        elapsed = t_exit - t_fault
        left = job.settle()
        gone = time.time() - t_fault
        print(
            f"exception on rank 1: mpiexec exited {elapsed:.2f} s later with code {rc}, "
            f"every process of the job gone after {gone:.2f} s"
        )
        assert not left, f"still alive 10 s after mpiexec's exit: {left}"
        err = job.stderr()
        assert rc != 0, job.output()
        assert "[rank 1]" in err and "injected failure on rank 1" in err, job.output()
        assert elapsed < EXIT_BOUND, job.output()
        assert not wait_gone(pids, 1), f"ranks still alive: {pids}"
        assert not (tmp_path / "out.h5").exists()
    finally:
        job.cleanup()


@pytest.mark.timeout(240)
def test_ctrl_c_on_one_rank_ends_the_job_without_a_traceback(tmp_path):
    """SIGINT (Ctrl-C; hydra passes it on to every rank) reaching rank 1 alone mid-solve:
    one line from that rank, exit 130 (128 + SIGINT), every rank ended, no output and
    no temporary file, no checkpoint."""
    job = Job(tmp_path, "sigint", rank=1)
    try:
        job.expect("ITERATING", 2)
        rc, _ = job.wait(EXIT_BOUND + 30)
        assert not job.settle(), job.output()
        err = job.stderr()
        assert rc == 130, job.output()
        assert "[rank 1] error: interrupted (SIGINT): stopped without a checkpoint" in err, err
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["stderr.txt"]
    finally:
        job.cleanup()


@pytest.mark.timeout(240)
def test_sigkill_of_one_rank_ends_the_job(tmp_path):
    """hydra (the mpich wheel's mpiexec) sees a rank die by a signal, kills the others
    and exits with the signal number (9), after a 'BAD TERMINATION' banner."""
    job = Job(tmp_path, "report")
    try:
        ranks = {int(f["rank"]): int(f["pid"]) for f in map(_fields, job.expect("ITERATING", 2))}
        time.sleep(0.5)  # further inside the iterations
        assert alive(ranks[1]), job.output()
        t_kill = time.time()
        os.kill(ranks[1], signal.SIGKILL)
        rc, t_exit = job.wait(EXIT_BOUND + 30)
        elapsed = t_exit - t_kill
        left = job.settle()
        gone = time.time() - t_kill
        print(
            f"SIGKILL of rank 1: mpiexec exited {elapsed:.2f} s later with code {rc}, "
            f"every process of the job gone after {gone:.2f} s"
        )
        assert not left, f"still alive 10 s after mpiexec's exit: {left}"
        assert rc != 0, job.output()
        assert elapsed < EXIT_BOUND, job.output()
        assert not alive(ranks[0]), "rank 0 outlived the job"
        assert "BAD TERMINATION" in job.output()  # hydra's report (documented in README)
        assert not (tmp_path / "out.h5").exists()
    finally:
        job.cleanup()


@pytest.mark.timeout(120)
def test_plain_srun_copies_are_refused(tmp_path):
    """What one copy sees under plain ``srun -n 2`` (no MPI wiring): Slurm says 2 tasks
    in a job step, MPI says a world of 1.  It must stop at once with exit code 2 and say
    how to launch (the real thing runs in test_slurm.py when Slurm is installed)."""
    out = tmp_path / "out.h5"
    env = _clean_env(SLURM_NTASKS="2", SLURM_STEP_ID="0", SLURM_PROCID="0", SLURM_JOB_ID="1")
    t0 = time.monotonic()
    proc = subprocess.run(
        [str(MPDA), "run", str(ROOT / "configs" / "small.yaml"), "-o", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "2 tasks" in proc.stderr and "single rank" in proc.stderr, proc.stderr
    assert "srun --mpi=pmi2" in proc.stderr and "mpiexec -n" in proc.stderr, proc.stderr
    assert not out.exists()
    assert time.monotonic() - t0 < 60
