"""Stages of the one-call GPU benchmark (run by ``benchmarks/gpu.sh``, one process each).

    python benchmarks/gpu_bench.py kernel [--quick] --csv gpu_results.csv
    python benchmarks/gpu_bench.py exact  [--quick] --fractions F --dir /tmp/mpda_exact
    python benchmarks/gpu_bench.py solve  [--quick] --csv ... --exact-dir /tmp/mpda_exact
    python benchmarks/gpu_bench.py big    [--quick] --csv ...
    mpiexec -n 2 python benchmarks/gpu_bench.py mpi [--quick] --csv ...
    python benchmarks/gpu_bench.py report --csv ...

Stages:
  kernel  per-iteration time of the frozen update ``iterate_b`` (one block, constant
          edge halo, float32) with the solver's momentum 0.5 (49·4·N bytes: ``b_prev``
          is read too), ``pads`` against ``fused`` (the hand-written pass), at 1024²,
          2048², 4096²; at 10 and 1 updates per call; ``fused`` tile and warp variants;
          no momentum (37·4·N); the node-sum fence forced on; copies of message arrays
          in the compiled ``pads`` update.  ``--cases all`` first times ``iterate`` (62·4·N)
          and ``iterate_b`` in both border forms (``strips`` too)
          → achieved GB/s, ratio to the 3.0 TB/s floor (DESIGN §2) and to a jitted
          device triad measured here.
  exact   the exact sparse solve (scipy, float64) of a 1024² problem on the host CPU;
          gpu.sh starts one per fraction in the background so they overlap the GPU
          stages.  Writes one .npz per fraction.
  solve   time to solution at 1024² for 1 %, 5 %, 10 % observations, float32, residual
          1e-5, demo solver settings: first run (the first fraction's includes every
          compile; later fractions find the kernels in JAX's in-process cache) and a
          second, warm run in the same process; RMSE vs truth and vs the exact solve
          when the exact stage produced it.
  big     4096², 5 %: a compile warm-up (50 iterations per level), then the warm run.
  mpi     two ranks sharing the GPU (run under ``mpiexec -n 2``), 1024², 5 %: first and
          warm run; time = max over ranks.
  fit     8192², 5 %: one solve capped at 20 iterations per level; the peak device
          memory says whether the largest grid fits on one device.
  report  the tables of every stage from the CSV.

Every stage appends rows ``stage, case, metric, value, unit`` to the CSV (metadata as
``#`` lines at its top, written by the first stage) and its metadata to
``<csv>.json``; peak device memory (``memory_stats()['peak_bytes_in_use']``) is recorded
per stage.  ``--quick`` uses small sizes so the whole script runs on a CPU in minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

T_START = time.perf_counter()  # the script's start: before JAX and the package import

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

FLOOR_BPS = 3.0e12  # DESIGN §2: H100 HBM ≈ 3 TB/s
FIELDS = ["stage", "case", "metric", "value", "unit"]

SIZES = {  # full, quick
    "kernel": ([1024, 2048, 4096], [64, 128, 256]),
    "solve": (1024, 128),
    "big": (4096, 160),
    "fit": (8192, 192),
    "mpi": (1024, 128),
    "profile": (1024, 128),
}


def pick(name: str, quick: bool):
    full, small = SIZES[name]
    return small if quick else full


# ---------------------------------------------------------------- output


def append_rows(path: Path, rows: list[tuple], meta: dict | None = None) -> None:
    new = not path.exists() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="", encoding="utf-8") as fh:
        if new:
            for k, v in C._flatten(meta or {}):
                fh.write(f"# {k}: {v}\n")
            fh.write("# note: long format; see benchmarks/gpu_bench.py for each metric\n")
            csv.writer(fh).writerow(FIELDS)
        w = csv.writer(fh)
        for r in rows:
            w.writerow(r)


def add_meta(path: Path, stage: str, meta: dict) -> None:
    side = path.with_suffix(path.suffix + ".json")
    data = json.loads(side.read_text()) if side.exists() else {}
    data[stage] = meta
    side.write_text(json.dumps(data, indent=1, default=str))


def peak_memory() -> int | None:
    import jax

    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    return None if not stats else stats.get("peak_bytes_in_use")


def stage_meta(args, extra: dict | None = None) -> dict:
    m = C.machine_info(extra={"command": C.command_line(), "quick": args.quick, **(extra or {})})
    try:
        import jax

        d = jax.devices()[0]
        m["device_kind"] = d.device_kind
    except Exception:  # noqa: BLE001
        pass
    return m


class Sink:
    """Rows of one stage, appended to the CSV as they come (a stage that times out
    keeps what it finished)."""

    def __init__(self, args, stage: str, meta: dict) -> None:
        self.path, self.stage, self.meta = Path(args.csv), stage, meta
        self.rows: list[tuple] = []
        add_meta(self.path, stage, meta)

    def add(self, rows: list[tuple]) -> None:
        append_rows(self.path, rows, self.meta)
        self.rows += rows


def finish(sink: Sink, table: bool = True) -> None:
    """Peak device memory and the stage's metadata; its rows as a table (``table``)."""
    stage, rows, meta = sink.stage, sink.rows, sink.meta
    pk = peak_memory()
    sink.add([(stage, "all", "peak_device_bytes", pk if pk is not None else "", "B")])
    meta["peak_bytes_in_use"] = pk
    add_meta(sink.path, stage, meta)
    if table:
        print(render(stage, rows))
    print(
        f"peak device memory: {pk / 2**30:.2f} GiB"
        if pk
        else "peak device memory: n/a (memory_stats() not available on this device)"
    )
    sys.stdout.flush()


def render(stage: str, rows: list[tuple]) -> str:
    """Wide markdown table of one stage's long rows (case × metric)."""
    cases: dict[str, dict] = {}
    heads: list[str] = []
    for st, case, metric, value, unit in rows:
        if st != stage or case == "all":
            continue
        h = f"{metric} [{unit}]" if unit else metric
        if h not in heads:
            heads.append(h)
        try:
            value = float(value)
        except (TypeError, ValueError):
            pass
        cases.setdefault(case, {"case": case})[h] = value
    if not cases:
        return f"({stage}: no rows)"
    return f"\n### {stage}\n\n" + C.markdown_table(list(cases.values()), ["case"] + heads)


# ---------------------------------------------------------------- stages


def _start(need_mpi: bool = True):
    """MPI + JAX environment; without a working mpi4py only the kernel stage can run
    (the solver imports mpi4py)."""
    try:
        from mpda_dist import runtime

        return runtime.start()
    except Exception as exc:  # noqa: BLE001
        if need_mpi:
            raise SystemExit(
                f"this stage needs mpda_dist's dependencies and mpi4py with an MPI library "
                f"({sys.executable}): {type(exc).__name__}: {exc}"
            ) from None
        print(f"note: no MPI ({exc}); running without it", flush=True)
        return None


def _fallback_block(n: int, dtype: str):
    """An operator without scipy (constant 13-point weights, 5 % observed nodes)."""
    import jax.numpy as jnp
    import numpy as np

    from mpda_dist._offsets import OFFSETS
    from mpda_dist.halo import DIRECTIONS, message_layout
    from mpda_dist.kernel import Operator

    rng = np.random.default_rng(0)
    w = np.zeros((12, n, n))
    for k, (dy, dx) in enumerate(OFFSETS):
        val = -0.5 if abs(dy) + abs(dx) == 1 else 0.05
        w[k, max(0, -dy) : n - max(0, dy), max(0, -dx) : n - max(0, dx)] = val
    diag = np.full((n, n), 4.0)
    obs = rng.random((n, n)) < 0.05
    diag[obs] += 1e6
    rhs = np.where(obs, 1e6 * rng.standard_normal((n, n)), 0.0)
    op = Operator(*(jnp.asarray(v, dtype) for v in (diag, w, rhs)))
    lay = message_layout(n, n)
    halo = jnp.asarray(
        np.concatenate([lay.fill_segment(i) for i in range(len(DIRECTIONS))]).astype(dtype)
    )
    return (
        op,
        jnp.zeros((12, n, n), dtype),
        jnp.full((12, n, n), 1e-8, dtype),
        jnp.zeros((0,), dtype),
        halo,
    )


def stage_kernel(args) -> None:
    _start(need_mpi=False)
    import kernel as kb  # benchmarks/kernel.py

    from mpda_dist import kernel as kernel_mod
    from mpda_dist.kernel import FORMS

    warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
    try:
        import scipy  # noqa: F401
    except ImportError:
        print("note: scipy missing: kernel stage uses a constant-coefficient operator")
        kb.make_block = lambda n, dtype, **kw: _fallback_block(n, dtype)
    meta = stage_meta(args)
    iters, reps = (10, 3) if args.quick else (50, 5)
    cp, fz = kb.VALUES_PER_NODE, kb.VALUES_FROZEN
    meta["note"] = (
        "bytes/iter = values per node x 4 B x nodes, per case: coupled "
        f"{cp} (24 messages in, 24 out, 12 weights, diag, rhs), frozen-a {fz} (12 b in, "
        "12 out, 12 gains, rhs), each +12 with momentum (b_prev; 'm0.5' in the case): "
        f"the default frozen-a m0.5 rows {fz + 12}; {iters} iterations per call, "
        f"median of {reps} calls"
    )
    sink = Sink(args, "kernel", meta)
    mib = 32 if args.quick else 1024
    tri = C.jax_triad(mib * 2**20)
    meta["device_triad"] = tri
    sink.add([("kernel", "device triad", "bandwidth", tri["triad_gbs"], "GB/s")])
    # the border forms (mpda_dist.kernel.FORMS) and the fused frozen pass: on an H100
    # "pads" is ~5x faster than "strips" (RESULTS §15), on a CPU "strips" ~2x faster
    sizes = args.sizes or pick("kernel", args.quick)
    for n, frozen, form, mom, k, fence, knobs in _kernel_cases(args.cases, sizes, iters):
        case = _case_name(n, frozen, form, mom, k, iters, fence, knobs)
        try:
            with _kernel_variant(kernel_mod, fence, knobs):
                r = kb.bench_size(
                    n, "float32", k, reps, 10.0, 0.6, frozen=frozen, form=form, momentum=mom
                )
        except Exception as exc:  # noqa: BLE001 - a variant that fails to build is a result
            print(f"  kernel {case}: FAILED: {type(exc).__name__}: {exc}"[:2000], flush=True)
            continue
        t = r["t_iter_median_ms"] / 1e3
        floor_t = r["mb_per_iter"] * 1e6 / FLOOR_BPS
        sink.add(
            [
                ("kernel", case, "compile", r["compile_s"], "s"),
                ("kernel", case, "t_iter_median", r["t_iter_median_ms"] * 1e3, "us"),
                ("kernel", case, "t_iter_min", r["t_iter_min_ms"] * 1e3, "us"),
                ("kernel", case, "floor_t_iter_3TBps", floor_t * 1e6, "us"),
                ("kernel", case, "achieved", r["achieved_gbs"], "GB/s"),
                ("kernel", case, "ratio_to_3TBps_floor", r["achieved_gbs"] * 1e9 / FLOOR_BPS, ""),
                ("kernel", case, "ratio_to_device_triad", r["achieved_gbs"] / tri["triad_gbs"], ""),
            ]
        )
        print(
            f"  kernel {case}: {t * 1e6:.1f} us/iter, {r['achieved_gbs']:.1f} GB/s "
            f"(floor {floor_t * 1e6:.1f} us)",
            flush=True,
        )
    # full copies of a (12, by, bx) message stack (padded, for fused) in the compiled
    # update (none on a CPU in the strips form since stop 15; RESULTS §14)
    copies = [("pads", k) for k in (1, 2, iters)] + [(kernel_mod.FUSED, k) for k in (10, iters)]
    if args.cases == "all":
        copies += [(f, k) for f in FORMS if f != "pads" for k in (1, 2, iters)]
    for form, k in copies:
        case = _case_name(sizes[0], True, form, 0.5, k, 0, None, None)
        try:
            nc = _message_copies(kb, kernel_mod, sizes[0], form, True, k)
        except Exception as exc:  # noqa: BLE001
            print(f"  kernel {case}: copies FAILED: {type(exc).__name__}: {exc}"[:2000])
            continue
        sink.add([("kernel", case, "message_copies", nc, "")])
        print(f"  kernel {case}: {nc} copies of a message stack", flush=True)
    finish(sink)


def _kernel_cases(which: str, sizes: list[int], iters: int) -> list[tuple]:
    """(size, frozen, form, momentum, updates per call, node-sum fence forced on, fused
    settings) per row.  ``frozen`` (the default): the frozen update with the solver's
    momentum 0.5, ``pads`` against ``fused`` at every size, and at 10 updates per call
    (one rank's level solves).  ``sweep``: ``fused``'s settings against each other
    (:func:`_sweep_cases`).  ``all``: first both updates
    in both border forms, as measured in RESULTS §15 (``strips`` is 5x slower than
    ``pads`` on an H100), then the same rows with ``strips`` too, and one update per
    call, no momentum and the fence forced on (it is off on a GPU)."""
    from mpda_dist.kernel import FORMS, FUSED

    small = sizes[0]
    cases = []
    if which == "sweep":
        return _sweep_cases(sizes, iters)
    forms = ("pads", FUSED)
    if which == "all":
        cases += [
            (n, f, m, 0.0, iters, None, None) for n in sizes for f in (False, True) for m in FORMS
        ]
        forms = (*FORMS, FUSED)
    # most telling first: a stage that runs out of time keeps the rows it has
    cases += [(n, True, m, 0.5, iters, None, None) for n in sizes for m in forms]
    cases += [(small, True, m, 0.5, 10, None, None) for m in ("pads", FUSED)]
    if which == "all":
        cases += [(small, True, m, 0.5, 1, None, None) for m in ("pads", FUSED)]
        cases += [(small, True, m, 0.0, iters, None, None) for m in forms]
        cases += [(small, True, "pads", 0.5, iters, True, None)]
    return cases


OLD = {"aligned": False, "along_rows": False, "warps": 4, "store_last": False, "hints": False}
"""The fused pass's settings before stop 17 (RESULTS §15)."""


def _sweep_cases(sizes: list[int], iters: int) -> list[tuple]:
    """``fused`` settings against each other (momentum 0.5, ``iters`` per call): the
    defaults, the settings of §15, stores in slot order, eviction hints at every size;
    at the two smaller sizes also programs down columns of tiles, unaligned rows, rows
    from a 128-byte line (a lead of 32 values), 4 warps, and four more tiles (4 × 128
    and 8 × 64 with 4 warps, 8 × 256 and 4 × 128 with 8)."""
    from mpda_dist.kernel import FUSED

    every = [None, OLD, {"store_last": False}, {"hints": True}]
    some = [
        {"along_rows": False},
        {"aligned": False},
        {"align_lead": 32},
        {"warps": 4},
        {"tile": (4, 128), "warps": 4},
        {"tile": (8, 256), "warps": 8},
        {"tile": (4, 128), "warps": 8},
        {"tile": (8, 64), "warps": 4},
    ]
    cases = [(n, True, FUSED, 0.5, iters, None, v) for n in sizes for v in every]
    cases += [(n, True, FUSED, 0.5, iters, None, v) for n in sizes[:2] for v in some]
    return cases


def _case_name(n, frozen, form, mom, k, iters, fence, knobs) -> str:
    name = f"{n}x{n}" + (" frozen-a" if frozen else "") + f" {form}"
    name += f" m{mom}" if mom else ""
    name += f" {k}/call" if k != iters else ""
    name += " fenced" if fence else ""
    knobs = dict(knobs or {})
    tile, warps = knobs.pop("tile", None), knobs.pop("warps", None)
    if knobs == {k: v for k, v in OLD.items() if k != "warps"}:
        name += " as in §15"
    elif knobs:
        name += " " + "+".join(k if v is True else f"{k}={v}" for k, v in sorted(knobs.items()))
    name += f" tile {tile[0]}x{tile[1]}" if tile else ""
    name += f" warps {warps}" if warps else ""
    return name


class _kernel_variant:
    """Within: ``kernel.FENCE`` and ``mpda_dist.fused``'s settings as given (``fence``
    ``None``: unchanged; ``knobs``: lower-case names of ``fused``'s settings)."""

    def __init__(self, kernel_mod, fence, knobs):
        from mpda_dist import fused

        self.saved = []
        if fence is not None:
            self.saved.append((kernel_mod, "FENCE", fence))
        for name, value in (knobs or {}).items():
            self.saved.append((fused, name.upper(), value))

    def __enter__(self):
        import jax

        self.saved = [(m, a, getattr(m, a), v) for m, a, v in self.saved]
        for m, a, _, v in self.saved:
            setattr(m, a, v)
        if self.saved:
            jax.clear_caches()

    def __exit__(self, *exc):
        import jax

        for m, a, old, _ in self.saved:
            setattr(m, a, old)
        if self.saved:
            jax.clear_caches()


def _message_copies(kb, kernel_mod, n: int, form: str, frozen: bool, k: int) -> int:
    """``copy`` instructions of a whole ``(12, n, n)`` float32 array, or a padded one
    (``fused``; since stop 17 also counted for ``pads``), in the compiled update of
    ``k`` iterations with momentum 0.5 (the HLO text after optimisation)."""
    import jax.numpy as jnp

    op, a, b, _, halo = kb.make_block(n, "float32")
    bp = jnp.array(b)
    p = kernel_mod.Params(10.0, 0.6)
    g = kernel_mod.gains(a, op, halo, p, neighbours=False) if frozen else None
    fn, args = kernel_mod.update_call(a, b, bp, g, op, halo, p, k)
    # as one rank runs it (no neighbours: the halo is not read, nothing is sent)
    low = fn.lower(*args, n=k, momentum=0.5, delta=False, form=form, neighbours=False)
    text = low.compile().as_text()
    stack = re.compile(r"f32\[12,(\d+),(\d+)\]")

    def whole(line: str) -> bool:
        m = stack.search(line)
        return m is not None and min(int(m[1]), int(m[2])) >= n

    return sum(1 for ln in text.splitlines() if " copy(" in ln and whole(ln))


def _cfg(n: int, fraction: float):
    from mpda_dist.config import load_config

    return load_config(
        None,
        [
            f"grid.nx={n}",
            f"grid.ny={n}",
            f"observations.synthetic.fraction={fraction}",
            "solver.dtype=float32",
            "solver.tol=1.0e-5",
            "logging.heartbeat_seconds=0",
        ],
    )


def exact_case(n: int, fraction: float, out_dir: str) -> str:
    """Exact anomaly of the (deterministic) synthetic problem; writes an .npz."""
    import numpy as np

    from mpda_dist import driver
    from mpda_dist.multigrid import schedule
    from mpda_dist.stencil import build

    cfg = _cfg(n, fraction)
    p = driver.build_problem(cfg)
    lv = schedule(n, n, 1 / (n - 1), 1 / (n - 1), 32, False)[-1]
    t0 = time.perf_counter()
    st = build(
        lv,
        cfg.prior.lengthscale,
        cfg.prior.amplitude,
        p.nodes,
        (0, lv.interior[0]),
        (0, lv.interior[1]),
    )
    x = C.exact_anomaly(st)
    path = Path(out_dir) / f"exact_{n}_{fraction:g}.npz"
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, anomaly=x, seconds=time.perf_counter() - t0)
    os.replace(tmp, path)
    return str(path)


def stage_exact(args) -> None:
    """CPU only (no JAX): one process per fraction, so gpu.sh can run them side by side."""
    n = pick("solve", args.quick)
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    for f in args.fractions:
        print(f"  exact: wrote {exact_case(n, f, args.dir)}", flush=True)


def solve_case(
    comm,
    n: int,
    fraction: float,
    runs: int = 2,
    on_run=None,
    first_max_iterations=None,
    report_first: bool = False,
) -> dict:
    """Build the problem on rank 0, solve it ``runs`` times; per run: wall (max over
    ranks), compile and solve seconds (sums over levels), iterations, status.
    ``on_run(index, run, out)`` is called after each run (to record it at once).
    ``first_max_iterations``: cap the first run's iterations per level (a compile
    warm-up: same kernels, same shapes, little solving).  ``report_first``: print each
    rank's compile report after the first run (a stage cut short keeps it)."""
    import dataclasses

    import jax

    from mpda_dist import driver, lowering, runtime
    from mpda_dist.multigrid import schedule
    from mpda_dist.solver import prepare, solve

    cfg = _cfg(n, fraction)
    rank = comm.Get_rank()
    if os.environ.get("GPU_BENCH_NO_IMPORT_AHEAD") == "1":  # gpu.sh's coldimports stage
        lowering.import_ahead = lambda: None
    runtime.settle_gc()  # as `mpda run` does before it reads its inputs
    lowering.start()
    levels = schedule(n, n, 1 / (n - 1), 1 / (n - 1), cfg.solver.multigrid.min_size, True)
    s = driver.settings_from(cfg)
    s0 = s
    if first_max_iterations:
        s0 = dataclasses.replace(s, max_iterations=first_max_iterations)
    t0 = time.perf_counter()  # the build's time includes the preparing (its main thread)
    prepared = None  # as `mpda run` does: the programs compile while the problem is built
    if os.environ.get("GPU_BENCH_NO_PREPARE") != "1" and runs:  # (gpu.sh's coldprepare)
        with jax.enable_x64(False):
            prepared = prepare(comm, levels, s0)
    problem = driver.on_root(comm, lambda: driver.build_problem(cfg))
    nodes = comm.bcast(problem.nodes if rank == 0 else None, root=0)
    build_s = C.max_over_ranks(comm, time.perf_counter() - t0)
    out = {"build_s": build_s, "runs": [], "problem": problem}
    for i in range(runs):
        si = s0 if i == 0 else s
        comm.Barrier()
        t0 = time.perf_counter()
        sampler = C.MainThreadSampler() if i == 0 else contextlib.nullcontext()
        with sampler, jax.enable_x64(False):
            res = solve(
                comm, levels, nodes, cfg.prior.lengthscale, cfg.prior.amplitude, si,
                prepared=prepared if i == 0 else None,
            )  # fmt: skip
        wall = C.max_over_ranks(comm, time.perf_counter() - t0)
        since_start = C.max_over_ranks(comm, time.perf_counter() - T_START)
        if i == 0:
            out["sampled"] = sampler.report()
        run = {
            "wall": wall,
            "since_start": since_start,
            "compile": sum(lr.compile_seconds for lr in res.levels),
            "solve": sum(lr.solve_seconds for lr in res.levels),
            "iterations": "/".join(str(lr.iterations) for lr in res.levels),
            "finest_iterations": res.levels[-1].iterations,
            "corrections": sum(lr.corrections for lr in res.levels),
            "correction_s": sum(lr.correction_seconds for lr in res.levels),
            "status": res.status,
            "residual": res.levels[-1].residual,
            "anomaly": res.anomaly,
        }
        out["runs"].append(run)
        if on_run is not None and rank == 0:
            on_run(i, run, out)
        if report_first and i == 0:
            _print_compile_report(comm)
    return out


def _run_rows(
    stage: str, case: str, i: int, run: dict, out: dict, first: str = "first"
) -> list[tuple]:
    """Rows for run ``i`` (0: first run, with compiles; 1: warm)."""
    tag = first if i == 0 else "warm"
    rows = [
        (stage, case, f"{tag}_wall", run["wall"], "s"),
        (stage, case, f"{tag}_compile", run["compile"], "s"),
        (stage, case, f"{tag}_solve", run["solve"], "s"),
        (stage, case, f"{tag}_status", run["status"], ""),
    ]
    if i == 0:
        rows.append((stage, case, "problem_build", out["build_s"], "s"))
        # the script's start to this run's end: JAX's import and start-up, the
        # package's, the problem, the background imports (lowering.start) and the solve
        rows.append((stage, case, f"{tag}_since_start", run["since_start"], "s"))
        # the build and the first solve: the programs compile during the build too
        rows.append((stage, case, f"{tag}_with_build", out["build_s"] + run["wall"], "s"))
    if tag not in ("warmup50", "capped20"):
        rows.append((stage, case, f"{tag}_iterations_per_level", run["iterations"], ""))
        rows.append((stage, case, f"{tag}_corrections", run["corrections"], ""))
        rows.append((stage, case, f"{tag}_correction_s", run["correction_s"], "s"))
        rows.append((stage, case, f"{tag}_residual", run["residual"], ""))
    return rows


def stage_solve(args) -> None:
    marks = [("Python and the script's imports", time.perf_counter())]
    comm = _start()
    marks.append(("MPI and the environment (runtime.start)", time.perf_counter()))
    from mpda_dist import runtime

    with runtime.gc_paused():  # as `mpda run` imports ($MPDA_GC)
        import jax
        import numpy as np
    runtime.settle_gc()
    marks.append(("import jax", time.perf_counter()))
    jax.devices()
    marks.append(("the device (jax.devices)", time.perf_counter()))
    if os.environ.get("GPU_BENCH_FUSED_MIN_NODES"):  # gpu.sh's alternated stages
        from mpda_dist import kernel

        kernel.FUSED_MIN_NODES = int(os.environ["GPU_BENCH_FUSED_MIN_NODES"])
    warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
    meta = stage_meta(args)
    marks.append(("the run's metadata", time.perf_counter()))
    t, parts = T_START, []
    for what, at in marks:
        parts.append(f"{what} {at - t:.2f} s")
        t = at
    print("  start-up: " + ", ".join(parts), flush=True)
    meta["note"] = (
        "first run of the first fraction includes all compiles; later fractions "
        "reuse JAX's in-process compile cache (same shapes)"
    )
    sink = Sink(args, "solve", meta)
    n = pick("solve", args.quick)
    done = []
    for f in args.fractions:
        case = f"{n}x{n} {f:.0%}{args.label}"
        out = solve_case(
            comm,
            n,
            f,
            runs=args.runs,
            on_run=lambda i, r, o, case=case: sink.add(_run_rows("solve", case, i, r, o)),
        )
        p = out["problem"]
        truth = p.truth[1:-1, 1:-1] - p.background[1:-1, 1:-1]
        mp = np.asarray(out["runs"][-1]["anomaly"], np.float64)
        sink.add([("solve", case, "rmse_mp", C.rms(mp - truth), "")])
        done.append((case, f, mp, truth))
        warm = f", warm {out['runs'][-1]['wall']:.2f} s" if len(out["runs"]) > 1 else ""
        print(
            f"  solve {case}: first {out['runs'][0]['wall']:.2f} s{warm}, "
            f"{out['runs'][-1]['status']}",
            flush=True,
        )
        if len(done) == 1:  # the cold start: every program was got in this case
            _print_compile_report(comm if comm is not None and comm.Get_size() > 1 else None)
            if comm is None or comm.Get_rank() == 0:  # where rank 0's first solve went
                print("\n".join(f"  {line}" for line in out["sampled"]), flush=True)
    # exact reference, computed by the background `exact` stage
    t_end = time.perf_counter() + args.exact_wait
    for case, f, mp, truth in done:
        path = Path(args.exact_dir) / f"exact_{n}_{f:g}.npz" if args.exact_dir else None
        while path is not None and not path.exists() and time.perf_counter() < t_end:
            time.sleep(1.0)
        if path is None or not path.exists():
            print(
                f"  {case}: no exact solution ({path or 'no --exact-dir'}): RMSE vs exact skipped",
                flush=True,
            )
            continue
        z = np.load(path)
        ex = z["anomaly"]
        sink.add(
            [
                ("solve", case, "rmse_exact", C.rms(ex - truth), ""),
                ("solve", case, "rel_mp_vs_exact", C.rms(mp - ex) / C.rms(ex), ""),
                ("solve", case, "exact_cpu_solve", float(z["seconds"]), "s"),
            ]
        )
    finish(sink)


def stage_big(args) -> None:
    comm = _start()
    warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
    n = pick("big", args.quick)
    sink = Sink(args, "big", stage_meta(args))
    case = f"{n}x{n} 5%{args.label}"
    # The first run only compiles (50 iterations per level: the same kernels and shapes);
    # the second, warm run is the measurement.
    solve_case(
        comm,
        n,
        0.05,
        first_max_iterations=50,
        on_run=lambda i, r, o: (
            sink.add(_run_rows("big", case, i, r, o, first="warmup50")),
            print(
                f"  big {case}: {'compile warm-up' if i == 0 else 'warm run'}: "
                f"{r['wall']:.2f} s, {r['status']}",
                flush=True,
            ),
        ),
    )
    finish(sink)


def stage_profile(args) -> None:
    """Where a warm solve's time goes on the device: one warm 1024² 10 % solve, then
    calls of 10 frozen updates (the pass with its framing), under JAX's profiler; per
    kernel name the count and the total device time, the device's busy time against
    the wall time."""
    import tempfile

    import jax

    comm = _start()
    warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
    n = pick("profile", args.quick)
    sink = Sink(args, "profile", stage_meta(args))
    solve_case(comm, n, 0.1, runs=1)  # compiles
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d):
            solve_case(comm, n, 0.1, runs=1)
        _profile_rows(sink, f"{n}x{n} 10% warm solve", d, time.perf_counter() - t0)
    import kernel as kb  # benchmarks/kernel.py

    from mpda_dist import kernel as kernel_mod

    op, a, b, bp, halo = kb.make_block(n, "float32")
    p = kernel_mod.Params(10.0, 0.6)
    a, b, bp, _, _ = kernel_mod.iterate(a, b, bp, op, halo, p, n=60, momentum=0.0)
    g = kernel_mod.gains(a, op, halo, p, neighbours=False)
    bp = jax.numpy.array(b)
    fn, args_ = kernel_mod.update_call(a, b, bp, g, op, halo, p, 10)
    step = fn.lower(*args_, n=10, momentum=0.5, delta=False, neighbours=False).compile()
    state = C.block(step(*args_))
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d):
            for _ in range(5):
                _, args_ = kernel_mod.update_call(*state[:3], g, op, halo, p, 10)
                state = C.block(step(*args_))
        _profile_rows(sink, f"{n}x{n} frozen update, 5 calls of 10", d, time.perf_counter() - t0)
    finish(sink, table=False)  # one column per kernel name: the lists above read better


def _profile_rows(sink, case: str, trace_dir: str, wall: float, top: int = 15) -> None:
    """Summarise a profiler trace: device planes (a GPU's streams) if there are any,
    else the host's XLA threads (a CPU)."""
    import glob

    from jax.profiler import ProfileData

    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        print(f"  profile {case}: no trace written")
        return
    planes = list(ProfileData.from_file(files[0]).planes)
    device = [pl for pl in planes if pl.name.startswith("/device:")]
    per_name: dict[str, list[float]] = {}
    busy = 0.0
    for pl in device or [pl for pl in planes if pl.name == "/host:CPU"]:
        lines = list(pl.lines)
        if device:  # the kernels on the streams ("XLA Modules"/"XLA Ops" lines repeat them)
            lines = [ln for ln in lines if ln.name.startswith("Stream")] or lines
        else:
            lines = [ln for ln in lines if "XLA" in ln.name]
        for line in lines:
            for ev in line.events:
                ms = ev.duration_ns / 1e6
                busy += ms
                per_name.setdefault(ev.name, [0, 0.0])
                per_name[ev.name][0] += 1
                per_name[ev.name][1] += ms
    where = "device" if device else "host XLA threads"
    rows = [
        ("profile", case, "wall", wall * 1e3, "ms"),
        ("profile", case, f"busy ({where}, summed over streams)", busy, "ms"),
    ]
    print(f"  profile {case}: wall {wall * 1e3:.1f} ms, {where} busy {busy:.1f} ms")
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]
    for name, (count, ms) in ranked:
        short = name if len(name) <= 70 else name[:67] + "..."
        rows.append(("profile", case, f"{short} ({count}x)", ms, "ms"))
        print(f"    {ms:9.2f} ms  {count:6d}x  {short}")
    sink.add(rows)


def stage_fit(args) -> None:
    """Does the largest grid fit on one device?  One solve capped at 20 iterations per
    level (every kernel and array of a full solve, little solving); the peak device
    memory is the figure, the time is not."""
    comm = _start()
    warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
    n = pick("fit", args.quick)
    sink = Sink(args, "fit", stage_meta(args))
    case = f"{n}x{n} 5%"
    solve_case(
        comm,
        n,
        0.05,
        runs=1,
        first_max_iterations=20,
        on_run=lambda i, r, o: (
            sink.add(_run_rows("fit", case, i, r, o, first="capped20")),
            print(f"  fit {case}: capped run {r['wall']:.2f} s, {r['status']}", flush=True),
        ),
    )
    finish(sink)


def stage_mpi(args) -> None:
    comm = _start()
    if comm is None or comm.Get_size() < 2:
        print("note: mpi stage needs mpiexec -n 2; skipped")
        return
    from mpda_dist import runtime

    warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")
    devs = runtime.device_table(comm)  # pins each rank's default device by local rank
    n = pick("mpi", args.quick)
    rank = comm.Get_rank()
    case = f"{n}x{n} 5% {comm.Get_size()} ranks{args.label}"
    sink = None
    if rank == 0:
        sink = Sink(args, "mpi", stage_meta(args, {"ranks": comm.Get_size(), "rank_devices": devs}))
        for r, host, dev, cores, _ in devs:
            print(f"  rank {r} on {host}, {dev}, {cores} usable core(s)", flush=True)
    solve_case(
        comm,
        n,
        0.05,
        on_run=lambda i, r, o: (
            sink.add(_run_rows("mpi", case, i, r, o)),
            print(f"  mpi {case}: run {i + 1}: {r['wall']:.2f} s, {r['status']}", flush=True),
        ),
        report_first=True,
    )
    pk = C.max_over_ranks(comm, float(peak_memory() or 0))
    _print_compile_report(comm)
    if rank == 0:
        sink.add([("mpi", case, "peak_device_bytes_max_rank", pk or "", "B")])
        finish(sink)


def _print_compile_report(comm=None) -> None:
    """Each rank's slowest programs to get (programs.compile_report), rank by rank."""
    from mpda_dist import programs

    rows = programs.compile_report(8)
    lines = [
        f"  {name}: {n} programs, load {ld:.2f} s, trace+lower {lo:.2f} s, compile {co:.2f} s"
        for name, n, ld, lo, co in rows
    ]
    total, count, longest = programs.wait_report(10)
    lines.append(
        f"  this process's solves so far waited {total:.2f} s for programs in {count} "
        "calls; longest waits:"
    )
    lines += [f"    {name} {sec:.2f} s ({where})" for name, sec, where in longest]
    from mpda_dist import lowering

    helpers = lowering.report()
    lines.append(f"  {helpers}" if helpers else "  no lowering helpers")
    ranks = comm.gather(lines, root=0) if comm is not None else [lines]
    if ranks is not None:
        for r, ls in enumerate(ranks):
            print(f"slowest programs to get, rank {r} (background threads included):")
            print("\n".join(ls) if ls else "  (none)", flush=True)


def stage_report(args) -> None:
    path = Path(args.csv)
    if not path.exists():
        print(f"no results in {path}")
        return
    with open(path, encoding="utf-8") as fh:
        lines = [ln for ln in fh if not ln.startswith("#")]
    rows = [tuple(r[k] for k in FIELDS) for r in csv.DictReader(lines)]
    meta = {}
    side = path.with_suffix(path.suffix + ".json")
    if side.exists():
        meta = next(iter(json.loads(side.read_text()).values()), {})
    if meta:
        print(f"machine: {C.machine_line(meta)}")
    print(f"results: {path}")
    for stage in ("kernel", "solve", "big", "mpi", "fit"):
        print(render(stage, rows))
        pk = [r for r in rows if r[0] == stage and r[2].startswith("peak_device_bytes")]
        for r in pk:
            if r[3]:
                print(f"\n{stage}: {r[2]} = {float(r[3]) / 2**30:.2f} GiB")
    summary = alternated(rows)
    if summary:
        print(summary)


def alternated(rows: list[tuple]) -> str:
    """gpu.sh's alternated settings (solve cases ending in `` rN``): per setting, in
    order of appearance, the runs' first solve, the problem's build with it, the time
    from the script's start and the warm solve as ``mean (min–max)``; "" when there
    are none."""
    runs: dict[str, dict[str, list[float]]] = {}
    for stage, case, metric, value, _ in rows:
        found = re.fullmatch(r"(.*) r\d+", case)
        if stage != "solve" or not found or not value:
            continue
        if metric in ("first_wall", "first_with_build", "first_since_start", "warm_wall"):
            with contextlib.suppress(ValueError):
                runs.setdefault(found[1], {}).setdefault(metric, []).append(float(value))
    if not runs:
        return ""

    def cell(v: list[float] | None) -> str:
        if not v:
            return "–"
        return f"{sum(v) / len(v):.2f} ({min(v):.2f}–{max(v):.2f})"

    out = [
        "\n### alternated settings (mean, min–max over the rounds)\n",
        "| setting | runs | first solve [s] | problem build and first solve [s] "
        "| script start to its end [s] | warm [s] |",
        "|---|---|---|---|---|---|",
    ]
    for setting, m in runs.items():
        n = len(m.get("first_wall", []))
        out.append(
            f"| {setting} | {n} | {cell(m.get('first_wall'))} | "
            f"{cell(m.get('first_with_build'))} | "
            f"{cell(m.get('first_since_start'))} | {cell(m.get('warm_wall'))} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "stage", choices=["kernel", "exact", "solve", "big", "mpi", "fit", "profile", "report"]
    )
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU smoke test)")
    default_csv = (
        str(Path(os.environ["OUT"]) / "gpu_results.csv")
        if os.environ.get("OUT")
        else "gpu_results.csv"
    )
    ap.add_argument("--csv", default=default_csv, help=f"results CSV (default {default_csv})")
    ap.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[0.05, 0.1, 0.01],
        help="solve stage (default 0.05 0.1 0.01: the slowest to converge last)",
    )
    ap.add_argument(
        "--runs", type=int, default=2, help="solve stage: runs per case (default 2: first, warm)"
    )
    ap.add_argument(
        "--label",
        default="",
        help="solve and big stages: appended to each case name (e.g. ' disk cache' for a rerun)",
    )
    ap.add_argument(
        "--cases",
        choices=["frozen", "all", "sweep"],
        default="frozen",
        help="kernel stage: the frozen update's rows, pads against the hand-written fused "
        "pass (default); sweep: the fused pass's settings against each other; or all: "
        "the coupled update and the strips form too",
    )
    ap.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        help="kernel stage: grid sizes n (n x n) instead of the default "
        f"{' '.join(map(str, SIZES['kernel'][0]))} (--quick: "
        f"{' '.join(map(str, SIZES['kernel'][1]))})",
    )
    ap.add_argument("--dir", default="/tmp/mpda_exact", help="exact stage: output folder")
    ap.add_argument("--exact-dir", default=None, help="solve stage: where exact .npz files are")
    ap.add_argument(
        "--exact-wait",
        type=float,
        default=30.0,
        help="solve stage: seconds to wait for the exact solutions (default 30)",
    )
    args = ap.parse_args(argv)
    {
        "kernel": stage_kernel,
        "exact": stage_exact,
        "solve": stage_solve,
        "big": stage_big,
        "mpi": stage_mpi,
        "fit": stage_fit,
        "profile": stage_profile,
        "report": stage_report,
    }[args.stage](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
