"""Accuracy and time to solution of message passing (MP) against the exact sparse solve.

For each grid size and observation fraction: a synthetic problem from the bundled demo
config (``load_config(None, overrides)``: Matérn prior ℓ = 0.15, σ = 1.1, point
observations with noise 1e-3, seed 0) built by ``driver.build_problem``; MP runs through
``solver.solve`` on ``COMM_WORLD`` (one rank) with the demo's solver settings
(``driver.settings_from``: c = 10, damping 0.6, momentum 0.5, multigrid down to the
configuration's ``min_size``, 64, residual stopping) at ``--dtype`` (float32) and
``--tol`` (1e-5); the exact answer is a sparse direct solve of ``Q μ = h`` in float64
(``_common.exact_anomaly``).

Reported: RMSE against the truth (interior nodes) of MP and of the exact solution, the
relative difference ``rms(μ_MP − μ_exact) / rms(μ_exact)`` (anomalies), iterations per
level (coarse → fine), MP solve time (compile excluded) and compile time as the solver
records them, the wall time of the whole ``solve`` call, and the exact solve's time.

    python benchmarks/accuracy.py --sizes 128 256 --fractions 0.01 0.05 0.1
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def run_case(comm, n: int, fraction: float, args) -> dict:
    import jax
    import numpy as np

    from mpda_dist import driver
    from mpda_dist.config import load_config
    from mpda_dist.multigrid import schedule
    from mpda_dist.solver import solve
    from mpda_dist.stencil import build

    cfg = load_config(
        None,
        [
            f"grid.nx={n}",
            f"grid.ny={n}",
            f"observations.synthetic.fraction={fraction}",
            f"observations.synthetic.seed={args.seed}",
            f"solver.dtype={args.dtype}",
            f"solver.tol={args.tol}",
            f"solver.max_iterations={args.max_iterations}",
            "logging.heartbeat_seconds=0",
        ]
        + list(args.set or []),
    )
    t0 = time.perf_counter()
    problem = driver.build_problem(cfg)
    build_s = time.perf_counter() - t0
    ny, nx = cfg.grid.ny, cfg.grid.nx
    lx, ly = cfg.grid.extent
    mg = cfg.solver.multigrid
    levels = schedule(ny, nx, ly / (ny - 1), lx / (nx - 1), mg.min_size, mg.enabled)
    s = driver.settings_from(cfg)
    truth = problem.truth[1:-1, 1:-1] - problem.background[1:-1, 1:-1]

    def mp_once():
        t0 = time.perf_counter()
        with jax.enable_x64(s.dtype == "float64"):
            res = solve(comm, levels, problem.nodes, cfg.prior.lengthscale, cfg.prior.amplitude, s)
        return time.perf_counter() - t0, res

    wall, res = mp_once()
    warm_wall = warm_solve = warm_compile = None
    if args.warm:
        warm_wall, res2 = mp_once()
        warm_solve = sum(lr.solve_seconds for lr in res2.levels)
        warm_compile = sum(lr.compile_seconds for lr in res2.levels)

    t0 = time.perf_counter()
    st = build(
        levels[-1],
        cfg.prior.lengthscale,
        cfg.prior.amplitude,
        problem.nodes,
        (0, levels[-1].interior[0]),
        (0, levels[-1].interior[1]),
    )
    exact = C.exact_anomaly(st)
    exact_s = time.perf_counter() - t0

    mp = np.asarray(res.anomaly, np.float64)
    lv = res.levels
    return {
        "grid": f"{nx}x{ny}",
        "fraction": fraction,
        "observations": lv[-1].observations,
        "dtype": s.dtype,
        "tol": s.tol,
        "status": res.status,
        "residual": lv[-1].residual,
        "levels": len(lv),
        "iterations": "/".join(str(lr.iterations) for lr in lv),
        "iterations_finest": lv[-1].iterations,
        "rmse_mp": C.rms(mp - truth),
        "rmse_exact": C.rms(exact - truth),
        "rmse_background": C.rms(truth),
        "rel_mp_vs_exact": C.rms(mp - exact) / C.rms(exact),
        "max_abs_mp_vs_exact": float(np.max(np.abs(mp - exact))),
        "solve_s": sum(lr.solve_seconds for lr in lv),
        "compile_s": sum(lr.compile_seconds for lr in lv),
        "wall_s": wall,
        "warm_wall_s": warm_wall,
        "warm_solve_s": warm_solve,
        "warm_compile_s": warm_compile,
        "exact_s": exact_s,
        "problem_build_s": build_s,
        "per_level": [lr.summary() for lr in lv],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[128, 256, 512],
        help="grid points per side incl. boundary (default: 128 256 512)",
    )
    ap.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[0.01, 0.05, 0.1],
        help="observed share of interior nodes (default: 0.01 0.05 0.1)",
    )
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--tol", type=float, default=1e-5, help="relative residual (default 1e-5)")
    ap.add_argument("--max-iterations", type=int, default=10000, help="per level (default 10000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--warm",
        action="store_true",
        help="solve each case a second time in the same process (warm wall time)",
    )
    ap.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="extra config override (repeatable), e.g. --set solver.momentum=0",
    )
    ap.add_argument("--csv", default="benchmarks/out/accuracy.csv", help="CSV output path")
    args = ap.parse_args(argv)

    from mpda_dist import runtime

    comm = runtime.start()  # sets JAX's environment: before JAX is imported
    if comm.Get_size() != 1:
        raise SystemExit("accuracy.py runs on one rank (the comparison needs the whole field)")
    warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
    meta = C.machine_info(extra={"command": C.command_line(), "ranks": 1})

    rows = []
    for n in args.sizes:
        for f in args.fractions:
            r = run_case(comm, n, f, args)
            rows.append(r)
            print(
                f"  {r['grid']} {f:.0%}: {r['status']} in {r['iterations']} it, "
                f"solve {r['solve_s']:.2f} s + compile {r['compile_s']:.2f} s, "
                f"rel. diff to exact {r['rel_mp_vs_exact']:.2e}",
                flush=True,
            )
    meta["loadavg_at_end"] = C.loadavg()
    notes = [
        "RMSE over interior nodes, anomaly vs truth anomaly; rel_mp_vs_exact = "
        "rms(mu_mp - mu_exact) / rms(mu_exact)",
        "solve_s, compile_s: sums over levels of LevelResult.solve_seconds / "
        "compile_seconds; wall_s: the whole solver.solve call (stencils, compile, solve)",
        "exact: scipy spsolve (SuperLU, MMD_AT_PLUS_A ordering), float64, incl. assembly",
    ]
    path = C.write_csv(
        args.csv,
        [{k: v for k, v in r.items() if k != "per_level"} for r in rows],
        meta,
        notes,
        json_rows=rows,
    )
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
                ("grid", "grid"),
                ("fraction", "obs"),
                ("status", "status"),
                ("iterations", "iterations/level"),
                ("rmse_mp", "RMSE MP"),
                ("rmse_exact", "RMSE exact"),
                ("rmse_background", "RMSE bg"),
                ("rel_mp_vs_exact", "rms(MP−exact)/rms(exact)"),
                ("residual", "residual"),
                ("solve_s", "MP solve [s]"),
                ("compile_s", "compile [s]"),
                ("wall_s", "wall [s]"),
                ("exact_s", "exact [s]"),
            ]
            + ([("warm_wall_s", "warm wall [s]")] if args.warm else []),
            formats={
                "fraction": ".0%",
                "rmse_mp": ".4g",
                "rmse_exact": ".4g",
                "rmse_background": ".4g",
                "rel_mp_vs_exact": ".2e",
                "residual": ".1e",
            },
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
