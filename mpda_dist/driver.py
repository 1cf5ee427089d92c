"""The thin per-rank driver behind ``mpda run`` and ``mpda simulate``.

Rank 0 reads the inputs and builds the problem (truth, observations, background),
every rank receives the observations mapped to grid nodes and builds its own blocks,
rank 0 alone logs and writes.  Any error ends every rank with a non-zero exit code.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

import numpy as np

from mpda_dist import runtime

log = logging.getLogger("mpda_dist")
T = TypeVar("T")

EXIT_OK, EXIT_INPUT, EXIT_DIVERGED, EXIT_NOT_CONVERGED = 0, 2, 3, 4
EXIT_INTERRUPTED = 5  # a signal stopped the run after writing a checkpoint


class RunError(RuntimeError):
    """A failure with a message for the user and an exit code."""

    def __init__(self, message: str, code: int = EXIT_INPUT) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Problem:
    """What rank 0 knows about the problem (whole grid, y first)."""

    shape: tuple[int, int]  # (ny, nx) incl. boundary
    extent: tuple[float, float]  # (Lx, Ly)
    background: np.ndarray  # (ny, nx)
    observations: Any  # observations.Observations, every row read
    used: np.ndarray  # bool per observation (QC flag ok)
    nodes: Any  # observations.NodeObservations
    truth: np.ndarray | None
    qc: Any = None  # qc.QCReport: a flag per observation
    source: str = ""  # the observation file, or "observations.synthetic"
    lat_range: tuple[float, float] | None = None  # the sphere (grid.domain: sphere)
    coverage: tuple[float, float] | None = None  # synthetic sphere: nodes, area observed


def is_sphere(cfg: Any) -> bool:
    return cfg.grid.domain == "sphere"


def grid_geometry(cfg: Any) -> tuple[tuple[float, float], float]:
    """``(extent, y0)`` in the coordinates observations use: ``(Lx, Ly)`` and 0 on the
    rectangle; ``(360, lat_max − lat_min)`` and ``lat_min`` on the sphere."""
    if is_sphere(cfg):
        lo, hi = cfg.grid.lat_range
        return (360.0, hi - lo), lo
    return tuple(float(v) for v in cfg.grid.extent), 0.0


def grid_coordinates(cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """``/grid/x`` and ``/grid/y``: domain units, or longitude and latitude (degrees)."""
    from mpda_dist import sphere

    if is_sphere(cfg):
        return sphere.longitudes(cfg.grid.nx), sphere.latitudes(cfg.grid.ny, cfg.grid.lat_range)
    lx, ly = cfg.grid.extent
    return np.linspace(0.0, lx, cfg.grid.nx), np.linspace(0.0, ly, cfg.grid.ny)


def _setup_logging(comm: Any, level: str = "info", per_rank: bool = False) -> None:
    rank = comm.Get_rank()
    root = logging.getLogger("mpda_dist")
    root.handlers.clear()
    root.propagate = False
    lvl = getattr(logging, level.upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    handler.setLevel(lvl if rank == 0 else logging.ERROR)
    root.addHandler(handler)
    if per_rank:
        name, fh, error = f"mpda-rank{rank:04d}.log", None, None
        try:
            fh = logging.FileHandler(name, mode="w")
        except OSError as exc:
            error = f"logging.per_rank: cannot write {os.path.abspath(name)} ({exc.strerror})"
        errors = [e for e in comm.allgather(error) if e]  # every rank stops alike
        if errors:
            raise RunError(f"{errors[0]}; run from a writable directory", EXIT_INPUT)
        fh.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s"))
        fh.setLevel(logging.DEBUG)
        root.addHandler(fh)
    root.setLevel(logging.DEBUG if per_rank else lvl)


def on_root(comm: Any, fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0; a failure there becomes a :class:`RunError` on every rank."""
    outcome: tuple[bool, Any] = (True, None)
    value = None
    if comm.Get_rank() == 0:
        try:
            value = fn()
        except RunError as exc:
            outcome = (False, (str(exc), exc.code))
        except (ValueError, OSError) as exc:
            outcome = (False, (str(exc), EXIT_INPUT))
        except MemoryError as exc:  # rank 0 holds the whole grid's fields
            outcome = (
                False,
                (
                    f"out of memory on rank 0 ({str(exc) or 'MemoryError'}): rank 0 "
                    "holds whole-grid fields (grid.nx x grid.ny); a smaller grid, "
                    "or a node with more memory for rank 0",
                    EXIT_INPUT,
                ),
            )
    outcome = comm.bcast(outcome, root=0)
    if not outcome[0]:
        raise RunError(*outcome[1])
    return value


def _warn_if_analysis_file(spec: str) -> None:
    """An ``mpda run`` output given as ``prior.background`` without a dataset: its
    ``/background`` is that run's background, not its analysis (a cycling user most
    likely meant ``OUT.h5:analysis/mean``)."""
    import h5py

    from mpda_dist import io

    path, dataset = io.split_field_spec(spec)
    if dataset != io.DEFAULT_FIELD_DATASET or spec.endswith(f":{dataset}"):
        return  # a dataset was named
    try:
        with h5py.File(path, "r") as f:
            analysis = isinstance(f.get("analysis/mean"), h5py.Dataset)
    except OSError:
        return
    if analysis:
        log.warning(
            "prior.background = %s is an analysis file: its /background is that run's "
            "background, read as this one's; for the analysis (cycling) give %s:analysis/mean",
            spec,
            path,
        )


def build_problem(cfg: Any, rng_seed: int | None = None) -> Problem:
    """Rank 0: background, observations (file or synthetic), their quality control and
    truth.  Bad input raises InputError/ObservationError naming the file (and row)."""
    from mpda_dist import globe, io, prior, qc, sphere
    from mpda_dist import observations as obsmod

    shape = (cfg.grid.ny, cfg.grid.nx)
    on_sphere = is_sphere(cfg)
    lat_range = tuple(cfg.grid.lat_range) if on_sphere else None
    extent, y0 = grid_geometry(cfg)
    bg = cfg.prior.background
    if bg == "climatology":  # sphere only (checked by Config)
        background = globe.climatology(*shape, lat_range)
    elif isinstance(bg, str):
        background = io.read_field(bg, shape)
        _warn_if_analysis_file(bg)
    else:
        background = np.full(shape, float(bg))
    with np.errstate(invalid="ignore"):
        bad = np.argwhere(~(np.abs(background) < qc.FILL_BOUND))  # NaN and ±inf too
    if bad.size:
        at = tuple(int(i) for i in bad[0])
        raise io.InputError(
            f"{bg}: the background is not finite, or a fill value (|f_b| >= "
            f"{qc.FILL_BOUND:g}), at (iy, ix) = {at}: {float(background[at])!r} ({len(bad)} such "
            "node(s))"
        )
    truth = None
    cover = None
    if cfg.observations.file is not None:
        source = str(cfg.observations.file)
        d = io.read_observations(source, default_noise=cfg.observations.noise)
        obs = obsmod.Observations(d["x"], d["y"], d["value"], d["noise"])
        try:
            truth = io.read_truth(source, grid_coordinates(cfg))
        except io.OtherGrid as exc:
            log.warning("%s: no RMSE against the file's truth", exc)
    else:
        syn = cfg.observations.synthetic
        source = "observations.synthetic"
        rng = np.random.default_rng(syn.seed if rng_seed is None else rng_seed)
        ell, amp = cfg.prior.lengthscale, cfg.prior.amplitude
        if on_sphere:
            truth = background + sphere.sample(shape, lat_range, ell, amp, rng)
            if syn.tracks is not None:
                tr = syn.tracks
                mask = globe.satellite_swaths(
                    shape,
                    lat_range,
                    tr.satellites,
                    tr.swath_km,
                    tr.window_hours,
                    tr.inclination_deg,
                    tr.period_minutes,
                    rng,
                )
            else:
                mask = globe.random_mask(shape, syn.fraction, rng)
            cover = globe.coverage(mask, lat_range)
            log.info(
                "synthetic observations: %s, coverage %.1f%% of the nodes (%.1f%% of the area)",
                "satellite swaths" if syn.tracks is not None else "random nodes",
                100 * cover[0],
                100 * cover[1],
            )
            obs = globe.observe(truth, lat_range, mask, syn.noise, rng)
        else:  # tracks are sphere only (checked by Config)
            anomaly = prior.sample(shape, extent, ell, amp, rng)
            truth = background + anomaly
            obs = obsmod.synthetic(truth, extent, syn.fraction, syn.noise, rng)
    named = source  # what QC's messages name
    if cfg.observations.noise is not None:
        # every observation's assumed error: a file's own noise, or the synthetic draw's
        # (the values keep the noise they were drawn with: a misspecified R, on purpose)
        obs = replace(obs, noise=np.full_like(obs.value, cfg.observations.noise))
        named = f"{source} (noise from observations.noise = {cfg.observations.noise!r})"
    report = qc.quality_control(
        obs,
        shape,
        extent,
        background,
        named,
        on_error=cfg.qc.on_error,
        duplicates=cfg.qc.duplicates,
        gross_error_k=cfg.qc.gross_error_k,
        periodic_x=on_sphere,
        y0=y0,
        operator=cfg.observations.operator,
        dtype=cfg.solver.dtype,
    )
    # Observations are read and checked on rank 0 alone, so these counts are already
    # the totals over all ranks: there is nothing to sum.
    log.info("quality control of %s: %s", source, report.summary())
    flagged = report.first_rows()
    if flagged:
        more = int(np.count_nonzero(~report.used)) - len(flagged)
        log.warning(
            "flagged observations, not used%s:",
            f" (first {len(flagged)}; {more} more in /observations/flag)" if more else "",
        )
        for line in flagged:
            log.warning("  %s", line)
    if cfg.observations.operator == "bilinear":
        u = report.used
        iy, ix, w = obsmod.bilinear_nodes(obs.x[u], obs.y[u] - y0, shape, extent, on_sphere)
        innovation = report.value_used[u] - report.hfb[u]  # H f_b through the bilinear H
        nodes = obsmod.BilinearObservations(iy, ix, w, innovation, 1.0 / report.noise_used[u] ** 2)
    else:
        nodes = report.nodes()
    return Problem(
        shape,
        extent,
        background,
        obs,
        report.used,
        nodes,
        truth,
        report,
        source,
        lat_range,
        cover,
    )


# What a checkpoint's messages belong to: the problem and the messages' parametrisation.
_RESUME_KEYS = ("grid", "prior", "observations", "qc", "solver.c")


def _config_changes(stored: str, cfg: Any) -> list[str]:
    """The keys of :data:`_RESUME_KEYS` (flattened, dotted) whose values differ between
    a checkpoint's stored config (YAML; empty: not compared) and ``cfg``."""
    import yaml

    from mpda_dist.config import config_to_dict

    if not stored.strip():
        return []
    try:
        old = yaml.safe_load(stored)
    except yaml.YAMLError:
        return []
    if not isinstance(old, dict):
        return []
    new = config_to_dict(cfg)

    def flat(d: Any, prefix: str) -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        return {k: v for key, sub in d.items() for k, v in flat(sub, f"{prefix}.{key}").items()}

    changed = []
    for key in _RESUME_KEYS:
        a, b = old, new
        for part in key.split("."):
            a = a.get(part) if isinstance(a, dict) else None
            b = b.get(part) if isinstance(b, dict) else None
        fa, fb = flat(a, key), flat(b, key)
        changed += sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))
    return changed


def settings_from(cfg: Any) -> Any:
    from mpda_dist.solver import Settings

    s = cfg.solver
    return Settings(
        c=s.c,
        damping=s.damping,
        momentum=s.momentum,
        stopping=s.stopping,
        tol=s.effective_tol(),
        check_every=s.check_every,
        max_iterations=s.max_iterations,
        dtype=s.dtype,
        freeze_precisions=s.freeze_precisions,
        mode=s.exchange.mode,
        every=s.exchange.every,
        max_staleness=s.exchange.max_staleness,
        heartbeat_seconds=cfg.logging.heartbeat_seconds or math.inf,
        cycle=s.multigrid.cycle,
        smoothing=s.multigrid.smoothing,
        anderson=s.anderson,
        stall_checks=s.stall_checks,
    )


def _check_checkpoint_file(path: str) -> None:
    from mpda_dist import io

    try:
        io.check_writable(path)
    except io.InputError as exc:
        raise io.InputError(f"checkpoint.file: {exc}") from None


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet)
        return os.path.abspath(a) == os.path.abspath(b)


def _check_paths(
    cfg: Any,
    out_path: str,
    resume: str | None,
    config_path: str | os.PathLike[str] | None = None,
    checkpoint: bool = True,
) -> None:
    """The files a run writes must not be the files it reads (its config file, an
    observation file, the background, the checkpoint it resumes from), nor each other,
    and must be file names (``out/`` is not one).  ``checkpoint``: the run may write
    ``checkpoint.file`` (``mpda run`` with method mp; not ``mpda simulate``)."""
    from mpda_dist import io

    outputs = [("output.file (-o)", out_path)]
    if checkpoint and cfg.solver.method == "mp":
        outputs.append(("checkpoint.file", cfg.checkpoint.file))
    inputs = [("the config file", config_path), ("observations.file", cfg.observations.file)]
    bg = cfg.prior.background
    if isinstance(bg, str) and bg != "climatology":
        inputs.append(("prior.background", os.fspath(io.split_field_spec(bg)[0])))
    inputs.append(("--resume", resume))
    for what, path in outputs:
        if str(path).endswith(("/", os.sep)):
            raise io.InputError(f"{what} = {path}: a directory name; give a file name")
        for key, other in inputs:
            if other and not (what == "checkpoint.file" and key == "--resume"):
                if _same_file(path, other):
                    raise io.InputError(
                        f"{what} = {path} is also {key}: the run would overwrite its input; "
                        "write to another file"
                    )
    if len(outputs) == 2 and _same_file(out_path, cfg.checkpoint.file):
        raise io.InputError(
            f"output.file (-o) and checkpoint.file are the same file ({out_path}): a "
            "checkpoint would look like a finished analysis; give them different names"
        )


_DIGEST_LINE = "# inputs sha256: "  # the last line of a checkpoint's config text


def _inputs_digest(cfg: Any, problem: Problem) -> str:
    """A digest of what a run reads from files, beside its config: the observation
    file's rows and a background file's field, as read (what the config generates, a
    synthetic draw or the climatology, it names already; their floats could differ in
    the last bit on another CPU, and so refuse a valid resume)."""
    h = hashlib.sha256()
    arrays = []
    if cfg.observations.file is not None:
        obs = problem.observations
        arrays += [("x", obs.x), ("y", obs.y), ("value", obs.value), ("noise", obs.noise)]
    if isinstance(cfg.prior.background, str) and cfg.prior.background != "climatology":
        arrays.append(("background", problem.background))
    for name, a in arrays:
        v = np.ascontiguousarray(a)
        h.update(f"{name}:{v.dtype.str}:{v.shape}".encode())
        h.update(v.tobytes())
    return h.hexdigest()


def _stored_digest(config_text: str) -> str | None:
    """The inputs' digest in a checkpoint's config text (None: written before it was)."""
    for line in reversed(config_text.splitlines()):
        if line.startswith(_DIGEST_LINE):
            return line[len(_DIGEST_LINE) :].strip()
    return None


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))


_RANKS_LINE = "# ranks: "  # a checkpoint's config text: the ranks that wrote it


def _stored_ranks(config_text: str) -> int | None:
    """The rank count in a checkpoint's config text (None: written before it was)."""
    for line in reversed(config_text.splitlines()):
        if line.startswith(_RANKS_LINE):
            try:
                return int(line[len(_RANKS_LINE) :])
            except ValueError:
                return None
    return None


def _nothing_written(out_path: str) -> str:
    """The end of a failed run's message: nothing was written, and what ``out_path``
    holds if something was there before (an earlier run's file, left as it was, which
    must not pass for this run's result)."""
    try:
        mtime = os.stat(out_path).st_mtime
    except OSError:
        return "no output was written"
    when = datetime.fromtimestamp(mtime, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        f"no output was written: {out_path} is an earlier file (modified {when}), left as "
        "it was, not this run's result"
    )


def _warn_unconverged_levels(results: Sequence[Any], tol: float) -> None:
    """Rank 0: a warning for each level below the last one that did not converge (it
    reached ``solver.max_iterations``, or stalled): the finer levels started from it,
    and only the output's ``levels`` attribute would say so."""
    from mpda_dist.solver import CAPPED, STALLED

    for i, lr in enumerate(results[:-1]):
        if lr.status not in (CAPPED, STALLED):
            continue
        why = "reached solver.max_iterations" if lr.status == CAPPED else "stalled"
        log.warning(
            "level %d (%d x %d points) %s after %d iterations at residual %.3e > tol %.1e: "
            "the finer levels went on from it unconverged",
            i + 1,
            lr.shape[1],
            lr.shape[0],
            why,
            lr.iterations,
            lr.residual,
            tol,
        )


def execute(
    comm: Any,
    cfg: Any,
    output: str | None,
    resume: str | None = None,
    last: bool = False,
    config_path: str | os.PathLike[str] | None = None,
) -> int:
    """Run the configured solve on every rank of ``comm``; rank 0 writes ``output``.
    The signal handlers the run sets (:class:`checkpoint.Requests`) are put back as
    they were when it returns or fails, for a caller in the same process; with ``last``
    (the process ends after it, ``mpda run``) SIGTERM and SIGUSR1 are ignored instead
    (:func:`checkpoint.handlers_kept`).  ``config_path``: the file ``cfg`` was read
    from, which the output must not overwrite.

    An input error found once the paths are checked (an observation file that fails,
    say) names an earlier file at the output path, as exit codes 3 to 5 do: it is left
    as it was and is not this run's result."""
    from mpda_dist import checkpoint, io
    from mpda_dist.decomposition import DecompositionError

    out_path = output or cfg.output.file
    checked: list[bool] = []  # set once the output path is known to be a file to write
    with checkpoint.handlers_kept(last):
        try:
            return _execute(comm, cfg, output, resume, config_path, checked)
        except (RunError, io.InputError, DecompositionError) as exc:
            code = getattr(exc, "code", EXIT_INPUT)
            if not checked or code != EXIT_INPUT or not os.path.isfile(out_path):
                raise
            if "no output was written" in str(exc):
                raise
            message = f"{exc}; {_nothing_written(out_path)}"
            if isinstance(exc, RunError):
                raise RunError(message, code) from None
            raise type(exc)(message) from None


def _execute(
    comm: Any,
    cfg: Any,
    output: str | None,
    resume: str | None,
    config_path: str | os.PathLike[str] | None,
    checked: list[bool],
) -> int:
    import jax

    from mpda_dist import __version__, diagnostics, io, lowering, provenance, sphere
    from mpda_dist.config import dump_config
    from mpda_dist.decomposition import check_ranks
    from mpda_dist.multigrid import odd_cells_advice, schedule, sphere_schedule
    from mpda_dist.solver import (
        CAPPED,
        DIVERGED,
        INTERRUPTED,
        STALLED,
        CheckpointError,
        ResumeError,
        prepare,
        solve,
    )

    t0 = time.perf_counter()
    rank, size = comm.Get_rank(), comm.Get_size()
    out_path = output or cfg.output.file
    on_root(comm, lambda: _check_paths(cfg, out_path, resume, config_path))
    on_root(comm, lambda: io.check_writable(out_path))
    checked.append(True)
    if cfg.solver.method == "mp":  # a signal or the timer writes it, hours from now
        on_root(comm, lambda: _check_checkpoint_file(cfg.checkpoint.file))
    rows = runtime.device_table(comm)
    if gc.get_freeze_count():  # (runtime.settle_gc, at the start)
        frozen = gc.get_freeze_count()
        log.debug("%d objects frozen out of the garbage collector's walks ($MPDA_GC)", frozen)
    lowering.start()  # imports ahead (and any helpers) while the inputs are read
    if rank == 0:
        log.info("mpda_dist %s on %d rank(s)", __version__, size)
        for r, host, dev, cores, _ in rows[:16]:
            log.info("  rank %4d  %-20s %-8s %3d core(s)", r, host, dev, cores)
        if len(rows) > 16:
            log.info("  ... %d more ranks", len(rows) - 16)
        advice = runtime.few_cores_advice(rows)
        if advice:
            log.warning("%s", advice)
        pool = lowering.helpers()
        if pool is not None:
            log.info(
                "  %d lowering helper process(es) per rank trace the programs (%s)",
                pool.count,
                lowering.ENV,
            )
    pg = cfg.decomposition.process_grid
    grid = None if pg == "auto" else (int(pg[0]), int(pg[1]))
    if grid is not None:  # exact and amg_cg run on rank 0, but a grid for other ranks
        check_ranks(grid[::-1], size)  # is a mistake in the config or the launch all the same
    ny, nx = cfg.grid.ny, cfg.grid.nx
    lx, ly = cfg.grid.extent
    dy, dx = ly / (ny - 1), lx / (nx - 1)
    mg = cfg.solver.multigrid
    on_sphere = is_sphere(cfg)
    # Every method runs on the sphere: cg and 3dvar wrap the process grid in longitude
    # (krylov.solve passes Level.periodic to the Decomposition), exact and amg_cg
    # assemble Q with the periodic seam (baselines.assemble_periodic).
    multigrid = mg.enabled and cfg.solver.method == "mp"
    if on_sphere:
        levels = sphere_schedule(ny, nx, cfg.grid.lat_range, mg.min_size, multigrid)
        advice = odd_cells_advice(levels, mg.min_size) if multigrid else None
        if advice and rank == 0:
            log.warning("%s", advice)
    else:
        levels = schedule(ny, nx, dy, dx, mg.min_size, multigrid)
        if multigrid and len(levels) == 1 and max(ny, nx) > mg.min_size and rank == 0:
            log.warning(
                "no coarser level: the %d x %d grid is too thin to halve (a coarser grid "
                "needs 4 interior points along each axis), so message passing runs "
                "without multigrid and converges slowly on its long axis",
                nx,
                ny,
            )
    s = settings_from(cfg)
    # The programs' shapes follow from the grid, not from the data: they start
    # compiling now, while rank 0 reads the inputs and builds the problem.
    prepared = None
    if cfg.solver.method == "mp":
        with jax.enable_x64(s.dtype == "float64"):
            prepared = prepare(comm, levels, s, process_grid=grid)
    try:
        problem = on_root(comm, lambda: build_problem(cfg))
        nodes = comm.bcast(problem.nodes if rank == 0 else None, root=0)
        inputs = comm.bcast(_inputs_digest(cfg, problem) if rank == 0 else None, root=0)
        if rank == 0:
            log.info(
                "%d x %d grid, %d observations used (%d given), method %s, %s, tol %.1e",
                nx,
                ny,
                len(nodes.iy),
                len(problem.observations),
                cfg.solver.method,
                s.dtype,
                s.tol,
            )
        from mpda_dist import checkpoint

        state = None
        if resume is not None:
            if cfg.solver.method != "mp":
                raise RunError("--resume continues message passing; solver.method must be mp")

            def read_checkpoint() -> Any:
                state = checkpoint.read(resume)
                changed = _config_changes(state.config, cfg)
                stored = _stored_digest(state.config)
                if stored is not None and stored != inputs:
                    changed.append("the observations' or the background's contents")
                if changed:
                    raise RunError(
                        f"{resume}: written for another problem ({', '.join(changed)} differ); "
                        "resume with the config of the interrupted run",
                        EXIT_INPUT,
                    )
                return state

            state = on_root(comm, read_checkpoint)
            if rank == 0:
                log.info(
                    "resuming %s: level %d, iteration %d", resume, state.level + 1, state.iteration
                )
        requests = checkpoint.Requests(cfg.checkpoint.every_seconds)
        # The baselines cannot checkpoint: a caught SIGTERM was never looked at, and the run
        # went on to the end.
        requests.install(can_checkpoint=cfg.solver.method == "mp")
        with jax.enable_x64(s.dtype == "float64"):
            if cfg.solver.method == "mp":
                try:
                    result = solve(
                        comm,
                        levels,
                        nodes,
                        cfg.prior.lengthscale,
                        cfg.prior.amplitude,
                        s,
                        process_grid=grid,
                        prepared=prepared,
                        resume=state,
                        checkpoint_path=cfg.checkpoint.file,
                        requests=requests,
                        config_text=(
                            f"{dump_config(cfg)}{_RANKS_LINE}{size}\n{_DIGEST_LINE}{inputs}\n"
                        ),
                    )
                except ResumeError as exc:  # raised on every rank
                    raise RunError(f"{resume}: {exc}", EXIT_INPUT) from None
                except CheckpointError as exc:  # raised on every rank
                    raise RunError(
                        f"interrupted by {requests.signal_name or 'a signal on another rank'}, "
                        f"and the checkpoint failed: {exc}; {_nothing_written(out_path)}",
                        EXIT_INPUT,
                    ) from None
                level_results, anomaly = result.levels, result.anomaly
            else:
                level_results, anomaly = _reference_solve(comm, cfg, levels[-1], nodes)
    finally:  # solve closes it too; a failure before must stop its compiles
        if prepared is not None:
            prepared.close()
    requests.uninstall()  # the solve is over: a late signal would only end the job badly
    status = level_results[-1].status
    if rank == 0:
        _warn_unconverged_levels(level_results, s.tol)
    if status == INTERRUPTED:
        raise RunError(
            f"interrupted by {requests.signal_name or 'a signal on another rank'} at "
            f"iteration {level_results[-1].iterations}; checkpoint written to "
            f"{cfg.checkpoint.file}; continue with: mpda run CONFIG --resume "
            f"{cfg.checkpoint.file}; {_nothing_written(out_path)}",
            EXIT_INTERRUPTED,
        )
    if status == DIVERGED:
        hint = "try a smaller solver.damping or another solver.c"
        if level_results[-1].extrapolations:
            hint += " (or solver.anderson: 0: Anderson mixing moved this level's mean)"
        if cfg.observations.operator == "bilinear":
            # a row's four corners are coupled almost as a rank-one block when its noise
            # is small against the prior: not walk-summable (README, observations)
            hint = (
                "bilinear observations with a small noise couple their cell's corners too "
                "strongly for message passing with these settings: try solver.c: 100 (or "
                "-2 with solver.damping: 0.7), or solver.method: cg"
            )
        raise RunError(
            f"the solver diverged at level {len(level_results)} "
            f"(residual {level_results[-1].residual:.3e}); {hint}; {_nothing_written(out_path)}",
            EXIT_DIVERGED,
        )
    if status == STALLED:
        fix = "solver.dtype: float64 or " if s.dtype == "float32" else ""
        why, off = (
            (f"no 10 % fall in {s.stall_checks} checks", "; solver.stall_checks: 0 runs on")
            if cfg.solver.method == "mp"
            else ("three restarts from the true residual without halving it", "")
        )
        raise RunError(
            f"not converged: the residual stalled at {level_results[-1].residual:.3e} > tol "
            f"{s.tol:.1e} ({why}, after {level_results[-1].iterations} iterations): below "
            f"what {s.dtype} reaches here; try {fix}a larger solver.tol{off}; "
            f"{_nothing_written(out_path)}",
            EXIT_NOT_CONVERGED,
        )
    if status == CAPPED:
        raise RunError(
            f"not converged: residual {level_results[-1].residual:.3e} > tol {s.tol:.1e} after "
            f"{level_results[-1].iterations} iterations (solver.max_iterations); "
            f"{_nothing_written(out_path)}",
            EXIT_NOT_CONVERGED,
        )

    def finish() -> None:
        """Rank 0: diagnostics, attributes and the file.  Inside ``on_root``, so a
        failure to write (disk full, ...) is a clean error on every rank."""
        mean = problem.background.copy()
        if on_sphere:
            mean[1:-1, :] += anomaly  # every longitude is an unknown
        else:
            mean[1:-1, 1:-1] += anomaly
        wall = time.perf_counter() - t0
        history = f"{datetime.now(UTC).isoformat(timespec='seconds')} mpda run on {size} rank(s)"
        resumed: dict[str, Any] = {}
        if state is not None:  # (rank 0 holds it)
            resumed = {
                "resumed_from": os.fspath(resume),
                "resumed_level": state.level + 1,
                "resumed_iteration": state.iteration,
            }
            history += f", resumed from {resume} at level {state.level + 1}, iteration "
            history += f"{state.iteration}"
            ranks_before = _stored_ranks(state.config)
            if ranks_before is not None:  # (not in checkpoints written before it was)
                resumed["resumed_from_ranks"] = ranks_before
                history += f" (a checkpoint of {ranks_before} rank(s))"
            history += "; wall_seconds counts this part only"
        attrs: dict[str, Any] = {
            "title": "mpda_dist analysis",
            "source": f"mpda_dist {__version__}",
            "history": history,
            "config": _effective_config(cfg, out_path, s.tol),
            "method": cfg.solver.method,
            "status": status,
            "stopping": level_results[-1].stopped_by,
            "tol": s.tol,
            "inputs_sha256": inputs,
            "ranks": size,
            "version": __version__,
            **provenance.attributes(),
            **resumed,
            "wall_seconds": wall,
            "level_ny": np.array([lr.shape[0] for lr in level_results]),
            "level_nx": np.array([lr.shape[1] for lr in level_results]),
            "iterations": np.array([lr.iterations for lr in level_results]),
            "residual": np.array([lr.residual for lr in level_results]),
            "levels": [lr.summary() for lr in level_results],
        }
        summary = f"done in {wall:.2f} s: {status}, residual {level_results[-1].residual:.3e}"
        if problem.truth is not None:
            if on_sphere:
                # Area-weighted (cos latitude): each node counts by the area it stands for.
                lr = problem.lat_range
                attrs["rmse_analysis"] = sphere.area_rmse(mean, problem.truth, lr)
                attrs["rmse_background"] = sphere.area_rmse(problem.background, problem.truth, lr)
                attrs["rmse_weighting"] = "cos(latitude)"
                what = "area-weighted RMSE"
            else:
                attrs["rmse_analysis"] = _rmse(mean, problem.truth)
                attrs["rmse_background"] = _rmse(problem.background, problem.truth)
                what = "RMSE"
            summary += (
                f", {what} vs truth {attrs['rmse_analysis']:.4g} "
                f"(background {attrs['rmse_background']:.4g})"
            )
        if problem.coverage is not None:
            attrs["coverage_nodes"], attrs["coverage_area"] = problem.coverage
            summary += f", coverage {100 * problem.coverage[0]:.1f}% of the nodes"
        report = problem.qc
        operator = cfg.observations.operator  # H of the analysis, for O-B and O-A too
        columns, stats = diagnostics.observation_diagnostics(report, mean)
        log.info("diagnostics: %s", diagnostics.summary_line(stats))
        attrs |= _qc_attrs(cfg, problem)
        attrs |= {k: v for k, v in stats.items() if k != "n_used"}
        obs = problem.observations
        gx, gy = grid_coordinates(cfg)
        try:
            io.write_analysis(
                out_path,
                mean=mean,
                x=gx,
                y=gy,
                observations={
                    "x": obs.x,
                    "y": obs.y,
                    "value": obs.value,
                    "noise": obs.noise,
                    "flag": report.flag,
                    "used": problem.used.astype(np.int8),
                    "duplicate_of": report.duplicate_of,
                    "value_used": report.value_used,
                    "noise_used": report.noise_used,
                    **columns,
                },
                background=problem.background,
                truth=problem.truth,
                attrs=attrs,
                observation_attrs=diagnostics.column_attrs(operator),
                lonlat=on_sphere,
            )
        except OSError as exc:  # ENOSPC, EIO, quota: the temporary is already removed
            raise io.InputError(
                f"{out_path}: cannot write the analysis ({exc}); {_nothing_written(out_path)}"
            ) from None
        except io.InputError:
            raise
        except (ValueError, TypeError) as exc:  # h5py refusing a value: a bug, not input
            raise RunError(
                f"{out_path}: cannot write the analysis ({type(exc).__name__}: {exc}); "
                f"{_nothing_written(out_path)}",
                1,
            ) from None
        log.info("%s; wrote %s", summary, out_path)

    on_root(comm, finish)
    return EXIT_OK


def _effective_config(cfg: Any, out_path: str, tol: float) -> str:
    """The config as YAML with what the run made of it: ``solver.tol`` the tolerance in
    force (not ``null``) and ``output.file`` the file written (``-o``)."""
    from mpda_dist._schema import dump_yaml
    from mpda_dist.config import config_to_dict

    d = config_to_dict(cfg)
    d["solver"]["tol"] = tol
    d["output"]["file"] = os.fspath(out_path)
    return dump_yaml(d)


def _qc_attrs(cfg: Any, problem: Problem) -> dict[str, Any]:
    """Root attributes on quality control: policy, flag table and counts per flag."""
    from mpda_dist.qc import FLAGS

    report = problem.qc
    k = cfg.qc.gross_error_k
    attrs: dict[str, Any] = {
        "observations_source": problem.source,
        "qc_on_error": cfg.qc.on_error,
        "qc_duplicates": cfg.qc.duplicates,
        "qc_gross_error_k": math.nan if k is None else float(k),  # NaN: check off
        "qc_flag_values": np.array(sorted(FLAGS), dtype=np.int8),
        "qc_flag_meanings": " ".join(FLAGS[c][0] for c in sorted(FLAGS)),
        "qc_read": len(report.flag),
        "qc_used": int(report.used.sum()),
    }
    attrs |= {f"qc_count_{name}": n for name, n in report.counts().items()}
    return attrs


def _reference_solve(comm: Any, cfg: Any, level: Any, nodes: Any) -> tuple[list, Any]:
    """The baselines, chosen by ``solver.method``, on the target ``level``.

    ``cg`` and ``3dvar`` run distributed on every rank (:mod:`mpda_dist.krylov`, same
    blocks and halo exchange as message passing, Jacobi-preconditioned); ``exact`` and
    ``amg_cg`` need the whole matrix and run on rank 0 while the others wait
    (:mod:`mpda_dist.baselines`).  Returns ``([LevelResult], anomaly on rank 0)``.
    """
    method = cfg.solver.method
    sc = cfg.solver
    args = (comm, level, nodes, cfg.prior.lengthscale, cfg.prior.amplitude, method)
    if method in ("cg", "3dvar"):
        from mpda_dist.krylov import KrylovSettings
        from mpda_dist.krylov import solve as krylov_solve

        pg = cfg.decomposition.process_grid
        beat = cfg.logging.heartbeat_seconds or math.inf
        ks = KrylovSettings(sc.effective_tol(), sc.max_iterations, sc.dtype, heartbeat_seconds=beat)
        res, anomaly = krylov_solve(
            *args, ks, process_grid=None if pg == "auto" else (int(pg[0]), int(pg[1]))
        )
        return [_stopped_by(res, "residual")], anomaly
    if method == "exact" and level.periodic_x:
        res, anomaly = _sphere_exact(comm, level, nodes, cfg.prior.lengthscale, cfg.prior.amplitude)
        return [_stopped_by(r, "direct") for r in res], anomaly
    if method in ("exact", "amg_cg"):
        from mpda_dist.baselines import solve_on_root

        res, anomaly = solve_on_root(*args, sc.effective_tol(), sc.max_iterations)
        return [_stopped_by(res, "direct" if method == "exact" else "residual")], anomaly
    raise RunError(
        f"solver.method = {method!r} is not available; use mp, cg, 3dvar, exact or amg_cg"
    )


def _stopped_by(res: Any, rule: str) -> Any:
    """A baseline's level result with the rule that ended it, when it converged."""
    from mpda_dist.solver import CONVERGED

    if res.status == CONVERGED:
        res.stopped_by = rule
    return res


def _sphere_exact(
    comm: Any, level: Any, nodes: Any, lengthscale: float, amplitude: float
) -> tuple[list, Any]:
    """The direct sparse solve on the sphere (periodic longitude), on rank 0."""
    import scipy.sparse.linalg as spla

    from mpda_dist.baselines import assemble_periodic, scaled_residual
    from mpda_dist.solver import CONVERGED, LevelResult
    from mpda_dist.stencil import build

    res = LevelResult((level.ny, level.nx), 1, (1, 1), solver="exact")
    anomaly = None
    if comm.Get_rank() == 0:
        t0 = time.perf_counter()
        lobs = nodes.at_level(1, level.interior, True)
        st = build(level, lengthscale, amplitude, lobs, (0, level.interior[0]), (0, level.nx))
        q = assemble_periodic(st)
        res.setup_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        x = spla.spsolve(q.tocsc(), st.rhs.ravel(), permc_spec="MMD_AT_PLUS_A")
        anomaly = x.reshape(st.diag.shape)
        res.solve_seconds = res.compute_seconds = time.perf_counter() - t0
        res.status, res.residual = CONVERGED, scaled_residual(q, st, anomaly)
        res.observations = len(lobs.iy)
        log.info(
            "exact (sphere) on rank 0: residual %.3e (set-up %.2f s, solve %.2f s)",
            res.residual,
            res.setup_seconds,
            res.solve_seconds,
        )
    res = comm.bcast(res if comm.Get_rank() == 0 else None, root=0)
    return [res], anomaly


def _guard(comm: Any, fn: Callable[[], int]) -> int:
    """Turn expected failures into a message and an exit code, on every rank alike."""
    from mpda_dist.config import ConfigError
    from mpda_dist.decomposition import DecompositionError

    try:
        return fn()
    except RunError as exc:
        if comm.Get_rank() == 0:
            log.error("error: %s", exc)
        return exc.code
    except (ConfigError, DecompositionError) as exc:
        if comm.Get_rank() == 0:
            sys.stderr.write(f"error: {exc}\n")
        return EXIT_INPUT
    except KeyboardInterrupt:  # Ctrl-C: every rank may not have it, so end them all
        runtime.end_interrupted()
        raise  # (it does not return)


def _start() -> Any:
    """``runtime.start`` with a launch mistake, or a bad value of one of the package's
    environment variables, reported as an input error (one line, exit 2)."""
    comm = runtime.start_checked()  # (the command has started it; $MPDA_MALLOC)
    try:
        with runtime.gc_paused():  # $MPDA_GC
            from mpda_dist import kernel, lowering, mlir_contexts, programs  # (JAX's env is set)
        runtime.settle_gc()  # before any program is traced

        programs.compile_threads()  # $MPDA_COMPILE_THREADS
        mlir_contexts.mode()  # $MPDA_MLIR_CONTEXTS
        lowering.requested()  # $MPDA_LOWER_PROCESSES
        if os.environ.get(kernel.FORM_ENV, "").strip():
            kernel.default_form()
        return comm
    except ValueError as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise SystemExit(EXIT_INPUT) from None


def run_from_cli(
    config_path: str | None,
    output: str | None,
    overrides: Sequence[str] = (),
    resume: str | None = None,
) -> int:
    comm = _start()
    _setup_logging(comm)

    def main() -> int:
        from mpda_dist.config import BUNDLED_DEMO, load_config
        from mpda_dist.decomposition import DecompositionError

        cfg = load_config(config_path, overrides)
        _setup_logging(comm, cfg.logging.level, cfg.logging.per_rank)
        try:
            return execute(comm, cfg, output, resume, last=True, config_path=config_path)
        except DecompositionError as exc:  # name where the grids came from, as config errors do
            keys = ("decomposition.process_grid", "grid.nx", "grid.ny")
            sets = [f"--set {t}" for t in overrides if t.split("=", 1)[0].strip() in keys]
            where = ", ".join([os.fspath(config_path or BUNDLED_DEMO), *sets])
            raise DecompositionError(f"{where}: {exc}") from None

    return _guard(comm, main)


def simulate_from_cli(config_path: str | None, output: str, overrides: Sequence[str] = ()) -> int:
    """``mpda simulate``: write a synthetic truth and its observations (rank 0)."""
    comm = _start()
    _setup_logging(comm)

    def main() -> int:
        from mpda_dist import io
        from mpda_dist.config import load_config

        cfg = load_config(config_path, overrides)
        if cfg.observations.synthetic is None:
            raise RunError("mpda simulate needs observations.synthetic in the config")

        def write() -> None:
            _check_paths(cfg, output, None, config_path, checkpoint=False)
            io.check_writable(output)
            # The file holds the noise the values were drawn with; observations.noise,
            # an assumed error, is applied when the file is solved.
            drawn = replace(cfg, observations=replace(cfg.observations, noise=None))
            p = build_problem(drawn)
            obs = p.observations
            gx, gy = grid_coordinates(cfg)
            io.write_problem(
                output,
                truth=p.truth,
                x=gx,
                y=gy,
                observations={"x": obs.x, "y": obs.y, "value": obs.value, "noise": obs.noise},
                background=p.background,
            )
            log.info(
                "wrote %s: %d observations on a %d x %d grid",
                output,
                len(obs),
                p.shape[1],
                p.shape[0],
            )

        on_root(comm, write)
        return EXIT_OK

    return _guard(comm, main)
