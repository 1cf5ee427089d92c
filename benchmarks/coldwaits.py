"""What the first solve of a fresh process waits for: its wall time and the program
waits of its own calls (``programs.wait_report``), longest first.

The problem is the demo's (Matérn prior ℓ = 0.15, σ = 1.1, noise 1e-3, seed 0) at
``--size``² with ``--fraction`` observed, float32, residual rule 1e-5, momentum 0.5,
multigrid down to ``--min-size`` (32 by default, as in RESULTS; the configuration's
default is 64).  Run it with empty caches to time a cold start, e.g.

    XDG_CACHE_HOME=$(mktemp -d) python benchmarks/coldwaits.py --size 1024

(with ``JAX_COMPILATION_CACHE_DIR`` and ``MPDA_PROGRAM_CACHE_DIR`` unset).  For A/B
comparisons run a copy of this script inside each checkout, alternately; on a commit
without ``programs.wait_report`` it prints the wall time alone.  Last comes the compile
report: the programs' tracing-and-lowering and compiling seconds, summed over threads;
before it, where the main thread spent the first solve (``_common.MainThreadSampler``).
With ``MPDA_COMPILE_THREADS=1`` nothing overlaps, and the tracing sum is what a
many-core host still does one program at a time (``programs._TRACING``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = C.demo_parser(__doc__, 256, 0.1, min_size=32)
    ap.add_argument("--top", type=int, default=25, help="longest waits to list (25)")
    args = ap.parse_args(argv)

    from mpda_dist import runtime

    comm = runtime.start()  # as `mpda run`: JAX's environment and the allocator first

    from mpda_dist import programs
    from mpda_dist.solver import Settings, solve

    n = args.size
    nodes, levels = C.demo_problem(n, args.fraction, "coldwaits.py", args.min_size)
    s = Settings(dtype="float32", tol=1e-5, momentum=0.5)
    t0 = time.perf_counter()
    with C.MainThreadSampler() as sampler:
        res = solve(comm, levels, nodes, 0.15, 1.1, s)
    wall = time.perf_counter() - t0
    if comm.rank != 0:
        return 0
    its = "/".join(str(lv.iterations) for lv in res.levels)
    case = f"{n}² {args.fraction:.0%}"
    print(f"first solve {case}: wall {wall:.2f} s, {res.status}, iterations {its}")
    if hasattr(programs, "wait_report"):
        total, count, longest = programs.wait_report(args.top)
        print(f"waited {total:.2f} s for programs in {count} calls; longest:")
        for name, sec, where in longest:
            print(f"  {name:24s} {sec:6.2f} s  ({where})")
    print("\n".join(sampler.report()))
    rows = programs.compile_report(10_000)
    lowered, compiled = sum(r[3] for r in rows), sum(r[4] for r in rows)
    print(
        f"{sum(r[1] for r in rows)} programs: tracing and lowering {lowered:.2f} s, "
        f"compiling {compiled:.2f} s (summed over threads); most tracing:"
    )
    for name, count, _, low, comp in sorted(rows, key=lambda r: -r[3])[:5]:
        print(f"  {name:24s} {count:3d} programs, trace+lower {low:5.2f} s, compile {comp:6.2f} s")
    try:
        from mpda_dist import lowering  # not on commits before the helpers
    except ImportError:
        lowering = None
    if lowering is not None:
        print(lowering.report() or "no lowering helpers")
    print(f"machine: {C.machine_line(C.machine_info())}; ranks {comm.size}")
    print(f"command: {C.command_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
