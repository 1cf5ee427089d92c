"""Distributed classical baselines on the block stencil: conjugate gradient and 3D-Var.

Both solve ``Q δ = h`` (DESIGN §1) on the same blocks and the same halo machinery as
message passing, matrix-free: every application of ``Q`` is one synchronous 2-wide halo
exchange of the vector (:class:`~mpda_dist.exchange.HaloExchange` on
:func:`~mpda_dist.halo.field_layout`) followed by :func:`mpda_dist.kernel.apply_operator`,
and every inner product is a global ``MPI_Allreduce``.  Those two counts are the
synchronisation that message passing avoids, so each solve returns them
(``LevelResult.reductions`` and ``LevelResult.halo_exchanges``; on a 1 × 1 process grid
the frame is the constant boundary and nothing is sent, but the count is the same).
Several inner products needed at the same point of an algorithm share one reduction.

Stopping (both methods; the same number message passing uses, so the comparison is fair):
the Jacobi-scaled relative residual ``‖D⁻¹(h − Qδ)‖₂ / ‖D⁻¹h‖₂ < tol`` with
``D = diag Q``.  Unscaled, the observed nodes' ``1/σ_y²`` dominates both norms (see
:func:`mpda_dist.kernel.residual_sq`).  The test first uses the residual the recursion
carries; when that says "done" the true residual is computed with one more operator
application and decides.  If it disagrees (rounding, mostly float32), the recursion is
restarted from the true residual; three restarts in a row that do not halve it mean the
dtype's floor is reached, and the solve stops with status ``stalled``.

Iterates are started from ``δ = 0``.  Arrays are this rank's block, ``(by, bx)``, y first.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from mpi4py import MPI

from mpda_dist import kernel
from mpda_dist.decomposition import Decomposition, auto_grid, check_grid
from mpda_dist.exchange import HaloExchange, allreduce_sum
from mpda_dist.halo import field_layout
from mpda_dist.programs import Programs, jit, on_device, zeros
from mpda_dist.solver import CAPPED, CONVERGED, DIVERGED, STALLED, LevelResult

log = logging.getLogger("mpda_dist")

METHODS = ("cg", "3dvar")
_STRIKES = 3  # restarts in a row without halving the true residual: stagnation
# The memory's dot products in full float32: JAX's default computes float32 dots in
# TensorFloat-32 (10 bits of mantissa) on recent NVIDIA GPUs.
EXACT = jax.lax.Precision.HIGHEST


@dataclass(frozen=True)
class KrylovSettings:
    """Options of :func:`cg` and :func:`var3d`.

    ``jacobi``: CG is preconditioned by ``D⁻¹``; 3D-Var runs L-BFGS in the scaled
    variable ``v = D^{1/2} δ`` (the same as an initial inverse Hessian ``γ D⁻¹``).
    Without it, Q's condition number (≈ 1e10 with σ_y = 1e-3) makes either method
    impractically slow.  ``memory``: L-BFGS pairs kept (optax's default, 10).  ``tol``
    None: the config's default for ``dtype`` (1e-5 in float32, 1e-10 in float64).
    """

    tol: float | None = None  # (a float once made: __post_init__)
    max_iterations: int = 10000
    dtype: str = "float32"
    jacobi: bool = True
    memory: int = 10
    heartbeat_seconds: float = 10.0

    def __post_init__(self) -> None:
        if self.tol is None:
            from mpda_dist.config import DEFAULT_TOL

            object.__setattr__(self, "tol", DEFAULT_TOL[self.dtype])


class _Block:
    """This rank's share of the work: halo rounds and global sums, counted and timed."""

    def __init__(self, decomp: Decomposition, dtype: Any) -> None:
        by, bx = decomp.shape
        self.comm = decomp.comm
        self.rank = decomp.rank
        self.neighbours = decomp.has_neighbours
        self.fex = HaloExchange(decomp, field_layout(by, bx), np.dtype(dtype), tag=400)
        self.edge = jax.device_put(self.fex.edge)
        self.jit = Programs()
        self.reductions = 0
        self.exchanges = 0
        self.reduce_seconds = 0.0
        self.beat = time.perf_counter()  # last heartbeat

    def frame(self, packed: jax.Array) -> jax.Array:
        """The 2-wide frame around this block of the vector whose border is ``packed``."""
        self.exchanges += 1
        if not self.neighbours:
            return self.edge
        return jax.device_put(self.fex.exchange(np.asarray(packed)))

    def allreduce(self, local: jax.Array) -> np.ndarray:
        """Global float64 sums of a small vector of local partial sums."""
        host = np.asarray(local, np.float64)  # waits for the device
        t0 = time.perf_counter()
        out = allreduce_sum(self.comm, host)
        self.reduce_seconds += time.perf_counter() - t0
        self.reductions += 1
        return out

    def finish(self, res: LevelResult, t_start: float) -> None:
        """Fill ``res`` with counts and the maximum over ranks of the times."""
        elapsed = time.perf_counter() - t_start  # everything was compiled before t_start
        times = np.array([self.jit.seconds, elapsed, self.fex.wait_seconds, self.reduce_seconds])
        self.comm.Allreduce(MPI.IN_PLACE, times, op=MPI.MAX)
        res.compile_seconds, res.solve_seconds = float(times[0]), float(times[1])
        res.exchange_seconds, res.reduce_seconds = float(times[2]), float(times[3])
        rest = res.solve_seconds - res.exchange_seconds - res.reduce_seconds
        res.compute_seconds = max(0.0, rest)  # includes the waits for the device
        res.bytes_sent = self.fex.bytes_sent
        res.reductions, res.halo_exchanges = self.reductions, self.exchanges


# ---------------------------------------------------------------- jitted pieces (pure)


@jit
def _true_residual(
    x: jax.Array, frame: jax.Array, op: kernel.Operator, pm: jax.Array, dinv: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``r = h − Qx``, ``z = pm·r`` and local ``[rᵀz, ‖D⁻¹r‖²]``."""
    r = op.rhs - kernel.apply_operator(x, frame, op)
    z = pm * r
    return r, z, jnp.stack([jnp.sum(r * z), jnp.sum(jnp.square(r * dinv))])


@jit
def _cg_matvec(p: jax.Array, frame: jax.Array, op: kernel.Operator) -> tuple[jax.Array, jax.Array]:
    q = kernel.apply_operator(p, frame, op)
    return q, jnp.sum(p * q)[None]


@jit
def _cg_step(
    x: jax.Array,
    r: jax.Array,
    p: jax.Array,
    q: jax.Array,
    alpha: jax.Array,
    pm: jax.Array,
    dinv: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    x = x + alpha * p
    r = r - alpha * q
    z = pm * r
    return x, r, z, jnp.stack([jnp.sum(r * z), jnp.sum(jnp.square(r * dinv))])


@jit
def _cg_direction(z: jax.Array, p: jax.Array, beta: jax.Array) -> tuple[jax.Array, jax.Array]:
    p = z + beta * p
    return p, kernel.pack_frame(p)


@jit
def _lbfgs_direction(
    M: jax.Array, g: jax.Array, coef: jax.Array, sc: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``d = Σ coef·[M; g]`` (v-space) and the border of ``u = sc·d``; one pass over M."""
    d = jnp.tensordot(coef[:-1], M, 1, precision=EXACT) + coef[-1] * g
    return d, kernel.pack_frame(sc * d)


def _memory_dots(M: jax.Array, *vectors: jax.Array) -> jax.Array:
    """``M · v`` for each vector, ``(len(vectors), 2m)``: one pass over the memory.

    Reading the ``2m`` memory vectors here and in :func:`_lbfgs_direction` is what makes
    an L-BFGS iteration several times the memory traffic of a CG iteration."""
    return jnp.einsum("kij,vij->vk", M, jnp.stack(vectors), precision=EXACT)


# Layout of the reduced vector of one L-BFGS step (see _lbfgs_matvec).
_SCALARS = ("gq", "qq", "dq", "gd", "dd", "gg", "gwq", "qwq", "gwg")


@jit
def _lbfgs_matvec(
    d: jax.Array,
    frame: jax.Array,
    op: kernel.Operator,
    sc: jax.Array,
    M: jax.Array,
    g: jax.Array,
    w: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """``q = Q̃d = sc·Q(sc·d)`` and every local inner product one L-BFGS step needs:
    ``[Mq, Md, Mg]`` (``2m`` each: the ``s`` slots, then the ``y`` slots) then
    ``_SCALARS``.

    All are computed directly rather than carried by recursion: with Q's range of
    scales, recurrences lose every digit once ``‖g‖`` has dropped a few decades."""
    q = sc * kernel.apply_operator(sc * d, frame, op)
    scalars = jnp.stack(
        [
            jnp.sum(g * q),
            jnp.sum(q * q),
            jnp.sum(d * q),
            jnp.sum(g * d),
            jnp.sum(d * d),
            jnp.sum(g * g),
            jnp.sum(g * w * q),
            jnp.sum(q * w * q),
            jnp.sum(g * w * g),
        ]
    )
    return q, jnp.concatenate([_memory_dots(M, q, d, g).ravel(), scalars.astype(q.dtype)])


@jit(donate_argnums=(0, 1, 2))
def _lbfgs_update(
    xv: jax.Array,
    g: jax.Array,
    M: jax.Array,
    d: jax.Array,
    q: jax.Array,
    alpha: jax.Array,
    k: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Step ``s = αd``, ``y = αq`` (exact: ``y = Q̃s``), stored in memory slot ``k``."""
    s, y = alpha * d, alpha * q
    m = M.shape[0] // 2
    return xv + s, g + y, M.at[k].set(s).at[m + k].set(y)


@jit
def _lbfgs_gradient(
    xv: jax.Array,
    frame: jax.Array,
    op: kernel.Operator,
    sc: jax.Array,
    M: jax.Array,
    w: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """True gradient ``g = sc·(Q(sc·v) − h)`` and local ``[Mg (2m), gᵀg, gᵀWg]``."""
    g = sc * (kernel.apply_operator(sc * xv, frame, op) - op.rhs)
    scalars = jnp.stack([jnp.sum(g * g), jnp.sum(g * w * g)])
    return g, jnp.concatenate([_memory_dots(M, g)[0], scalars])


@jit
def _pack_scaled(xv: jax.Array, sc: jax.Array) -> jax.Array:
    return kernel.pack_frame(sc * xv)


# ---------------------------------------------------------------- shared loop logic


class Verdict:
    """Decides on a true residual: converged, keep going, or stagnated (dtype floor)."""

    def __init__(self, tol: float) -> None:
        self.tol = tol
        self.best = math.inf
        self.strikes = 0

    def __call__(self, rel: float) -> str | None:
        if not math.isfinite(rel):
            return DIVERGED
        if rel < self.tol:
            return CONVERGED
        self.strikes = self.strikes + 1 if rel > 0.5 * self.best else 0
        self.best = min(self.best, rel)
        return STALLED if self.strikes >= _STRIKES else None


def _progress(blk: _Block, res: LevelResult, it: int, rel: float, s: KrylovSettings) -> None:
    if it % 50 == 0:
        res.history.append((it, rel))
    if blk.rank == 0 and time.perf_counter() - blk.beat > s.heartbeat_seconds:
        log.info("  ... iteration %d, residual %.3e", it, rel)
        blk.beat = time.perf_counter()


def _stagnated(rel: float, s: KrylovSettings) -> None:
    log.warning(
        "stopped at residual %.3e > tol %.1e: the true residual no longer decreases "
        "(rounding floor of %s); use %sa larger tol",
        rel,
        s.tol,
        s.dtype,
        "solver.dtype=float64 or " if s.dtype == "float32" else "",
    )


# ---------------------------------------------------------------- conjugate gradient


def _inverse_diagonal(op: kernel.Operator) -> np.ndarray:
    """``1 / diag(Q)`` on the host, in the operator's dtype.  The set-up's vectors are
    made there (:func:`mpda_dist.programs.on_device`): as eager device operations each
    was one more program to compile, in every process (a rerun of 3dvar compiled 8)."""
    diag = np.asarray(op.diag)
    return (np.ones((), diag.dtype) / diag).astype(diag.dtype)


def cg(
    decomp: Decomposition, op: kernel.Operator, s: KrylovSettings, res: LevelResult
) -> jax.Array:
    """Preconditioned conjugate gradient for ``Q δ = h`` on every rank of ``decomp``.

    Per iteration: one halo exchange (the search direction ``p``) and two reductions,
    ``pᵀQp`` and then ``[rᵀz, ‖D⁻¹r‖²]`` (the stopping norm rides along with ``rᵀz``).
    Returns this rank's block of ``δ``; ``res`` is filled in (same on every rank).
    """
    blk = _Block(decomp, s.dtype)
    dt = np.dtype(s.dtype)
    inverse = _inverse_diagonal(op)
    dinv = on_device(inverse)
    pm = dinv if s.jacobi else on_device(np.ones_like(inverse))
    x = zeros(op.rhs.shape, op.rhs.dtype)
    scalar = np.zeros((), dt)
    pack = blk.jit(kernel.outgoing_frame, x)
    resid = blk.jit(_true_residual, x, blk.edge, op, pm, dinv)
    matvec = blk.jit(_cg_matvec, x, blk.edge, op)
    step = blk.jit(_cg_step, x, x, x, x, scalar, pm, dinv)
    direction = blk.jit(_cg_direction, x, x, scalar)

    t_start = time.perf_counter()
    r, z, loc = resid(x, blk.edge, op, pm, dinv)  # δ = 0: r = h, no halo needed
    rz, zz = blk.allreduce(loc)
    hn2 = zz if zz > 0 else 1.0
    p, pf = z, pack(z)
    it, rel, status = 0, math.sqrt(zz / hn2), None
    verdict = Verdict(s.tol)
    while status is None:
        if not math.isfinite(rel):
            status = DIVERGED
            break
        if rel < s.tol or it >= s.max_iterations:
            r, z, loc = resid(x, blk.frame(pack(x)), op, pm, dinv)
            rz, zz = blk.allreduce(loc)
            rel = math.sqrt(zz / hn2)
            status = verdict(rel)
            if status is None and it >= s.max_iterations:
                status = CAPPED
            elif status is None:  # restart from the true residual
                p, pf = z, pack(z)
                continue
            if status == STALLED:
                _stagnated(rel, s)
            break
        q, pq = matvec(p, blk.frame(pf), op)
        (pq,) = blk.allreduce(pq)
        if not (pq > 0 and math.isfinite(pq)):
            status = DIVERGED  # Q is SPD: only overflow or NaN gets here
            break
        x, r, z, loc = step(x, r, p, q, np.asarray(rz / pq, dt), pm, dinv)
        rz_new, zz = blk.allreduce(loc)
        p, pf = direction(z, p, np.asarray(rz_new / rz, dt))
        rz, it, rel = rz_new, it + 1, math.sqrt(max(zz, 0.0) / hn2)
        _progress(blk, res, it, rel, s)
    res.status, res.iterations, res.residual = status, it, rel
    res.history.append((it, rel))
    blk.finish(res, t_start)
    return x


# ---------------------------------------------------------------- 3D-Var by L-BFGS


def _two_loop(G: np.ndarray, order: list[int], m: int) -> np.ndarray:
    """L-BFGS direction ``d = −H g`` as coefficients on the basis ``[s₀…s_{m−1},
    y₀…y_{m−1}, g]`` from the basis' Gram matrix ``G`` ((2m+1)², float64).

    Nocedal & Wright Alg. 7.4, as ``optax.scale_by_lbfgs`` runs it (initial inverse
    Hessian ``γI`` with ``γ = sᵀy / yᵀy`` of the newest pair, ``min(1, 1/‖g‖)`` with an
    empty memory), with every inner product read from ``G`` instead of computed.
    """
    coef = np.zeros(2 * m + 1)
    coef[2 * m] = 1.0
    alphas = {}
    for i in reversed(order):
        a = (coef @ G[:, i]) / G[i, m + i]
        alphas[i] = a
        coef[m + i] -= a
    if order:
        k = order[-1]
        gamma = G[k, m + k] / G[m + k, m + k]
    else:
        gamma = min(1.0, 1.0 / math.sqrt(max(G[2 * m, 2 * m], 1e-300)))
    coef *= gamma
    for i in order:
        b = (coef @ G[:, m + i]) / G[i, m + i]
        coef[i] += alphas[i] - b
    return -coef


def _gram_update(G: np.ndarray, alpha: float, tot: np.ndarray, k: int, m: int) -> None:
    """Gram matrix of the basis after the step ``s = αd``, ``y = αq`` into slot ``k`` and
    ``g ← g + y``, from the reduced inner products of :func:`_lbfgs_matvec`.

    Only ``g``'s new row is one step of recursion from directly computed products."""
    Sq, Yq, Sd, Yd, Sg, Yg = (tot[i * m : (i + 1) * m] for i in range(6))  # M = [S; Y]
    v = dict(zip(_SCALARS, tot[6 * m :], strict=True))
    gi = 2 * m
    a2 = alpha * alpha
    s_row = alpha * np.concatenate([Sd, Yd, [v["gd"]]])
    y_row = alpha * np.concatenate([Sq, Yq, [v["gq"]]])
    g_row = np.concatenate([Sg, Yg, [v["gg"]]]) + y_row
    G[k, :] = G[:, k] = s_row
    G[m + k, :] = G[:, m + k] = y_row
    G[gi, :] = G[:, gi] = g_row
    G[k, k] = a2 * v["dd"]
    G[k, m + k] = G[m + k, k] = a2 * v["dq"]
    G[m + k, m + k] = a2 * v["qq"]
    G[k, gi] = G[gi, k] = alpha * v["gd"] + a2 * v["dq"]
    G[m + k, gi] = G[gi, m + k] = alpha * v["gq"] + a2 * v["qq"]
    G[gi, gi] = v["gg"] + 2 * alpha * v["gq"] + a2 * v["qq"]


def var3d(
    decomp: Decomposition, op: kernel.Operator, s: KrylovSettings, res: LevelResult
) -> jax.Array:
    """3D-Var: minimise ``J(δ) = ½ δᵀQδ − hᵀδ`` by L-BFGS on every rank of ``decomp``.

    The published cost ``½ (y − H(f_b+δ))ᵀR⁻¹(y − H(f_b+δ)) + ½ δᵀPδ`` expands to this
    ``J`` plus the constant ``½ dᵀR⁻¹d`` (``d = y − H f_b``), so both have the same
    minimiser and gradient ``∇J = Qδ − h`` (minus the residual).  Stopping rule on the
    gradient norm: ``‖D⁻¹∇J(δ)‖₂ ≤ tol · ‖D⁻¹∇J(0)‖₂`` — because ``∇J(0) = −h`` this is
    the same relative residual that CG and message passing stop on.

    Why not ``optax.lbfgs`` itself: its inner products (``optax.tree.vdot``) are local
    to one process, so on a block they would be wrong, and its zoom line search calls
    the objective inside ``lax.while_loop``, where MPI cannot run.  This is the same
    algorithm (two-loop recursion with optax's ``γ`` scaling and memory 10, see
    :func:`_two_loop`; tests/test_baselines.py checks the iterates against
    ``optax.scale_by_lbfgs``) written for distributed memory in the *vector-free* form
    (Chen et al., NeurIPS 2014): the host keeps the Gram matrix of the ``2m+1`` basis
    vectors, and one reduction per iteration brings the new inner products, instead of
    ``2m + 2`` sequential reductions in the textbook two-loop recursion.  The reduction
    carries ``6m + 9`` numbers: the new vectors' products with the memory.  Line search:
    ``J`` is quadratic, so the exact minimiser along ``d``, ``α = −gᵀd / dᵀQd``, costs one
    operator application (which also gives the next gradient, ``g + αQd``) and satisfies
    the strong Wolfe conditions that optax's zoom line search looks for.

    ``s.jacobi``: L-BFGS runs in ``v = D^{1/2}δ`` (``Q̃ = D^{-1/2} Q D^{-1/2}``).
    Per iteration: one halo exchange and one reduction.
    """
    blk = _Block(decomp, s.dtype)
    m = s.memory
    gi = 2 * m
    dt = np.dtype(s.dtype)
    dinv = _inverse_diagonal(op)
    scale = np.sqrt(dinv) if s.jacobi else np.ones_like(dinv)
    sc = on_device(scale)
    w = on_device(np.square(dinv / scale))  # ‖D⁻¹∇J(δ)‖² = gᵀ W g in v-space
    xv = zeros(op.rhs.shape, op.rhs.dtype)
    M = zeros((2 * m,) + xv.shape, dt)  # memory: s slots, then y slots
    coef0 = np.zeros(2 * m + 1, dt)
    pack = blk.jit(_pack_scaled, xv, sc)
    gradient = blk.jit(_lbfgs_gradient, xv, blk.edge, op, sc, M, w)
    direction = blk.jit(_lbfgs_direction, M, xv, coef0, sc)
    matvec = blk.jit(_lbfgs_matvec, xv, blk.edge, op, sc, M, xv, w)
    kslot = np.zeros((), np.int32)
    update = blk.jit(_lbfgs_update, xv, xv, M, xv, xv, np.zeros((), dt), kslot)

    t_start = time.perf_counter()
    G = np.zeros((2 * m + 1, 2 * m + 1))
    order: list[int] = []

    def refresh(frame: jax.Array) -> tuple[jax.Array, float]:
        g, loc = gradient(xv, frame, op, sc, M, w)
        tot = blk.allreduce(loc)
        G[gi, :gi] = G[:gi, gi] = tot[:gi]
        G[gi, gi] = tot[gi]
        return g, float(tot[gi + 1])

    g, gw = refresh(blk.edge)  # δ = 0: g = −sc·h, no halo needed
    hn2 = gw if gw > 0 else 1.0
    it, rel, status = 0, math.sqrt(gw / hn2), None
    verdict = Verdict(s.tol)
    while status is None:
        if not math.isfinite(rel):
            status = DIVERGED
            break
        if rel < s.tol or it >= s.max_iterations:
            g, gw = refresh(blk.frame(pack(xv, sc)))
            rel = math.sqrt(max(gw, 0.0) / hn2)
            status = verdict(rel)
            if status is None and it >= s.max_iterations:
                status = CAPPED
            elif status is None:
                continue  # go on from the true gradient, memory kept
            if status == STALLED:
                _stagnated(rel, s)
            break
        coef = _two_loop(G, order, m)
        d, pf = direction(M, g, coef.astype(dt), sc)
        q, loc = matvec(d, blk.frame(pf), op, sc, M, g, w)
        tot = blk.allreduce(loc)
        v = dict(zip(_SCALARS, tot[6 * m :], strict=True))
        dq, gd = v["dq"], v["gd"]
        if not all(math.isfinite(x) for x in tot):
            status = DIVERGED
            break
        if not (dq > 0 and gd < 0):
            if not order:
                status = DIVERGED
                break
            order.clear()  # rounding broke descent: drop the memory (steepest descent)
            G[:gi, :] = 0.0
            G[:, :gi] = 0.0
            continue
        alpha = -gd / dq
        k = len(order) if len(order) < m else order.pop(0)
        _gram_update(G, alpha, tot, k, m)
        order.append(k)
        xv, g, M = update(xv, g, M, d, q, np.asarray(alpha, dt), np.asarray(k, np.int32))
        # Trigger for the true-gradient check: one step of recursion from ‖g‖²_W.
        gw = v["gwg"] + 2 * alpha * v["gwq"] + alpha * alpha * v["qwq"]
        it, rel = it + 1, math.sqrt(max(gw, 0.0) / hn2)
        _progress(blk, res, it, rel, s)
    res.status, res.iterations, res.residual = status, it, rel
    res.history.append((it, rel))
    blk.finish(res, t_start)
    return on_device(np.asarray(xv) * scale)  # δ = D^{-1/2} v (on the host: no program)


# ---------------------------------------------------------------- whole solve


def solve(
    comm: Any,
    level: Any,
    nodes: Any,
    lengthscale: float,
    amplitude: float,
    method: str,
    s: KrylovSettings,
    process_grid: tuple[int, int] | None = None,
) -> tuple[LevelResult, np.ndarray | None]:
    """``method`` (``cg`` or ``3dvar``) on every rank of ``comm`` for one grid ``level``.

    ``process_grid`` is ``(Px, Py)`` (None: automatic).  Returns the result (the same on
    every rank; times are the maximum over ranks) and the interior ``(n, m)`` anomaly
    ``δ`` in float64 on rank 0 (None elsewhere).  Call inside ``jax.enable_x64(True)``
    for float64.
    """
    from mpda_dist.stencil import build

    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    t0 = time.perf_counter()
    size = comm.Get_size()
    if process_grid is not None:
        grid = (process_grid[1], process_grid[0])
        check_grid(grid, size, level.interior)
    else:
        grid = auto_grid(size, level.interior)
    # The sphere's longitude is periodic: the process grid wraps, and the halo frame
    # across the seam comes from the block on the other side (HaloExchange does it).
    periodic = tuple(getattr(level, "periodic", (False, False)))
    decomp = Decomposition(comm, level.interior, grid, periodic=periodic)
    lobs = nodes.at_level(level.stride, level.interior, periodic[1])
    st = build(level, lengthscale, amplitude, lobs, *decomp.extent)
    dtype = jnp.dtype(s.dtype)
    op = jax.block_until_ready(
        kernel.Operator(
            *(jax.device_put(np.asarray(v, dtype)) for v in (st.diag, st.weights, st.rhs))
        )
    )
    res = LevelResult(
        (level.ny, level.nx), size, (grid[1], grid[0]), observations=len(lobs.iy), solver=method
    )
    res.setup_seconds = float(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    if decomp.rank == 0:
        log.info(
            "%s on %d x %d points, %d rank(s) as %d x %d, %s, Jacobi %s",
            method,
            level.nx,
            level.ny,
            size,
            grid[1],
            grid[0],
            s.dtype,
            "on" if s.jacobi else "off",
        )
    x = (cg if method == "cg" else var3d)(decomp, op, s, res)
    anomaly = decomp.gather(np.asarray(x, np.float64))
    decomp.free()
    if decomp.rank == 0:
        log.info(
            "%s: %s after %d iterations, residual %.3e, %d reductions, %d halo exchanges "
            "(solve %.2f s, compile %.2f s, set-up %.2f s)",
            method,
            res.status,
            res.iterations,
            res.residual,
            res.reductions,
            res.halo_exchanges,
            res.solve_seconds,
            res.compile_seconds,
            res.setup_seconds,
        )
    return res, anomaly
