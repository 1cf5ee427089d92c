"""Tracing and lowering time of a level's message-passing programs, the first time per
block shape (what a cold start pays once per level, one program after another).

Each ``--sizes`` side is a new shape, as the levels of a hierarchy are.  The programs
are lowered from shapes alone (``jax.ShapeDtypeStruct``), nothing is compiled or run:
the update programs as one rank runs them on a CPU (``strips``: ``iterate_a`` with 10
updates, ``gains``, ``iterate_b`` with 10 updates and momentum 0.5), the one-update
``iterate_b_odd`` that several ranks run (``pads``), and three small ones.  float32.

    python benchmarks/tracing.py                      # sides 512 256 128 64

For A/B comparisons run a copy of this script inside each checkout, alternately, each in
a fresh process (JAX keeps what it traced).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 256, 128, 64])
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    from mpda_dist import kernel
    from mpda_dist.halo import field_layout, message_layout

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
            "iterate_a": lambda: kernel.iterate_a.lower(msg, msg, op, halo, p, n=10, form="strips"),
            "gains": lambda: kernel.gains.lower(msg, op, halo, p),
            "iterate_b": lambda: kernel.iterate_b.lower(*upd, n=10, form="strips", **frozen),
            "iterate_b_odd (pads, 1)": lambda: kernel.iterate_b_odd.lower(
                *upd, n=1, form="pads", **frozen
            ),
            "shift_messages": lambda: kernel.shift_messages.lower(msg, msg, field, frame, op, p.c),
            "marginal_mean": lambda: kernel.marginal_mean.lower(msg, msg, op, p),
            "residual": lambda: kernel.residual.lower(field, frame, op),
        }

    seconds: dict[str, float] = {}
    t_all = time.perf_counter()
    for n in args.sizes:
        for name, lower in lowerings(n).items():
            t0 = time.perf_counter()
            lower()
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
    total = time.perf_counter() - t_all
    sides = ", ".join(f"{n}²" for n in args.sizes)
    print(f"tracing and lowering, first time per shape, summed over {sides}:")
    for name, sec in seconds.items():
        print(f"  {name:24s} {sec:6.3f} s")
    print(f"  {'all':24s} {total:6.3f} s")
    print(f"machine: {C.machine_line(C.machine_info())}")
    print(f"command: {C.command_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
