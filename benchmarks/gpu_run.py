"""One-call GPU benchmark: kernel per-iteration time and time to solution.

Run from the repository root on a machine with JAX (CUDA):
    PYTHONPATH=. python benchmarks/gpu_run.py [--quick] [--csv gpu.csv]
Prints a markdown table per stage, and the machine/devices; writes CSV rows.
Timers stop after ``block_until_ready``; compile time is reported apart.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mpda_dist import runtime  # noqa: E402

comm = runtime.start()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mpda_dist import kernel  # noqa: E402
from mpda_dist.config import load_config  # noqa: E402
from mpda_dist.driver import build_problem, settings_from  # noqa: E402
from mpda_dist.halo import message_layout  # noqa: E402
from mpda_dist.multigrid import schedule  # noqa: E402
from mpda_dist.solver import solve  # noqa: E402
from mpda_dist.stencil import build  # noqa: E402

ROWS: list[dict] = []


def kernel_time(n: int, iters: int, floor_bw: float) -> dict:
    cfg = load_config(None, [f"grid.nx={n}", f"grid.ny={n}"])
    p = build_problem(cfg)
    lv = schedule(n, n, 1 / (n - 1), 1 / (n - 1), enabled=False)[0]
    st = build(lv, 0.15, 1.1, p.nodes, (0, n - 2), (0, n - 2))
    op = kernel.Operator(*(jnp.asarray(v, jnp.float32) for v in (st.diag, st.weights, st.rhs)))
    by, bx = n - 2, n - 2
    halo = jnp.asarray(
        np.concatenate([message_layout(by, bx).fill_segment(i) for i in range(8)]), jnp.float32
    )
    a = jnp.zeros((12, by, bx), jnp.float32)
    b = jnp.full((12, by, bx), 1e-8, jnp.float32)
    bp = jnp.zeros((0,), jnp.float32)
    prm = kernel.Params(10.0, 0.6)
    t0 = time.perf_counter()
    f = kernel.iterate.lower(a, b, bp, op, halo, prm, n=iters, delta=False).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        a, b, bp, out, _ = f(a, b, bp, op, halo, prm)
        out.block_until_ready()
        times.append(time.perf_counter() - t0)
    per_it = float(np.median(times[1:])) / iters
    nbytes = (24 + 24 + 12 + 2) * 4 * by * bx
    row = {
        "stage": "kernel",
        "size": n,
        "per_iter_ms": per_it * 1e3,
        "GBps": nbytes / per_it / 1e9,
        "floor_ratio": per_it / (nbytes / floor_bw),
        "compile_s": compile_s,
    }
    ROWS.append(row)
    return row


def solve_time(n: int, frac: float, label: str, max_it: int) -> dict:
    cfg = load_config(
        None,
        [
            f"grid.nx={n}",
            f"grid.ny={n}",
            f"observations.synthetic.fraction={frac}",
            f"solver.max_iterations={max_it}",
        ],
    )
    p = build_problem(cfg)
    levels = schedule(n, n, 1 / (n - 1), 1 / (n - 1), 32)
    s = settings_from(cfg)
    t0 = time.perf_counter()
    r = solve(comm, levels, p.nodes, 0.15, 1.1, s)
    wall = time.perf_counter() - t0
    mean = r.anomaly
    rmse = float(np.sqrt(np.mean((mean - p.truth[1:-1, 1:-1]) ** 2)))
    row = {
        "stage": f"solve-{label}",
        "size": n,
        "fraction": frac,
        "wall_s": wall,
        "solve_s": sum(lv.solve_seconds for lv in r.levels),
        "compile_s": sum(lv.compile_seconds for lv in r.levels),
        "iterations": "/".join(str(lv.iterations) for lv in r.levels),
        "status": r.status,
        "rmse_truth": rmse,
    }
    ROWS.append(row)
    return row


def show(rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for r in rows:
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU smoke test)")
    ap.add_argument("--csv", default=os.path.join(os.environ.get("OUT", "."), "gpu_results.csv"))
    ap.add_argument("--bandwidth", type=float, default=3.0e12, help="floor bandwidth, B/s")
    ap.add_argument("--stages", default="kernel,solve,big")
    args = ap.parse_args()
    print(f"# host {platform.node()}, jax {jax.__version__}, devices {jax.devices()}")
    stages = args.stages.split(",")
    ksizes = [128, 256] if args.quick else [1024, 2048, 4096]
    if "kernel" in stages:
        for n in ksizes:
            kernel_time(n, 20 if args.quick else 200, args.bandwidth)
        show([r for r in ROWS if r["stage"] == "kernel"])
    n = 128 if args.quick else 1024
    if "solve" in stages:
        for frac in (0.01, 0.05, 0.1):
            solve_time(n, frac, "cold", 10000)
            solve_time(n, frac, "warm", 10000)
            show([r for r in ROWS if r["stage"].startswith("solve")])
    if "big" in stages:
        solve_time(256 if args.quick else 4096, 0.05, "warm-big", 10000)
    try:
        stats = jax.devices()[0].memory_stats() or {}
        print(f"# peak device memory {stats.get('peak_bytes_in_use', 0) / 2**30:.2f} GiB")
    except Exception as exc:  # noqa: BLE001 - CPU devices have no memory stats
        print(f"# no memory stats: {exc}")
    print("\n## all results")
    show(ROWS)
    keys = list(dict.fromkeys(k for r in ROWS for k in r))
    with open(args.csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, keys)
        w.writeheader()
        w.writerows(ROWS)


if __name__ == "__main__":
    main()
