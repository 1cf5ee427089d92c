"""Anderson mixing's failed-mix rule (:data:`mpda_dist.anderson.MAX_FAILED_MIXES`,
:data:`~mpda_dist.anderson.GROWTH`) on the bundled demo's problem and variants of it:
with few observations (where mixing is needed to converge), without heavy-ball
momentum (where mixing every other check diverged), float64, 512².  Each case is
solved three ways in one process (one rank, the demo's settings otherwise): the rule as
it is, the former rule (no mix ever counted as failed), and no mixing
(``solver.anderson: 0``).  Per way: the status and the iterations per level above
the coarsest.

    python benchmarks/anderson_cases.py --csv benchmarks/out/anderson_cases.csv
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

FRACTION, SEED = "observations.synthetic.fraction", "observations.synthetic.seed"
CASES = [
    ("demo", []),
    ("demo, momentum 0", ["solver.momentum=0"]),
    ("demo, momentum 0, 1 %", ["solver.momentum=0", f"{FRACTION}=0.01"]),
    ("demo, 0.05 %", [f"{FRACTION}=0.0005"]),
    (
        "demo, 0.05 %, seed 1",
        [f"{FRACTION}=0.0005", f"{SEED}=1"],
    ),
    (
        "demo, 0.1 %, seed 5",
        [f"{FRACTION}=0.001", f"{SEED}=5"],
    ),
    ("demo, 0.2 %, float64", [f"{FRACTION}=0.002", "solver.dtype=float64"]),
    ("demo, 1 %", [f"{FRACTION}=0.01"]),
    ("demo, float64", ["solver.dtype=float64"]),
    ("512², 10 %", ["grid.nx=512", "grid.ny=512", f"{FRACTION}=0.1"]),
]
WAYS = ("the rule", "former rule", "no mixing")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", help="write the rows here")
    args = ap.parse_args()
    from mpda_dist import runtime

    comm = runtime.start()
    import jax

    from mpda_dist import anderson, driver
    from mpda_dist.config import load_config
    from mpda_dist.multigrid import schedule
    from mpda_dist.solver import solve

    rule = anderson.MAX_FAILED_MIXES
    rows = []
    for name, sets in CASES:
        cfg = load_config(None, [*sets, "logging.heartbeat_seconds=0"])
        nodes = driver.build_problem(cfg).nodes
        ny, nx = cfg.grid.ny, cfg.grid.nx
        mg = cfg.solver.multigrid
        levels = schedule(ny, nx, 1 / (ny - 1), 1 / (nx - 1), mg.min_size, mg.enabled)
        s = driver.settings_from(cfg)
        row = {"case": name}
        for way in WAYS:
            anderson.MAX_FAILED_MIXES = math.inf if way == "former rule" else rule
            sw = replace(s, anderson=0) if way == "no mixing" else s
            try:
                with jax.enable_x64(s.dtype == "float64"):
                    r = solve(comm, levels, nodes, cfg.prior.lengthscale, cfg.prior.amplitude, sw)
            finally:
                anderson.MAX_FAILED_MIXES = rule
            its = "/".join(str(lr.iterations) for lr in r.levels[1:])
            row[way] = f"{r.status} {its}"
        rows.append(row)
        print(f"{name:26s} " + " | ".join(f"{w}: {row[w]}" for w in WAYS), flush=True)
    print()
    print("| case | " + " | ".join(WAYS) + " |")
    print("|---|" + "---|" * len(WAYS))
    for row in rows:
        print(f"| {row['case']} | " + " | ".join(row[w] for w in WAYS) + " |")
    print(f"rule: MAX_FAILED_MIXES {rule}, GROWTH {anderson.GROWTH}")
    print(f"machine: {C.machine_line(C.machine_info())}")
    print(f"command: {C.command_line()}")
    if args.csv:
        meta = {"machine": C.machine_info(), "command": C.command_line()}
        C.write_csv(args.csv, rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
