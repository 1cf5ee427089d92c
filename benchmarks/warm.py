"""Time to solution of repeated solves in one process (the first includes compiling),
on one rank or several.

The problem is the demo's (Matérn prior ℓ = 0.15, σ = 1.1, noise 1e-3, seed 0) at
``--size``² with ``--fraction`` observed, float32, residual rule 1e-5, momentum 0.5
(the configuration defaults).  Rank 0 prints one row per run: wall time, iterations
per level (coarsest first), the finest level's solve and correction seconds, and the
seconds spent compiling or waiting for programs.  The process starts as ``mpda run``
does (``runtime.start``: threads per rank, the allocator).  For A/B comparisons of two
commits, run a copy of this script inside each checkout, alternately (``_common`` puts
its own checkout first on ``sys.path``).

    python benchmarks/warm.py --size 1024 --fraction 0.1 --runs 3
    mpiexec -n 2 python benchmarks/warm.py --size 512 --fraction 0.1 --runs 3
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = C.demo_parser(__doc__, 256, 0.1)
    ap.add_argument("--runs", type=int, default=3, help="solves in this process (3)")
    ap.add_argument(
        "--every", type=int, default=1, help="solver.exchange.every: iterations per exchange (1)"
    )
    args = ap.parse_args(argv)

    from mpda_dist import runtime

    comm = runtime.start()  # as `mpda run`: JAX's environment and the allocator first

    from mpda_dist.solver import Settings, solve

    nodes, levels = C.demo_problem(args.size, args.fraction, "warm.py", args.min_size)
    s = Settings(dtype="float32", tol=1e-5, momentum=0.5, every=args.every)
    rows = []
    for r in range(args.runs):
        comm.Barrier()
        t0 = time.perf_counter()
        res = solve(comm, levels, nodes, 0.15, 1.1, s)
        wall = time.perf_counter() - t0
        top = res.levels[-1]
        rows.append(
            {
                "run": r + 1,
                "wall [s]": wall,
                "status": res.status,
                "iterations per level": " ".join(str(lv.iterations) for lv in res.levels),
                "finest solve [s]": top.solve_seconds,
                "finest corrections [s]": top.correction_seconds,
                "compile or wait [s]": sum(lv.compile_seconds for lv in res.levels),
            }
        )
    if comm.rank == 0:
        C.print_report(rows, f"; ranks {comm.size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
