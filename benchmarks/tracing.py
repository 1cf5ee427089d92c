"""Tracing and lowering time of a level's message-passing programs, the first time per
block shape (what a cold start pays once per level, one program after another).

Each ``--sizes`` side is a new shape, as the levels of a hierarchy are.  The programs
are lowered from shapes alone (``jax.ShapeDtypeStruct``), nothing is compiled or run:
the update programs as one rank runs them on a CPU (``strips``, no neighbours:
``iterate_a`` with 10 updates, ``gains``, ``iterate_b`` with 10 updates and momentum
0.5), the one-update ``iterate_b_odd`` that several ranks run (``pads``, with
neighbours), and three small ones.  float32.  (Before benchmarks/RESULTS.md §27 the
one-rank programs read the halo and packed an outgoing buffer; before §28 the field
programs took the full frame, and ``marginal_mean`` packed one.)

With ``--gpu`` the programs are lowered for a CUDA GPU, as a GPU run traces them
(``iterate_a`` as ``pads``, ``iterate_b`` as ``fused``: Pallas's Triton lowering), on
whatever machine runs the script: the part of a GPU's cold start that holds Python's
lock, measurable without a GPU.

    python benchmarks/tracing.py                      # sides 512 256 128 64
    python benchmarks/tracing.py --gpu --sizes 1024 512 256 128
    python benchmarks/tracing.py --gpu --sizes 1024 512 256 128 --helpers 2

With ``--helpers N`` the programs go to N helper processes (:mod:`mpda_dist.lowering`),
N at a time, and the seconds shown are those spent in this process (wrapping each
program), which is what holds a run's interpreter lock; ``wall`` is for all of them.

``--first`` times one fresh helper's requests one after the other (``iterate_b``,
``iterate_a`` and ``gains`` per size, with ``--gpu`` for CUDA): its first programs pay
for what the helper imports and sets up on first use, unless it did that at start
(:func:`mpda_dist.lowering.preload`).

``--hierarchy N`` lowers instead every program that a prepared ``N²`` solve compiles in
the background (one rank, the demo's settings, float32: :func:`mpda_dist.solver.prepare`
with its prefetch recorded rather than run, each program once), for a CUDA GPU with
``--gpu``, and sums them per program: the whole tracing that a cold start's compile
threads do under Python's lock, measured on any machine.  The operations (the traced
programs' equations, nested ones included) do not depend on the machine's load, as
the seconds do.  It also counts the garbage collector's runs meanwhile and their CPU
seconds, after :func:`mpda_dist.runtime.settle_gc` as ``mpda run`` has
(``MPDA_GC=python``: Python's collector as it is).

``--contention`` (with ``--hierarchy``) measures what that tracing does to the rank's own
Python: the main thread builds the levels' prior stencils and copies them to the device
(host work of ``Hierarchy.build``), alone, then over and over while a thread lowers the
hierarchy's programs, at each ``--intervals`` (``sys.setswitchinterval``, seconds;
Python's default is 0.005).  A thread that gives up the lock (a NumPy call, a copy)
waits up to one interval to get it back while another thread traces.

    python benchmarks/tracing.py --hierarchy 1024 --gpu
    python benchmarks/tracing.py --hierarchy 1024 --gpu --contention --intervals 0.005 0.0005

For A/B comparisons run a copy of this script inside each checkout, alternately, each in
a fresh process (JAX keeps what it traced).
"""

from __future__ import annotations

import argparse
import pickle
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def _helpers(args, fused):
    """``(Helpers, Target)`` for ``--helpers``, started and warmed up (each imported
    JAX and the package, as :func:`mpda_dist.lowering.start` has them do while a run
    reads its inputs), else None."""
    if not args.helpers:
        return None
    from mpda_dist import lowering, programs

    h100 = lowering.Target("gpu", "cuda", True, "9.0", "NVIDIA H100 80GB HBM3", 132)
    target = h100 if args.gpu else lowering._target()
    lowering.HELPER_WAIT = lowering.REPLY_TIMEOUT  # every program to a helper, timed
    pool = lowering.Helpers(args.helpers, target.platform)
    pool.start()
    digest = programs._source_digest()
    for h in list(pool.all):  # a request that fails at once: the helper has started
        h.ask(pickle.dumps(("warm-up", "mpda_dist.kernel", (), {}, False, (), target, digest)), 120)
    return pool, target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 256, 128, 64])
    ap.add_argument("--gpu", action="store_true", help="lower for a CUDA GPU, its forms")
    ap.add_argument("--helpers", type=int, default=0, help="lower in this many helper processes")
    ap.add_argument(
        "--first", action="store_true", help="time one fresh helper's requests in order"
    )
    ap.add_argument(
        "--hierarchy", type=int, metavar="N", help="every program of a prepared N² solve"
    )
    ap.add_argument(
        "--contention",
        action="store_true",
        help="with --hierarchy: the rank's host work while a thread lowers the programs",
    )
    ap.add_argument(
        "--intervals",
        type=float,
        nargs="+",
        default=[0.005, 0.001, 0.0005],
        help="switch intervals for --contention, seconds (default 0.005 0.001 0.0005)",
    )
    args = ap.parse_args(argv)
    if args.contention and not args.hierarchy:
        ap.error("--contention needs --hierarchy N")
    if args.hierarchy:
        return _hierarchy(args)
    if args.first:
        args.helpers = 1

    import jax
    import jax.numpy as jnp

    from mpda_dist import fused, kernel
    from mpda_dist.halo import message_layout

    a_form, b_form = ("pads", "fused") if args.gpu else ("strips", "strips")
    if args.gpu and not args.helpers:
        # Triton's lowering, not Pallas's interpreter (a helper traces as for a GPU, and
        # refuses a program whose settings differ from this process's)
        fused.INTERPRET = False

    platforms = ("cuda",) if args.gpu else None
    helpers = _helpers(args, fused)
    here = threading.Lock()  # the part in this process, one at a time (programs._TRACING)

    class Lowering:
        """``fn.lower(...)`` (for the GPU with ``--gpu``); with ``--helpers`` lowered by a
        helper process and wrapped here.  Returns the seconds spent in this process."""

        def __init__(self, fn):
            self.fn = fn

        def lower(self, *args, **static):
            remote = None
            if helpers is not None:
                dyn, stat, key = self.fn._key(args, static)
                remote = helpers[0].lower(self.fn, dyn, stat, key, helpers[1])
                if remote is None:
                    raise RuntimeError(
                        f"{self.fn.name}: the helper could not: {helpers[0].refused}"
                    )
            with here:
                t0 = time.perf_counter()
                if remote is not None:
                    remote(platforms)
                elif platforms is None:
                    self.fn.lower(*args, **static)
                else:
                    self.fn.jitted.trace(*args, **static).lower(lowering_platforms=platforms)
                return time.perf_counter() - t0

    names = ("iterate_a", "gains", "iterate_b", "iterate_b_odd", "shift_messages")
    k = {name: Lowering(getattr(kernel, name)) for name in (*names, "marginal_mean", "residual")}

    f32 = jnp.float32

    def sds(*shape: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, f32)

    scalar = jax.ShapeDtypeStruct((), f32, weak_type=True)
    p = kernel.Params(scalar, scalar)

    def lowerings(n: int) -> dict:
        """The programs of one level of side ``n``, each as a call that lowers it."""
        msg, field = sds(12, n, n), sds(n, n)
        op = kernel.Operator(field, msg, field)
        halo = sds(message_layout(n, n).in_offsets[-1])
        frame = sds(0)  # one rank's: empty (the domain edge's 0, RESULTS §28)
        frozen = dict(momentum=0.5, delta=False)
        upd = (msg, msg, msg, msg, op, halo, p)
        return {
            "iterate_a": lambda: k["iterate_a"].lower(
                msg, msg, op, halo, p, n=10, form=a_form, neighbours=False
            ),
            "gains": lambda: k["gains"].lower(msg, op, halo, p, neighbours=False),
            "iterate_b": lambda: k["iterate_b"].lower(
                *upd, n=10, form=b_form, neighbours=False, **frozen
            ),
            "iterate_b_odd (pads, 1)": lambda: k["iterate_b_odd"].lower(
                *upd, n=1, form="pads", **frozen
            ),
            "shift_messages": lambda: k["shift_messages"].lower(msg, msg, field, frame, op, p.c),
            "marginal_mean": lambda: k["marginal_mean"].lower(msg, msg, op, p, neighbours=False),
            "residual": lambda: k["residual"].lower(field, frame, op),
        }

    if args.first:
        return _first(args, helpers, lowerings)
    seconds: dict[str, float] = {}
    jobs = [(name, lower) for n in args.sizes for name, lower in lowerings(n).items()]
    t_all = time.perf_counter()
    with ThreadPoolExecutor(max(1, args.helpers)) as pool:
        futures = [(name, pool.submit(lower)) for name, lower in jobs]
        for name, fut in futures:
            seconds[name] = seconds.get(name, 0.0) + fut.result()
    total = time.perf_counter() - t_all
    sides = ", ".join(f"{n}²" for n in args.sizes)
    where = "a CUDA GPU (iterate_a pads, iterate_b fused)" if args.gpu else "this backend"
    print(f"tracing and lowering for {where}, first time per shape, summed over {sides}:")
    if helpers is not None:
        print(f"  ({args.helpers} helper processes trace and lower; seconds in this process)")
    for name, sec in seconds.items():
        print(f"  {name:24s} {sec:6.3f} s")
    print(f"  {'all, in this process':24s} {sum(seconds.values()):6.3f} s")
    print(f"  {'wall':24s} {total:6.3f} s")
    if helpers is not None:
        refused = sorted(name for name, _ in helpers[0].refused) or "none"
        print(f"  {helpers[0].lost} helpers lost, refused: {refused}")
        helpers[0].close()
    print(f"machine: {C.machine_line(C.machine_info())}")
    print(f"command: {C.command_line()}")
    return 0


def _first(args, helpers, lowerings) -> int:
    """``--first``: a started helper's requests in order, each timed in full (the
    helper's tracing and lowering, and the wrapping here)."""
    print(f"one helper, lowering for {'a CUDA GPU' if args.gpu else 'this backend'}, in order:")
    for n in args.sizes:
        calls = lowerings(n)
        for name in ("iterate_b", "iterate_a", "gains"):
            t0 = time.perf_counter()
            calls[name]()
            print(f"  {name:10s} {n:5d}²  {time.perf_counter() - t0:6.3f} s", flush=True)
    helpers[0].close()
    print(f"machine: {C.machine_line(C.machine_info())}")
    print(f"command: {C.command_line()}")
    return 0


def _operations(jaxpr) -> int:
    """Operations of a traced program, those of the programs inside it included (loop
    bodies, the fused pass's kernel): a count that, unlike the seconds, does not depend
    on how busy the machine is."""
    count = 0
    for eqn in jaxpr.eqns:
        count += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's, or a Jaxpr
                if hasattr(inner, "eqns"):
                    count += _operations(inner)
    return count


def _hierarchy_programs(n: int, gpu: bool) -> list[tuple[str, object]]:
    """``(name, lower)`` for every program that :func:`mpda_dist.solver.prepare` of an
    ``n²`` solve prefetches, each once (as :meth:`Jit.prefetch` drops a repeat); ``lower()``
    traces and lowers it (for CUDA with ``gpu``) and returns ``(trace s, lower s,
    operations)``."""
    import jax

    from mpda_dist import driver, fused, programs, runtime
    from mpda_dist.config import load_config
    from mpda_dist.multigrid import schedule
    from mpda_dist.solver import prepare

    comm = runtime.start()
    runtime.settle_gc()  # as `mpda run` does before its programs are traced ($MPDA_GC)
    if gpu:  # the forms a CUDA GPU traces (as a lowering helper does for its rank)
        programs.TRACE_BACKEND[0] = "gpu"
        fused.SUPPORTED[0] = True
        fused.INTERPRET = False
        fused.preload()
    cfg = load_config(None, [f"grid.nx={n}", f"grid.ny={n}", "solver.dtype=float32"])
    levels = schedule(n, n, 1 / (n - 1), 1 / (n - 1), cfg.solver.multigrid.min_size, True)
    jobs, seen = [], set()

    def record(self, fn, *args, **static):
        key = (fn.name, fn._key(args, static)[2])
        if key not in seen:
            seen.add(key)
            jobs.append((fn, args, static))

    real = programs.Programs.prefetch
    programs.Programs.prefetch = record
    try:
        with jax.enable_x64(False):
            prepare(comm, levels, driver.settings_from(cfg)).close()
    finally:
        programs.Programs.prefetch = real
    platforms = ("cuda",) if gpu else None

    def lowering(fn, args, static):
        def lower() -> tuple[float, float, int]:
            dyn, stat, _ = fn._key(args, static)
            with jax.enable_x64(False):
                t0 = time.perf_counter()
                traced = fn.jitted.trace(*dyn, **stat)
                t1 = time.perf_counter()
                traced.lower(lowering_platforms=platforms)
            return t1 - t0, time.perf_counter() - t1, _operations(traced.jaxpr.jaxpr)

        return lower

    return [(fn.name.rsplit(".", 1)[-1], lowering(fn, a, st)) for fn, a, st in jobs]


class _Collections:
    """The cyclic garbage collector's runs while in use (``gc.callbacks``): how many,
    and their CPU seconds (``time.thread_time``, not inflated by other processes), all
    and full ones."""

    def __init__(self) -> None:
        self.runs = self.full = 0
        self.seconds = self.full_seconds = 0.0
        self._start = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.thread_time()
            return
        spent = time.thread_time() - self._start
        self.runs += 1
        self.seconds += spent
        if info["generation"] == 2:
            self.full += 1
            self.full_seconds += spent

    def __enter__(self) -> _Collections:
        import gc

        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        import gc

        gc.callbacks.remove(self._callback)

    def __str__(self) -> str:
        return (
            f"{self.runs} runs, {self.seconds:.3f} s of CPU; "
            f"{self.full} full, {self.full_seconds:.3f} s"
        )


def _hierarchy(args) -> int:
    from mpda_dist import runtime

    jobs = _hierarchy_programs(args.hierarchy, args.gpu)
    where = "a CUDA GPU" if args.gpu else "this backend"
    if args.contention:
        _contention(args, jobs)
    else:
        rows: dict[str, list[float]] = {}
        collections = _Collections()
        t0, cpu0 = time.perf_counter(), time.thread_time()
        with collections:
            for name, lower in jobs:
                tr, lo, ops = lower()
                row = rows.setdefault(name, [0, 0.0, 0.0, 0])
                row[0] += 1
                row[1] += tr
                row[2] += lo
                row[3] += ops
        total, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
        ops = sum(int(r[3]) for r in rows.values())
        print(
            f"{len(jobs)} programs of a prepared {args.hierarchy}² solve (one rank, float32), "
            f"traced and lowered for {where}, one after another: {total:.2f} s "
            f"({cpu:.2f} s of CPU), {ops} operations"
        )
        print(f"  garbage collection ($MPDA_GC {runtime.gc_mode()}): {collections}")
        head = ("program", "count", "trace s", "lower s", "operations")
        print("  {:16s} {:>5s} {:>8s} {:>8s} {:>10s}".format(*head))
        for name, (k, tr, lo, n) in sorted(rows.items(), key=lambda r: -(r[1][1] + r[1][2])):
            print(f"  {name:16s} {k:5d} {tr:8.3f} {lo:8.3f} {int(n):10d}")
    print(f"machine: {C.machine_line(C.machine_info())}")
    print(f"command: {C.command_line()}")
    return 0


def _host_work(n: int) -> None:
    """What :meth:`mpda_dist.cycle.Hierarchy.build` does on the host per level: the prior's
    stencil (as float32) and its copy to the device."""
    import jax
    import numpy as np

    from mpda_dist import prior

    side = n - 2
    while side >= 30:
        diag, weights = prior.rectangle_stencil(
            (side, side), (1 / (side + 1),) * 2, 0.1, 1.0, (0, side), (0, side), np.float32
        )
        jax.block_until_ready((jax.device_put(weights), jax.device_put(diag)))
        side //= 2


def _contention(args, jobs) -> None:
    """The host work alone, then repeated while a thread lowers ``jobs`` (each program
    anew: JAX's caches are cleared before each interval), per switch interval."""
    import statistics

    import jax

    n = args.hierarchy
    alone = [C.timed(lambda: _host_work(n))[0] for _ in range(4)][1:]
    print(
        f"host work of a {n}² hierarchy (prior stencils, device copies), alone: "
        f"{statistics.median(alone):.3f} s (median of 3)"
    )
    print(f"  {'interval':>9s} {'host passes':>11s} {'host s (median)':>15s} {'lowering s':>10s}")
    default = sys.getswitchinterval()
    try:
        for interval in args.intervals:
            jax.clear_caches()
            sys.setswitchinterval(interval)
            done = threading.Event()
            spent = [0.0]

            def lower_all(done: threading.Event, spent: list[float]) -> None:
                t0 = time.perf_counter()
                for _, lower in jobs:
                    lower()
                spent[0] = time.perf_counter() - t0
                done.set()

            th = threading.Thread(target=lower_all, args=(done, spent))
            th.start()
            passes = []
            while not done.is_set():
                passes.append(C.timed(lambda: _host_work(n))[0])
            th.join()
            print(
                f"  {interval * 1e3:7.2f} ms {len(passes):11d} "
                f"{statistics.median(passes):15.3f} {spent[0]:10.2f}"
            )
    finally:
        sys.setswitchinterval(default)


if __name__ == "__main__":
    sys.exit(main())
