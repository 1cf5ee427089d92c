"""Tracing and lowering programs in helper processes, so that a cold start's main
process does not hold Python's lock for them.

Tracing a program and lowering it to StableHLO runs in Python; XLA's compile does not.
A cold solve prefetches each level's programs in background threads
(:meth:`mpda_dist.programs.Programs.prefetch`), but their tracing holds the
interpreter lock, one program at a time, and the main thread's own Python waits
behind it: on an H100 4.3 s of a 7.6 s first solve at 1024² (benchmarks/RESULTS.md
§22).  Here ``$MPDA_LOWER_PROCESSES`` helper processes (JAX on the CPU, no MPI, no
GPU) trace and lower a background program for the main process's platform with
:mod:`jax.export` and send it back; the main process wraps it in a one-call program
(17–56 ms of lowering where the program itself took 0.1–0.6 s) and compiles that.

A helper traces with the main process's backend, the fused pass's support and the
registered settings (:func:`mpda_dist.programs.key_settings`), and refuses a program
whose settings differ; any failure, a helper that died included, lowers the program in
the main process as before (and that program is not sent again).  ``mpda run`` starts
the helpers once JAX has its devices (:func:`start`; otherwise the first background
program does), one import of JAX each: 1-2 CPU-seconds, while the main process reads
its inputs, and about 200 MB of host memory each while it runs.  They end when the
main process ends (their input closes), or when they are given up.

Default: none (``MPDA_LOWER_PROCESSES`` unset or 0).  On average they did not pay:
over nine cold 1024² solves on four H200 machines, alternated with and without 4
helpers, the solve took 0.05 s longer with them (from 0.83 s shorter to 0.77 s longer;
the last machine favoured them three times out of three; benchmarks/RESULTS.md §26).
The helpers take the tracing off the rank's interpreter lock, but their Python competes
with XLA's compiles for the cores, and they cost processes and host memory.

:func:`start` also imports, in a background thread of the rank, the modules that the
first solve would import (scipy's sparse solver for the coarsest level, the solver's
modules, and on a CUDA GPU Pallas's lowering), while ``mpda run`` reads its inputs: on
an H200 a cold first solve spent about 1.2 s importing them.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib
import logging
import os
import pickle
import queue
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any, BinaryIO

import jax

from mpda_dist import programs

log = logging.getLogger("mpda_dist")

ENV = "MPDA_LOWER_PROCESSES"
REPLY_TIMEOUT = 30.0  # seconds a helper may take for one program before it is dropped
MAX_LOST = 3  # helpers that died or hung before the rest are given up
# Seconds a compile thread waits for a busy (or still starting) helper before it lowers
# the program itself.
# Waiting made the helpers a queue: on an H200 a 1024² solve's 56 programs went 4 at a
# time, and the first program needed waited 2.1 s behind later ones (RESULTS §25).
HELPER_WAIT = 0.0
REASON_CHARS = 300  # of the first refusal's reason in :func:`report`
# Environment a helper must not inherit: an MPI launcher's wiring (the helper never
# starts MPI, and MPI_Init with a rank's PMI variables would confuse the launcher).
_DROP_ENV = (
    "PMI_",
    "PMIX_",
    "OMPI_",
    "PRTE_",
    "OPAL_",
    "HYDRA_",
    "HYDI_",
    "MPIR_",
    "MPI_LOCAL",
    "MPICH_",
    "I_MPI_",
    "MV2_",
)
# Triton calls (the fused pass) carry no compatibility promise, which jax.export asks
# for; the program goes straight back to the same jaxlib, so that does not matter here
# (_custom_calls).


def target_platform() -> str | None:
    """The platform name :mod:`jax.export` lowers for in this process: ``cpu`` or
    ``cuda``; None for any other backend (no helpers)."""
    backend = jax.default_backend()
    if backend == "cpu":
        return "cpu"
    if backend == "gpu":
        version = str(jax.devices()[0].client.platform_version).lower()
        return "cuda" if "cuda" in version else None
    return None


def requested() -> int | None:
    """``$MPDA_LOWER_PROCESSES`` as a count, None when unset."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return None
    try:
        return max(0, int(value))
    except ValueError:
        raise ValueError(f"{ENV}={value!r}: expected a whole number of processes") from None


def processes() -> int:
    """Helper processes for this process: ``$MPDA_LOWER_PROCESSES``, else 0."""
    return requested() or 0


@dataclasses.dataclass(frozen=True)
class Target:
    """What a helper traces for: the requesting process's backend and platform, whether
    the fused pass builds there (:func:`mpda_dist.fused.supported`), and the GPU's
    compute capability (``"9.0"``), kind (``"NVIDIA H200"``) and core count (None on a
    CPU)."""

    backend: str
    platform: str
    fused: bool
    capability: str | None = None
    device_kind: str | None = None
    cores: int | None = None


def _target() -> Target | None:
    from mpda_dist import fused

    platform = target_platform()
    if platform is None:
        return None
    device = jax.devices()[0]
    if platform == "cpu":
        return Target(jax.default_backend(), platform, fused.supported())
    return Target(
        jax.default_backend(),
        platform,
        fused.supported(),
        getattr(device, "compute_capability", None),
        device.device_kind,
        getattr(device, "core_count", None),
    )


# -- the main process's side ------------------------------------------------------------

_MAGIC = b"MPDL"
READY = ("ready", None)  # a helper's first frame, once it can answer at once
_MAX_FRAME = 1 << 30  # a reply larger than this is not one (stray output on the pipe)


def _frame(data: bytes) -> bytes:
    return _MAGIC + struct.pack("<Q", len(data)) + data


def _write(stream: BinaryIO, obj: Any) -> None:
    """One framed pickle: a marker, the length, the pickle."""
    stream.write(_frame(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)))
    stream.flush()


def _read(stream: BinaryIO) -> Any:
    """One framed pickle; EOFError when the other side closed, ValueError when what
    came is not a frame."""
    head = stream.read(12)
    if len(head) < 12:
        raise EOFError("the other side closed")
    (size,) = struct.unpack("<Q", head[4:])
    if head[:4] != _MAGIC or size > _MAX_FRAME:
        raise ValueError(f"not a lowering reply: {head!r}")
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the other side closed")
    return pickle.loads(data)


def _helper_env() -> dict[str, str]:
    """This process's environment for a helper: JAX on the CPU with one thread, no MPI
    launcher's wiring, no helpers of its own, and this copy of the package first on the
    path (wherever this process found it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROP_ENV)}
    env.update(JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1", MPDA_LOWER_PROCESSES="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    return env


_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Helper:
    """One helper process and its pipes; used by one thread at a time.  Replies come
    on a pipe of their own, not the helper's stdout, which anything may write to."""

    def __init__(self, platform: str | None) -> None:
        read_end, write_end = os.pipe()
        try:
            # -P: not the current directory first on the path (another copy of the
            # package may live there), _PACKAGE_ROOT is (_helper_env)
            self.proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "mpda_dist.lowering", str(write_end), str(platform)],
                stdin=subprocess.PIPE,
                pass_fds=(write_end,),
                cwd=_PACKAGE_ROOT,
                env=_helper_env(),
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        self.replies = os.fdopen(read_end, "rb")
        self.ready = False  # it said READY: JAX imported and its preload done

    def poll(self) -> bool:
        """Whether it is ready, without waiting; raise if it died or wrote garbage."""
        if not self.ready and select.select([self.replies], [], [], 0)[0]:
            if _read(self.replies) != READY:
                raise ValueError("a lowering helper spoke before it was asked")
            self.ready = True
        return self.ready

    def ask(self, request: bytes, timeout: float) -> Any:
        """Send a pickled request; the reply, or raise (a helper that does not answer
        within ``timeout`` is killed).  Waits for a starting helper to be ready."""
        timer = threading.Timer(timeout, self.proc.kill)
        timer.start()
        try:
            self.proc.stdin.write(_frame(request))
            self.proc.stdin.flush()
            reply = _read(self.replies)
            if reply == READY and not self.ready:
                self.ready = True
                reply = _read(self.replies)
            return reply
        finally:
            timer.cancel()

    def end(self) -> None:
        """Close its input: it exits once it has answered what it is doing."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def reap(self, deadline: float) -> None:
        """Wait for it until ``deadline`` (``time.monotonic()``), then kill it."""
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.replies.close()


class Helpers:
    """A pool of helper processes."""

    def __init__(self, count: int, platform: str | None = None) -> None:
        """``platform``: what the requests will lower for (:func:`target_platform`,
        the default), so each helper imports the right things before the first one."""
        self.count = count
        self.platform = platform
        self.idle: queue.Queue[_Helper] = queue.Queue()
        self.all: list[_Helper] = []
        self.lost = 0  # helpers that died, did not answer in time or answered garbage
        # (name, settings) of the programs a helper could not lower, or lost a helper
        # on: why (the report shows it)
        self.refused: dict[tuple[str, Any], str] = {}
        self.lowered = 0
        self.busy = 0  # requests lowered by the caller because every helper was busy
        self.waited = 0.0
        self.closed = False
        self._lock = threading.Lock()

    def summary(self) -> str:
        """One line: helpers running, programs lowered, refusals (the first one's
        reason: the fallback costs the requesting process that program's lowering)."""
        refused = dict(self.refused)  # a snapshot: background threads may add to it
        names = sorted({name.rsplit(".", 1)[-1] for name, _ in refused})
        line = (
            f"lowering helpers: {len(self.all)} of {self.count} running, {self.lowered} programs "
            f"lowered in them ({self.waited:.2f} s summed over the waiting threads), "
            f"{self.busy} here while all were busy or starting, "
            f"{len(refused)} refused{' (' + ', '.join(names) + ')' if names else ''}, "
            f"{self.lost} lost"
        )
        if refused:
            (name, _), why = next(iter(refused.items()))  # the first, in order
            why = " ".join(why.split())
            line += f"; {name.rsplit('.', 1)[-1]}: {why[:REASON_CHARS]}"
            line += "…" if len(why) > REASON_CHARS else ""
        return line

    @property
    def usable(self) -> bool:
        return not self.closed and self.lost < MAX_LOST

    def _spawn(self) -> _Helper | None:
        """A new helper, if fewer than ``count`` run (call with the lock held)."""
        if len(self.all) >= self.count or not self.usable:
            return None
        try:
            if self.platform is None:
                self.platform = target_platform()
            helper = _Helper(self.platform)
        except OSError as exc:
            log.debug("lowering helper did not start: %s", exc)
            self.lost = MAX_LOST
            return None
        self.all.append(helper)
        return helper

    def start(self) -> None:
        """Start every helper now: each imports JAX (about a second) while this
        process goes on."""
        with self._lock:
            while (helper := self._spawn()) is not None:
                self.idle.put(helper)

    def _take(self, wait: float = REPLY_TIMEOUT) -> _Helper | None:
        """An idle helper that is ready; else, with ``wait`` > 0, one still starting
        (new ones are started while fewer than ``count`` run), or the first to come
        back within ``wait`` seconds.  None when none is, and once the helpers are
        given up or closed.  A starting helper answers only once it has imported JAX
        (a second or more), so ``wait=0`` never hands one out."""
        deadline = time.monotonic() + wait
        while self.usable:
            dead: list[_Helper] = []
            with self._lock:  # one scan at a time: a helper is handed to one thread
                idle = []
                while True:
                    try:
                        idle.append(self.idle.get_nowait())
                    except queue.Empty:
                        break
                chosen = None
                for helper in idle:
                    try:
                        ready = helper.poll()
                    except Exception:  # it died, or wrote something that is not a reply
                        dead.append(helper)
                        continue
                    if chosen is None and ready:
                        chosen = helper
                    else:
                        self.idle.put(helper)
                while chosen is None and (helper := self._spawn()) is not None:
                    self.idle.put(helper)  # starting; handed out once ready (or waited for)
            for helper in dead:
                self._lose(helper)
            if chosen is not None:
                return chosen
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:  # a starting one (ask() waits for it), a busy one back, or room to spawn
                return self.idle.get(timeout=min(0.5, left))
            except queue.Empty:
                continue
        return None

    def wait_ready(self, timeout: float) -> bool:
        """Start the helpers and wait until each is ready (tests, benchmarks)."""
        self.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.usable:
            with self._lock:
                helpers = list(self.all)
            try:
                if helpers and all(h.poll() for h in helpers):
                    return True
            except Exception:
                return False
            time.sleep(0.05)
        return False

    def _lose(self, helper: _Helper) -> None:
        helper.end()
        helper.proc.kill()
        helper.reap(time.monotonic() + 5)
        with self._lock:
            self.lost += 1
            if helper in self.all:
                self.all.remove(helper)
        if not self.usable:
            self.close()  # the rest are given up: end them too

    def lower(
        self, fn: programs.Jit, args: tuple, static: dict, key: tuple, target: Target | None = None
    ) -> Any:
        """``fn`` lowered for ``args`` (dynamic, by position) and ``static`` by a
        helper, as a call that lowers a one-call program of it here (a
        :class:`jax.stages.Lowered`); None when the helper could not, or when every
        helper is busy or still starting (:data:`HELPER_WAIT`): the caller lowers it
        itself.  ``target``: this process's (benchmarks lower for a GPU on a
        CPU: pass the target, and call the result with ``platforms=("cuda",)``)."""
        target = target or _target()
        what = (fn.name, key[2])
        if not self.usable or target is None or what in self.refused:
            return None
        if programs.registered(fn.name) is not fn:
            return None  # a program a helper cannot find by name
        try:
            request = (
                fn.name,
                fn.__module__,
                _specs(args),
                static,
                key[-1],
                key[2],
                target,
                programs._source_digest(),
            )
            data = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # arguments that do not pickle
            log.debug("%s: its request does not pickle (%s); lowered here", fn.name, exc)
            self.refused[what] = f"its request does not pickle ({exc})"
            return None
        helper = self._take(HELPER_WAIT)
        if helper is None:
            if self.usable:  # all busy or starting: the caller lowers it, beside them
                with self._lock:
                    self.busy += 1
            return None
        t0 = time.perf_counter()
        try:
            status, payload = helper.ask(data, REPLY_TIMEOUT)
        except Exception as exc:  # died, killed on timeout, or not a reply
            if self.closed:  # ended by close() meanwhile: not lost
                return None
            log.debug("lowering helper lost on %s: %s", fn.name, exc)
            self.refused[what] = f"lost a helper ({exc})"  # it hangs or kills them: not again
            self._lose(helper)
            return None
        if not self.closed:
            self.idle.put(helper)
        if status == "stale":  # another version of the package: none of them will do
            log.warning("lowering helpers disabled: %s", payload)
            self.close()
            return None
        if status != "ok":
            log.debug("lowering helper refused %s: %s", fn.name, payload)
            self.refused[what] = str(payload)
            return None
        try:
            exported = pickle.loads(payload)
        except Exception as exc:
            log.debug("%s: the helper's program does not load (%s)", fn.name, exc)
            self.refused[what] = f"its program does not load here ({exc})"
            return None
        with self._lock:
            self.waited += time.perf_counter() - t0
            self.lowered += 1

        def lower(platforms: tuple[str, ...] | None = None) -> Any:
            wrapper = jax.jit(exported.call, donate_argnums=fn.options[1])
            with jax.enable_x64(key[-1]):
                if platforms is None:
                    return wrapper.lower(*args)
                return wrapper.trace(*args).lower(lowering_platforms=platforms)

        return lower

    def close(self) -> None:
        """End the helpers: each finishes what it is doing (a request in flight fails,
        and its program is lowered by the caller); killed after 5 s."""
        with self._lock:
            self.closed = True
            helpers, self.all = list(self.all), []
        for helper in helpers:
            helper.end()
        deadline = time.monotonic() + 5
        for helper in helpers:
            helper.reap(deadline)


def _specs(args: Any) -> Any:
    """``args`` with every array as a ``jax.ShapeDtypeStruct`` (Python scalars kept)."""

    def spec(x: Any) -> Any:
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=getattr(x, "weak_type", False))
        return x

    return jax.tree.map(spec, args)


_HELPERS: list[Helpers | None] = []
_HELPERS_LOCK = threading.Lock()


def reset() -> None:
    """End this process's helpers; the next background program reads
    ``$MPDA_LOWER_PROCESSES`` again (tests)."""
    with _HELPERS_LOCK:
        pool = _HELPERS.pop() if _HELPERS else None
    if pool is not None:
        pool.close()


def start() -> None:
    """Start this process's helpers now rather than at its first background program, and
    import in a background thread what the first solve will import (``mpda run`` does,
    once JAX has its devices, before it reads its inputs)."""
    import_ahead()
    pool = helpers()
    if pool is not None:
        pool.start()


# What a first solve imports that `mpda run` has not imported by then: the coarsest
# level's direct solve (scipy), the solver's modules (preload imports more).
_AHEAD = ("scipy.sparse.linalg", "mpda_dist.baselines", "mpda_dist.cycle")
_AHEAD_THREAD: list[threading.Thread] = []


def import_ahead() -> threading.Thread:
    """Import :data:`_AHEAD` and what :func:`preload` imports for this process's platform,
    in a background thread (once per process), and return that thread.  The first solve
    would import them on its own critical path, behind the compile threads' hold on the
    interpreter lock; a module that fails to import here fails where it is used."""
    with _HELPERS_LOCK:
        if not _AHEAD_THREAD:

            def run() -> None:
                for name in _AHEAD:
                    with contextlib.suppress(Exception):
                        importlib.import_module(name)
                with contextlib.suppress(Exception):
                    preload(target_platform() or "")

            # Not a daemon: the interpreter's exit waits for it.  A daemon thread still
            # importing (in an extension's C++ code) when a failed run exited was ended
            # by the finalisation, and the forced unwinding aborted the process
            # ("FATAL: exception not rethrown", exit -6 instead of 2).
            thread = threading.Thread(target=run, name="mpda-imports", daemon=False)
            thread.start()
            _AHEAD_THREAD.append(thread)
        return _AHEAD_THREAD[0]


def helpers() -> Helpers | None:
    """This process's helpers (None: none, :func:`processes` is 0)."""
    with _HELPERS_LOCK:
        if not _HELPERS:
            try:
                count = processes()
            except ValueError as exc:  # `mpda run` refuses it at start-up; a library call
                log.warning("%s; no lowering helpers", exc)
                count = 0
            _HELPERS.append(Helpers(count) if count > 0 else None)
            if _HELPERS[0] is not None:
                atexit.register(_HELPERS[0].close)
        return _HELPERS[0]


def report() -> str | None:
    """One line on this process's helpers, or None when it has none."""
    pool = _HELPERS[0] if _HELPERS else None
    return None if pool is None else pool.summary()


# -- the helper's side ------------------------------------------------------------------


class _Stale(Exception):
    """The helper's copy of the package is not the requesting process's."""


def _export(request: tuple) -> bytes:
    from jax import export

    from mpda_dist import fused, kernel  # noqa: F401  (kernel registers settings)

    name, module, args, static, x64, settings, target, digest = request
    if digest != programs._source_digest():
        raise _Stale(f"the helper's mpda_dist ({programs.__file__}) is another version")
    importlib.import_module(module)
    fn = programs.registered(name)
    if fn is None:
        raise LookupError(f"{name}: no such program in {module} (or more than one)")
    programs.TRACE_BACKEND[0] = target.backend
    fused.SUPPORTED[0] = target.fused
    with jax.enable_x64(x64), _abstract_device(target):
        if programs._settings() != settings:
            raise ValueError(f"{name}: settings differ from the requesting process's")
        checks = [export.DisabledSafetyCheck.custom_call(c) for c in _custom_calls(target)]
        exported = export.export(fn.jitted, platforms=[target.platform], disabled_checks=checks)(
            *args, **static
        )
    # the exported function's derivative is a closure: not needed, and not picklable
    if any(f.name == "_get_vjp" for f in dataclasses.fields(exported)):
        exported = dataclasses.replace(exported, _get_vjp=None)
    return pickle.dumps(exported)


def _abstract_device(target: Target) -> contextlib.AbstractContextManager:
    """The requester's GPU as the abstract device in effect while a helper lowers for
    it.  jax 0.11 lowers Pallas's Triton kernels for that device, else for the default
    one: a helper's CPU, which it refuses ("No supported GPU devices found"; an H200,
    RESULTS §25).  The mesh is empty, so nothing else about the programs changes;
    jaxlib up to 0.10.2 ignores it and lowers for compute capability 9.0."""
    sharding = jax.sharding
    if (
        target.platform != "cuda"
        or not target.device_kind
        or not hasattr(sharding, "AbstractDevice")
    ):
        return contextlib.nullcontext()
    device = sharding.AbstractDevice(
        device_kind=target.device_kind, num_cores=target.cores, platform="gpu"
    )
    return sharding.use_abstract_mesh(sharding.AbstractMesh((), (), abstract_device=device))


def _custom_calls(target: Target) -> tuple[str, ...]:
    """The custom calls a helper's export may hold: Pallas's Triton kernels
    (``__gpu$xla.gpu.triton``, the Triton IR that XLA compiles) only for a GPU of
    compute capability 9.0 (an H100 or H200).  jaxlib 0.10 lowers them in a process
    without a GPU for 9.0 whatever the requester's, so for any other GPU the export
    fails this check and the requester lowers the program itself.  Conservative on jax
    0.11, which lowers for the requester's GPU (:func:`_abstract_device`)."""
    return ("__gpu$xla.gpu.triton",) if target.capability == "9.0" else ()


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    """Answer lowering requests until ``requests`` closes."""
    while True:
        try:
            request = _read(requests)
        except (EOFError, ValueError):
            return
        try:
            reply = ("ok", _export(request))
        except _Stale as exc:
            reply = ("stale", str(exc))
        except Exception as exc:  # the requesting process lowers the program itself
            reply = ("error", f"{type(exc).__name__}: {exc}")
        try:
            _write(replies, reply)
        except OSError:  # the requesting process is gone
            return


def preload(platform: str) -> None:
    """Import what requests for ``platform`` need before the first one comes (the
    programs' modules, :mod:`jax.export`, and for ``cuda`` Pallas's GPU lowering:
    :func:`mpda_dist.fused.preload`), so a helper's first program costs about what its
    later ones do.  The requesting process starts helpers while it reads its inputs, so
    this is off its critical path."""
    from jax import export  # noqa: F401

    from mpda_dist import cycle, fused, krylov, solver  # noqa: F401  (their programs)

    if platform == "cuda":
        fused.preload()


def main() -> None:
    # Ctrl-C reaches the whole process group: the helper ends when its input closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import mpi4py

    mpi4py.rc.initialize = mpi4py.rc.finalize = False  # modules import MPI; never start it
    fd = int(sys.argv[1])
    # not passed on to any process this one starts: a child holding it would keep the
    # requesting process from seeing this one end
    os.set_inheritable(fd, False)
    with os.fdopen(fd, "wb") as replies:
        try:
            preload(sys.argv[2] if len(sys.argv) > 2 else "")
        except Exception:  # a request imports what it needs, and reports what fails
            pass
        try:
            _write(replies, READY)
        except OSError:  # the requesting process is gone
            return
        serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
