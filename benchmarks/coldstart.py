"""Start-up cost of a solve: the first solve of a fresh process, by cache state.

Every case runs in a new process (one rank) and times its first ``solver.solve`` of
the demo problem at ``--size`` (wall, and the seconds the levels spent compiling or
waiting for programs), counting the programs JAX traced and XLA compiled, and the
programs loaded from mpda_dist's program cache (``mpda_dist/programs.py``):

  cold, 1 thread    empty caches, MPDA_COMPILE_THREADS=1 (no background compiles)
  cold, N threads   empty caches, N compile threads (default: every core; no such row
                    when N is 1)
  JAX cache only    a later process with the program cache off (MPDA_PROGRAM_CACHE_DIR
                    empty, as before it existed), and JAX's persistent cache, its
                    fallback, filled by a process before it with the same setting
  program cache     a later process with the program cache filled by the cold line
                    above (what a rerun gets; since RESULTS §28 JAX's cache is off
                    while the program cache is on, unless the user sets its directory)

    python benchmarks/coldstart.py --size 256 --fraction 0.1 --csv benchmarks/out/coldstart.csv

Each case runs ``--repeats`` times (fresh caches for every cold run); the table shows
the median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

INNER = r"""
import json, sys, time
t_start = time.perf_counter()
from mpda_dist import runtime
comm = runtime.start()
from jax import monitoring
events = []
monitoring.register_event_duration_secs_listener(
    lambda name, d, **kw: events.append(name.rsplit("/", 1)[-1]))
from mpda_dist import driver, programs
from mpda_dist.config import load_config
from mpda_dist.multigrid import schedule
from mpda_dist.solver import solve
n, fraction = int(sys.argv[1]), float(sys.argv[2])
cfg = load_config(None, overrides=[f"grid.nx={n}", f"grid.ny={n}",
    f"observations.synthetic.fraction={fraction}", "logging.heartbeat_seconds=0"])
nodes = driver.build_problem(cfg).nodes
mg = cfg.solver.multigrid
lx, ly = cfg.grid.extent
levels = schedule(n, n, ly / (n - 1), lx / (n - 1), mg.min_size, mg.enabled)
s = driver.settings_from(cfg)
t0 = time.perf_counter()
res = solve(comm, levels, nodes, cfg.prior.lengthscale, cfg.prior.amplitude, s)
wall = time.perf_counter() - t0
st = programs.store()
print(json.dumps(dict(
    wall=wall, since_start=time.perf_counter() - t_start, status=res.status,
    compile=sum(lr.compile_seconds for lr in res.levels),
    traced=events.count("jaxpr_trace_duration"),
    compiled=events.count("backend_compile_duration") - events.count("cache_retrieval_time_sec"),
    jax_cache_loads=events.count("cache_retrieval_time_sec"),
    store_loads=st.loaded, stored=st.saved,
    iterations="/".join(str(lr.iterations) for lr in res.levels))))
"""


def run_case(args, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", INNER, str(args.size), str(args.fraction)],
        env=env,
        capture_output=True,
        text=True,
        timeout=args.timeout,
    )
    if out.returncode != 0:
        raise SystemExit(f"case failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    import _common as C

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=256, help="grid side incl. boundary (256)")
    ap.add_argument("--fraction", type=float, default=0.1, help="observed share (0.1)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="compile threads")
    ap.add_argument("--repeats", type=int, default=2, help="runs per case (2)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per process (600)")
    ap.add_argument("--csv", default=None, help="write the rows here (and <csv>.json)")
    args = ap.parse_args(argv)

    base = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "MPDA_"))}
    base.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(args.threads))
    repo = str(Path(__file__).resolve().parent.parent)
    base["PYTHONPATH"] = repo + (os.pathsep + base["PYTHONPATH"] if "PYTHONPATH" in base else "")
    cases: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="mpda-coldstart-") as tmp:
        for r in range(args.repeats):
            # once each: with --threads 1 a second "cold" run in the same caches is warm
            for threads in sorted({1, args.threads}):
                caches = Path(tmp) / f"r{r}t{threads}"
                env = dict(
                    base,
                    XDG_CACHE_HOME=str(caches),
                    MPDA_COMPILE_THREADS=str(threads),
                )
                name = f"cold, {threads} thread{'s' if threads > 1 else ''}"
                cases.setdefault(name, []).append(run_case(args, env))
                print(f"  {name}: {cases[name][-1]['wall']:.2f} s", flush=True)
            warm = dict(base, XDG_CACHE_HOME=str(caches))
            jax_only = dict(base, XDG_CACHE_HOME=str(Path(tmp) / f"r{r}jax"))
            jax_only["MPDA_PROGRAM_CACHE_DIR"] = ""
            run_case(args, jax_only)  # fills JAX's cache, the fallback without the store
            for name, env in (("JAX cache only", jax_only), ("program cache", warm)):
                cases.setdefault(name, []).append(run_case(args, env))
                print(f"  {name}: {cases[name][-1]['wall']:.2f} s", flush=True)
    rows = []
    for name, runs in cases.items():
        row = {"case": name}
        for key in ("wall", "since_start", "compile"):
            row[key] = statistics.median(x[key] for x in runs)
        for key in ("traced", "compiled", "jax_cache_loads", "store_loads", "stored"):
            row[key] = runs[-1][key]
        row["runs_wall"] = " / ".join(f"{x['wall']:.2f}" for x in runs)
        row["status"] = runs[-1]["status"]
        row["iterations"] = runs[-1]["iterations"]
        rows.append(row)
    info = C.machine_info()
    print(f"\n{C.machine_line(info)}\ncommand: {C.command_line()}")
    print(f"{args.size}², {args.fraction:.0%} observations, one rank; medians of {args.repeats}\n")
    print(
        C.markdown_table(
            rows,
            [
                "case",
                ("wall", "first solve [s]"),
                ("since_start", "process start → solved [s]"),
                ("compile", "compile or wait [s]"),
                ("traced", "traced"),
                ("compiled", "XLA compiles"),
                ("jax_cache_loads", "JAX cache loads"),
                ("store_loads", "program-cache loads"),
                ("runs_wall", "each run [s]"),
            ],
            {"wall": ".2f", "since_start": ".2f", "compile": ".2f"},
        )
    )
    if args.csv:
        C.write_csv(args.csv, rows, dict(info, command=C.command_line()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
