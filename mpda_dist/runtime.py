"""Process start-up: MPI, fail-fast error handling, JAX's environment and the C
allocator.

Call :func:`start` before anything imports JAX: thread and GPU-memory settings are
read from the environment when JAX initialises.  What the user already set is kept.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from types import TracebackType
from typing import Any

log = logging.getLogger("mpda_dist")


class LaunchError(RuntimeError):
    """The job was started in a way that cannot work (e.g. plain ``srun`` copies)."""


# GPU memory share: the name jaxlib reads now, and the older one it still accepts
MEM_FRACTION_VARS = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")


# XLA's older CPU code emitters: they compile the solver's programs about twice as fast
# as the fusion emitters (MLIR) that XLA uses by default, into the same HLO and programs
# no slower (benchmarks/RESULTS.md §29).  XLA is retiring them, and an XLA that does not
# know a flag in XLA_FLAGS aborts the process, so the flag is only set for the jaxlib
# versions it was measured with.
LEGACY_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
LEGACY_EMITTERS_JAXLIB = frozenset({"0.10.2"})


def jaxlib_version() -> str | None:
    """The installed jaxlib's version, without importing it."""
    from importlib import metadata

    try:
        return metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return None


def _add_xla_flag(flag: str) -> None:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def _setdefault_env(name: str, value: str) -> None:
    if name not in os.environ:
        os.environ[name] = value


def usable_cores() -> frozenset[int]:
    """The CPUs this process may run on (its affinity: a launcher's binding, a cgroup),
    or all of them where the platform does not say."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return frozenset(range(os.cpu_count() or 1))


def user_threads() -> int | None:
    """The thread count in ``$OMP_NUM_THREADS`` if the user set one (the first of an
    OpenMP list such as ``4,2``), else None; a value that is not a count is ignored."""
    value = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    try:
        return max(1, int(value)) if value else None
    except ValueError:
        return None


def gpu_of(local_rank: int) -> str:
    """Which GPU this rank will use, as a name comparable between the node's ranks,
    without importing JAX: :func:`select_device` takes the GPU ``local_rank mod n`` of
    the ``n`` it sees, which are ``$CUDA_VISIBLE_DEVICES``'s entries if set (up to a
    ``-1``), else the NVIDIA driver's GPUs.  ``"?"`` where neither says: every such rank
    is taken to share one."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        entries = []
        for entry in (e.strip() for e in value.split(",")):
            if not entry or entry == "-1":
                break
            entries.append(entry)
        if entries and entries[0].startswith("MIG-"):
            return entries[0]  # CUDA shows a process one MIG instance: the first
        return entries[local_rank % len(entries)] if entries else "?"
    try:
        count = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return "?"
    return str(local_rank % count) if count else "?"


def configure_jax_env(
    local_size: int, threads: int | None = None, gpu_share: int | None = None
) -> None:
    """Threads and GPU memory per rank when ``local_size`` ranks share a node.

    ``threads``: this rank's share of the cores (:func:`start` counts the ranks that
    share this rank's affinity), overridden by a count the user set in
    ``$OMP_NUM_THREADS``; by default the usable cores over ``local_size``.
    ``gpu_share``: the ranks that use this rank's GPU (:func:`start` compares
    :func:`gpu_of` between the node's ranks; default ``local_size``); when more than
    one, each gets an even share of its memory, and a rank with a GPU of its own keeps
    JAX's default.  XLA's older CPU emitters where the jaxlib is one they were measured
    with (:data:`LEGACY_EMITTERS`).  Never overrides a variable (or an XLA flag) the
    user set.
    """
    threads = user_threads() or threads or max(1, len(usable_cores()) // max(1, local_size))
    flags = os.environ.get("XLA_FLAGS", "")
    if threads == 1 and "xla_cpu_multi_thread_eigen" not in flags:
        _add_xla_flag("--xla_cpu_multi_thread_eigen=false")
    if "xla_cpu_use_fusion_emitters" not in flags and jaxlib_version() in LEGACY_EMITTERS_JAXLIB:
        _add_xla_flag(LEGACY_EMITTERS)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        _setdefault_env(var, str(threads))
    # No preallocation: JAX's default takes 75 % of the GPU at the first allocation,
    # which cost a cold 1024² solve 1.6-2.0 s on an H200 (about 15 ms per GB; 0.003 s
    # without; benchmarks/RESULTS.md §25).  The pool then grows as the solve needs it,
    # and ranks sharing a GPU take only what they use.
    _setdefault_env("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    share = local_size if gpu_share is None else gpu_share
    if share > 1:
        # Ranks share this GPU: an even share of its memory, unless the user gave a
        # share under either name (jaxlib refuses both at once).
        if not any(os.environ.get(v) for v in MEM_FRACTION_VARS):
            os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / share:.3f}"
    _setdefault_env("TF_CPP_MIN_LOG_LEVEL", "2")
    configure_caches()


CACHE_ENV = "MPDA_PROGRAM_CACHE_DIR"  # the program store's directory (mpda_dist.programs)


def configure_caches() -> None:
    """The persistent caches of compiled programs, where the user set none.

    Kernels are compiled per block shape (seconds each); a persistent cache makes every
    later run with the same shapes start at once.  Every program is cached, the small
    ones too: a solve compiles ~50 of them, and on a GPU even a one-op program costs
    ~0.1 s (a first run on an H100 compiled for 37 s; benchmarks/RESULTS.md §8).
    mpda_dist's own store (``$MPDA_PROGRAM_CACHE_DIR``, mpda_dist/programs.py) spares a
    later run the tracing and lowering too, and it holds every program that ``mpda run``
    compiles: a rerun compiles none without JAX's cache.  So JAX's persistent cache is
    the fallback for a store turned off (``MPDA_PROGRAM_CACHE_DIR=""``) or one whose
    directory it will not use (:func:`store_problem`), and otherwise off unless the user
    sets ``$JAX_COMPILATION_CACHE_DIR``: with both, a cold start
    serialised each program twice, holding Python's lock, and hashed each for JAX's key
    (on a CPU 0.7 + 0.7 + 0.1 s for a 512² solve's 41 programs, §28).  JAX computes
    that key while its cache is enabled, even with no directory: it is disabled too
    (``$JAX_ENABLE_COMPILATION_CACHE``)."""
    cache = os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "mpda_dist",
    )
    store = os.environ.get(CACHE_ENV, os.path.join(cache, "programs"))
    if not store or store_problem(store) is not None:  # off, or it will not be used
        _setdefault_env("JAX_COMPILATION_CACHE_DIR", os.path.join(cache, "jax"))
    elif "JAX_COMPILATION_CACHE_DIR" not in os.environ:
        _setdefault_env("JAX_ENABLE_COMPILATION_CACHE", "false")
    _setdefault_env("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    _setdefault_env(CACHE_ENV, store)


def store_problem(root: str | os.PathLike) -> str | None:
    """Why the program store cannot keep its files in ``root`` (created, private, if
    it is missing), or None when it can.  The files are pickles, which run code when
    loaded: a directory that another user owns, or that others may write to, is not
    used."""
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
        st = os.stat(root)
    except OSError as exc:
        return f"not usable ({exc})"
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        return f"not private (owner uid {st.st_uid}, mode {st.st_mode & 0o777:o})"
    return None


MALLOC_ENV = "MPDA_MALLOC"
# glibc's mallopt parameters (<malloc.h>)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def configure_malloc() -> bool:
    """Make glibc's malloc keep freed memory for reuse, unless ``$MPDA_MALLOC`` is
    ``system``.  Returns whether it did (not on other C libraries).

    XLA's CPU runtime allocates each call's large buffers anew.  By default glibc maps
    every allocation above 32 MiB with ``mmap`` and unmaps it when freed, so each call
    page-faults its buffers in again: at 1024² a call of one update (what several ranks
    run) took 31–34 ms against 17 ms per update inside a loop.  Here large blocks come
    from the heap (``M_MMAP_MAX`` 0), freed memory is not handed back to the system
    (``M_TRIM_THRESHOLD`` 2 GiB) and all threads share one arena (``M_ARENA_MAX`` 1),
    so a freed block is found again by the next call: 17.6–20 ms per call, and
    13.5–15.7 instead of 17 ms per update in a loop of 10 (benchmarks/RESULTS.md §14).  A rank
    then keeps its peak memory until it exits.  Call it before JAX allocates."""
    mode = os.environ.get(MALLOC_ENV, "").strip().lower() or "keep"
    if mode not in ("keep", "system"):
        raise ValueError(f"{MALLOC_ENV}={mode!r}: expected keep or system")
    if mode == "system":
        return False
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # not glibc (musl, macOS)
            return False
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1))
    return all([mallopt(param, value) == 1 for param, value in settings])


GC_ENV = "MPDA_GC"
_GC_SETTLED: list[bool] = []


def gc_mode() -> str:
    """``$MPDA_GC``: ``freeze`` (the default) or ``python`` (Python's collector left
    as it is)."""
    mode = os.environ.get(GC_ENV, "").strip().lower() or "freeze"
    if mode not in ("freeze", "python"):
        raise ValueError(f"{GC_ENV}={mode!r}: expected freeze or python")
    return mode


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No automatic garbage collection inside (unless ``$MPDA_GC`` is ``python``): for
    the package's imports, JAX's among them, whose objects all live until the process
    ends; two full collections walked them as they grew, 0.06–0.07 s of a rank's start
    on a 2-core CPU.  Follow it with :func:`settle_gc`."""
    import gc

    if gc_mode() == "python" or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def settle_gc() -> bool:
    """Take every object the process holds now out of the cyclic garbage collector's
    walks (``gc.freeze``), unless ``$MPDA_GC`` is ``python`` or the collector is off.
    Returns whether it did.

    Call it once the imports are done and before the programs are traced (``mpda run``
    does right after its imports, :func:`gc_paused`).  A full collection walks every
    tracked object, about 95 000 once JAX is imported, and holds Python's lock, which a
    cold start's tracing threads and the rank's own build share: tracing a 1024²
    solve's programs for CUDA ran one, 0.07–0.09 s of CPU (benchmarks/RESULTS.md §31).
    The modules and JAX's tables live until the process ends, so freezing them loses
    little: the cyclic garbage the uncollected imports left is kept too (about 6 000
    objects after JAX's); what becomes garbage later is still collected.  Once per process: a later
    call does nothing (a cycle that became garbage in between would never be
    collected)."""
    import gc

    if _GC_SETTLED or gc_mode() == "python" or not gc.isenabled():
        return False
    _GC_SETTLED.append(True)
    gc.freeze()
    return True


# MPI_Abort makes hydra's mpiexec kill every process at once, possibly before its proxy
# has passed on what the failing rank just wrote (the rank-tagged traceback was lost in
# about 1 of 8 aborts in tests/test_faults.py).  A short pause lets it through first.
_ABORT_GRACE_SECONDS = 0.3


def _abort(comm: Any, code: int) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(_ABORT_GRACE_SECONDS)
    comm.Abort(code)


def install_abort_hook(comm: Any) -> None:
    """An uncaught exception on any rank prints a rank-tagged traceback and aborts
    every rank (otherwise the others hang in the next collective or in Finalize)."""
    rank = comm.Get_rank()

    def hook(etype: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        text = "".join(traceback.format_exception(etype, value, tb))
        sys.stderr.write("".join(f"[rank {rank}] {line}\n" for line in text.splitlines()))
        _abort(comm, 1)

    sys.excepthook = hook


def abort_on_error(comm: Any, exc: BaseException | str, code: int = 1) -> None:
    """Report ``exc`` tagged with the rank and end the whole job."""
    rank = comm.Get_rank()
    sys.stderr.write(f"[rank {rank}] error: {exc}\n")
    sys.stderr.flush()
    if comm.Get_size() > 1:
        _abort(comm, code)
    raise SystemExit(code)


SIGINT_EXIT = 130  # Ctrl-C: 128 + SIGINT, as a shell reports it


def end_interrupted() -> None:
    """Ctrl-C (a ``KeyboardInterrupt``) on this rank: one line, every rank ended
    (``MPI_Abort``: the others may not have it), exit :data:`SIGINT_EXIT`.  Before MPI
    has started, this process alone."""
    message = "interrupted (SIGINT): stopped without a checkpoint"
    comm = _COMM
    mpi = sys.modules.get("mpi4py.MPI")
    if comm is None and mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        comm = mpi.COMM_WORLD  # inside start(): MPI runs, its collectives may be waiting
    if comm is None:
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(SIGINT_EXIT)
    abort_on_error(comm, message, SIGINT_EXIT)


def check_launch(world_size: int) -> None:
    """Plain ``srun -n N`` without MPI wiring starts N independent 1-rank copies."""
    ntasks = int(os.environ.get("SLURM_NTASKS", "1") or 1)
    if world_size == 1 and ntasks > 1 and "SLURM_STEP_ID" in os.environ:
        raise LaunchError(
            f"Slurm started {ntasks} tasks but MPI sees a single rank: the tasks were not "
            "wired together. Launch with `srun --mpi=pmi2 mpda run ...` or "
            "`mpiexec -n $SLURM_NTASKS mpda run ...`"
        )


_COMM: Any = None
_EARLY_SIGNALS: list[str] = []  # caught between MPI's start and the run's own handlers
_BEFORE: list[Any] = []  # the SIGUSR1 handler before catch_early_signals, while it catches


def _record_signal(signum: int, _frame: Any) -> None:
    _EARLY_SIGNALS.append(signal.Signals(signum).name)


def catch_early_signals() -> None:
    """Record SIGUSR1 from now until :func:`stop_catching` (``mpda run`` only:
    :func:`start` with ``catch_signals``).  MPICH installs a SIGUSR1 handler of its own
    when MPI starts, which swallowed Slurm's warning before a time limit when it came
    during start-up: the run went on without a checkpoint (review helper).  A no-op
    outside the main thread, where Python cannot set handlers."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.signal(signal.SIGUSR1, _record_signal)
    if not _BEFORE:
        _BEFORE.append(previous)


def stop_catching() -> None:
    """Put back the SIGUSR1 handler that was there before :func:`catch_early_signals`;
    what was recorded stays for :func:`early_signal`.  Called as the run installs its own
    handlers (:meth:`mpda_dist.checkpoint.Requests.install`)."""
    if _BEFORE and threading.current_thread() is threading.main_thread():
        before = _BEFORE.pop()
        signal.signal(signal.SIGUSR1, before if before is not None else signal.SIG_DFL)


def handler_before_catching() -> Any:
    """The SIGUSR1 handler from before :func:`catch_early_signals` while it records, so
    that :func:`mpda_dist.checkpoint.handlers_kept` restores that one after a run, not
    the recorder (a signal between two runs in one process stopped the second, review
    helper); None when nothing records."""
    if not _BEFORE:
        return None
    return _BEFORE[0] if _BEFORE[0] is not None else signal.SIG_DFL


def early_signal() -> str | None:
    """The first signal :func:`catch_early_signals` recorded (and forget them: a later
    run in this process does not see it again)."""
    name = _EARLY_SIGNALS[0] if _EARLY_SIGNALS else None
    _EARLY_SIGNALS.clear()
    return name


EARLY_SIGNAL_ENV = "MPDA_EARLY_SIGNAL"
"""A signal that the launching script got before it started the ranks
(launch/slurm/assimilate.sbatch: Slurm's warning during its set-up), by name (``USR1``
or ``SIGUSR1``): ``mpda run`` takes it as one that came during its start-up."""


_ACTED_ON = ("SIGUSR1", "SIGTERM")  # what a run acts on (mpda_dist.checkpoint.SIGNALS)


def _signal_from_launcher() -> None:
    """Record :data:`EARLY_SIGNAL_ENV`'s signal as an early one, and take it out of the
    environment (it is this run's, not a child process's).  Only SIGUSR1 and SIGTERM, the
    signals a run acts on; another name is reported and ignored (the run goes on as if
    none had come)."""
    name = os.environ.pop(EARLY_SIGNAL_ENV, "").strip().upper()
    if not name:
        return
    name = name if name.startswith("SIG") else f"SIG{name}"
    if name in _ACTED_ON:
        _EARLY_SIGNALS.append(name)
    else:
        print(
            f"mpda: warning: {EARLY_SIGNAL_ENV}={name}: not SIGUSR1 or SIGTERM; ignored",
            file=sys.stderr,
        )


def start(catch_signals: bool = False) -> Any:
    """Initialise MPI and the environment; returns ``COMM_WORLD``.  A second call
    returns the same communicator.  ``catch_signals`` (``mpda run``): record a SIGUSR1
    that comes before the run's own handlers (:func:`catch_early_signals`), or came
    before the rank started (:data:`EARLY_SIGNAL_ENV`)."""
    global _COMM
    if _COMM is not None:
        return _COMM
    if catch_signals:  # before MPI starts (SIGUSR1 would end the process) and after:
        catch_early_signals()
        _signal_from_launcher()
    from mpi4py import MPI  # MPI_Init: MPICH takes SIGUSR1 here

    if catch_signals:
        catch_early_signals()
    comm = MPI.COMM_WORLD
    install_abort_hook(comm)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_size, local_rank = local.Get_size(), local.Get_rank()
    # A launcher that binds each rank to its own cores gives every rank another
    # affinity; unbound ranks share one: divide the cores among the ranks that share.
    mine = usable_cores()
    sharing = sum(cpus == mine for cpus in local.allgather(mine))
    # Ranks with a GPU each (several visible, or bind_gpu.sh's one each) keep all of it
    gpu = gpu_of(local_rank)
    gpu_share = local.allgather(gpu).count(gpu)
    local.Free()
    configure_jax_env(local_size, max(1, len(mine) // max(1, sharing)), gpu_share)
    configure_malloc()
    os.environ["MPDA_LOCAL_RANK"] = str(local_rank)  # this launch's, never an inherited one
    check_launch(comm.Get_size())
    _COMM = comm
    return comm


def start_checked(catch_signals: bool = False) -> Any:
    """:func:`start` for a command: a launch mistake or a bad value of one of the
    package's environment variables is one line on stderr and exit 2 (an input error)."""
    try:
        return start(catch_signals)
    except (LaunchError, ValueError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(2) from None


def select_device(local_rank: int) -> Any:
    """The JAX device for this rank: GPU by node-local rank when several are visible."""
    import jax

    devices = jax.devices()
    return devices[local_rank % len(devices)]


def device_table(comm: Any) -> list[tuple[int, str, str, int, str]]:
    """``(rank, host, device, cores, platform)`` for every rank, gathered on rank 0
    (others get []): ``cores`` is how many CPUs the rank may run on
    (:func:`usable_cores`), ``platform`` JAX's for its device (``cpu``, ``gpu``...)."""
    import jax

    local_rank = int(os.environ.get("MPDA_LOCAL_RANK", "0"))
    dev = select_device(local_rank)
    jax.config.update("jax_default_device", dev)
    row = (comm.Get_rank(), socket.gethostname(), str(dev), len(usable_cores()), dev.platform)
    rows = comm.gather(row, root=0)
    return rows or []


# A rank on an accelerator with fewer usable cores than this compiles its programs
# slowly: a cold 1024² solve compiles about 56 programs, about 13 s of one core's time
# on an H200's host; two ranks bound to a core each took 22.4 s for their first solve,
# 5.8 s unbound (benchmarks/RESULTS.md §30).
FEW_CORES = 4


def few_cores_advice(rows: list[tuple[int, str, str, int, str]]) -> str | None:
    """A warning for :func:`device_table`'s rows when ranks on an accelerator may run on
    fewer than :data:`FEW_CORES` cores each (a launcher's binding, Slurm's default of one
    CPU per task), else None.  Such a rank's compile threads share those cores."""
    short = [(r, c) for r, _, _, c, platform in rows if c < FEW_CORES and platform != "cpu"]
    if not short:
        return None
    few = [r for r, _ in short]
    cores = sorted({c for _, c in short})
    shown = ", ".join(map(str, few[:8])) + (f" and {len(few) - 8} more" if len(few) > 8 else "")
    return (
        f"rank(s) {shown} run on a GPU with {'/'.join(map(str, cores))} usable core(s) each: "
        "their programs compile on those cores, so a cold start takes several times longer. "
        "Give each rank more cores (Slurm: --cpus-per-task=8; Open MPI: --bind-to none or "
        "--map-by slot:PE=8; MPICH: -bind-to core:8; launch/mpirun.sh -t 8 --bind core)"
    )
