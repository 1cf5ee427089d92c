"""Process bookkeeping for tests that start daemons or MPI jobs: find what they left
behind by a marker in the environment and end it by PID, never by name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
MPIEXEC = Path(sys.executable).with_name("mpiexec")


def mpirun(n: int, script: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """``mpiexec -n n python tests/<script> args…`` with a hard timeout (a deadlock
    fails the test instead of hanging it)."""
    cmd = [str(MPIEXEC), "-n", str(n), sys.executable, str(HERE / script), *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (zombies are reaped slowly here)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def pids_with_env(key: str, value: str) -> list[int]:
    """PIDs of live processes (not this one) whose environment holds ``key=value``."""
    needle = f"{key}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if needle in env and alive(int(entry)):
            found.append(int(entry))
    return found


def kill_pids(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def kill_marked(key: str, value: str, rounds: int = 3) -> list[int]:
    """SIGKILL every process marked ``key=value`` (repeatedly: a dying parent may still
    fork); returns the PIDs that were found alive."""
    seen: list[int] = []
    for _ in range(rounds):
        pids = pids_with_env(key, value)
        if not pids:
            break
        seen += pids
        kill_pids(pids)
        time.sleep(0.3)
    return seen


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` is alive; returns those still alive at the deadline."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if alive(p)]
    return left


def environ(pid: int) -> dict[str, str]:
    """The environment of ``pid`` ({} if it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read().split(b"\0")
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in raw if item)
    return {k: v for k, _, v in pairs}


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []
