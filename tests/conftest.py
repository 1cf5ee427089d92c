import os
import sys
import tempfile

# Tests import their shared helpers (tests/_problems.py) by name.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One compilation cache for this process and the mpiexec subprocesses it starts: the
# same block shapes recur across tests, and compiling them dominates a CPU test run.
# One per pytest-xdist worker: JAX writes its entries in place, and another worker could
# read one half written (a warning and a recompile).  The program store below is shared:
# it writes whole files and locks.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(
        tempfile.gettempdir(),
        f"mpda-tests-jax-{os.getuid()}{os.environ.get('PYTEST_XDIST_WORKER', '')}",
    ),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# XLA's backend (LLVM) at optimisation level 0: the suite is bound by compiling, not by
# running, and this takes its CPU time from about 21 to 16 minutes (benchmarks/RESULTS.md
# §22).  The HLO passes (fusion, buffer reuse, what the no-copy tests read) are the same.
# A level the user's XLA_FLAGS sets wins.
_FLAGS = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in _FLAGS:
    os.environ["XLA_FLAGS"] = _FLAGS = f"{_FLAGS} --xla_backend_optimization_level=0".strip()
# XLA's CPU code from its older emitters: at that level they compile the kernel's
# programs 3-4 times faster than the fusion emitters (MLIR), for the same HLO
# (benchmarks/RESULTS.md §29).  An XLA that does not know the flag aborts the process,
# so it is tried once in a child (a newer jaxlib may have dropped it); pytest-xdist's
# workers inherit the result.
_EMITTERS = "--xla_cpu_use_fusion_emitters"


def _xla_knows(flag: str) -> bool:
    import subprocess

    env = dict(os.environ, XLA_FLAGS=f"{os.environ['XLA_FLAGS']} {flag}", JAX_PLATFORMS="cpu")
    probe = "import jax.numpy as jnp; (jnp.ones(2) + 1).block_until_ready()"
    try:
        run = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        return False
    return run.returncode == 0


if _EMITTERS not in _FLAGS and _xla_knows(f"{_EMITTERS}=false"):
    os.environ["XLA_FLAGS"] = f"{_FLAGS} {_EMITTERS}=false"
_OWN_STORE = "MPDA_PROGRAM_CACHE_DIR" not in os.environ
os.environ.setdefault(
    "MPDA_PROGRAM_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"mpda-tests-programs-{os.getuid()}"),
)


def _prune_programs(root: str, days: float = 3.0) -> None:
    """Remove the tests' stored programs older than ``days``: the key holds the package's
    source, so each commit writes a new set (about 23 MB), and a CI machine keeps its
    temporary directory between runs.  Within a run the files are fresh.  Only in the
    directory the tests chose, never in one the user set."""
    import time

    if not os.path.isdir(root):
        return
    cutoff = time.time() - days * 86400
    for entry in os.scandir(root):
        try:
            old = entry.is_file() and entry.stat().st_mtime < cutoff
            if old and entry.name.endswith((".pkl", ".lock")):
                os.remove(entry.path)
        except OSError:  # another run's file, gone or not ours: leave it
            pass


if _OWN_STORE:
    _prune_programs(os.environ["MPDA_PROGRAM_CACHE_DIR"])


# The long groups first: with two pytest-xdist workers (`make test`, --dist loadgroup) a
# group is one unit of work, handed out in collection order, and `slurm` (about 2 min)
# and `global` (about 1.5 min) came late, so one worker ran them while the other sat idle
# (benchmarks/RESULTS.md §25).  Within a group the order is unchanged.
_FIRST = ("slurm", "global")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        marker = item.get_closest_marker("xdist_group")
        name = (marker.args[0] if marker.args else marker.kwargs.get("name")) if marker else None
        return _FIRST.index(name) if name in _FIRST else len(_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order
