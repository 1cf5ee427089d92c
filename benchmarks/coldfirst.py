"""The cold start of one rank on any machine: the build and first solve of the demo
problem (prepared as ``mpda run`` does), each in a fresh process with empty caches,
settings alternated round by round.

Each run is ``gpu_bench.solve_case`` at ``--size`` with 5 % observations and at most
``--cap`` iterations per level (the same programs as a full solve, little solving: on a
CPU the full solve would hide the start).  ``--switch-intervals`` alternates Python's
``sys.setswitchinterval`` (seconds; ``default`` leaves it).  ``--jax-cache`` first fills
a JAX persistent cache and then runs every case with it and without mpda's program
store: the programs are traced and lowered but not compiled, so what is left is the
part of a cold start that holds Python's lock (as on a many-core GPU host, where the
compiles run beside it).

    python benchmarks/coldfirst.py --size 512 --rounds 3
    python benchmarks/coldfirst.py --size 512 --jax-cache --switch-intervals default 0.0005

To compare two versions of the package, run each checkout's own copy of the script
(copy it into the older one), alternately: ``benchmarks/_common.py`` puts its own
checkout first on ``sys.path``, whatever ``PYTHONPATH`` says.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

INNER = r"""
import sys
interval, n, cap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if interval != "default":
    sys.setswitchinterval(float(interval))
sys.path.insert(0, sys.argv[4])
import gpu_bench as G  # (its _common puts this checkout first on sys.path)
comm = G._start()
out = G.solve_case(comm, n, 0.05, runs=1, first_max_iterations=cap)
r = out["runs"][0]
print("RESULT", out["build_s"], r["wall"], r["since_start"], r["compile"], flush=True)
"""


def run_once(args, interval: str, cache: str | None) -> tuple[float, ...]:
    with tempfile.TemporaryDirectory(prefix="mpda_coldfirst") as d:
        env = dict(os.environ, XDG_CACHE_HOME=d)
        if cache is not None:  # JAX's cache filled, no program store: trace, no compile
            env.update(JAX_COMPILATION_CACHE_DIR=cache, MPDA_PROGRAM_CACHE_DIR="")
        here = str(Path(__file__).resolve().parent)
        return C.run_inner(
            INNER, [interval, str(args.size), str(args.cap), here], env, d, args.timeout
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="grid side (512)")
    ap.add_argument("--cap", type=int, default=20, help="iterations per level at most (20)")
    ap.add_argument("--rounds", type=int, default=2, help="runs per setting, alternated (2)")
    ap.add_argument("--switch-intervals", nargs="+", default=["default"])
    ap.add_argument("--jax-cache", action="store_true", help="JAX's cache filled, no store")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run (900)")
    args = ap.parse_args(argv)
    cache = None
    with tempfile.TemporaryDirectory(prefix="mpda_coldfirst_jax") as jax_dir:
        if args.jax_cache:
            cache = jax_dir
            run_once(args, "default", cache)  # fills it
        rows: dict[str, list[tuple[float, ...]]] = {v: [] for v in args.switch_intervals}
        for r in range(args.rounds):
            for v in args.switch_intervals:
                rows[v].append(run_once(args, v, cache))
                build, first = rows[v][-1][:2]
                print(f"  round {r + 1}, interval {v}: build {build:.2f} s, first solve "
                      f"{first:.2f} s, together {build + first:.2f} s", flush=True)  # fmt: skip
    what = "JAX's cache filled, no program store" if args.jax_cache else "empty caches"
    print(f"\none rank, {args.size}², 5 %, ≤ {args.cap} iterations per level, {what}; "
          f"medians of {args.rounds}:")  # fmt: skip
    print(f"  {'interval':>9s} {'build s':>8s} {'first s':>8s} {'together s':>10s} {'waits s':>8s}")
    for v, runs in rows.items():
        med = [statistics.median(x) for x in zip(*runs, strict=True)]
        print(f"  {v:>9s} {med[0]:8.2f} {med[1]:8.2f} {med[0] + med[1]:10.2f} {med[3]:8.2f}")
    print(f"machine: {C.machine_line(C.machine_info())}")
    print(f"command: {C.command_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
