"""Strong and weak scaling of the distributed message-passing loop, plus an analytic model.

Each point (P ranks, strong or weak) runs as its own MPI job,
``mpiexec -n P python benchmarks/scaling.py --worker ...``, under a timeout.  A worker
builds one synthetic problem (bundled demo config, 5 % observations), its per-rank block
stencil, and runs the solver's per-rank loop (``solver.solve_level``) for a fixed
number of iterations (no multigrid, ``tol`` so small that it never stops, residual
check every ``--check-every``) once in ``sync`` and once in ``async`` exchange mode,
after an untimed warm-up.  It times the coupled message-passing update and its halo
exchange alone: ``solver.freeze_precisions=false`` and ``solver.anderson=0`` (the
configuration's defaults, true and 2, would add a-only precision iterations and
Anderson's exchange rounds that are timed but not counted as iterations).
``solve_level`` is called directly, not ``solver.solve``, because ``solve`` broadcasts
rank 0's timings while here every rank's are needed.

Reported per point and mode (each the maximum over ranks):
  t/iter      LevelResult.solve_seconds / iterations (compile excluded)
  compute     LevelResult.compute_seconds / it (kernel, to the device→host copy)
  exchange    LevelResult.exchange_seconds / it (waiting in the halo exchange)
  reduce      LevelResult.reduce_seconds / it (residual allreduce)
  other       t/iter − compute − exchange − reduce on the same rank (posting, host
              copies, unpack, residual evaluation)
  bytes/iter  LevelResult.bytes_sent / iterations vs the analytic count from
              ``halo.message_layout`` (one round per iteration plus the initial one)
Efficiency: strong E = t(1) / (P·t(P)), weak E = t(1) / t(P), per mode.

With one rank the solver runs ``check_every`` iterations per jitted call (no
exchange); with P > 1 it runs ``exchange.every`` (1) per call and exchanges after each.

The analytic model (printed, in the CSV and the markdown) extrapolates to 10⁴ ranks;
its assumptions are printed with it.

    python benchmarks/scaling.py --max-ranks 2 --global-size 512 --block 512
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

HERE = Path(__file__).resolve()


# ---------------------------------------------------------------- geometry


def square_factors(p: int) -> tuple[int, int]:
    """``(Py, Px)`` with ``Py·Px = p``, as square as possible, ``Px ≥ Py``."""
    py = int(math.isqrt(p))
    while p % py:
        py -= 1
    return py, p // py


def per_round_values(by: int, bx: int, neighbours) -> tuple[int, list[int]]:
    """Values this rank sends per exchange round, and per present neighbour."""
    from mpda_dist.halo import message_layout

    off = message_layout(by, bx).out_offsets
    sizes = [off[i + 1] - off[i] for i, nb in enumerate(neighbours) if nb is not None]
    return sum(sizes), sizes


# ---------------------------------------------------------------- worker (one MPI job)


def worker(args) -> int:
    from mpda_dist import runtime

    comm = runtime.start()
    import warnings

    import jax.numpy as jnp
    import numpy as np

    from mpda_dist import driver, kernel
    from mpda_dist.config import load_config
    from mpda_dist.decomposition import Decomposition, auto_grid
    from mpda_dist.multigrid import schedule
    from mpda_dist.solver import LevelResult, solve_level
    from mpda_dist.stencil import build

    warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
    size, rank = comm.Get_size(), comm.Get_rank()
    if args.kind == "strong":
        ny = nx = args.global_size
        grid = auto_grid(size, (ny - 2, nx - 2))
    else:
        grid = square_factors(size)
        ny, nx = grid[0] * args.block + 2, grid[1] * args.block + 2
    cfg = load_config(
        None,
        [
            f"grid.nx={nx}",
            f"grid.ny={ny}",
            f"observations.synthetic.fraction={args.fraction}",
            "solver.multigrid.enabled=false",
            # only the coupled update: the a-only precision iterations and Anderson's
            # exchange rounds would be timed but not counted in `iterations`
            "solver.freeze_precisions=false",
            "solver.anderson=0",
            f"solver.max_iterations={args.iterations}",
            "solver.tol=1.0e-30",
            "solver.stall_checks=0",  # never stops early, even on a rounding floor
            f"solver.check_every={args.check_every}",
            f"solver.dtype={args.dtype}",
            "logging.heartbeat_seconds=0",
        ],
    )
    problem = driver.on_root(comm, lambda: driver.build_problem(cfg))
    nodes = comm.bcast(problem.nodes if rank == 0 else None, root=0)
    level = schedule(ny, nx, 1.0 / (ny - 1), 1.0 / (nx - 1), 32, False)[-1]
    decomp = Decomposition(comm, level.interior, grid)
    st = build(level, cfg.prior.lengthscale, cfg.prior.amplitude, nodes, *decomp.extent)
    dtype = np.dtype(args.dtype)
    op = kernel.Operator(*(jnp.asarray(v, dtype) for v in (st.diag, st.weights, st.rhs)))
    a0 = np.zeros((12,) + decomp.shape, dtype)
    b0 = np.full((12,) + decomp.shape, 1e-8, dtype)
    base = driver.settings_from(cfg)
    by, bx = decomp.shape
    vals, _ = per_round_values(by, bx, decomp.neighbours)

    def run(mode: str, iterations: int) -> dict:
        s = dataclasses.replace(base, mode=mode, max_iterations=iterations)
        res = LevelResult((ny, nx), size, (grid[1], grid[0]))
        comm.Barrier()
        t0 = time.perf_counter()
        solve_level(decomp, op, jnp.asarray(a0), jnp.asarray(b0), s, res)
        wall = time.perf_counter() - t0
        it = max(res.iterations, 1)
        mine = {
            "wall_s": wall,
            "solve_s": res.solve_seconds,
            "compile_s": res.compile_seconds,
            "t_iter": res.solve_seconds / it,
            "compute": res.compute_seconds / it,
            "exchange": res.exchange_seconds / it,
            "reduce": res.reduce_seconds / it,
            "other": (
                res.solve_seconds - res.compute_seconds - res.exchange_seconds - res.reduce_seconds
            )
            / it,
            "bytes_sent": res.bytes_sent,
            "iterations": res.iterations,
            "status": res.status,
            "residual": res.residual,
            "analytic_bytes_per_round": vals * dtype.itemsize,
            "neighbours": sum(nb is not None for nb in decomp.neighbours),
        }
        allr = comm.gather(mine, root=0)
        if rank != 0:
            return {}
        out = {
            k: max(r[k] for r in allr)
            for k in (
                "wall_s",
                "solve_s",
                "compile_s",
                "t_iter",
                "compute",
                "exchange",
                "reduce",
                "other",
                "bytes_sent",
                "analytic_bytes_per_round",
                "neighbours",
            )
        }
        out["iterations"] = allr[0]["iterations"]
        out["status"] = allr[0]["status"]
        out["residual"] = allr[0]["residual"]
        rounds = out["iterations"] // s.every + 1 if size > 1 else 0
        # exact check on every rank: bytes sent == its per-round size × rounds
        out["bytes_match"] = all(
            r["bytes_sent"] == r["analytic_bytes_per_round"] * rounds for r in allr
        )
        out["per_rank_t_iter"] = [r["t_iter"] for r in allr]
        slow = max(allr, key=lambda r: r["t_iter"])
        out["slowest_rank"] = {
            k: slow[k] for k in ("t_iter", "compute", "exchange", "reduce", "other")
        }
        return out

    warm = run("sync", args.warmup) if args.warmup > 0 else {}
    results = {m: run(m, args.iterations) for m in args.modes}
    if rank == 0:
        meta = C.machine_info(extra={"hosts": sorted(set(comm.allgather(os.uname().nodename)))})
        payload = {
            "ranks": size,
            "kind": args.kind,
            "grid_points": [nx, ny],
            "interior": list(level.interior),
            "process_grid": [grid[1], grid[0]],
            "block": [by, bx],
            "results": results,
            "meta": meta,
            "warmup_compile_s": warm.get("compile_s"),
        }
        Path(args.json_out).write_text(json.dumps(payload, default=str))
    else:
        comm.allgather(os.uname().nodename)
    return 0


# ---------------------------------------------------------------- analytic model


def model_rows(
    t_compute: float,
    block: int,
    itemsize: int,
    alpha: float,
    beta: float,
    check_every: int,
    staging: float | None,
    ranks: list[int],
) -> list[dict]:
    """Per-iteration time of MP and CG at ``ranks`` for ``block × block`` per rank."""
    from mpda_dist.decomposition import Blocks
    from mpda_dist.halo import DIRECTIONS, field_layout, message_layout

    moff = message_layout(block, block).out_offsets
    foff = field_layout(block, block, 2).out_offsets
    msizes = [moff[i + 1] - moff[i] for i in range(len(DIRECTIONS))]
    fsizes = [foff[i + 1] - foff[i] for i in range(len(DIRECTIONS))]
    cg_compute = t_compute * CG_VALUES / MP_VALUES
    rows = []
    for p in ranks:
        py, px = square_factors(p)
        bl = Blocks((py * block, px * block), (py, px))
        # the worst rank: the one with the most neighbours (an interior rank has all 8)
        present = [False] * len(DIRECTIONS)
        for r in range(p if p > 1 else 0):
            pr = [bl.neighbour(r, d) is not None for d in DIRECTIONS]
            if sum(pr) > sum(present):
                present = pr
            if sum(present) == len(DIRECTIONS):
                break
        nmsg = sum(present)
        mbytes = sum(s for s, on in zip(msizes, present, strict=True) if on) * itemsize
        fbytes = sum(s for s, on in zip(fsizes, present, strict=True) if on) * itemsize
        t_mhalo = nmsg * alpha + mbytes / beta
        t_fhalo = nmsg * alpha + fbytes / beta
        t_allred = 2 * alpha * math.log2(p) if p > 1 else 0.0
        mp_check = (t_fhalo + t_allred) / check_every
        mp = t_compute + t_mhalo + mp_check
        mp_overlap = max(t_compute, t_mhalo) + mp_check
        cg = cg_compute + t_fhalo + 2 * t_allred
        row = {
            "P": p,
            "process_grid": f"{px}x{py}",
            "neighbours": nmsg,
            "mp_halo_bytes": mbytes,
            "cg_halo_bytes": fbytes,
            "t_mp_us": mp * 1e6,
            "mp_comm_share": (mp - t_compute) / mp,
            "t_mp_overlap_us": mp_overlap * 1e6,
            "t_cg_us": cg * 1e6,
            "cg_comm_share": (cg - cg_compute) / cg,
            "cg_allreduce_us": 2 * t_allred * 1e6,
            "mp_weak_eff": t_compute / mp,
            "cg_weak_eff": cg_compute / cg,
        }
        if staging is not None:
            t = t_compute + (staging if p > 1 else 0.0) + t_mhalo + mp_check
            row["t_mp_staged_us"] = t * 1e6
            row["mp_staged_weak_eff"] = t_compute / t
        rows.append(row)
    return rows


MP_VALUES = 62  # values moved per node and MP iteration (DESIGN §2)
# CG per node and iteration, bandwidth-bound: matvec reads diag + 12 weights + x and
# writes q (15), p·q reads 2, x += αp (3), r −= αq (3), r·r fused with it (0), p = r + βp (3),
# plus ~1 for the stencil's reuse misses: ≈ 27 values.
CG_VALUES = 27


# ---------------------------------------------------------------- driver (parent)


def launcher_words(given: str | None) -> list[str]:
    """The launcher's command words: ``--mpiexec`` split like a shell would ("srun
    --mpi=pmi2"), else the mpiexec next to this python, else mpiexec on PATH."""
    if given:
        words = shlex.split(given)
        if not words:
            raise SystemExit(f"scaling.py: --mpiexec {given!r} names no command")
        return words
    own = Path(sys.executable).parent / "mpiexec"
    return [str(own) if own.exists() else "mpiexec"]


def launch(args, kind: str, p: int, cores: int, tmp: Path) -> dict:
    out = tmp / f"{kind}-{p}.json"
    cmd = [*launcher_words(args.mpiexec), "-n", str(p)]
    if p <= cores and not args.no_bind:
        # srun does not know hydra's -bind-to
        cmd += ["--cpu-bind=cores"] if Path(cmd[0]).name == "srun" else ["-bind-to", "core"]
    cmd += [
        sys.executable,
        str(HERE),
        "--worker",
        "--kind",
        kind,
        "--global-size",
        str(args.global_size),
        "--block",
        str(args.block),
        "--iterations",
        str(args.iterations),
        "--check-every",
        str(args.check_every),
        "--warmup",
        str(args.warmup),
        "--fraction",
        str(args.fraction),
        "--dtype",
        args.dtype,
        "--modes",
        *args.modes,
        "--json-out",
        str(out),
    ]
    t0 = time.perf_counter()
    print(f"  {kind} P={p}: {' '.join(cmd[:5])} ...", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"ranks": p, "kind": kind, "error": f"timed out after {args.timeout} s"}
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stdout + proc.stderr)[-2000:]
        return {"ranks": p, "kind": kind, "error": f"exit {proc.returncode}: {tail}"}
    d = json.loads(out.read_text())
    d["launch_wall_s"] = time.perf_counter() - t0
    d["oversubscribed"] = p > cores
    d["command"] = " ".join(cmd)
    return d


def rows_from(points: list[dict]) -> list[dict]:
    rows = []
    base: dict[tuple[str, str], float] = {}
    for d in points:
        if "error" in d:
            rows.append(
                {"kind": d["kind"], "P": d["ranks"], "mode": "-", "status": d["error"][:80]}
            )
            continue
        for mode, r in d["results"].items():
            key = (d["kind"], mode)
            if d["ranks"] == 1:
                base[key] = r["t_iter"]
            it = max(r["iterations"], 1)
            row = {
                "kind": d["kind"],
                "P": d["ranks"],
                "mode": mode,
                "grid": "x".join(map(str, d["grid_points"])),
                "process_grid": "x".join(map(str, d["process_grid"])),
                "block": "x".join(map(str, d["block"])),
                "oversubscribed": d["oversubscribed"],
                "iterations": r["iterations"],
                "status": r["status"],
                "t_iter_ms": r["t_iter"] * 1e3,
                "compute_ms": r["compute"] * 1e3,
                "exchange_ms": r["exchange"] * 1e3,
                "reduce_ms": r["reduce"] * 1e3,
                "other_ms": r["other"] * 1e3,
                "compile_s": r["compile_s"],
                "warmup_compile_s": d.get("warmup_compile_s"),
                "bytes_per_iter": r["bytes_sent"] / it,
                "analytic_bytes_per_round": r["analytic_bytes_per_round"],
                "bytes_match": r["bytes_match"],
                "neighbours": r["neighbours"],
                "slowest": r["slowest_rank"],
                "cpu_busy_before": d.get("cpu_busy_before"),
            }
            if key in base:
                t1 = base[key]
                p = d["ranks"]
                row["efficiency"] = (
                    t1 / (p * r["t_iter"]) if d["kind"] == "strong" else t1 / r["t_iter"]
                )
            rows.append(row)
    return rows


def plot(rows: list[dict], model: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any("t_iter_ms" in r for r in rows):  # model only
        fig, ax = plt.subplots(1, 1, figsize=(6.5, 4.6))
        axes = [None, None, ax]
    else:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, kind in zip(axes[:2], ("strong", "weak"), strict=True):
        if ax is None:
            continue
        sel = [r for r in rows if r.get("kind") == kind and "t_iter_ms" in r]
        labels, x = [], 0
        for r in sel:
            bottom = 0.0
            slow = r["slowest"]
            for comp, col in (
                ("compute", "C0"),
                ("exchange", "C1"),
                ("reduce", "C2"),
                ("other", "C7"),
            ):
                v = max(slow[comp] * 1e3, 0.0)
                ax.bar(x, v, bottom=bottom, color=col, label=comp if x == 0 else None)
                bottom += v
            labels.append(f"P={r['P']}\n{r['mode']}")
            x += 1
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylabel("ms per iteration (slowest rank's split)")
        ax.set_title(
            f"{kind} scaling"
            + (
                f" ({sel[0]['grid']} grid)"
                if kind == "strong" and sel
                else f" ({sel[0]['block']} per rank)"
                if sel
                else ""
            )
        )
        ax.legend(fontsize=8)
    ax = axes[2]
    ps = [m["P"] for m in model]
    ax.loglog(ps, [m["t_mp_us"] for m in model], "o-", label="MP (model)")
    ax.loglog(ps, [m["t_mp_overlap_us"] for m in model], "s--", label="MP, halo overlapped")
    if "t_mp_staged_us" in model[0]:
        ax.loglog(ps, [m["t_mp_staged_us"] for m in model], "^-", label="MP + measured staging")
    ax.loglog(ps, [m["t_cg_us"] for m in model], "d-", label="CG, 2 allreduce/iter")
    ax.set_xlabel("ranks P (weak scaling)")
    ax.set_ylabel("µs per iteration")
    ax.set_title("analytic model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_csv_atomic(
    path: str | os.PathLike[str],
    rows: list[dict],
    meta: dict,
    notes: list[str],
    json_rows: list[dict],
) -> Path:
    """``_common.write_csv`` into temporary files beside ``path``, then renamed over the
    CSV and its ``.json`` sidecar: a reader, or a job killed at its time limit, never
    sees a file half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    side_tmp = tmp.with_suffix(tmp.suffix + ".json")
    try:
        C.write_csv(tmp, rows, meta, notes, json_rows=json_rows)
        os.replace(side_tmp, path.with_suffix(path.suffix + ".json"))
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, side_tmp):
            leftover.unlink(missing_ok=True)
    return path


def summarize(args, points: list[dict], meta: dict, cores: int):
    """The table rows, the model rows and the notes from the points measured so far
    (``meta`` gains the points' record and the worker's settings)."""
    ok = [d for d in points if "error" not in d]
    if ok:
        meta["worker"] = ok[0]["meta"]
    meta["points"] = [
        {
            k: d.get(k)
            for k in (
                "kind",
                "ranks",
                "command",
                "launch_wall_s",
                "oversubscribed",
                "cpu_busy_before",
                "error",
            )
        }
        for d in points
    ]
    rows = rows_from(points)

    # model: t_compute(block) from the one-rank weak run (else strong), sync mode
    one = [r for r in rows if r.get("P") == 1 and r.get("mode") == "sync" and "t_iter_ms" in r]
    one.sort(key=lambda r: r["kind"] != "weak")
    model = []
    notes = [
        "worker settings: solver.freeze_precisions=false, solver.anderson=0 (the coupled "
        "update and its halo exchange alone; the configuration defaults true and 2 add "
        "a-only iterations and exchange rounds not counted in iterations)",
        "compile [s] is the warm-up run's (the timed runs then hit JAX's in-process "
        "compilation cache, compile_s column of the CSV)",
        "times per iteration are max over ranks; compile excluded; bytes_match: every rank's "
        "LevelResult.bytes_sent == its analytic per-round halo size x (iterations + 1 initial "
        "round)",
        "with 1 rank the solver runs check_every iterations per jitted call and exchanges "
        "nothing; with P > 1 one iteration per call, one exchange round after each",
    ]
    if any(r.get("oversubscribed") for r in rows):
        notes.append(
            f"P > {cores} usable cores: ranks oversubscribed (no -bind-to core); "
            "those times measure contention, not scaling"
        )
    if one or args.model_t_compute_ms:
        if args.model_t_compute_ms:
            r1 = {"kind": "given by --model-t-compute-ms"}
            blk, t_comp = args.model_block, args.model_t_compute_ms / 1e3
        else:
            r1 = one[0]
            blk = int(r1["block"].split("x")[0])
            t_comp = r1["t_iter_ms"] / 1e3
        weak = {
            r["P"]: r
            for r in rows
            if r.get("kind") == "weak"
            and r.get("mode") == "sync"
            and "t_iter_ms" in r
            and not r["oversubscribed"]
        }
        staging = None
        if 1 in weak and max(weak) > 1:
            # extra per-iteration time at the largest measured P over one rank, same block:
            # host staging, exchange, one jitted call per iteration instead of check_every
            staging = max((weak[max(weak)]["t_iter_ms"] - weak[1]["t_iter_ms"]) / 1e3, 0.0)
        if args.model_staging_ms is not None:
            staging = args.model_staging_ms / 1e3
        model = model_rows(
            t_comp,
            blk,
            4 if args.dtype == "float32" else 8,
            args.alpha,
            args.beta,
            args.check_every,
            staging,
            args.model_ranks,
        )
        notes += [
            f"model: weak scaling with a {blk}x{blk} block per rank on a square-ish process "
            f"grid; t_compute = {t_comp * 1e3:.3f} ms "
            + (
                "(given)"
                if args.model_t_compute_ms
                else f"= measured 1-rank t/iter ({r1['kind']}, sync)"
            )
            + ", assumed independent of P",
            f"model: halo = one message per present neighbour (8 for an interior rank) of the "
            f"sizes halo.message_layout gives, t = n_msg*alpha + bytes/beta, alpha = "
            f"{args.alpha * 1e6:g} us, beta = {args.beta / 1e9:g} GB/s, sends serialised "
            "(no overlap); 'overlapped' takes max(compute, halo)",
            f"model: MP does one field-halo exchange (halo.field_layout, width 2) and one "
            f"allreduce per residual check, every {args.check_every} iterations; "
            "an allreduce costs 2*alpha*log2(P)",
            f"model: CG does one field-halo exchange and 2 allreduces per iteration; its "
            f"compute is bandwidth-bound at {CG_VALUES} values/node vs MP's {MP_VALUES} "
            f"(t_cg_compute = {CG_VALUES}/{MP_VALUES} x t_compute)",
            "model: per-iteration only; time to solution also needs the iteration counts, "
            "which differ (MP needs more iterations than preconditioned CG) and are not "
            "modelled",
        ]
        if staging is not None and args.model_staging_ms is not None:
            notes.append(
                f"model: 'MP + staging' adds, for P > 1, a given fixed {staging * 1e3:.3f} ms "
                "per iteration (--model-staging-ms)"
            )
        elif staging is not None:
            notes.append(
                f"model: 'MP + measured staging' adds, for P > 1, the measured weak-scaling "
                f"t/iter(P={max(weak)}) - t/iter(1) = {staging * 1e3:.3f} ms (sync; device->host "
                "copies, numpy packing, MPI through shared memory, one jitted call per "
                "iteration) as a fixed cost per iteration"
            )

    return rows, model, notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    cores = len(os.sched_getaffinity(0))
    ap.add_argument(
        "--max-ranks",
        type=int,
        default=cores,
        help=f"largest P; P = 1, 2, 4, ... (default: the usable cores, {cores})",
    )
    ap.add_argument(
        "--global-size",
        type=int,
        default=512,
        help="strong scaling: grid points per side incl. boundary (default 512)",
    )
    ap.add_argument(
        "--block",
        type=int,
        default=256,
        help="weak scaling: interior nodes per side per rank (default 256)",
    )
    ap.add_argument("--iterations", type=int, default=400, help="timed iterations (default 400)")
    ap.add_argument("--check-every", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=50, help="untimed warm-up iterations")
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--modes", nargs="+", default=["sync", "async"], choices=["sync", "async"])
    ap.add_argument("--kinds", nargs="+", default=["strong", "weak"], choices=["strong", "weak"])
    ap.add_argument("--timeout", type=float, default=900, help="seconds per MPI job")
    ap.add_argument(
        "--mpiexec",
        help="launcher, with its arguments if any ('srun --mpi=pmi2'; default: the mpiexec "
        "next to python)",
    )
    ap.add_argument(
        "--no-bind", action="store_true", help="never pass -bind-to core (--cpu-bind=cores)"
    )
    ap.add_argument("--alpha", type=float, default=2e-6, help="model latency [s] (2 µs)")
    ap.add_argument("--beta", type=float, default=10e9, help="model bandwidth [B/s] (10 GB/s)")
    ap.add_argument(
        "--model-ranks", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024, 4096, 10000]
    )
    ap.add_argument(
        "--model-only",
        action="store_true",
        help="measure nothing; model from --model-t-compute-ms and --model-block",
    )
    ap.add_argument(
        "--model-t-compute-ms",
        type=float,
        help="model: per-iteration kernel time for --model-block (e.g. a GPU's), "
        "instead of the measured one-rank time",
    )
    ap.add_argument("--model-block", type=int, help="model: block side for --model-t-compute-ms")
    ap.add_argument(
        "--model-staging-ms",
        type=float,
        help="model: fixed per-iteration staging cost for P > 1 (default: measured)",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="before each MPI job wait up to this long for the CPUs to be < 25%% busy; "
        "the busy share seen is recorded (default 30; 0: do not wait)",
    )
    ap.add_argument("--csv", default="benchmarks/out/scaling.csv")
    ap.add_argument("--png", default=None, help="the figure (default: next to --csv, suffix .png)")
    # worker-only
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind", choices=["strong", "weak"], help=argparse.SUPPRESS)
    ap.add_argument("--json-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.max_ranks < 1:
        ap.error(f"--max-ranks must be at least 1 (got {args.max_ranks})")
    if args.model_only and not args.model_t_compute_ms:
        ap.error("--model-only measures nothing: it needs a positive --model-t-compute-ms")
    if args.model_t_compute_ms and not args.model_block:
        ap.error("--model-t-compute-ms needs --model-block")

    ranks = []
    p = 1
    while p <= args.max_ranks:
        ranks.append(p)
        p *= 2
    if ranks[-1] != args.max_ranks:
        ranks.append(args.max_ranks)
    meta = C.machine_info(with_jax=False, extra={"command": C.command_line()})
    planned = 0 if args.model_only else len(args.kinds) * len(ranks)

    def report(points: list[dict]):
        """Summarise the points so far and rewrite the CSV (atomically): called after
        every point, so a run stopped by a time limit keeps the points it finished."""
        rows, model, notes = summarize(args, points, meta, cores)
        if len(points) < planned:
            notes = [*notes, f"partial: {len(points)} of {planned} points measured so far"]
        csv_rows = [{k: v for k, v in r.items() if k != "slowest"} for r in rows]
        path = write_csv_atomic(
            args.csv,
            csv_rows + [dict(kind="model", **m) for m in model],
            meta,
            notes,
            json_rows=rows + [dict(kind="model", **m) for m in model],
        )
        return rows, model, notes, path

    points = []
    if not args.model_only:
        with tempfile.TemporaryDirectory() as tmp:
            for kind in args.kinds:
                for p in ranks:
                    busy = C.wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
                    d = launch(args, kind, p, cores, Path(tmp))
                    d["cpu_busy_before"] = busy
                    points.append(d)
                    report(points)
    rows, model, notes, path = report(points)
    # next to the CSV by default: a small run with --csv elsewhere left the committed
    # figure overwritten
    png = Path(args.png) if args.png else Path(args.csv).with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    if model:
        plot(rows, model, png)

    print()
    print(
        f"machine: {meta['hostname']}: {meta['cpu_model']}, {cores} usable CPUs; "
        f"python {meta['python']}, mpi4py {meta['mpi4py']}, MPI {meta['mpi_library']}; "
        f"jax {meta.get('worker', {}).get('jax')}, devices "
        f"{meta.get('worker', {}).get('devices')}"
    )
    print(f"command: {meta['command']}")
    for n in notes:
        print(f"note: {n}")
    print(f"csv: {path}  png: {png if model else '(none)'}")
    for d in points:
        if "error" in d:
            print(f"FAILED {d['kind']} P={d['ranks']}: {d['error']}")
    if model:
        print()
        print("Analytic model (per iteration, weak scaling):")
        print()
        cols = [
            ("P", "P"),
            ("process_grid", "grid"),
            ("neighbours", "nbrs"),
            ("mp_halo_bytes", "MP halo B"),
            ("t_mp_us", "MP [µs]"),
            ("mp_comm_share", "MP comm"),
            ("t_mp_overlap_us", "MP overlap [µs]"),
        ]
        if "t_mp_staged_us" in model[0]:
            cols += [("t_mp_staged_us", "MP+staging [µs]"), ("mp_staged_weak_eff", "eff")]
        cols += [
            ("cg_halo_bytes", "CG halo B"),
            ("cg_allreduce_us", "CG 2×allreduce [µs]"),
            ("t_cg_us", "CG [µs]"),
            ("cg_comm_share", "CG comm"),
            ("mp_weak_eff", "MP eff"),
            ("cg_weak_eff", "CG eff"),
        ]
        print(
            C.markdown_table(
                model,
                cols,
                formats={
                    "mp_comm_share": ".1%",
                    "cg_comm_share": ".1%",
                    "mp_weak_eff": ".2f",
                    "cg_weak_eff": ".2f",
                    "mp_staged_weak_eff": ".2f",
                },
            )
        )
    print()
    print("Measured:")
    print()
    print(
        C.markdown_table(
            rows,
            [
                ("kind", "kind"),
                ("P", "P"),
                ("mode", "mode"),
                ("grid", "grid"),
                ("process_grid", "Px×Py"),
                ("block", "block"),
                ("t_iter_ms", "t/iter [ms]"),
                ("compute_ms", "compute"),
                ("exchange_ms", "exchange wait"),
                ("reduce_ms", "reduce"),
                ("other_ms", "other"),
                ("warmup_compile_s", "compile [s]"),
                ("bytes_per_iter", "bytes/iter"),
                ("analytic_bytes_per_round", "analytic B/round"),
                ("bytes_match", "bytes ok"),
                ("efficiency", "efficiency"),
                ("oversubscribed", "oversub."),
                ("cpu_busy_before", "CPU busy before"),
            ],
            formats={"efficiency": ".2f", "bytes_per_iter": ".0f", "cpu_busy_before": ".0%"},
        )
    )
    return 0 if all("error" not in d for d in points) else 1


if __name__ == "__main__":
    raise SystemExit(main())
