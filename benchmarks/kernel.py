"""Per-iteration time and achieved memory bandwidth of ``kernel.iterate`` (coupled) and
``kernel.iterate_b`` (frozen precisions) on one block, for each border form
(``--forms``; ``mpda_dist.kernel.FORMS``), as the solver calls them with the residual
rule (``delta=False``).

One block on a 1 × 1 process grid, timed as the solver runs it there: with
``neighbours=False``, the programs use the domain edge's constant instead of reading the
halo (the constant payload from ``message_layout(by, bx).fill_segment``, still passed)
and send nothing (benchmarks/RESULTS.md §27; before, they read that halo and packed an
outgoing buffer per call). The operator is the real posterior stencil (Matérn prior, 5 %
point observations) of a grid whose interior is the block. ``--momentum`` (default 0: a
zero-size ``b_prev``, as the solver passes without momentum; the solver's default is
0.5) adds the heavy-ball term and a full-size ``b_prev``, read once per iteration: 12
more values per node in the floor.

Bytes per iteration (DESIGN §2): per node, 24 message values read (a, b: 12 slots each),
24 written, 12 weights and 2 scalars (diag, rhs) read:

    bytes/iter = N_nodes × (24 + 24 + 12 + 2) × itemsize = 62 · itemsize · N_nodes
               = 248 B/node in float32.

The frozen update reads and writes ``b``, reads the gains and ``rhs``: 37 values per
node.  That is the minimum traffic of one fused sweep; anything the compiled kernel moves on
top (intermediates, halo concatenation) lowers the achieved GB/s.  The host memory
bandwidth is measured with a numpy triad (a = b + s·c, see ``_common.stream_triad``)
and a jitted triad on the JAX device; the ratio column is kernel B/s ÷ measured B/s.

    python benchmarks/kernel.py --sizes 256 512 --iters 20 --repeats 3 --csv out/kernel.csv
    python benchmarks/kernel.py --sizes 256 512 1024 --forms strips pads --csv out/forms.csv
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

VALUES_PER_NODE = 24 + 24 + 12 + 2  # messages in, messages out, weights, diag + rhs
# The frozen-precision update (kernel.iterate_b): b in, b out, gains, rhs.
VALUES_FROZEN = 12 + 12 + 12 + 1


def make_block(n: int, dtype: str, fraction: float = 0.05, seed: int = 0):
    """Operator, messages and the constant edge halo for an ``n × n`` block."""
    import jax.numpy as jnp
    import numpy as np

    from mpda_dist import kernel
    from mpda_dist.halo import DIRECTIONS, message_layout
    from mpda_dist.multigrid import Level
    from mpda_dist.observations import NodeObservations
    from mpda_dist.stencil import build

    h = 1.0 / (n + 1)
    level = Level(n + 2, n + 2, 1, h, h)
    rng = np.random.default_rng(seed)
    count = max(1, int(fraction * n * n))
    flat = rng.choice(n * n, size=count, replace=False)
    iy, ix = np.divmod(flat, n)
    nodes = NodeObservations(
        iy + 1, ix + 1, rng.standard_normal(count), np.full(count, 1.0 / 1e-3**2)
    )
    st = build(level, 0.15, 1.1, nodes, (0, n), (0, n))
    op = kernel.Operator(*(jnp.asarray(v, dtype) for v in (st.diag, st.weights, st.rhs)))
    layout = message_layout(n, n)
    halo = jnp.asarray(
        np.concatenate([layout.fill_segment(i) for i in range(len(DIRECTIONS))]).astype(dtype)
    )
    a = jnp.zeros((12, n, n), dtype)
    b = jnp.full((12, n, n), 1e-8, dtype)
    bp = jnp.zeros((0,), dtype)
    return op, a, b, bp, halo


def bench_size(
    n: int,
    dtype: str,
    iters: int,
    repeats: int,
    c: float,
    damping: float,
    quiet: float = 0.0,
    frozen: bool = False,
    form: str = "strips",
    momentum: float = 0.0,
) -> dict:
    """Per-iteration time of the coupled update (``kernel.iterate``) or, with
    ``frozen``, of the b-only update (``kernel.iterate_b``, gains from 60 coupled
    iterations' ``a``), on an ``n × n`` block."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mpda_dist import kernel

    t0 = time.perf_counter()
    op, a, b, bp, halo = make_block(n, dtype)
    C.block((op, a, b, halo))
    setup = time.perf_counter() - t0
    p = kernel.Params(c, damping)
    g = None
    if frozen:
        a, b, bp, _, _ = kernel.iterate(a, b, bp, op, halo, p, n=60, momentum=0.0)
        g = kernel.gains(a, op, halo, p, neighbours=False)
    if momentum:
        bp = jnp.array(b)
    # the program the solver runs on one rank (kernel.update_call; with the residual
    # rule, the default, delta=False; no neighbours)
    fn, args = kernel.update_call(a, b, bp, g, op, halo, p, iters)
    compile_s, step = C.compile_timed(
        fn, *args, n=iters, momentum=momentum, delta=False, form=form, neighbours=False
    )
    # one untimed call: first-touch page faults and thread-pool start-up
    a, b, bp, out, d = C.block(step(*args))
    busy = C.wait_for_quiet(quiet) if quiet > 0 else C.cpu_busy(0.5)
    per_iter = []
    for _ in range(repeats):
        _, args = kernel.update_call(a, b, bp, g, op, halo, p, iters)
        t0 = time.perf_counter()
        a, b, bp, out, d = step(*args)
        jax.block_until_ready((a, b, bp, out, d))
        per_iter.append((time.perf_counter() - t0) / iters)
    if not np.all(np.isfinite(np.asarray(d))):
        raise RuntimeError(f"{n}²: the iteration produced non-finite values")
    s = C.summary(per_iter)
    itemsize = np.dtype(dtype).itemsize
    values = (VALUES_FROZEN if frozen else VALUES_PER_NODE) + (12 if momentum else 0)
    nbytes = values * itemsize * n * n
    return {
        "size": f"{n}x{n}",
        "kernel": "frozen a (iterate_b)" if frozen else "coupled (iterate)",
        "form": form,
        "momentum": momentum,
        "nodes": n * n,
        "dtype": dtype,
        "iters_per_call": iters,
        "repeats": repeats,
        "setup_s": setup,
        "compile_s": compile_s,
        "t_iter_median_ms": s["median"] * 1e3,
        "t_iter_min_ms": s["min"] * 1e3,
        "t_iter_max_ms": s["max"] * 1e3,
        "ns_per_node": s["median"] / (n * n) * 1e9,
        "mb_per_iter": nbytes / 1e6,
        "achieved_gbs": nbytes / s["median"] / 1e9,
        "achieved_gbs_best": nbytes / s["min"] / 1e9,
        "cpu_busy_before": busy,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[256, 512, 1024, 2048],
        help="block side lengths (nodes); default: 256 512 1024 2048",
    )
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--iters", type=int, default=50, help="iterations per jitted call (default 50)")
    ap.add_argument(
        "--repeats", type=int, default=5, help="timed calls per size (median; default 5)"
    )
    ap.add_argument("--c", type=float, default=10.0)
    ap.add_argument(
        "--momentum", type=float, default=0.0, help="heavy-ball term (0: off; the solver's 0.5)"
    )
    ap.add_argument("--damping", type=float, default=0.6)
    ap.add_argument(
        "--triad-mib",
        type=int,
        default=256,
        help="array size for the bandwidth triads (MiB per array; default 256)",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="before each size wait up to this long for the CPUs to be < 25%% busy "
        "(other processes); the busy fraction seen is recorded (default 20)",
    )
    ap.add_argument(
        "--forms",
        nargs="+",
        choices=["strips", "pads"],
        default=None,
        help="how the kernel reads across the block border (mpda_dist.kernel.FORMS); "
        "default: the form this backend uses (strips on a CPU)",
    )
    ap.add_argument("--csv", default="benchmarks/out/kernel.csv", help="CSV output path")
    args = ap.parse_args(argv)

    from mpda_dist import runtime

    runtime.start()  # JAX environment (threads) before JAX is imported
    import jax

    warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
    ctx = jax.enable_x64(True) if args.dtype == "float64" else _null()
    meta = C.machine_info(extra={"command": C.command_line()})

    bw = C.stream_triad(args.triad_mib * 2**20)
    jbw = C.jax_triad(args.triad_mib * 2**20)
    from mpda_dist import kernel

    forms = args.forms or [kernel.default_form()]
    rows = []
    with ctx:
        cases = [(n, f, fm) for n in args.sizes for f in (False, True) for fm in forms]
        for n, frozen, form in cases:
            r = bench_size(
                n,
                args.dtype,
                args.iters,
                args.repeats,
                args.c,
                args.damping,
                args.wait_quiet,
                frozen,
                form,
                args.momentum,
            )
            r["ratio_vs_numpy_triad"] = r["achieved_gbs"] / bw["triad_gbs"]
            r["time_over_floor"] = 1.0 / r["ratio_vs_numpy_triad"]
            r["ratio_vs_jax_triad"] = r["achieved_gbs"] / jbw["triad_gbs"]
            rows.append(r)
            print(
                f"  {r['size']} {r['kernel']} [{form}]: {r['t_iter_median_ms']:.3f} ms/iter, "
                f"{r['achieved_gbs']:.2f} GB/s (compile {r['compile_s']:.2f} s)",
                flush=True,
            )
    meta["bandwidth"] = {"numpy": bw, "jax": jbw}
    meta["loadavg_at_end"] = C.loadavg()
    notes = [
        "bytes/iter = nodes x (24 + 24 + 12 + 2) x itemsize "
        f"= {VALUES_PER_NODE} x itemsize x nodes (coupled); frozen a: b in, b out, gains, "
        f"rhs = {VALUES_FROZEN} x itemsize x nodes",
        f"numpy triad a=b+s*c (float64, 2 passes, 5 transfers/element counted): "
        f"{bw['triad_gbs']:.2f} GB/s; numpy copy: {bw['copy_gbs']:.2f} GB/s; "
        f"jitted JAX triad (float32, fused, 3 transfers/element): {jbw['triad_gbs']:.2f} GB/s",
        "t_iter = wall time of one call of `iters` iterations / iters, synchronised "
        "(block_until_ready); median over repeats; compile time measured apart (AOT); "
        "delta=False (the residual rule's program)",
        "floor = bytes/iter at the numpy triad's bandwidth; time / floor = 1 / (÷ numpy triad)",
        "cpu busy = share of all CPUs busy (any process) just before a size's timed calls; "
        "values > 0 mean other work shared the machine",
    ]
    path = C.write_csv(args.csv, rows, meta, notes)

    print()
    print(f"machine: {C.machine_line(meta)}")
    print(f"command: {meta['command']}")
    for n in notes:
        print(f"note: {n}")
    print(f"csv: {path}")
    print()
    print(
        C.markdown_table(
            rows,
            [
                ("size", "block"),
                ("kernel", "update"),
                ("form", "form"),
                ("dtype", "dtype"),
                ("compile_s", "compile [s]"),
                ("t_iter_median_ms", "t/iter median [ms]"),
                ("t_iter_min_ms", "min [ms]"),
                ("t_iter_max_ms", "max [ms]"),
                ("ns_per_node", "ns/node"),
                ("mb_per_iter", "MB/iter"),
                ("achieved_gbs", "achieved [GB/s]"),
                ("achieved_gbs_best", "best [GB/s]"),
                ("ratio_vs_numpy_triad", "÷ numpy triad"),
                ("ratio_vs_jax_triad", "÷ JAX triad"),
                ("time_over_floor", "time ÷ floor"),
                ("cpu_busy_before", "CPU busy before"),
            ],
            formats={"cpu_busy_before": ".0%"},
        )
    )
    return 0


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    raise SystemExit(main())
