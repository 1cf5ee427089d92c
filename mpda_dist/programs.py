"""Compiled programs: in memory, on disk, and shared by every caller that runs the same one.

:func:`jit` is ``jax.jit`` for the package's device functions with one more cache in
front of XLA's.  JAX's persistent compilation cache spares a fresh process the XLA
compilation, but not the tracing, lowering and hashing of every program: for the ~50
programs of a 3-level solve that was 2.6 s of a 3.2 s first solve on a CPU with the
cache filled (benchmarks/RESULTS.md §13), and 5 s on an H100 (§8).  So a compiled
program is also kept as a serialized executable under ``$MPDA_PROGRAM_CACHE_DIR`` (set
by :func:`mpda_dist.runtime.configure_jax_env`; unset or empty: memory only), keyed by
the function, its arguments' shapes, dtypes and static values, the package's source,
the JAX version, the device (on a CPU, its instruction set) and the XLA flags.  A later
process loads it without tracing.

Only programs that XLA compiled in this process are stored: an executable that JAX's
cache loaded does not serialize whole (on a CPU its copy fails when run).  Each jitted
function is named ``<name>_<source digest>``, so JAX's cache holds a program of this
version only if the store once did (delete the two caches together).  Files are written
whole (rename into place), so ranks that compile the same program at once never read
half of one; a file that does not read is removed and the program compiled again
(while JAX's cache holds that program it is not stored again: delete the two caches
together).  The
files are pickles: the directory is created private and not used unless it is.  Each
version of the package adds its own files; delete the directory to reclaim the space.

The solver times compilation apart from solving (``LevelResult.compile_seconds``): one
:class:`Programs` per hierarchy (or baseline solve) gets the compiled program for its
callers and counts the seconds spent compiling or loading it; a coarse level's own
solve and its visits inside the corrections of finer levels run the same program.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import inspect
import logging
import os
import pickle
import platform
import tempfile
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mpda_dist import mlir_contexts
from mpda_dist.runtime import CACHE_ENV, store_problem

mlir_contexts.install()  # one MLIR context per thread for every lowering

log = logging.getLogger("mpda_dist")
# Environment that changes what a traced function computes or how XLA compiles it.
_KEY_ENV = ("XLA_FLAGS", "MPDA_KERNEL_FORM")

_SETTINGS: list[Any] = []


def _key_value(var: str) -> str:
    """``$var`` as the program store's key takes it: ``XLA_FLAGS`` as the flags' last
    values, sorted, so that the same settings in another order (the user's flag before
    or after those :func:`mpda_dist.runtime.configure_jax_env` adds) are one key."""
    value = os.environ.get(var, "")
    if var != "XLA_FLAGS":
        return value
    last = {flag.split("=", 1)[0]: flag for flag in value.split()}
    return " ".join(sorted(last.values()))


_SEEN: list[Any] = [None]


# The backend that programs are traced for: None, this process's (jax.default_backend);
# a lowering helper (mpda_dist/lowering.py) sets the requesting process's.
TRACE_BACKEND: list[str | None] = [None]


def trace_backend() -> str:
    """The backend whose forms a program being traced takes (``cpu``, ``gpu``, …)."""
    return TRACE_BACKEND[0] or jax.default_backend()


# Every Jit by name, for lowering helpers (None where two share a name).
_REGISTRY: dict[str, Any] = {}


def registered(name: str) -> Any:
    """The :class:`Jit` called ``name`` in this process, or None."""
    return _REGISTRY.get(name)


def key_settings(read: Any) -> Any:
    """Make what ``read()`` returns part of every program's key: module settings that
    are read when a program is traced (the fused pass's tile, the kernel's fence), so
    that a program built under other settings is neither reused from memory nor loaded
    from the store."""
    _SETTINGS.append(read)
    return read


def _settings() -> tuple:
    """The registered settings now.  When they changed since the last program call,
    JAX's own caches of traced functions (which do not know them) are cleared first."""
    now = tuple(read() for read in _SETTINGS)
    if now != _SEEN[0]:
        if _SEEN[0] is not None:
            jax.clear_caches()
        _SEEN[0] = now
    return now


def _signature(args: Any) -> tuple:
    """Shape, dtype and weak type of each leaf (a Python scalar: its type).  On every
    call of a program, so kept cheap: the dtype objects themselves, not their names
    (33 → 4 µs for an update's arguments)."""
    out = []
    for x in jax.tree.leaves(args):
        dt = getattr(x, "dtype", None)
        if dt is None:
            out.append(((), type(x).__name__, True))
        else:
            out.append((tuple(x.shape), np.dtype(dt), bool(getattr(x, "weak_type", False))))
    return tuple(out)


@functools.cache
def _source_digest() -> str:
    """The package's source: any edit makes every stored program stale."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@functools.cache
def _host_features() -> str:
    """The CPU's instruction-set flags: a CPU executable compiled on one node may not
    run on another (a cache directory in a home shared by a cluster)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha256((platform.machine() + flags).encode()).hexdigest()[:16]


def _device_of(args: Any) -> Any:
    """The device a program for ``args`` runs on: their own, or the default one (for
    ``jax.ShapeDtypeStruct`` and host values)."""
    for x in jax.tree.leaves(args):
        devices = getattr(x, "devices", None)
        if callable(devices):
            return min(devices(), key=lambda d: d.id)
    default = jax.config.jax_default_device
    return default if isinstance(default, jax.Device) else jax.devices()[0]


_HITS = threading.local()  # JAX cache hits, per thread: the event comes in the compiling one
_LISTENING = [False]


def _jax_cache_hits() -> int:
    """Executables that JAX's persistent cache loaded in this thread so far."""
    if not _LISTENING[0]:

        def count(event: str, **_: Any) -> None:
            if event == "/jax/compilation_cache/cache_hits":
                _HITS.n = getattr(_HITS, "n", 0) + 1

        jax.monitoring.register_event_listener(count)
        _LISTENING[0] = True
    return getattr(_HITS, "n", 0)


def _compile_fresh(lowered: Any) -> tuple[Any, bool]:
    """``lowered.compile()``, and whether XLA compiled it in this thread (not JAX's
    cache).  An executable that JAX's cache loaded does not serialize whole: on a CPU
    its copy fails when run (a fused function is missing), and so does one compiled
    again in the same process, which XLA's CPU compiler builds from the same parts.
    Such a program is not stored; the store's versioned names (:class:`Jit`) make this
    rare."""
    hits = _jax_cache_hits()
    compiled = lowered.compile()
    return compiled, _jax_cache_hits() == hits


class Store:
    """Serialized executables in one directory (None: nothing stored).

    The directory is created private (0700).  One that another user owns, or that others
    may write to, is not used (the files are pickles: loading one runs its code)."""

    def __init__(self, root: str | os.PathLike | None) -> None:
        self.root = Path(root) if root else None
        self.loaded = 0
        self.saved = 0
        self._checked = False
        self._held: dict[Path, int] = {}  # the locks this process holds: their files

    @classmethod
    def from_env(cls) -> Store:
        return cls(os.environ.get(CACHE_ENV) or None)

    def _usable(self) -> bool:
        if self._checked or self.root is None:
            return self.root is not None
        self._checked = True
        problem = store_problem(self.root)
        if problem is not None:
            log.warning(
                "program cache %s %s: not used; remove it or point %s at a directory of "
                "your own (%s)",
                self.root,
                problem,
                CACHE_ENV,
                "JAX's persistent cache stores the programs instead"
                if os.environ.get("JAX_COMPILATION_CACHE_DIR")
                else "programs are not stored",
            )
            self.root = None
            return False
        return True

    def path(self, name: str, key: tuple, device: Any) -> Path | None:
        if "<" in name or not self._usable():  # lambdas and locals have no stable name
            return None
        import jaxlib

        text = repr(
            (
                name,
                key,
                _source_digest(),
                jax.__version__,
                jaxlib.__version__,
                device.platform,
                device.client.platform_version,
                device.device_kind,
                device.id,
                _host_features() if device.platform == "cpu" else "",
                tuple(_key_value(v) for v in _KEY_ENV),
            )
        )
        digest = hashlib.sha256(text.encode()).hexdigest()[:40]
        return self.root / f"{name.rsplit('.', 1)[-1]}-{digest}.pkl"

    def load(self, path: Path | None) -> Any:
        if path is None or not path.is_file():
            return None
        from jax.experimental import serialize_executable

        try:
            payload, in_tree, out_tree = pickle.loads(zlib.decompress(path.read_bytes()))
        except Exception as exc:  # damaged (a truncated write, another format): removed
            log.debug("program cache: %s does not read (%s); compiling", path, exc)
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            return None
        try:
            compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
        except Exception as exc:  # maybe this process's trouble (device memory): kept
            log.debug("program cache: %s does not load (%s); compiling", path, exc)
            return None
        self.loaded += 1
        return compiled

    # -- Sharing the work between processes (ranks on one node) ------------------------
    # A process that compiles a program it will store first takes an exclusive
    # ``flock`` on ``<file>.lock``.  Another process's background compiles skip a locked
    # program and go on with the next, so two ranks that need the same programs
    # compile about half each; a program needed now waits for the file instead.  The
    # kernel lets go of the lock when its process ends, however it ends, so a lock file
    # left by a killed job (or naming a pid that now belongs to another process) holds
    # no one up.  Where the file system has no locks, nobody waits: each compiles.

    def claim(self, path: Path) -> bool:
        """Take the lock for ``path``: True unless another process (or another thread's
        claim) holds it.  A lock that cannot be made or taken does not stop anyone."""
        lock = _lock_of(path)
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o600)
            except OSError:
                return True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError:  # no locks on this file system
                os.close(fd)
                return True
            try:  # the holder before may have removed the file we opened: try the new one
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except OSError:
                same = False
            if same:
                with contextlib.suppress(OSError):  # for people: who holds it
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{platform.node()} {os.getpid()}".encode())
                self._held[path] = fd
                return True
            os.close(fd)
        return True

    def release(self, path: Path) -> None:
        fd = self._held.pop(path, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                _lock_of(path).unlink()
            os.close(fd)

    def wait(self, path: Path, limit: float) -> Any:
        """While another process holds the lock for ``path`` (at most ``limit`` s): the
        program once it is stored, or None when the lock goes without it."""
        lock = _lock_of(path)
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and not path.is_file() and _held(lock):
            time.sleep(0.02)
        return self.load(path)

    def save(self, path: Path | None, compiled: Any) -> None:
        if path is None:
            return
        from jax.experimental import serialize_executable

        tmp = None
        try:
            blob = zlib.compress(pickle.dumps(serialize_executable.serialize(compiled)), 1)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".pkl")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
            tmp = None
            self.saved += 1
        except Exception as exc:  # not serializable here, a full or read-only disk
            log.debug("program cache: %s not written (%s)", path, exc)
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


LOCK_WAIT = 300.0  # seconds a needed program waits for another process's compile


def _lock_of(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _held(lock: Path) -> bool:
    """Whether some process holds ``lock`` now (False when it is gone, or when the file
    system cannot tell)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # and with it the shared lock just taken
    return False


_STORE: Store | None = None
# Seconds that callers (not the background threads) spent compiling, loading or
# waiting for programs: what a level's compile_seconds counts, whichever call it was.
_CLOCK = [0.0]
# Per program name, over this process (background threads included): calls that
# loaded, traced and lowered, or compiled, and the seconds each took.  Read by
# :func:`compile_report` (benchmarks; the GPU runs' multi-rank cold start).
_STATS: dict[str, list[float]] = {}
_STATS_LOCK = threading.Lock()
# One background thread traces and lowers at a time.  That work holds the interpreter
# lock, so N threads tracing at once each take about N times as long, and the first
# programs of the queue (the ones needed first) reach the compiler last; in turn, each
# is traced at full speed and compiles (without the lock) while the next is traced.
_TRACING = threading.Lock()
# The callers' waits, in order: (name, seconds, "background" when a prefetch was still
# compiling it, else "here").  What a cold start's main thread waited for
# (:func:`wait_report`); the first _WAITS_KEPT only.
_WAITS: list[tuple[str, float, str]] = []
_WAITS_KEPT = 10_000


def _count(name: str, loaded: float, lowered: float, compiled: float) -> None:
    with _STATS_LOCK:
        row = _STATS.setdefault(name, [0, 0.0, 0.0, 0.0])
        row[0] += 1
        row[1] += loaded
        row[2] += lowered
        row[3] += compiled


def compile_report(top: int = 10) -> list[tuple[str, int, float, float, float]]:
    """The programs that took longest to get, as ``(name, programs, load s, trace and
    lower s, compile s)``, slowest first."""
    with _STATS_LOCK:
        rows = [(k.rsplit(".", 1)[-1], int(v[0]), *v[1:]) for k, v in _STATS.items()]
    return sorted(rows, key=lambda r: -(r[2] + r[3] + r[4]))[:top]


def wait_report(top: int = 10) -> tuple[float, int, list[tuple[str, float, str]]]:
    """The callers' waits for programs so far: the seconds in all, how many calls
    waited, and the ``top`` longest as ``(name, seconds, where)``, ``where`` being
    ``background`` (a prefetch was compiling it) or ``here`` (the caller got it)."""
    waits = list(_WAITS)
    longest = sorted(waits, key=lambda w: -w[1])[:top]
    return sum(w[1] for w in waits), len(waits), longest


def store() -> Store:
    """The process's store, from ``$MPDA_PROGRAM_CACHE_DIR`` at its first use."""
    global _STORE
    if _STORE is None:
        _STORE = Store.from_env()
    return _STORE


def set_store(s: Store | None) -> None:
    """Use ``s`` from now on (None: read the environment again at the next use)."""
    global _STORE
    _STORE = s


class Jit:
    """A ``jax.jit`` function whose compiled programs are looked up in memory, then in
    the :func:`store`, before they are traced and compiled.  Called with tracers (from
    inside another jitted function) it is the plain jitted function."""

    def __init__(self, fun: Any, static_argnames: tuple[str, ...], donate_argnums: tuple) -> None:
        self.name = f"{fun.__module__}.{fun.__qualname__}"
        # The program's name carries the source digest, so JAX's own cache keys differ
        # with every version of the package, as the store's do: a program that the
        # store lacks is rarely in JAX's cache (whose copies cannot be stored, see
        # _compile_fresh).
        versioned = functools.wraps(fun)(lambda *a, **k: fun(*a, **k))
        versioned.__name__ = f"{fun.__name__}_{_source_digest()[:10]}"
        self.jitted = jax.jit(
            versioned, static_argnames=static_argnames, donate_argnums=donate_argnums
        )
        self.static = frozenset(static_argnames)
        self.options = (tuple(static_argnames), tuple(donate_argnums))
        _REGISTRY[self.name] = None if self.name in _REGISTRY else self
        names = list(inspect.signature(fun).parameters)
        self.static_at = {i: n for i, n in enumerate(names) if n in self.static}
        self.programs: dict[Any, Any] = {}
        self.pending: dict[Any, Future] = {}
        functools.update_wrapper(self, fun)

    def lower(self, *args: Any, **static: Any) -> Any:
        return self.jitted.lower(*args, **static)

    def _key(self, args: tuple, static: dict) -> tuple[tuple, dict, tuple]:
        if self.static_at and len(args) > min(self.static_at):
            args, static = self._split(args, static)
        unknown = set(static) - self.static
        if unknown:
            raise TypeError(f"{self.name}: keyword arguments {sorted(unknown)} are not static")
        x64 = bool(jax.config.jax_enable_x64)
        sig = (_signature(args), jax.tree.structure(args))
        return args, static, (sig, tuple(sorted(static.items())), _settings(), x64)

    def compiled(self, *args: Any, **static: Any) -> tuple[Any, float]:
        """The compiled program for arguments like these (arrays, or
        ``jax.ShapeDtypeStruct``), and the seconds it took to compile, load or wait for
        it now (0 when it was in memory).  Static arguments may come by position too;
        the program takes the others, by position."""
        args, static, key = self._key(args, static)
        # The job first, then memory: a job puts its program in memory before it leaves
        # ``pending``, so one that ends between the two looks is found in memory (the
        # other order missed it in both and compiled it again here).
        job = self.pending.get(key)
        hit = self.programs.get(key)
        if hit is not None:
            return hit, 0.0
        t0, where = time.perf_counter(), "here"
        try:
            if job is not None:  # compiling in the background (prefetch): wait for it
                try:
                    got = job.result()
                    if got is not None:  # None: skipped, another process compiles it
                        where = "background"
                        return got, time.perf_counter() - t0
                except Exception:  # cancelled, or failed there: compile here (and raise)
                    pass
                self._forget(key, job)
            return self._compile(key, args, static), time.perf_counter() - t0
        finally:
            waited = time.perf_counter() - t0
            _CLOCK[0] += waited
            if len(_WAITS) < _WAITS_KEPT:
                _WAITS.append((self.name.rsplit(".", 1)[-1], waited, where))

    def prefetch(self, pool: ThreadPoolExecutor, *args: Any, **static: Any) -> None:
        """Start compiling (or loading) the program for these arguments in ``pool``."""
        args, static, key = self._key(args, static)
        job = self.pending.get(key)
        # (a job cancelled by an earlier pool's close is no job: queued again)
        if key in self.programs or (job is not None and not job.cancelled()):
            return
        x64 = key[-1]

        def work() -> Any:
            with jax.enable_x64(x64):  # the caller's setting, which is per thread
                return self._compile(key, args, static, background=True)

        try:
            job = pool.submit(work)
        except RuntimeError:  # the pool was shut down: compile at first use instead
            return
        self.pending[key] = job
        # It leaves ``pending`` once its future is done (at once if it already is), only
        # if it is still the one recorded there.
        job.add_done_callback(lambda done: self._forget(key, done))

    def _forget(self, key: tuple, job: Future) -> None:
        if self.pending.get(key) is job:
            self.pending.pop(key, None)

    def _compile(self, key: tuple, args: tuple, static: dict, background: bool = False) -> Any:
        """Load, or trace, lower and compile (and store) the program.  Another process
        compiling it (its lock, see :meth:`Store.claim`): in the ``background`` return
        None at once, else wait for its file."""
        claimed = False
        try:
            st = store()
            path = st.path(self.name, (key, self.options), _device_of(args))
            t0 = time.perf_counter()
            compiled = st.load(path)
            if compiled is None and path is not None:
                claimed = st.claim(path)
                if not claimed:
                    if background:
                        return None
                    compiled = st.wait(path, LOCK_WAIT)
            t1 = traced = t2 = time.perf_counter()
            if compiled is None:
                lowered = self._lowered_elsewhere(key, args, static) if background else None
                with _TRACING if background else contextlib.nullcontext():
                    traced = time.perf_counter()  # the wait for the lock is not counted
                    if lowered is not None:  # held for the one-call program's lowering
                        try:
                            lowered = lowered()
                        except Exception as exc:
                            log.debug("%s: a helper's program did not lower: %s", self.name, exc)
                            lowered = None
                    if lowered is None:
                        lowered = self.jitted.lower(*args, **static)
                t2 = time.perf_counter()
                if path is None or tuple(read() for read in _SETTINGS) != key[2]:
                    compiled = lowered.compile()  # settings changed meanwhile: not stored
                else:
                    compiled, fresh = _compile_fresh(lowered)
                    if fresh:
                        st.save(path, compiled)
            _count(self.name, t1 - t0, t2 - traced, time.perf_counter() - t2)
            self.programs[key] = compiled
            return compiled
        finally:
            if claimed:
                st.release(path)

    def _lowered_elsewhere(self, key: tuple, args: tuple, static: dict) -> Any:
        """A lowering helper's program (:mod:`mpda_dist.lowering`), as a call that
        lowers it here, or None (no helpers, or they could not)."""
        from mpda_dist import lowering

        try:
            pool = lowering.helpers()
            return None if pool is None else pool.lower(self, args, static, key)
        except Exception as exc:  # never worse than lowering it here
            log.debug("%s: lowering helpers failed: %s", self.name, exc)
            return None

    def _split(self, args: tuple, static: dict) -> tuple[tuple, dict]:
        static = dict(static)
        for i, name in self.static_at.items():
            if i < len(args):
                static[name] = args[i]
        return tuple(x for i, x in enumerate(args) if i not in self.static_at), static

    def __call__(self, *args: Any, **static: Any) -> Any:
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args)):
            return self.jitted(*args, **static)
        if self.static_at and len(args) > min(self.static_at):
            args, static = self._split(args, static)
        return self.compiled(*args, **static)[0](*args)


def jit(
    fun: Any = None, *, static_argnames: tuple[str, ...] = (), donate_argnums: tuple = ()
) -> Any:
    """``jax.jit`` with the program caches above; a decorator, bare or with arguments."""
    if fun is None:
        return functools.partial(
            jit, static_argnames=static_argnames, donate_argnums=donate_argnums
        )
    return Jit(fun, tuple(static_argnames), tuple(donate_argnums))


def on_device(v: Any, dtype: Any = None) -> jax.Array:
    """``v`` on the default device (as ``dtype``), made on the host: ``jnp.zeros``,
    ``astype`` or ``copy`` on device arrays would each be one more program to trace and
    compile per shape.  A device array is copied (``b_prev = b`` must not alias)."""
    if isinstance(v, jax.Array) and (dtype is None or v.dtype == dtype):
        return jax.device_put(v, may_alias=False)
    return jax.device_put(np.asarray(v, dtype))


def zeros(shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return on_device(np.zeros(shape, dtype))


@jit
def add(x: jax.Array, y: jax.Array) -> jax.Array:
    """``x + y`` as a stored program (an eager ``+`` is traced in every process)."""
    return x + y


@jit
def subtract(x: jax.Array, y: jax.Array) -> jax.Array:
    return x - y


THREADS_ENV = "MPDA_COMPILE_THREADS"


def compile_threads() -> int:
    """Threads that compile programs ahead of use: ``$MPDA_COMPILE_THREADS`` (0 or 1: none),
    else the rank's share of the cores (``OMP_NUM_THREADS``, set by
    :func:`mpda_dist.runtime.configure_jax_env`; its first count where it is an OpenMP
    list, and ignored where it is not a count), else every usable core; by default at least
    2, so that ranks sharing a node and a program cache split the compiling
    (:meth:`Store.claim`): a cold 2-rank ``make run`` on 2 cores took 16 s with 2
    threads a rank and 20–22 s with 1 (RESULTS §16)."""
    from mpda_dist.runtime import usable_cores, user_threads

    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        try:
            count = int(value)
        except ValueError:
            count = -1
        if count < 0:
            raise ValueError(
                f"{THREADS_ENV}={value!r}: expected a whole number of threads (0 or 1: none)"
            )
        return max(1, count)
    return max(2, user_threads() or len(usable_cores()))


class Programs:
    """The compiled programs of one solve and the seconds spent compiling them (or
    waiting for them)."""

    def __init__(self, threads: int | None = None) -> None:
        self.cache: dict[Any, Any] = {}
        self._start = _CLOCK[0]
        self.threads = compile_threads() if threads is None else threads
        self._pool: ThreadPoolExecutor | None = None

    def __call__(self, fn: Any, *args: Any, **static: Any) -> Any:
        """The compiled ``fn`` (a :class:`Jit`, or any ``jax.jit`` function) for
        arguments like ``args`` and these static ones."""
        sig = (_signature(args), jax.tree.structure(args))
        statics = tuple(sorted(static.items()))
        key = (fn, sig, statics, _settings(), bool(jax.config.jax_enable_x64))
        if key not in self.cache:
            if isinstance(fn, Jit):
                self.cache[key] = fn.compiled(*args, **static)[0]
            else:
                t0 = time.perf_counter()
                self.cache[key] = fn.lower(*args, **static).compile()
                _CLOCK[0] += time.perf_counter() - t0
        return self.cache[key]

    @property
    def seconds(self) -> float:
        """Seconds this thread spent compiling, loading or waiting for programs since
        this object was made, by any call (direct calls of :func:`jit` functions too)."""
        return _CLOCK[0] - self._start

    def prefetch(self, fn: Jit, *args: Any, **static: Any) -> None:
        """Compile ``fn`` for these arguments (``jax.ShapeDtypeStruct`` will do) in a
        background thread, when there are at least 2 (:func:`compile_threads`): XLA
        releases the interpreter while it compiles, so the programs of several levels
        compile at once, and while the coarse levels solve.  A later call waits for
        it."""
        if self.threads < 2:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="mpda-compile")
        fn.prefetch(self._pool, *args, **static)

    def close(self) -> None:
        """Drop the background compiles that have not started (a running one ends on
        its own; the process does not wait for the rest at exit)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __len__(self) -> int:
        return len(self.cache)
