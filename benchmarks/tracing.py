"""Tracing and lowering time of a level's message-passing programs, the first time per
block shape (what a cold start pays once per level, one program after another).

Each ``--sizes`` side is a new shape, as the levels of a hierarchy are.  The programs
are lowered from shapes alone (``jax.ShapeDtypeStruct``), nothing is compiled or run:
the update programs as one rank runs them on a CPU (``strips``: ``iterate_a`` with 10
updates, ``gains``, ``iterate_b`` with 10 updates and momentum 0.5), the one-update
``iterate_b_odd`` that several ranks run (``pads``), and three small ones.  float32.

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
    args = ap.parse_args(argv)
    if args.first:
        args.helpers = 1

    import jax
    import jax.numpy as jnp

    from mpda_dist import fused, kernel
    from mpda_dist.halo import field_layout, message_layout

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
        frame = sds(field_layout(n, n, 2).in_offsets[-1])
        frozen = dict(momentum=0.5, delta=False)
        upd = (msg, msg, msg, msg, op, halo, p)
        return {
            "iterate_a": lambda: k["iterate_a"].lower(msg, msg, op, halo, p, n=10, form=a_form),
            "gains": lambda: k["gains"].lower(msg, op, halo, p),
            "iterate_b": lambda: k["iterate_b"].lower(*upd, n=10, form=b_form, **frozen),
            "iterate_b_odd (pads, 1)": lambda: k["iterate_b_odd"].lower(
                *upd, n=1, form="pads", **frozen
            ),
            "shift_messages": lambda: k["shift_messages"].lower(msg, msg, field, frame, op, p.c),
            "marginal_mean": lambda: k["marginal_mean"].lower(msg, msg, op, p),
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


if __name__ == "__main__":
    sys.exit(main())
