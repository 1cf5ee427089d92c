"""Host-side set-up of a solve on one rank: the multigrid hierarchy that ``solve``
builds before it iterates (every level's prior stencil, the observation term, the
restricted coarse operators, moving them to the device; ``cycle.Hierarchy``).

On a GPU this is host work that the device waits for: at 4096² it was most of a warm
solve's time (benchmarks/RESULTS.md §17).  The problem is ``warm.py``'s (Matérn prior
ℓ = 0.15, σ = 1.1, ``--fraction`` observed, float32).  Each repeat builds the hierarchy
again in the same process; the first pays for touching fresh memory.

    python benchmarks/setup.py --size 4096 --repeats 3
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = C.demo_parser(__doc__, 1024, 0.05)
    ap.add_argument("--repeats", type=int, default=3, help="hierarchies to build (3)")
    args = ap.parse_args(argv)

    from mpda_dist import runtime

    comm = runtime.start()

    import jax
    import numpy as np

    from mpda_dist import kernel
    from mpda_dist.cycle import Hierarchy
    from mpda_dist.programs import Programs
    from mpda_dist.solver import Settings

    n = args.size
    t0 = time.perf_counter()
    nodes, levels = C.demo_problem(n, args.fraction, "setup.py", args.min_size)
    problem_s = time.perf_counter() - t0
    s = Settings(dtype="float32", tol=1e-5, momentum=0.5)
    p = kernel.Params(s.c, s.damping)
    rows = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        with contextlib.closing(Programs()) as programs:
            h = Hierarchy(
                comm, levels, nodes, 0.15, 1.1, None, levels[-1].periodic, p, s.momentum,
                np.float32, programs,
            )  # fmt: skip
            jax.block_until_ready(h.ops)
            rows.append(
                {
                    "repeat": r + 1,
                    "levels": len(h.levels),
                    "hierarchy [s]": time.perf_counter() - t0,
                }
            )
            h.free()
    if comm.rank == 0:
        print(f"problem ({n}², {args.fraction:g} observed, not timed below): {problem_s:.2f} s")
        C.print_report(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
