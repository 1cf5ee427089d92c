import os
import sys
import tempfile

# Tests import their shared helpers (tests/_problems.py) by name.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One compilation cache for this process and the mpiexec subprocesses it starts: the
# same block shapes recur across tests, and compiling them dominates a CPU test run.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"mpda-tests-jax-{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault(
    "MPDA_PROGRAM_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"mpda-tests-programs-{os.getuid()}"),
)
