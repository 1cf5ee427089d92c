"""Gaussian message passing on one block, in JAX (DESIGN §2). Pure: arrays in, arrays out.

Layout (y first): messages ``a, b`` have shape ``(12, by, bx)``; ``a[k][j]`` is the
message into node ``j`` from ``j + OFFSETS[k]``.  The posterior stencil is
``diag (by, bx)``, ``weights (12, by, bx)`` with ``weights[k][j] = Q[j, j + OFFSETS[k]]``
and ``rhs (by, bx)`` = ``h``.

Everything that lies outside the block arrives as one flat ``halo`` array laid out by
:mod:`mpda_dist.halo`; the kernel never knows whether a piece came from another rank,
from this rank across a periodic seam, or is the constant at a domain edge.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mpda_dist._offsets import NSLOTS, OFFSETS, OPPOSITE
from mpda_dist.halo import DIRECTIONS, Layout, Piece, field_layout, message_layout

Array = jax.Array


class Operator(NamedTuple):
    """The posterior stencil on a block (a pytree of arrays)."""

    diag: Array  # (by, bx)
    weights: Array  # (12, by, bx)
    rhs: Array  # (by, bx)


class Params(NamedTuple):
    c: float
    damping: float


def _split(flat: Array, layout_groups: tuple[tuple[Piece, ...], ...]) -> dict:
    """Cut a flat halo into 2-D pieces keyed by ``(array, kind)``."""
    out = {}
    pos = 0
    for group in layout_groups:
        for p in group:
            out[(p.array, p.kind)] = flat[pos : pos + p.size].reshape(p.shape)
            pos += p.size
    return out


def _shifted(src: Array, d: tuple[int, int], pieces: dict, array: int) -> Array:
    """``src[j + d]`` for every node ``j`` of the block, using halo pieces outside it.

    Built as a sum of zero-padded pieces rather than a concatenation: ``pad`` fuses
    into the consumer, so XLA evaluates the whole update in one pass without
    materialising the shifted arrays (concatenation did, and cost ~30× at 254² blocks
    on a CPU).
    """
    dy, dx = d
    by, bx = src.shape
    rows = slice(max(dy, 0), by + min(dy, 0))
    cols = slice(max(dx, 0), bx + min(dx, 0))
    # Rows/columns of the result that come from outside the block: (before, after).
    ry = (max(-dy, 0), max(dy, 0))
    rx = (max(-dx, 0), max(dx, 0))
    out = jnp.pad(src[rows, cols], (ry, rx))
    if dx:
        xs = pieces[(array, "x")][rows, :]
        out = out + jnp.pad(xs, (ry, (0, bx - abs(dx)) if dx < 0 else (bx - abs(dx), 0)))
    if dy:
        ys = pieces[(array, "y")][:, cols]
        out = out + jnp.pad(ys, ((0, by - abs(dy)) if dy < 0 else (by - abs(dy), 0), rx))
    if dx and dy:
        corner = pieces[(array, "corner")]
        py = (0, by - abs(dy)) if dy < 0 else (by - abs(dy), 0)
        px = (0, bx - abs(dx)) if dx < 0 else (bx - abs(dx), 0)
        out = out + jnp.pad(corner, (py, px))
    return out


def _slot_sum(x: Array | Sequence[Array]) -> Array:
    """``Σ_k x[k]`` as explicit adds: an elementwise loop that streams the 12 slots,
    where ``jnp.sum(x, axis=0)`` became a strided reduction that cost ~20 ms per
    iteration at 254² blocks on a CPU (a TLB miss per element and slot)."""
    out = x[0]
    for k in range(1, len(x)):
        out = out + x[k]
    return out


def _beliefs(a: Array, b: Array, op: Operator, c: float) -> tuple[Array, Array]:
    """Node precisions ``A_i`` and potentials ``B_i`` (each ``(by, bx)``)."""
    return op.diag + c * _slot_sum(a), op.rhs + c * _slot_sum(b)


def _slots(x: Array) -> tuple[Array, ...]:
    return tuple(x[k] for k in range(x.shape[0]))


def update(a: Sequence[Array], b: Sequence[Array], op: Operator, halo: dict, p: Params) -> tuple:
    """One synchronous damped update of every message (DESIGN §2).

    ``a`` and ``b`` are sequences of the 12 per-slot ``(by, bx)`` arrays: keeping the
    slots apart inside the loop avoids re-stacking (a full copy) every iteration.
    """
    # Materialise the beliefs once: left to itself XLA fuses their 12-slot sums into
    # each of the 24 per-slot outputs and reads every message array 24 times.
    A, B = lax.optimization_barrier((op.diag + p.c * _slot_sum(a), op.rhs + p.c * _slot_sum(b)))
    eta = p.damping
    new_a, new_b = [], []
    for k, d in enumerate(OFFSETS):
        # Cavity of the sending node i = j + d: its belief minus the message j → i.
        alpha = _shifted(A - a[OPPOSITE[k]], d, halo, k)
        beta = _shifted(B - b[OPPOSITE[k]], d, halo, k + NSLOTS)
        w = op.weights[k] / p.c
        new_a.append((1 - eta) * a[k] - eta * (w * w) / alpha)
        new_b.append((1 - eta) * b[k] - eta * w * beta / alpha)
    return tuple(new_a), tuple(new_b)


def pack_cavities(a: Array, b: Array, op: Operator, p: Params, layout: Layout) -> Array:
    """Flat outgoing buffer: for each direction, the cavities that neighbour needs.

    Computed from thin slices only, so the cost is proportional to the border.
    """
    parts = []
    for group in layout.outgoing:
        for piece in group:
            k = piece.slot
            r, cidx = piece.rows, piece.cols
            if piece.array < NSLOTS:
                node = op.diag[r, cidx] + p.c * _slot_sum(a[:, r, cidx])
                val = node - a[OPPOSITE[k], r, cidx]
            else:
                node = op.rhs[r, cidx] + p.c * _slot_sum(b[:, r, cidx])
                val = node - b[OPPOSITE[k], r, cidx]
            parts.append(val.ravel())
    if not parts:
        return jnp.zeros((0,), a.dtype)
    return jnp.concatenate(parts)


@partial(jax.jit, static_argnames=("n", "momentum", "delta"), donate_argnums=(0, 1, 2))
def iterate(
    a: Array,
    b: Array,
    b_prev: Array,
    op: Operator,
    halo_flat: Array,
    p: Params,
    n: int,
    momentum: float = 0.0,
    delta: bool = True,
) -> tuple[Array, Array, Array, Array, Array]:
    """``n ≥ 1`` updates with the halo held fixed.

    ``momentum > 0`` adds a heavy-ball term ``momentum·(b_t − b_{t−1})`` to the
    ``b`` update; it vanishes at a fixed point, so the answer is unchanged.  ``b_prev``
    is the previous ``b`` (any array when ``momentum == 0``; returned as given).

    Returns the new messages, ``b_prev``, the flat outgoing cavity buffer for the
    neighbours, and ``[Σ|Δa|, Σ|Δb|]`` of the last update (for the paper's δ rule;
    zeros when ``delta`` is false, which compiles a smaller program).
    """
    by, bx = a.shape[1:]
    layout = message_layout(by, bx)
    halo = _split(halo_flat, layout.incoming)

    def step(a, b, bp):
        a2, b2 = update(a, b, op, halo, p)
        if momentum:
            b2 = tuple(x + momentum * (y - z) for x, y, z in zip(b2, b, bp, strict=True))
            return a2, b2, b
        return a2, b2, bp

    # Inside the loop the slots travel as 12 separate arrays (see update).
    bp0 = _slots(b_prev) if momentum else b_prev
    (sa, sb, sp), prev = _loop(step, (_slots(a), _slots(b), bp0), n, delta)
    change = jnp.zeros(2, a.dtype)
    if delta:
        change = jnp.stack([_abs_change(sa, prev[0]), _abs_change(sb, prev[1])])
    a, b = jnp.stack(sa), jnp.stack(sb)
    b_prev = jnp.stack(sp) if momentum else sp
    return a, b, b_prev, pack_cavities(a, b, op, p, layout), change


def _loop(step, state: tuple, n: int, delta: bool) -> tuple[tuple, tuple | None]:
    """``n ≥ 1`` applications of ``step`` to ``state`` in one ``fori_loop``; with
    ``delta`` also the state before the last one (for the δ rule's change)."""
    if not delta:
        return lax.fori_loop(0, n, lambda _, s: step(*s), state), None
    prev = lax.fori_loop(0, n - 1, lambda _, s: step(*s), state)
    return step(*prev), prev


def _abs_change(new: Sequence[Array], old: Sequence[Array]) -> Array:
    return sum(jnp.sum(jnp.abs(x - y)) for x, y in zip(new, old, strict=True))


def update_call(
    a: Array, b: Array, b_prev: Array, g: Array | None, op: Operator, halo: Array, p: Params
) -> tuple:
    """The jitted update for this state and its positional arguments: :func:`iterate_b`
    once ``a`` is frozen (``g`` its gains), else :func:`iterate`.  Both take the same
    static arguments and return ``(a, b, b_prev, cavities, change)``."""
    if g is None:
        return iterate, (a, b, b_prev, op, halo, p)
    return iterate_b, (a, b, b_prev, g, op, halo, p)


# -- Frozen precisions ------------------------------------------------------------------
# The precision messages ``a`` do not depend on ``b`` or ``h``; they reach their fixed
# point (to rounding) in a few dozen iterations, long before the ``b`` messages.  Once
# they are there, each ``b`` update is ``(1 − η) b − g ⊙ β`` with constant gains
# ``g = η (Γ/c) / α``: no division, no ``a`` traffic, and the same fixed point.


@partial(jax.jit, static_argnames=("n",), donate_argnums=(0,))
def iterate_a(
    a: Array, b: Array, op: Operator, halo_flat: Array, p: Params, n: int
) -> tuple[Array, Array, Array]:
    """``n`` updates of ``a`` alone (``b`` only fills the outgoing buffer).  Returns
    ``a``, the outgoing cavity buffer and the largest ``|Δa| / |a|`` of the last update."""
    by, bx = a.shape[1:]
    layout = message_layout(by, bx)
    halo = _split(halo_flat, layout.incoming)
    eta = p.damping

    def step(sa):
        A = lax.optimization_barrier(op.diag + p.c * _slot_sum(sa))
        out = []
        for k, d in enumerate(OFFSETS):
            alpha = _shifted(A - sa[OPPOSITE[k]], d, halo, k)
            w = op.weights[k] / p.c
            out.append((1 - eta) * sa[k] - eta * (w * w) / alpha)
        return tuple(out)

    (new,), (sa,) = _loop(lambda s: (step(s),), (_slots(a),), n, True)
    # Relative to each message itself: small messages far from the largest (those of
    # observed nodes) must have converged too.
    tiny = jnp.finfo(a.dtype).tiny
    change = jnp.max(
        jnp.stack(
            [
                jnp.max(jnp.abs(x - y) / jnp.maximum(jnp.maximum(jnp.abs(x), jnp.abs(y)), tiny))
                for x, y in zip(new, sa, strict=True)
            ]
        )
    )
    a = jnp.stack(new)
    return a, pack_cavities(a, b, op, p, layout), change


@jax.jit
def gains(a: Array, op: Operator, halo_flat: Array, p: Params) -> Array:
    """``g[k] = η (Γ_k/c) / α_k`` for frozen ``a`` (its cavities across the border come
    from ``halo_flat``, which must hold the frozen ``a``'s cavities)."""
    by, bx = a.shape[1:]
    halo = _split(halo_flat, message_layout(by, bx).incoming)
    A = op.diag + p.c * _slot_sum(a)
    return jnp.stack(
        [
            p.damping * (op.weights[k] / p.c) / _shifted(A - a[OPPOSITE[k]], d, halo, k)
            for k, d in enumerate(OFFSETS)
        ]
    )


@partial(jax.jit, static_argnames=("n", "momentum", "delta"), donate_argnums=(1, 2))
def iterate_b(
    a: Array,
    b: Array,
    b_prev: Array,
    g: Array,
    op: Operator,
    halo_flat: Array,
    p: Params,
    n: int,
    momentum: float = 0.0,
    delta: bool = True,
) -> tuple[Array, Array, Array, Array]:
    """Like :func:`iterate` with ``a`` frozen at its fixed point and ``g = gains(a)``.

    Returns ``a`` (as given), ``b``, ``b_prev``, the outgoing cavity buffer and
    ``[0, Σ|Δb|]``."""
    by, bx = b.shape[1:]
    layout = message_layout(by, bx)
    halo = _split(halo_flat, layout.incoming)
    gs = _slots(g)

    def step(sb, sp):
        B = lax.optimization_barrier(op.rhs + p.c * _slot_sum(sb))
        new = []
        for k, d in enumerate(OFFSETS):
            beta = _shifted(B - sb[OPPOSITE[k]], d, halo, k + NSLOTS)
            x = (1 - p.damping) * sb[k] - gs[k] * beta
            new.append(x + momentum * (sb[k] - sp[k]) if momentum else x)
        return tuple(new), (sb if momentum else sp)

    sp0 = _slots(b_prev) if momentum else b_prev
    (sb, sp), prev = _loop(step, (_slots(b), sp0), n, delta)
    change = jnp.zeros(2, b.dtype)
    if delta:
        change = jnp.stack([jnp.zeros((), b.dtype), _abs_change(sb, prev[0])])
    b = jnp.stack(sb)
    b_prev = jnp.stack(sp) if momentum else sp
    return a, b, b_prev, pack_cavities(a, b, op, p, layout), change


@jax.jit
def initial_cavities(a: Array, b: Array, op: Operator, p: Params) -> Array:
    by, bx = a.shape[1:]
    return pack_cavities(a, b, op, p, message_layout(by, bx))


@jax.jit
def marginal_mean(a: Array, b: Array, op: Operator, p: Params) -> tuple[Array, Array]:
    """Posterior mean ``μ = B/A`` and the flat frame of ``μ`` for the neighbours."""
    A, B = _beliefs(a, b, op, p.c)
    mu = B / A
    return mu, pack_frame(mu)


def pack_frame(x: Array, width: int = 2) -> Array:
    by, bx = x.shape
    layout = field_layout(by, bx, width)
    parts = [x[pc.rows, pc.cols].ravel() for g in layout.outgoing for pc in g]
    return jnp.concatenate(parts)


def framed(x: Array, frame_flat: Array, width: int) -> Array:
    """``x`` with a ``width``-wide frame around it, shape ``(by+2w, bx+2w)``."""
    by, bx = x.shape
    layout = field_layout(by, bx, width)
    pieces = {}
    pos = 0
    for d, group in zip(DIRECTIONS, layout.incoming, strict=True):
        (pc,) = group
        pieces[d] = frame_flat[pos : pos + pc.size].reshape(pc.shape)
        pos += pc.size
    top = jnp.concatenate([pieces[(-1, -1)], pieces[(-1, 0)], pieces[(-1, 1)]], axis=1)
    mid = jnp.concatenate([pieces[(0, -1)], x, pieces[(0, 1)]], axis=1)
    bottom = jnp.concatenate([pieces[(1, -1)], pieces[(1, 0)], pieces[(1, 1)]], axis=1)
    return jnp.concatenate([top, mid, bottom], axis=0)


def apply_operator(x: Array, frame_flat: Array, op: Operator) -> Array:
    """``Q x`` on the block, with ``x`` outside the block given by its 2-wide frame."""
    by, bx = x.shape
    xp = framed(x, frame_flat, 2)
    out = op.diag * x
    for k, (dy, dx) in enumerate(OFFSETS):
        out = out + op.weights[k] * xp[2 + dy : 2 + dy + by, 2 + dx : 2 + dx + bx]
    return out


@jax.jit
def messages_from_mean(m: Array, frame_flat: Array, op: Operator, c: float) -> Array:
    """``b`` messages ``(12, by, bx)`` whose cavity means all equal the field ``m``.

    At a fixed point ``b_ij = −(Γ_ij/c)·β_i\\j/α_i\\j`` and the cavity mean
    ``β/α`` is close to ``μ_i``; so a mean interpolated from a coarser level becomes a
    starting point for the fine messages (the fixed point itself is unchanged).
    """
    by, bx = m.shape
    mp = framed(m, frame_flat, 2)
    return jnp.stack(
        [
            -(op.weights[k] / c) * mp[2 + dy : 2 + dy + by, 2 + dx : 2 + dx + bx]
            for k, (dy, dx) in enumerate(OFFSETS)
        ]
    )


@jax.jit
def residual(x: Array, frame_flat: Array, op: Operator) -> Array:
    """``h − Q x`` on the block."""
    return op.rhs - apply_operator(x, frame_flat, op)


@jax.jit
def residual_sq(mu: Array, frame_flat: Array, op: Operator) -> Array:
    """Local ``[Σ (D⁻¹(h − Qμ))², non-finite flag]`` on the block, ``D = diag(Q)``.

    The Jacobi scaling keeps the test meaningful when ``σ_y ≪ σ``: unscaled, the
    observed nodes' ``1/σ_y²`` dominates both norms and the relative residual falls
    below 1e-5 while the mean is still far from the solution.
    """
    r = (op.rhs - apply_operator(mu, frame_flat, op)) / op.diag
    bad = jnp.logical_not(jnp.all(jnp.isfinite(mu)))
    return jnp.stack([jnp.sum(r * r), bad.astype(r.dtype)])
