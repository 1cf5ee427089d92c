"""MP solver settings against 3D-Var on one demo problem, in one process (issue 4).

Each variant is a comma-separated list of ``key=value`` over :class:`solver.Settings`
fields (plus ``min_size``, the coarsest multigrid level); ``3dvar`` runs 3D-Var.  Every
variant runs twice and the second (warm) run is printed: iterations per level and the
solve / set-up seconds of ``benchmarks/table.py``'s ``run_method``.

    python benchmarks/variants.py --size 512 --fraction 0.1 3dvar defaults damping=0.9 \\
        momentum=0.7 min_size=128 check_every=10
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def setting(base, key: str, text: str):
    """``text`` as the type of ``base``'s setting ``key``; bools explicitly (``bool('false')``
    is True): true/1/yes or false/0/no, any case."""
    if not hasattr(base, key):
        raise SystemExit(f"no solver setting {key!r}")
    kind = type(getattr(base, key))
    if kind is bool:
        if text.lower() not in TRUE + FALSE:
            raise SystemExit(f"{key}={text!r}: not a bool (true/false, 1/0, yes/no)")
        return text.lower() in TRUE
    try:
        return kind(text)
    except ValueError:
        raise SystemExit(f"{key}={text!r}: not a {kind.__name__}") from None


def variant(v: str, base, min_size: int) -> tuple[int, object]:
    """The coarsest level's side and the settings of variant ``v`` (key=value,...)."""
    if v == "defaults":
        return min_size, base
    try:
        kv = dict(x.split("=", 1) for x in v.split(","))
    except ValueError:
        raise SystemExit(f"variant {v!r}: not key=value[,key=value]") from None
    ms = kv.pop("min_size", None)
    try:
        ms = min_size if ms is None else int(ms)
    except ValueError:
        raise SystemExit(f"variant {v!r}: min_size={ms!r}: not an int") from None
    return ms, dataclasses.replace(base, **{k: setting(base, k, x) for k, x in kv.items()})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("variants", nargs="+", help="'3dvar', 'defaults' or key=value[,key=value]")
    ap.add_argument("--size", type=int, default=512, help="grid side incl. boundary (512)")
    ap.add_argument("--fraction", type=float, default=0.1, help="observed share (0.1)")
    ap.add_argument("--truth", type=int, default=0, help="observation seed (0)")
    args = ap.parse_args(argv)

    from mpda_dist import runtime

    comm = runtime.start()
    import table as T

    from mpda_dist import driver
    from mpda_dist.config import config_from_dict, config_to_dict, load_config
    from mpda_dist.multigrid import schedule

    n = args.size
    cfg = config_from_dict(
        config_to_dict(load_config(None)),
        source="bundled demo config",
        overrides=[
            f"grid.nx={n}",
            f"grid.ny={n}",
            f"observations.synthetic.fraction={args.fraction}",
            f"observations.synthetic.seed={args.truth}",
            "logging.heartbeat_seconds=0",
        ],
    )
    nodes = driver.build_problem(cfg).nodes
    lx, ly = cfg.grid.extent
    base = driver.settings_from(cfg)
    mg = cfg.solver.multigrid

    def levels(min_size: int):
        return schedule(n, n, ly / (n - 1), lx / (n - 1), min_size, mg.enabled)

    # every variant parsed before the first runs: a typo stops nothing half-way
    runs = {v: variant(v, base, mg.min_size) for v in args.variants if v != "3dvar"}
    print(f"{n}² {args.fraction:.0%} truth {args.truth}", flush=True)
    for rep in range(2):
        for v in args.variants:
            if v == "3dvar":
                r = T.run_method(comm, "3dvar", cfg, nodes, levels(mg.min_size)[-1:], base)
            else:
                ms, s = runs[v]
                r = T.run_method(comm, "mp_residual", cfg, nodes, levels(ms), s)
            if rep == 1:
                print(
                    f"{v:32s} solve {r['solve_s']:.3f} s  setup {r['setup_s']:.3f} s  "
                    f"iterations {r['level_iterations']}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
