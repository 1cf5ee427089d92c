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
from dataclasses import asdict, dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from mpi4py import MPI

from mpda_dist import kernel
from mpda_dist.decomposition import Decomposition, agglomerated_size, auto_grid, check_grid
from mpda_dist.exchange import HaloExchange, allreduce_sum
from mpda_dist.halo import field_layout, message_layout
from mpda_dist.multigrid import Level, prolong, prolong_mean
from mpda_dist.observations import NodeObservations
from mpda_dist.stencil import build

log = logging.getLogger("mpda_dist")

CONVERGED, CAPPED, DIVERGED = "converged", "max_iterations", "diverged"
INTERRUPTED = "interrupted"  # a signal asked for a checkpoint and a stop


@dataclass(frozen=True)
class Settings:
    """What the loop needs from ``solver`` config (see config.SolverConfig)."""

    c: float = 10.0
    damping: float = 0.6
    momentum: float = 0.0
    stopping: str = "residual"
    tol: float = 1e-5
    check_every: int = 50
    max_iterations: int = 10000
    dtype: str = "float32"
    mode: str = "async"
    every: int = 1
    max_staleness: int = 4
    divergence_factor: float = 1e4
    heartbeat_seconds: float = 10.0
    prolong: str = "mean"  # "mean": b from the interpolated mean; "messages": copy b


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


class _Compiled:
    """Ahead-of-time compiled kernels, so compile time is measured apart from solving."""

    def __init__(self) -> None:
        self.cache: dict[Any, Any] = {}
        self.seconds = 0.0

    def __call__(self, fn: Any, key: Any, *args: Any, **static: Any) -> Any:
        k = (fn, key, tuple(sorted(static.items())))
        if k not in self.cache:
            t0 = time.perf_counter()
            self.cache[k] = fn.lower(*args, **static).compile()
            self.seconds += time.perf_counter() - t0
        return self.cache[k]


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
) -> tuple[jax.Array, jax.Array]:
    """Iterate one level to its stopping rule; updates ``res`` in place.

    ``start`` (a :class:`checkpoint.State`) continues a level from a checkpoint;
    ``saver(it, a, b, b_prev, best, delta0)`` is called on every rank when the
    global reduction says a checkpoint is due (``requests``: this rank's triggers).
    """
    comm = decomp.comm
    npdt = np.dtype(s.dtype)
    by, bx = decomp.shape
    mex = HaloExchange(decomp, message_layout(by, bx), npdt, tag=100)
    fex = HaloExchange(decomp, field_layout(by, bx), npdt, tag=200)
    p = kernel.Params(s.c, s.damping)
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
    halo = jnp.asarray(mex.edge)
    frame_edge = jnp.asarray(fex.edge)
    jit = _Compiled()
    bp = b.copy() if s.momentum else jnp.zeros((0,), b.dtype)
    if start is not None and start.b_prev is not None and s.momentum:
        bp = jnp.asarray(start.b_prev)

    t_start = time.perf_counter()
    if neighbours:
        init = jit(kernel.initial_cavities, "init", a, b, op, p)
        halo = jnp.asarray(mex.exchange(np.asarray(init(a, b, op, p))))
    it, best, delta0 = 0, math.inf, None
    if start is not None:
        it, best, delta0 = start.iteration, start.best, start.delta0
    last_beat = time.perf_counter()
    while True:
        n = min(chunk, s.max_iterations - it)
        if n <= 0:  # resumed at or beyond this run's solver.max_iterations
            res.iterations = it
            res.status = CAPPED
            break
        step = jit(
            kernel.iterate,
            n,
            a,
            b,
            bp,
            op,
            halo,
            p,
            n=n,
            momentum=s.momentum,
            delta=s.stopping == "delta",
        )
        t0 = time.perf_counter()
        a, b, bp, out, d = step(a, b, bp, op, halo, p)
        it += n
        if neighbours:
            out_host = np.asarray(out)  # waits for the device
            t1 = time.perf_counter()
            res.compute_seconds += t1 - t0
            mex.post(out_host)
            new = mex.poll(pending)
            if new is not None:
                halo = jnp.asarray(new)
        if it % check and it < s.max_iterations:
            continue
        t0 = time.perf_counter()
        mean = jit(kernel.marginal_mean, "mean", a, b, op, p)
        mu, frame_out = mean(a, b, op, p)
        frame = jnp.asarray(fex.exchange(np.asarray(frame_out))) if neighbours else frame_edge
        rsq = jit(kernel.residual_sq, "rsq", mu, frame, op)
        flags = requests.flags(decomp.rank == 0) if requests is not None else (0.0, 0.0)
        local = np.concatenate(
            [np.asarray(rsq(mu, frame, op), np.float64), np.asarray(d, np.float64), flags]
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
        best = min(best, rel)
        if s.stopping == "residual":
            done = rel < s.tol
        else:
            delta0 = delta if delta0 is None else delta0
            done = it > check and delta <= 1e-4 * delta0
        if done:
            res.status = CONVERGED
            break
        if it >= s.max_iterations:
            res.status = CAPPED
            break
        if tot[4] > 0 and saver is not None:
            saver(it, a, b, bp if s.momentum else None, best, delta0)
            if requests is not None:
                requests.last = time.monotonic()
        if tot[5] > 0:
            res.status = INTERRUPTED
            break
        if decomp.rank == 0 and time.perf_counter() - last_beat > s.heartbeat_seconds:
            last_beat = time.perf_counter()
            log.info("  ... iteration %d, residual %.3e", it, rel)
    mex.drain()
    res.exchange_seconds = mex.wait_seconds + fex.wait_seconds
    res.bytes_sent = mex.bytes_sent
    res.compile_seconds = jit.seconds
    res.solve_seconds = time.perf_counter() - t_start - jit.seconds
    return a, b


def _b_from_mean(decomp: Decomposition, op: kernel.Operator, whole_mean: Any, s: Settings) -> Any:
    """Scatter a prolonged mean and turn it into this block's starting ``b`` messages."""
    m = jnp.asarray(decomp.scatter(whole_mean, (), np.dtype(s.dtype)))
    fex = HaloExchange(decomp, field_layout(*decomp.shape), np.dtype(s.dtype), tag=400)
    frame = fex.exchange(np.asarray(kernel.pack_frame(m)))
    return np.asarray(kernel.messages_from_mean(m, jnp.asarray(frame), op, s.c))


def _level_comm(comm: Any, members: int) -> Any:
    sub = comm.Split(0 if comm.Get_rank() < members else MPI.UNDEFINED, comm.Get_rank())
    return sub


def solve(
    comm: Any,
    levels: list[Level],
    nodes: NodeObservations,
    lengthscale: float,
    amplitude: float,
    s: Settings,
    process_grid: tuple[int, int] | None = None,
    agglomerate_below: int = 32,
    resume: Any = None,
    checkpoint_path: str | None = None,
    requests: Any = None,
    config_text: str = "",
    periodic: tuple[bool, bool] | None = None,
) -> SolveResult:
    """Multigrid message passing on every rank of ``comm``; ``levels`` coarse → fine.

    ``process_grid`` is ``(Px, Py)`` for the target level (None: automatic).
    ``periodic`` is the ``(y, x)`` periodicity of the process grid (None: each level's
    own, :attr:`Level.periodic`: x periodic on the sphere, nothing on the rectangle).
    ``resume`` (a :class:`checkpoint.State`, on rank 0; None elsewhere) continues a
    checkpointed run; ``checkpoint_path`` and ``requests`` enable writing them.
    """
    from mpda_dist import checkpoint

    size, rank = comm.Get_size(), comm.Get_rank()
    dtype = jnp.dtype(s.dtype)
    results: list[LevelResult] = []
    whole: tuple[np.ndarray, np.ndarray] | None = None  # rank 0: previous level's messages
    anomaly = None
    start_level = comm.bcast(resume.level if resume is not None else 0, root=0)
    if rank == 0 and resume is not None:
        results = [LevelResult(**_tuples(d)) for d in resume.finished]
    for li, level in enumerate(levels):
        if li < start_level:
            continue
        final = li == len(levels) - 1
        if final and process_grid is not None:
            members, grid = size, (process_grid[1], process_grid[0])
            check_grid(grid, size, level.interior)
        else:
            members = agglomerated_size(level.interior, size, agglomerate_below)
            members = comm.bcast(members if rank == 0 else None, root=0)
            grid = auto_grid(members, level.interior)
        lobs = nodes.at_level(level.stride, level.interior, level.periodic_x)
        res = LevelResult(
            (level.ny, level.nx), members, (grid[1], grid[0]), observations=len(lobs.iy)
        )
        sub = _level_comm(comm, members)
        if sub != MPI.COMM_NULL:
            decomp = Decomposition(
                sub, level.interior, grid, level.periodic if periodic is None else periodic
            )
            st = build(level, lengthscale, amplitude, lobs, *decomp.extent)
            op = kernel.Operator(*(jnp.asarray(v, dtype) for v in (st.diag, st.weights, st.rhs)))
            start = None
            if li == start_level and sub.bcast(resume is not None, root=0):
                # Continue exactly: the checkpoint's whole arrays, scattered afresh.
                a0 = decomp.scatter(resume.a if rank == 0 else None, (12,), dtype)
                b0 = decomp.scatter(resume.b if rank == 0 else None, (12,), dtype)
                has_bp = sub.bcast(rank == 0 and resume.b_prev is not None, root=0)
                bp = (
                    decomp.scatter(resume.b_prev if rank == 0 else None, (12,), dtype)
                    if has_bp
                    else None
                )
                meta = (resume.iteration, resume.best, resume.delta0) if rank == 0 else None
                it0, best0, d0 = sub.bcast(meta, root=0)
                start = checkpoint.State(li, it0, a0, b0, bp, best0, d0)
            elif whole is None and li == 0:
                a0 = np.zeros((12,) + decomp.shape, dtype)
                b0 = np.full((12,) + decomp.shape, 1e-8, dtype)
            else:
                a0 = decomp.scatter(whole[0] if whole else None, (12,), dtype)
                mask = st.weights != 0  # edges that do not exist at this level carry nothing
                a0 = a0 * mask
                if s.prolong == "mean":
                    b0 = _b_from_mean(decomp, op, whole[1] if whole else None, s)
                else:
                    b0 = decomp.scatter(whole[1] if whole else None, (12,), dtype) * mask
            if rank == 0:
                log.info(
                    "level %d/%d: %d x %d points, %d observations, %d rank(s) as %d x %d",
                    li + 1,
                    len(levels),
                    level.nx,
                    level.ny,
                    res.observations,
                    members,
                    res.process_grid[0],
                    res.process_grid[1],
                )
            saver = None
            if checkpoint_path is not None:

                def saver(it, a, b, bp, best, delta0, li=li, decomp=decomp):
                    ga = decomp.gather(np.asarray(a))
                    gb = decomp.gather(np.asarray(b))
                    gp = decomp.gather(np.asarray(bp)) if bp is not None else None
                    if decomp.rank == 0:
                        done = [r.summary() for r in results]
                        state = checkpoint.State(li, it, ga, gb, gp, best, delta0, done)
                        checkpoint.write(checkpoint_path, state, config_text)
                        log.info(
                            "checkpoint: level %d, iteration %d -> %s", li + 1, it, checkpoint_path
                        )

            a, b = solve_level(
                decomp,
                op,
                jnp.asarray(a0),
                jnp.asarray(b0),
                s,
                res,
                start=start,
                saver=saver,
                requests=requests,
            )
            if final:
                mu, _ = kernel.marginal_mean(a, b, op, kernel.Params(s.c, s.damping))
                anomaly = decomp.gather(np.asarray(mu, np.float64))
            elif res.status not in (DIVERGED, INTERRUPTED):
                ga = decomp.gather(np.asarray(a))
                if s.prolong == "mean":
                    mu, _ = kernel.marginal_mean(a, b, op, kernel.Params(s.c, s.damping))
                    gb = decomp.gather(np.asarray(mu, np.float64))
                else:
                    gb = decomp.gather(np.asarray(b))
                if rank == 0:
                    nxt = levels[li + 1].interior
                    fine_b = prolong_mean(gb, nxt) if s.prolong == "mean" else prolong(gb, nxt, 1.0)
                    whole = (prolong(ga, nxt, 1.0), fine_b)
            decomp.free()
            sub.Free()
        res = comm.bcast(res if rank == 0 else None, root=0)
        results.append(res)
        if rank == 0:
            log.info(
                "level %d/%d: %s after %d iterations, residual %.3e (solve %.2f s, compile %.2f s)",
                li + 1,
                len(levels),
                res.status,
                res.iterations,
                res.residual,
                res.solve_seconds,
                res.compile_seconds,
            )
        if res.status in (DIVERGED, INTERRUPTED):
            break
    return SolveResult(results, anomaly)


def _tuples(d: dict) -> dict:
    """A level summary read back from JSON (lists where the dataclass has tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
