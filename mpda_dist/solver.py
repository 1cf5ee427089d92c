"""The per-rank message-passing loop: iterate, exchange, check convergence, per level.

Every rank runs :func:`solve`; a single process is a 1 × 1 process grid on the same
path.  Rank 0 holds the level schedule and the whole-grid messages between levels
(it prolongs them and scatters the next level's start), and receives the mean.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mpda_dist import anderson, kernel
from mpda_dist.decomposition import Decomposition, check_grid
from mpda_dist.exchange import HaloExchange, allreduce_max, allreduce_sum
from mpda_dist.halo import field_layout, message_layout
from mpda_dist.multigrid import Level
from mpda_dist.observations import NodeObservations
from mpda_dist.programs import Programs, add, on_device, zeros

log = logging.getLogger("mpda_dist")

CONVERGED, CAPPED, DIVERGED = "converged", "max_iterations", "diverged"
STALLED = "stalled"  # the residual rule: no progress for stall_checks checks, above tol
STAGNANT_ITERATIONS = 500  # at least this many iterations without a 10 % fall, too
STAGNANT_ULPS = 1000  # ... and only below this many units of rounding (float32: 1.2e-4)
STALL = 5  # δ rule: checks without a new low of δ (1 % under the last) that count as converged
FREEZE_CAP = 2000  # most a-only iterations before falling back to the coupled update
UNFREEZE_AFTER = 10  # checks without a 10 % fall of the residual before a moves again
FREEZE_CHUNK = 10  # a-only iterations per call while the precisions converge
INTERRUPTED = "interrupted"  # a signal asked for a checkpoint and a stop


@dataclass
class Stall:
    """Checks in a row since ``value`` last fell below ``fall`` times its value at the
    previous such fall: a slow but steady fall resets it now and then, a floor never."""

    fall: float
    ref: float = math.inf
    checks: int = 0

    def update(self, value: float) -> int:
        if value < self.fall * self.ref:
            self.ref, self.checks = value, 0
        else:
            self.checks += 1
        return self.checks


@dataclass(frozen=True)
class Settings:
    """What the loop needs from ``solver`` config (see config.SolverConfig).  ``tol``
    None: the config's default for the stopping rule and ``dtype`` (1e-5 in float32,
    1e-10 in float64, 1e-4 for ``stopping="delta"``)."""

    c: float = 10.0
    damping: float = 0.6
    momentum: float = 0.0
    stopping: str = "residual"
    tol: float | None = None  # (a float once made: __post_init__)
    check_every: int = 10
    max_iterations: int = 10000
    dtype: str = "float32"
    mode: str = "async"
    every: int = 1
    max_staleness: int = 1
    divergence_factor: float = 1e4
    heartbeat_seconds: float = 10.0
    freeze_precisions: bool = True  # iterate a alone to its fixed point, then b alone
    cycle: str = "fas"  # "fas": coarse-grid corrections at every check; "nested": starts only
    smoothing: int = 20  # iterations per visit of a coarser level in a correction
    anderson: int = 2  # check means mixed per extrapolation (anderson.py; 0: off)
    stall_checks: int = 30  # checks without a 10 % fall near rounding: stalled (0: never)

    def __post_init__(self) -> None:
        if self.tol is None:
            from mpda_dist.config import DEFAULT_DELTA_TOL, DEFAULT_TOL

            tol = DEFAULT_DELTA_TOL if self.stopping == "delta" else DEFAULT_TOL[self.dtype]
            object.__setattr__(self, "tol", tol)


@dataclass
class LevelResult:
    """Outcome of one level (identical on every rank that took part)."""

    shape: tuple[int, int]  # (ny, nx) points including the boundary
    ranks: int
    process_grid: tuple[int, int]  # (Px, Py)
    status: str = CAPPED
    iterations: int = 0
    residual: float = math.inf
    delta: float = math.nan
    observations: int = 0
    compile_seconds: float = 0.0
    solve_seconds: float = 0.0
    compute_seconds: float = 0.0
    exchange_seconds: float = 0.0
    reduce_seconds: float = 0.0
    bytes_sent: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)
    # Baselines (krylov.py, baselines.py): global reductions and halo exchanges per
    # solve, and set-up time (stencil, assembly, AMG hierarchy) apart from solve time.
    reductions: int = 0
    halo_exchanges: int = 0
    setup_seconds: float = 0.0
    # Multigrid: "exact" for the coarsest level (direct solve on rank 0), coarse-grid
    # corrections made by this level, and iterations this level ran inside the
    # corrections of finer levels.
    solver: str = "mp"
    corrections: int = 0
    cycle_iterations: int = 0
    correction_seconds: float = 0.0  # in this level's corrections (part of solve_seconds)
    precision_iterations: int = 0  # a-only iterations before a was frozen (not in iterations)
    unfrozen_at: int = 0  # iteration where a stalled residual made a move again (0: never)
    # iterations of a first try that diverged on lagged halos, before the level was solved
    # again with exchanges at every iteration (0: no second try)
    retried_after: int = 0
    extrapolations: int = 0  # checks whose mean moved to the Anderson mix (anderson.py)
    # The rule that ended a converged level: "residual" (scaled residual < tol),
    # "delta" (δ ≤ tol δ₀), "delta_stall" (δ with no new low in STALL checks) or
    # "direct" (a direct solve); "" while not converged.
    stopped_by: str = ""

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("history")
        return d


@dataclass
class SolveResult:
    levels: list[LevelResult]
    anomaly: np.ndarray | None  # interior (n, m) posterior mean anomaly, rank 0 only

    @property
    def status(self) -> str:
        return self.levels[-1].status


def solve_level(
    decomp: Decomposition,
    op: kernel.Operator,
    a: jax.Array,
    b: jax.Array,
    s: Settings,
    res: LevelResult,
    start: Any = None,
    saver: Callable[..., None] | None = None,
    requests: Any = None,
    correct: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    programs: Programs | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Iterate one level to its stopping rule; updates ``res`` in place.

    ``start`` (a :class:`checkpoint.State`) continues a level from a checkpoint;
    ``saver(it, a, b, b_prev, best, delta0, frozen, history)`` is called on every rank when the
    global reduction says a checkpoint is due (``requests``: this rank's triggers); it
    returns why the checkpoint could not be written (None: written), and a stop
    requested by a signal then raises :class:`CheckpointError`.
    ``correct(mean, residual)`` (multigrid, :mod:`mpda_dist.cycle`) returns a field to
    add to the mean at every check that does not stop: the ``b`` messages shift by it.
    ``programs``: the compiled programs shared with the other levels (None: this
    level's own).
    Returns ``a, b`` and ``b_prev``.
    """
    comm = decomp.comm
    npdt = np.dtype(s.dtype)
    by, bx = decomp.shape
    mex = HaloExchange(decomp, message_layout(by, bx), npdt, tag=100)
    fex = HaloExchange(decomp, field_layout(by, bx), npdt, tag=200)
    p = kernel.device_params(s.c, s.damping)
    hnorm2, nmsg = allreduce_sum(
        comm,
        np.array(
            [
                float(
                    np.sum((np.asarray(op.rhs, np.float64) / np.asarray(op.diag, np.float64)) ** 2)
                ),
                12.0 * by * bx,
            ]
        ),
    )
    hnorm2 = hnorm2 if hnorm2 > 0 else 1.0
    neighbours = decomp.has_neighbours
    # Between exchanges the kernel runs `chunk` iterations inside one jitted loop.
    chunk = s.every if neighbours else s.check_every
    check = max(1, math.ceil(s.check_every / chunk)) * chunk
    pending = 0 if s.mode == "sync" else s.max_staleness
    halo = jax.device_put(mex.edge)
    frame_edge = jax.device_put(fex.frame_edge())
    jit = programs if programs is not None else Programs()
    compiled_before = jit.seconds
    bp = on_device(b) if s.momentum else zeros((0,), b.dtype)
    if start is not None and start.b_prev is not None and s.momentum:
        bp = jax.device_put(start.b_prev)

    t_start = time.perf_counter()
    if neighbours:
        init = jit(kernel.initial_cavities, a, b, op, p)
        # Halos stay host arrays: the compiled program's call moves them to the device
        # (≈ 8 µs, in C++), jax.device_put costs 40 µs and more of Python per call.
        halo = mex.exchange(np.asarray(init(a, b, op, p)))
    g = None
    if s.freeze_precisions:
        done_before = start is not None and start.frozen
        a, halo, g, res.precision_iterations = _freeze(
            decomp, mex, op, a, b, halo, p, jit, already=done_before
        )
    it, best, delta0 = 0, math.inf, None
    # a residual with no 10 % fall in UNFREEZE_AFTER checks; a δ with no new low
    resid_stall, delta_stall = Stall(0.9), Stall(0.99)
    floor = STAGNANT_ULPS * float(np.finfo(npdt).eps)  # a residual this small may stall
    acc = anderson.Extrapolation(s.anderson, (by, bx), npdt) if s.anderson else None
    if acc is not None and start is not None:
        acc.restore(
            *(start.history or (None, None)),
            start.history_count,
            start.history_last,
            start.history_mixed_at,
            start.history_failed,
        )
    if start is not None:
        it, best, delta0 = start.iteration, start.best, start.delta0
    # Checks every `check` iterations from where this run took the level up: a
    # checkpoint of another rank count (another `chunk`) or `check_every` need not sit
    # on a multiple of this run's `check`, and then no check would ever come (no
    # stopping rule, corrections or signals until max_iterations).
    it0 = it
    last_beat = time.perf_counter()
    while True:
        n = min(chunk, s.max_iterations - it)
        if n <= 0:  # resumed at or beyond this run's solver.max_iterations
            res.iterations = it
            res.status = CAPPED
            break
        fn, args = kernel.update_call(a, b, bp, g, op, halo, p, n)
        step = jit(
            fn,
            *args,
            n=n,
            momentum=s.momentum,
            delta=s.stopping == "delta",
            neighbours=neighbours,
        )
        t0 = time.perf_counter()
        a, b, bp, out, d = step(*args)
        it += n
        if neighbours:
            out_host = np.asarray(out)  # waits for the device
            t1 = time.perf_counter()
            res.compute_seconds += t1 - t0
            mex.post(out_host)
            new = mex.poll(pending)
            if new is not None:
                halo = new
        if (it - it0) % check and it < s.max_iterations:
            continue
        t0 = time.perf_counter()
        mean = jit(kernel.marginal_mean, a, b, op, p, neighbours=neighbours)
        mu, frame_out = mean(a, b, op, p)
        frame = jax.device_put(fex.exchange(np.asarray(frame_out))) if neighbours else frame_edge
        flags = requests.flags(decomp.rank == 0) if requests is not None else (0.0, 0.0)
        if acc is None:
            sums = np.asarray(jit(kernel.residual_sq, mu, frame, op)(mu, frame, op))
        else:
            sums = acc.check(mu, frame, op)
        # [Σ s², bad, δ_a, δ_b, checkpoint, stop, the extrapolation's sums…]
        local = np.concatenate(
            [sums[:2], np.asarray(d, np.float64), flags, np.asarray(sums[2:], np.float64)]
        )
        if not neighbours:
            res.compute_seconds += time.perf_counter() - t0
        t1 = time.perf_counter()
        tot = allreduce_sum(comm, local)
        res.reduce_seconds += time.perf_counter() - t1
        rel = math.sqrt(tot[0] / hnorm2) if np.isfinite(tot[0]) else math.inf
        delta = max(tot[2], tot[3]) / nmsg
        res.iterations, res.residual, res.delta = it, rel, delta
        res.history.append((it, rel))
        if tot[1] > 0 or not math.isfinite(rel) or rel > s.divergence_factor * best:
            res.status = DIVERGED
            break
        stalled = resid_stall.update(rel) >= UNFREEZE_AFTER
        best = min(best, rel)
        if g is not None and stalled:
            # Safety net: a frozen a that is not quite at its fixed point leaves the
            # residual on a floor; the coupled update moves a again.
            g = None
            res.unfrozen_at = it
            if acc is not None:
                acc.reset()  # the iteration map changed
            if decomp.rank == 0:
                log.info("  residual stalled at %.3e: iterating a and b together again", rel)
        if s.stopping == "residual":
            done = rel < s.tol
            # No 10 % fall for long, with a moving (the safety net has run), near the
            # dtype's rounding: its floor lies above tol.  A level gives up instead of
            # running to max_iterations; the final level's is not converged (exit 4).
            # (Far above rounding, a level that stops falling may be diverging slowly:
            # left to the divergence check and the lockstep retry.)
            stuck = resid_stall.checks * check >= STAGNANT_ITERATIONS and rel < floor
            stuck = stuck and 0 < s.stall_checks <= resid_stall.checks
            if not done and g is None and stuck:
                res.status = STALLED
                break
        else:
            delta0 = delta if delta0 is None else delta0
            # The paper's rule, δ ≤ tol δ₀ (tol 1e-4); and a stop when δ has reached no
            # new low in STALL checks: a level that starts close to its answer (from the
            # one below) has δ₀ so small that tol δ₀ lies under the dtype's rounding
            # floor, where δ wanders.  A δ that falls, however slowly, goes on.
            stall = delta_stall.update(delta)
            done = it > check and (delta <= s.tol * delta0 or stall >= STALL)
        if done:
            res.status = CONVERGED
            if s.stopping == "residual":
                res.stopped_by = "residual"
            else:
                res.stopped_by = "delta" if delta <= s.tol * delta0 else "delta_stall"
            break
        if it >= s.max_iterations:
            res.status = CAPPED
            break
        # Move the mean: to the Anderson mix of the check means, then by the coarse-grid
        # correction from there.  The b messages shift as if every sender's cavity mean
        # had moved by it.
        tc, jc = time.perf_counter(), jit.seconds
        move, x, r = None, mu, None
        gamma = acc.coefficients(tot[6:], rel, best) if acc is not None else None
        if gamma is not None:
            x, r, move = acc.mix(gamma, op.diag)
            res.extrapolations += 1
        if correct is not None:
            mex.drain()
            e = correct(x, kernel.residual(mu, frame, op) if r is None else r)
            move = e if move is None else add(move, e)
        if move is not None:
            mex.drain()
            ef = (
                jax.device_put(fex.exchange(np.asarray(kernel.outgoing_frame(move))))
                if neighbours
                else frame_edge
            )
            b, bp = kernel.shift_messages(b, bp, move, ef, op, p.c)
            if neighbours:
                halo = mex.exchange(np.asarray(init(a, b, op, p)))
        if correct is not None:
            res.corrections += 1
            # without its compile waits (they are compile_seconds, not solve_seconds)
            res.correction_seconds += time.perf_counter() - tc - (jit.seconds - jc)
        unsaved = None
        if tot[4] > 0 and saver is not None:
            unsaved = saver(it, a, b, bp if s.momentum else None, best, delta0, g is not None, acc)
            if requests is not None:
                requests.last = time.monotonic()
        if tot[5] > 0:
            if unsaved:
                raise CheckpointError(unsaved)
            res.status = INTERRUPTED
            break
        if decomp.rank == 0 and time.perf_counter() - last_beat > s.heartbeat_seconds:
            last_beat = time.perf_counter()
            log.info("  ... iteration %d, residual %.3e", it, rel)
    mex.drain()
    res.exchange_seconds = mex.wait_seconds + fex.wait_seconds
    res.bytes_sent = mex.bytes_sent
    res.compile_seconds = jit.seconds - compiled_before
    res.solve_seconds = time.perf_counter() - t_start - res.compile_seconds
    return a, b, bp, g


def _freeze(
    decomp: Decomposition,
    mex: HaloExchange,
    op: kernel.Operator,
    a: jax.Array,
    b: jax.Array,
    halo: jax.Array | np.ndarray,
    p: kernel.Params,
    jit: Programs,
    already: bool = False,
) -> tuple[jax.Array, jax.Array | np.ndarray, jax.Array | None, int]:
    """Iterate ``a`` alone (synchronous exchange every ``n`` iterations) until no rank's
    ``a`` changes by more than 16 ulp relative per iteration, on average over a call of
    ``n``; then the constant gains for :func:`kernel.iterate_b`.  While ``a`` contracts,
    the changes fall from one iteration to the next, so the average bounds the last
    one.  Returns ``a``, the halo, the gains (None: not converged in FREEZE_CAP
    iterations, keep the coupled update) and the a-only iterations.  ``already``:
    ``a`` is frozen (resumed)."""
    n = FREEZE_CHUNK
    tol = n * 16 * float(jnp.finfo(a.dtype).eps)
    its = 0
    nb = decomp.has_neighbours
    while not already:
        step = jit(kernel.iterate_a, a, b, op, halo, p, n=n, neighbours=nb)
        a, out, change = step(a, b, op, halo, p)
        its += n
        if nb:
            halo = mex.exchange(np.asarray(out))
        if allreduce_max(decomp.comm, float(change)) <= tol:
            break
        if its >= FREEZE_CAP:
            return a, halo, None, its
    g = jit(kernel.gains, a, op, halo, p, neighbours=nb)(a, op, halo, p)
    return a, halo, g, its


def _prefetch(hier: Any, s: Settings, levels: range) -> None:
    """Start compiling the message-passing programs of ``levels`` (coarse first) in the
    background (:meth:`Programs.prefetch`): the calls that :func:`solve_level`,
    :func:`_freeze` and the coarse visits (:meth:`cycle.Smoother.smooth`) make, from
    the shapes alone.  What is not prefetched compiles at its first call as before."""
    p = kernel.device_params(s.c, s.damping)
    for i in levels:  # in the order of use: the start, the level's loop, its corrections
        if i > 0:
            hier.prefetch_start(i)
        op, shape = hier.op_spec(i), hier.decomps[i].shape
        msg = jax.ShapeDtypeStruct((12, *shape), hier.dtype)
        bp = msg if s.momentum else jax.ShapeDtypeStruct((0,), hier.dtype)
        halo = jax.ShapeDtypeStruct((message_layout(*shape).in_offsets[-1],), hier.dtype)
        neighbours = hier.decomps[i].has_neighbours
        # (iterations per call, δ rule): the level's loop first; below the finest level
        # also the coarse visits of the finer levels' corrections (Smoother.smooth)
        calls = [(s.every if neighbours else s.check_every, s.stopping == "delta")]
        if s.cycle == "fas" and i < len(hier.levels) - 1:
            chunk = 1 if neighbours else s.check_every
            calls += [(chunk, False)] + (
                [(s.smoothing % chunk, False)] if s.smoothing % chunk else []
            )
        field = jax.ShapeDtypeStruct(hier.decomps[i].shape, hier.dtype)
        frame = jax.ShapeDtypeStruct(hier.frames[i].edge.shape, hier.dtype)
        # the start's first program (the messages of the mean from the level below)
        hier.programs.prefetch(kernel.shift_messages, msg, bp, field, frame, op, p.c)
        if neighbours:  # the first halo, and the fields' frames for the neighbours
            hier.programs.prefetch(kernel.initial_cavities, msg, msg, op, p)
            hier.programs.prefetch(kernel.outgoing_frame, field)
        if s.freeze_precisions:
            hier.programs.prefetch(
                kernel.iterate_a, msg, msg, op, halo, p, n=FREEZE_CHUNK, neighbours=neighbours
            )
            hier.programs.prefetch(kernel.gains, msg, op, halo, p, neighbours=neighbours)
        g = msg if s.freeze_precisions else None
        for n, delta in calls:  # (a repeated one is prefetched once)
            fn, args = kernel.update_call(msg, msg, bp, g, op, halo, p, n)
            hier.programs.prefetch(
                fn, *args, n=n, momentum=s.momentum, delta=delta, neighbours=neighbours
            )
        hier.programs.prefetch(kernel.marginal_mean, msg, msg, op, p, neighbours=neighbours)
        hist = jax.ShapeDtypeStruct((s.anderson + 1, *field.shape), hier.dtype)
        if s.anderson:
            hier.programs.prefetch(anderson.record, hist, hist, field, frame, op)
        else:
            hier.programs.prefetch(kernel.residual_sq, field, frame, op)
        hier.programs.prefetch(kernel.residual, field, frame, op)
        if s.anderson:
            gamma = jax.ShapeDtypeStruct((s.anderson,), hier.dtype)
            hier.programs.prefetch(anderson.mixed, hist, hist, gamma, op.diag)
            hier.programs.prefetch(add, field, field)
        if s.cycle == "fas":
            hier.prefetch_corrections(i)


class Prepared:
    """A solve's hierarchy laid out and its programs compiling (:func:`prepare`), before
    the observations are known; :func:`solve` builds the operators and runs it.  Close
    it (:meth:`close`, or ``with``) if it is not solved: the queued compiles stop."""

    def __init__(self, hier: Any, programs: Programs, key: tuple) -> None:
        self.hier, self.programs, self.key = hier, programs, key
        self.used = False

    def close(self) -> None:
        """Stop the queued compiles and free the hierarchy (its communicators; on every
        rank, as :func:`solve` ends or fails there).  Once; later calls do nothing."""
        self.programs.close()
        hier, self.hier = self.hier, None
        if hier is not None:
            hier.free()

    def __enter__(self) -> Prepared:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def prepare(
    comm: Any,
    levels: list[Level],
    s: Settings,
    process_grid: tuple[int, int] | None = None,
    periodic: tuple[bool, bool] | None = None,
) -> Prepared:
    """Lay out the hierarchy of :func:`solve` for these levels, settings and process
    grid, and start compiling its programs in the background: their shapes follow from
    the grid, not from the observations, so they compile while the caller reads and
    builds those (``mpda run`` does).  Collective over ``comm``; call it, like
    :func:`solve`, under the ``jax.enable_x64`` setting of ``s.dtype``.  Pass the result to
    :func:`solve` with the same arguments."""
    from mpda_dist.cycle import Hierarchy

    programs = Programs()
    grid = None
    if process_grid is not None:
        grid = (process_grid[1], process_grid[0])
        check_grid(grid, comm.Get_size(), levels[-1].interior)
    per = levels[-1].periodic if periodic is None else periodic

    def prefetch(h: Hierarchy) -> None:
        _prefetch(h, s, range(1 if len(h.levels) > 1 else 0, len(h.levels)))

    try:
        hier = Hierarchy.laid_out(comm, levels, grid, per, jnp.dtype(s.dtype), programs, prefetch)
    except BaseException:
        programs.close()
        raise
    return Prepared(hier, programs, _key(levels, s, process_grid, periodic))


def _key(*args: Any) -> tuple:
    """What a :class:`Prepared` must match: the arguments, and JAX's x64 setting (the
    frames were made in its dtype)."""
    return (*args, bool(jax.config.jax_enable_x64))


def solve(
    comm: Any,
    levels: list[Level],
    nodes: NodeObservations,
    lengthscale: float,
    amplitude: float,
    s: Settings,
    process_grid: tuple[int, int] | None = None,
    resume: Any = None,
    checkpoint_path: str | None = None,
    requests: Any = None,
    config_text: str = "",
    periodic: tuple[bool, bool] | None = None,
    prepared: Prepared | None = None,
) -> SolveResult:
    """Multigrid message passing on every rank of ``comm``; ``levels`` coarse → fine.

    The coarsest level of the hierarchy (:class:`cycle.Hierarchy`) is solved exactly;
    each finer level starts from the one below and, with ``s.cycle == "fas"``, is
    corrected from the levels below at every convergence check.
    ``process_grid`` is ``(Px, Py)`` for every level (None: automatic).
    ``periodic`` is the ``(y, x)`` periodicity of the process grid (None: the target
    level's own, :attr:`Level.periodic`: x periodic on the sphere).
    ``resume`` (a :class:`checkpoint.State`, on rank 0; None elsewhere) continues a
    checkpointed run; ``checkpoint_path`` and ``requests`` enable writing them.
    ``prepared``: the result of :func:`prepare` with the same levels, settings, process
    grid and periodicity (None: prepared here); it is closed when the solve ends.
    """
    t0 = time.perf_counter()
    if prepared is None:
        prepared = prepare(comm, levels, s, process_grid, periodic)
    elif prepared.used or prepared.key != _key(levels, s, process_grid, periodic):
        prepared.close()
        raise ValueError(
            "solve: prepared for another solve (levels, settings, process grid, "
            "periodicity or jax_enable_x64 differ), or solved already"
        )
    prepared.used = True
    # The background compiles end with the solve: an error or an interrupt does not
    # wait for the queued ones.
    with prepared:
        hier, programs = prepared.hier, prepared.programs
        size, rank = comm.Get_size(), comm.Get_rank()
        dtype = jnp.dtype(s.dtype)
        p = kernel.device_params(s.c, s.damping)
        hier.build(nodes, lengthscale, amplitude, p, s.momentum)
        for sm in hier.smoothers:  # coarse visits run the level solves' compiled calls
            sm.chunk = s.check_every
        setup = time.perf_counter() - t0
        nlev = len(hier.levels)
        resume_level = comm.bcast(resume.level if resume is not None else 0, root=0)
        why = _resume_mismatch(resume, hier) if rank == 0 and resume is not None else None
        why = comm.bcast(why, root=0)
        if why:  # on every rank alike
            raise ResumeError(why)
        results: list[LevelResult] = []
        if rank == 0 and resume is not None:
            results = [LevelResult(**_tuples(d)) for d in resume.finished]
        results = comm.bcast(results if rank == 0 else None, root=0)

        def level_result(i: int) -> LevelResult:
            lv, d = hier.levels[i], hier.decomps[i]
            pg = d.blocks.grid
            return LevelResult((lv.ny, lv.nx), size, (pg[1], pg[0]))

        mean = None
        if nlev > 1 and resume_level == 0:
            res = level_result(0)
            res.solver, res.status, res.stopped_by = "exact", CONVERGED, "direct"
            mean = hier.coarse.solve(hier.ops[0].rhs)
            res.solve_seconds, res.setup_seconds = hier.coarse.seconds, setup
            res.residual = _coarse_residual(hier, mean)
            results.append(res)
            _log_level(rank, 0, nlev, hier, res)
        first = 1 if nlev > 1 else 0
        for i in range(max(first, resume_level), nlev):
            sm, op, decomp = hier.smoothers[i], hier.ops[i], hier.decomps[i]
            res = level_result(i)
            if rank == 0:
                lv = hier.levels[i]
                log.info(
                    "level %d/%d: %d x %d points, %d rank(s) as %d x %d",
                    i + 1,
                    nlev,
                    lv.nx,
                    lv.ny,
                    size,
                    *res.process_grid,
                )
            start = None
            waited = programs.seconds  # for the programs of the start, too
            has_resume = comm.bcast(resume is not None, root=0) if i == resume_level else False
            if has_resume:
                start = _scatter_resume(hier, resume, i, dtype)
                a0, b0 = jax.device_put(start.a), jax.device_put(start.b)
            else:
                a0, b0 = _first_messages(hier, i, mean, dtype)
            correct = None
            if i > 0 and s.cycle == "fas":

                def correct(x, r, i=i):
                    return hier.correction(i, x, r, s.smoothing)

            saver = None
            if checkpoint_path is not None:

                def saver(it, a, b, bp, best, delta0, frozen, acc, i=i):
                    return _save(
                        hier,
                        checkpoint_path,
                        config_text,
                        results,
                        i,
                        it,
                        a,
                        b,
                        bp,
                        best,
                        delta0,
                        frozen,
                        acc,
                    )

            extra = dict(
                start=start, saver=saver, requests=requests, correct=correct, programs=hier.programs
            )

            # Lagged halos (exchanges every k > 1 iterations, or async ones that may be a
            # step old) can make message passing diverge where exchanging at every
            # iteration converges: strong couplings across a block border or the
            # sphere's seam (a bilinear row there, c < 0 on the sphere with several
            # ranks).  Such a level is solved once more from its start, in lockstep.
            safe = _lockstep(s) if decomp.has_neighbours else None
            warm = _warm_states(hier, i) if safe is not None else None
            a, b, bp, g = solve_level(decomp, op, a0, b0, s, res, **extra)
            if res.status == DIVERGED and safe is not None:
                if rank == 0:
                    log.warning(
                        "level %d/%d diverged with halos exchanged every %d iteration(s)%s: "
                        "solving it again from its start with exchanges at every iteration "
                        "(set solver.exchange.every: 1 and mode: sync to skip the first try)",
                        i + 1,
                        nlev,
                        s.every,
                        " (async)" if s.mode != "sync" else "",
                    )
                _restore_warm_states(hier, warm)
                if has_resume:  # from the checkpoint again (maybe one of a second try)
                    a0, b0 = jax.device_put(start.a), jax.device_put(start.b)
                else:
                    a0, b0 = _first_messages(hier, i, mean, dtype)  # (the first were donated)
                tried = res
                res = level_result(i)
                res.retried_after = tried.iterations
                a, b, bp, g = solve_level(decomp, op, a0, b0, safe, res, **extra)
            res.compile_seconds = programs.seconds - waited
            sm.a, sm.b, sm.bp, sm.g = a, b, (bp if s.momentum else zeros((0,), dtype)), g
            mean = sm.mean(op)
            results.append(res)
            _log_level(rank, i, nlev, hier, res)
            if res.status in (DIVERGED, INTERRUPTED):
                break
        for i, sm in enumerate(hier.smoothers):
            if i < len(results):
                results[i].cycle_iterations = sm.iterations
        anomaly = None
        if results[-1].status not in (DIVERGED, INTERRUPTED) and len(results) == nlev:
            anomaly = hier.decomps[-1].gather(np.asarray(mean, np.float64))
        return SolveResult(results, anomaly if rank == 0 else None)  # (closing frees hier)


def _coarse_residual(hier: Any, mean: Any) -> float:
    """The scaled residual ``‖D⁻¹(h − Q μ)‖ / ‖D⁻¹h‖`` of the coarsest level's exact
    solution ``mean`` as the finer levels receive it (in the solver's dtype), computed
    on rank 0 in float64 (the same on every rank).  Cheap: the coarsest level has at
    most ``solver.multigrid.min_size`` nodes a side."""
    from mpda_dist.baselines import assemble_periodic, scaled_residual
    from mpda_dist.stencil import BlockStencil

    d, op = hier.decomps[0], hier.ops[0]
    whole = [d.gather(np.asarray(x, np.float64)) for x in (op.diag, op.weights, op.rhs, mean)]
    rel = None
    if d.rank == 0:
        st = BlockStencil(*whole[:3])
        q = assemble_periodic(st, hier.levels[0].periodic_x)
        rel = scaled_residual(q, st, whole[3])
    return d.comm.bcast(rel, root=0)


def _log_level(rank: int, i: int, nlev: int, hier: Any, res: LevelResult) -> None:
    if rank != 0:
        return
    lv = hier.levels[i]
    if res.solver == "exact":
        log.info(
            "level %d/%d: %d x %d points, solved exactly on rank 0 (%.2f s), residual %.3e",
            i + 1,
            nlev,
            lv.nx,
            lv.ny,
            res.solve_seconds,
            res.residual,
        )
        return
    log.info(
        "level %d/%d: %s after %d iterations, %d coarse corrections, %d Anderson mixes, "
        "residual %.3e (solve %.2f s of which corrections %.2f s, compile %.2f s)",
        i + 1,
        nlev,
        res.status,
        res.iterations,
        res.corrections,
        res.extrapolations,
        res.residual,
        res.solve_seconds,
        res.correction_seconds,
        res.compile_seconds,
    )


def _save(
    hier, path, config_text, results, i, it, a, b, bp, best, delta0, frozen, acc
) -> str | None:
    """Gather this level's messages and every coarser MP level's warm state; rank 0
    writes the checkpoint.  Returns, on every rank, why it could not be written (None:
    written)."""
    from mpda_dist import checkpoint

    d = hier.decomps[i]
    error = None
    ga, gb = d.gather(np.asarray(a)), d.gather(np.asarray(b))
    gp = d.gather(np.asarray(bp)) if bp is not None else None
    hist = None
    if acc is not None and acc.count:
        hist = (d.gather(np.asarray(acc.means)), d.gather(np.asarray(acc.scaled)))
    coarse = []
    for c in range(1, i):
        sm, dc = hier.smoothers[c], hier.decomps[c]
        cp = dc.gather(np.asarray(sm.bp)) if bp is not None else None
        coarse.append((dc.gather(np.asarray(sm.a)), dc.gather(np.asarray(sm.b)), cp))
    if d.rank == 0:
        done = [r.summary() for r in results]
        state = checkpoint.State(
            i, it, ga, gb, gp, best, delta0, done, coarse, len(hier.levels), frozen,
            hist, acc.count if hist is not None else 0, acc.last if acc is not None else math.inf,
            acc.mixed_at if acc is not None else math.inf, acc.failed if acc is not None else 0,
        )  # fmt: skip
        try:
            checkpoint.write(path, state, config_text)
            log.info("checkpoint: level %d, iteration %d -> %s", i + 1, it, path)
        except OSError as exc:  # a full disk, a quota: not worth ending a solve for
            error = f"cannot write {path} ({exc})"
            log.warning("checkpoint: %s; the solve goes on", error)
    return d.comm.bcast(error, root=0)


def _first_messages(hier: Any, i: int, below: Any, dtype: Any) -> tuple[Any, Any]:
    """Level ``i``'s starting messages: from the mean ``below`` of the level below, or
    (a single level) ``a = 0`` and ``b`` a small constant."""
    if i == 0:
        shape = (12, *hier.decomps[0].shape)
        return zeros(shape, dtype), on_device(np.full(shape, 1e-8, dtype))
    return hier.start(i, below)


def _lockstep(s: Settings) -> Settings | None:
    """``s`` with halos exchanged at every iteration, synchronously; None when ``s``
    already does that."""
    if s.every == 1 and (s.mode == "sync" or s.max_staleness == 0):
        return None
    return replace(s, every=1, mode="sync")


def _warm_states(hier: Any, i: int) -> list[tuple]:
    """Copies of the coarser message-passing levels' warm messages (which level ``i``'s
    corrections continue from and update) and iteration counts, to start a second try
    from (the first try's iterations are not reported as the levels' work)."""
    return [
        (*(None if x is None else on_device(x) for x in (sm.a, sm.b, sm.bp, sm.g)), sm.iterations)
        for sm in hier.smoothers[1:i]
    ]


def _restore_warm_states(hier: Any, warm: list[tuple]) -> None:
    for sm, (a, b, bp, g, n) in zip(hier.smoothers[1:], warm, strict=False):
        sm.a, sm.b, sm.bp, sm.g, sm.iterations = a, b, bp, g, n


class ResumeError(ValueError):
    """A checkpoint that cannot continue this run (raised on every rank alike)."""


class CheckpointError(OSError):
    """A signal asked for a checkpoint and a stop, and the checkpoint could not be
    written (raised on every rank alike)."""


def _resume_mismatch(resume: Any, hier: Any) -> str | None:
    """Why the checkpoint ``resume`` cannot continue the hierarchy ``hier`` (None: it
    can): another number of levels, or messages of another shape."""
    nlev = len(hier.levels)
    again = "resume with the grid, process grid and solver.multigrid settings that wrote it"
    if resume.levels not in (0, nlev) or not 0 <= resume.level < nlev:
        if 0 < resume.levels < nlev:  # a larger min_size stops this run where that one stopped
            coarsest = hier.levels[nlev - resume.levels]
            fix = (
                f"; or stop this run's levels there too: --set solver.multigrid.min_size="
                f"{max(coarsest.ny, coarsest.nx)}"
            )
        else:
            fix = "; this run's blocks stop its levels sooner: fewer ranks, or wider blocks"
        return (
            f"the checkpoint was written with {resume.levels} multigrid levels but this run "
            f"has {nlev} (other solver.multigrid settings, or ranks whose blocks stop the "
            f"levels at another depth: a coarse block needs 4 nodes a side): {again}{fix}"
        )
    arrays = [(resume.level, "", resume.a)]
    arrays += [(c + 1, "the warm state of ", ca) for c, (ca, _, _) in enumerate(resume.coarse)]
    for i, what, arr in arrays:
        want = hier.levels[i].interior
        if i >= nlev or tuple(arr.shape[1:]) != want:
            got = f"{arr.shape[-1]} x {arr.shape[-2]}" if arr.ndim == 3 else str(arr.shape)
            return (
                f"{what}level {i + 1} holds messages for {got} interior nodes, but that level "
                f"of this run has {want[1]} x {want[0]}: {again}"
            )
    return None


def _scatter_resume(hier: Any, resume: Any, i: int, dtype: Any) -> Any:
    """This rank's part of a checkpoint (held whole by rank 0) for level ``i``; the
    coarser levels' warm states go straight into their smoothers."""
    from mpda_dist import checkpoint

    comm = hier.decomps[i].comm
    root = comm.Get_rank() == 0

    def part_lead(c: int, arr: Any, lead: int) -> Any:
        return hier.decomps[c].scatter(arr if root else None, (lead,), dtype)

    def part(c: int, arr: Any) -> Any:
        return part_lead(c, arr, 12)

    has_bp = comm.bcast(root and resume.b_prev is not None, root=0)
    frozen = comm.bcast(root and resume.frozen, root=0)
    for c in range(1, i):
        sm = hier.smoothers[c]
        ca, cb, cp = resume.coarse[c - 1] if root else (None, None, None)
        sm.a, sm.b = jax.device_put(part(c, ca)), jax.device_put(part(c, cb))
        sm.bp = jax.device_put(part(c, cp)) if has_bp else zeros((0,), dtype)
        if frozen:  # the coarse levels froze a too (their own solves ran before this one)
            nb = sm.decomp.has_neighbours
            sm.g = kernel.gains(sm.a, sm.op, sm.cavities(sm.op), sm.params, neighbours=nb)
    a0 = part(i, resume.a if root else None)
    b0 = part(i, resume.b if root else None)
    bp = part(i, resume.b_prev if root else None) if has_bp else None
    meta = None
    if root:
        meta = (
            resume.iteration,
            resume.best,
            resume.delta0,
            resume.history_count,
            resume.history_last,
            resume.history_mixed_at,
            resume.history_failed,
        )
    it0, best0, d0, hcount, hlast, hmixed, hfailed = comm.bcast(meta, root=0)
    hist = None
    if hcount:
        depth = comm.bcast(len(resume.history[0]) if root else None, root=0)
        m, s = resume.history if root else (None, None)
        hist = (part_lead(i, m, depth), part_lead(i, s, depth))
    return checkpoint.State(
        i, it0, a0, b0, bp, best0, d0, frozen=frozen, history=hist, history_count=hcount,
        history_last=hlast, history_mixed_at=hmixed, history_failed=hfailed,
    )  # fmt: skip


def _tuples(d: dict) -> dict:
    """A level summary read back from JSON (lists where the dataclass has tuples), with
    only the fields :class:`LevelResult` has."""
    names = {f.name for f in fields(LevelResult)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
