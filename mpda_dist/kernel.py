"""Gaussian message passing on one block, in JAX (DESIGN §2). Pure: arrays in, arrays out.

Layout (y first): messages ``a, b`` have shape ``(12, by, bx)``; ``a[k][j]`` is the
message into node ``j`` from ``j + OFFSETS[k]``.  The posterior stencil is
``diag (by, bx)``, ``weights (12, by, bx)`` with ``weights[k][j] = Q[j, j + OFFSETS[k]]``
and ``rhs (by, bx)`` = ``h``.

Everything that lies outside the block arrives as one flat ``halo`` array laid out by
:mod:`mpda_dist.halo`; the kernel does not know whether a piece came from another rank,
from this rank across a periodic seam, or is the constant at a domain edge.  The one
exception is a block without neighbours (``neighbours=False``), whose halo is the
domain edge's constant on every side: its ``pads`` and fused programs use that constant
and do not read the halo (:class:`_Border`, :func:`framed_messages`).
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mpda_dist import fused
from mpda_dist._offsets import NSLOTS, OFFSETS, OPPOSITE
from mpda_dist.halo import DIRECTIONS, Layout, Piece, field_layout, message_layout
from mpda_dist.programs import Jit, jit, key_settings, trace_backend

Array = jax.Array


class Operator(NamedTuple):
    """The posterior stencil on a block (a pytree of arrays)."""

    diag: Array  # (by, bx)
    weights: Array  # (12, by, bx)
    rhs: Array  # (by, bx)


class Params(NamedTuple):
    c: float
    damping: float


def device_params(c: float, damping: float) -> Params:
    """:class:`Params` as scalars on the device, made once per solve: Python floats
    passed to a compiled program are copied to the device at every call.  Weakly typed,
    as Python floats are, so the programs are the same."""
    return Params(jax.device_put(float(c)), jax.device_put(float(damping)))


# -- Tracing cost ---------------------------------------------------------------------
# Every level has its own block shape, so each program is traced anew per level, and a
# cold start traces them one after another (programs.py).  A ``jax.numpy`` operation
# traces its own small jitted function at each new shape (~130 µs); the ``lax``
# primitive that it ends in costs a third of that.  So the functions below that the
# update programs trace hundreds of times (slices, slot sums, the halo's pieces, the
# outgoing cavities) are written with ``lax`` on operands of one dtype.


def _part(x: Array, *index: int | slice) -> Array:
    """``x[index]`` for static ints and unit-step slices (trailing axes whole), as one
    ``lax.slice`` (and a reshape for the ints): the same values as indexing."""
    starts, limits, sizes = [], [], []
    for axis, size in enumerate(x.shape):
        i = index[axis] if axis < len(index) else slice(None)
        if isinstance(i, slice):
            lo, hi, step = i.indices(size)
            if step != 1:
                raise ValueError(f"_part: step {step} (only unit steps)")
            starts.append(lo)
            limits.append(max(hi, lo))
            sizes.append(max(hi - lo, 0))
        else:
            k = i + size if i < 0 else i
            starts.append(k)
            limits.append(k + 1)
    out = lax.slice(x, starts, limits)
    return out if len(sizes) == x.ndim else lax.reshape(out, tuple(sizes))


def _cast(v: Array | float, like: Array) -> Array:
    """A scalar (a weakly typed parameter, a Python float) in ``like``'s dtype: what
    ``jax.numpy`` converts it to before an operation with ``like``."""
    return lax.convert_element_type(v, like.dtype)


def _pad(x: Array, fill: float, pads: tuple[tuple[int, int], ...]) -> Array:
    """``jnp.pad(x, pads, constant_values=fill)``."""
    return lax.pad(x, _cast(fill, x), [(lo, hi, 0) for lo, hi in pads])


def _split(flat: Array, layout_groups: tuple[tuple[Piece, ...], ...]) -> dict:
    """Cut a flat halo into 2-D pieces keyed by ``(array, kind)``."""
    out = {}
    pos = 0
    for group in layout_groups:
        for p in group:
            out[(p.array, p.kind)] = lax.reshape(_part(flat, slice(pos, pos + p.size)), p.shape)
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
    out = _pad(_part(src, rows, cols), 0.0, (ry, rx))
    if dx:
        xs = _part(pieces[(array, "x")], rows)
        xs = _pad(xs, 0.0, (ry, (0, bx - abs(dx)) if dx < 0 else (bx - abs(dx), 0)))
        out = lax.add(out, xs)
    if dy:
        ys = _part(pieces[(array, "y")], slice(None), cols)
        ys = _pad(ys, 0.0, ((0, by - abs(dy)) if dy < 0 else (by - abs(dy), 0), rx))
        out = lax.add(out, ys)
    if dx and dy:
        corner = pieces[(array, "corner")]
        py = (0, by - abs(dy)) if dy < 0 else (by - abs(dy), 0)
        px = (0, bx - abs(dx)) if dx < 0 else (bx - abs(dx), 0)
        out = lax.add(out, _pad(corner, 0.0, (py, px)))
    return out


def _slot_sum(x: Array | Sequence[Array]) -> Array:
    """``Σ_k x[k]`` as explicit adds: an elementwise loop that streams the 12 slots,
    where ``jnp.sum(x, axis=0)`` became a strided reduction that cost ~20 ms per
    iteration at 254² blocks on a CPU (a TLB miss per element and slot)."""
    parts = [_part(x, k) for k in range(len(x))] if isinstance(x, jax.Array) else list(x)
    out = parts[0]
    for part in parts[1:]:
        out = lax.add(out, part)
    return out


def _beliefs(a: Array, b: Array, op: Operator, c: float) -> tuple[Array, Array]:
    """Node precisions ``A_i`` and potentials ``B_i`` (each ``(by, bx)``)."""
    return _node_sum(op.diag, a, c), _node_sum(op.rhs, b, c)


_BAND = max(max(abs(dy), abs(dx)) for dy, dx in OFFSETS)  # widest border a piece takes


def pack_cavities(a: Array, b: Array, op: Operator, p: Params, layout: Layout) -> Array:
    """Flat outgoing buffer: for each direction, the cavities that neighbour needs.

    Computed from thin slices only, so the cost is proportional to the border: the
    node sums once on each border band (the first or last ``_BAND`` rows or columns,
    as the pieces need them), each piece a slice of its band minus its message.  One
    node sum per piece instead traced 1721 operations into every update program
    (0.11 s of tracing and lowering each); this traces 505.
    """
    by, bx = a.shape[1:]
    bands: dict[tuple, tuple[Array, slice, slice]] = {}

    def node(piece: Piece) -> tuple[Array, int, int]:
        """The node sums of the band that holds ``piece`` and the band's origin."""
        beta = piece.array >= NSLOTS
        if piece.kind == "x":  # whole rows, columns at one side
            key = ("x", piece.cols.start == 0, beta)
            rows, cols = slice(0, by), _band(piece.cols, bx)
        else:  # rows at one side
            key = ("y", piece.rows.start == 0, beta)
            rows, cols = _band(piece.rows, by), slice(0, bx)
        if key not in bands:
            base, m = (op.rhs, b) if beta else (op.diag, a)
            band = _slot_sum(_part(m, slice(None), rows, cols))
            bands[key] = (lax.add(_part(base, rows, cols), lax.mul(band, c)), rows, cols)
        sums, rows, cols = bands[key]
        return sums, rows.start, cols.start

    c = lax.convert_element_type(p.c, a.dtype)
    parts = []
    for group in layout.outgoing:
        for piece in group:
            sums, r0, c0 = node(piece)
            r, cs = piece.rows, piece.cols
            msgs = b if piece.array >= NSLOTS else a
            here = _part(sums, slice(r.start - r0, r.stop - r0), slice(cs.start - c0, cs.stop - c0))
            cavity = lax.sub(here, _part(msgs, OPPOSITE[piece.slot], r, cs))
            parts.append(lax.reshape(cavity, (cavity.size,)))
    if not parts:
        return jnp.zeros((0,), a.dtype)
    return lax.concatenate(parts, 0)


def _outgoing(a: Array, b: Array, op: Operator, p: Params, neighbours: bool) -> Array:
    """The update programs' outgoing cavity buffer (:func:`pack_cavities`), or an empty
    one for a block without ``neighbours``: it sends nothing.  The buffer was half the
    operations of each update program to trace, lower and compile; with the halo not
    read either (:class:`_Border`) iterate_a has 287 instead of 936 and the fused
    iterate_b 300 instead of 1093 (benchmarks/RESULTS.md §27)."""
    if not neighbours:
        return jnp.zeros((0,), a.dtype)
    by, bx = a.shape[1:]
    return pack_cavities(a, b, op, p, message_layout(by, bx))


def _band(edge: slice, size: int) -> slice:
    """The border band (first or last ``_BAND`` of ``size``) that holds ``edge``."""
    if edge.start == 0:
        return slice(0, min(_BAND, size))
    return slice(max(size - _BAND, 0), size)


def _slot_terms(per_slot) -> Array:
    """``stack([per_slot(k) for every slot])``: one buffer that each slot's fusion
    writes its part of, with no copy."""
    return lax.concatenate([_lead(per_slot(k)) for k in range(NSLOTS)], 0)


def _lead(x: Array) -> Array:
    """``x[None]``."""
    return lax.broadcast_in_dim(x, (1, *x.shape), tuple(range(1, x.ndim + 1)))


# -- Reading across the block border ------------------------------------------------
# An update reads the cavity of every sender, ``x[j + d]``; near the border ``j + d``
# lies outside the block and the value comes from the halo.  Two forms, equal to
# rounding:
#
# ``pads``   the halo pieces are summed into the shifted array inside the update
#            (:func:`_shifted`).  XLA hoists the padded pieces out of the loop as
#            full-size arrays, so a slot reads up to three more arrays per node.
# ``strips`` the update reads the block only, with a fill outside it for which the
#            incoming term is 0 (β = 0, α = +inf).  The terms on the border strips
#            depend only on the halo, which is fixed during a call: they are computed
#            once per call and added to the strips after each update.  On a CPU this is
#            about twice as fast per iteration (benchmarks/RESULTS.md §11); on an H100
#            five times slower than ``pads`` (§15): the default on a CPU only.
FORMS = ("strips", "pads")
FORM_ENV = "MPDA_KERNEL_FORM"
# ``fused``: the frozen update as one hand-written pass per iteration (:mod:`fused`,
# Pallas on Triton, for GPUs); the other updates then read the border as ``pads``.
FUSED = "fused"
FUSED_MIN_UPDATES = 10
"""On a GPU the frozen update runs ``fused`` in calls of at least this many
updates, and ``pads`` in shorter ones: per call, ``fused`` frames the messages and gains
and unframes them again.  On an H100 at 1024² (§15): 10 updates per call 205 against
335 µs per update, one update per call 1070 against 590 µs."""


def default_form() -> str:
    """The border form for this process: ``$MPDA_KERNEL_FORM`` if set, else ``strips``
    on a CPU and ``pads`` on an accelerator."""
    form = os.environ.get(FORM_ENV, "").strip()
    if form:
        if form not in (*FORMS, FUSED):
            raise ValueError(f"{FORM_ENV}={form!r}: expected one of {', '.join((*FORMS, FUSED))}")
        return form
    return "strips" if trace_backend() == "cpu" else "pads"


FUSED_MIN_NODES = 2**17
"""On a GPU the frozen update runs ``fused`` on blocks of at least this many nodes only
(a 1024² solve's two finest levels), and ``pads`` on smaller ones: there an update
takes a few µs either way, while each block shape's pass costs a cold start its
lowering through Triton, Python that holds the interpreter's lock (0.13 s of the
0.51 s that ``iterate_b`` lowered in for 4 levels, benchmarks/RESULTS.md §30)."""


def frozen_form(form: str | None, n: int, nodes: int) -> str:
    """How :func:`iterate_b` runs ``n`` updates of a block of ``nodes`` nodes: ``form``
    if given, else ``$MPDA_KERNEL_FORM`` if set, else ``strips`` on a CPU, and on a GPU
    ``fused`` for ``n ≥ FUSED_MIN_UPDATES`` on ``nodes ≥ FUSED_MIN_NODES`` and ``pads``
    otherwise (``pads`` on other accelerators and GPUs that Pallas's Triton backend does
    not support: :func:`fused.supported`)."""
    if form or os.environ.get(FORM_ENV, "").strip():
        return form or default_form()
    backend = trace_backend()
    if backend == "cpu":
        return "strips"
    big = n >= FUSED_MIN_UPDATES and nodes >= FUSED_MIN_NODES
    if backend == "gpu" and big and fused.supported():
        return FUSED
    return "pads"


def _shift_in(src: Array, d: tuple[int, int], fill: float) -> Array:
    """``src[j + d]`` where ``j + d`` is inside the block, ``fill`` elsewhere."""
    dy, dx = d
    by, bx = src.shape
    rows = slice(max(dy, 0), by + min(dy, 0))
    cols = slice(max(dx, 0), bx + min(dx, 0))
    pad = ((max(-dy, 0), max(dy, 0)), (max(-dx, 0), max(dx, 0)))
    return _pad(_part(src, rows, cols), fill, pad)


def _strips(d: tuple[int, int], by: int, bx: int) -> list[tuple[slice, slice]]:
    """Where ``j + d`` lies outside the block: the rows strip (all columns) first, then
    the columns strip (all rows)."""
    dy, dx = d
    out = []
    if dy:
        out.append((slice(by - dy, by) if dy > 0 else slice(0, -dy), slice(None)))
    if dx:
        out.append((slice(None), slice(bx - dx, bx) if dx > 0 else slice(0, -dx)))
    return out


def _halo_strips(d: tuple[int, int], pieces: dict, array: int, fill: float) -> list[Array]:
    """``x[j + d]`` on :func:`_strips` from the halo pieces, without a full-size array.
    The columns strip holds ``fill`` on the rows that the rows strip covers."""
    dy, dx = d
    out = []
    if dy:
        ys, corner = pieces[(array, "y")], pieces.get((array, "corner"))
        if dx > 0:
            ys = lax.concatenate([_part(ys, slice(None), slice(dx, None)), corner], 1)
        elif dx < 0:
            ys = lax.concatenate([corner, _part(ys, slice(None), slice(None, dx))], 1)
        out.append(ys)
    if dx:
        xs = pieces[(array, "x")]
        xs = _part(xs, slice(max(dy, 0), xs.shape[0] + min(dy, 0)))
        out.append(_pad(xs, fill, ((max(-dy, 0), max(dy, 0)), (0, 0))))
    return out


_FILL = {"alpha": jnp.inf, "beta": 0.0}
ALL = (slice(None), slice(None))


class _Border:
    """How one call's updates read the cavities of senders across the block border.

    A block without ``neighbours`` has the domain edge on every side, where the halo is
    the layout's constant fill (``α = 1, β = 0``).  In the ``pads`` form (GPUs) the
    updates then read that constant outside the block (:func:`_shift_in`) and not the
    halo, which spares the programs the halo's pieces (cut from the flat buffer, padded
    and added; XLA kept them as full-size arrays: a frozen update at 510² on a CPU took
    8.6 instead of 12.9 ms per iteration).  The ``strips`` form (CPUs) still reads the
    halo: without the border strips' updates XLA fused its loop differently, and the
    frozen update took 8.4–9.5 instead of 5.0–5.3 ms (benchmarks/RESULTS.md §27)."""

    def __init__(
        self, halo_flat: Array, by: int, bx: int, form: str | None, neighbours: bool = True
    ):
        self.form = form or default_form()
        if self.form == FUSED:
            self.form = "pads"
        if self.form not in FORMS:
            raise ValueError(f"kernel form {self.form!r}: expected one of {', '.join(FORMS)}")
        layout = message_layout(by, bx)
        edge = not neighbours and self.form == "pads"
        self.edge = layout.fill if edge else None
        self.pieces = {} if edge else _split(halo_flat, layout.incoming)
        self.shape = (by, bx)

    def shift(self, x: Array, k: int, kind: str) -> Array:
        """``x[j + OFFSETS[k]]``: the cavity (``kind`` alpha or beta) of slot ``k``'s
        senders."""
        array = k if kind == "alpha" else k + NSLOTS
        if self.edge is not None:  # no neighbours: the domain edge's constant
            return _shift_in(x, OFFSETS[k], self.edge[array])
        if self.form == "pads":
            return _shifted(x, OFFSETS[k], self.pieces, array)
        return _shift_in(x, OFFSETS[k], _FILL[kind])

    def edge_terms(self, term) -> list[list[tuple]]:
        """Per slot, ``[(index, term(k, index, alpha, beta))]`` on its border strips
        from the halo (none with ``pads``, where the update reads the halo itself or,
        without neighbours, the edge's constant)."""
        if self.form == "pads":
            return [[] for _ in OFFSETS]
        out = []
        for k, d in enumerate(OFFSETS):
            idx = _strips(d, *self.shape)
            al = _halo_strips(d, self.pieces, k, _FILL["alpha"])
            be = _halo_strips(d, self.pieces, k + NSLOTS, _FILL["beta"])
            out.append([(i, term(k, i, x, y)) for i, x, y in zip(idx, al, be, strict=True)])
        return out

    @staticmethod
    def add(x: Array, edges: list[list[tuple]]) -> Array:
        for k, strips in enumerate(edges):
            for (rows, cols), val in strips:
                # (a scatter: as a dynamic-update-slice, a one-update call copies b_prev)
                x = x.at[k, rows, cols].add(val)
        return x


def _node_sum(base: Array, x: Array, c: float) -> Array:
    """Node beliefs ``base + c Σ_k x[k]`` (precisions with ``diag``, potentials with
    ``rhs``).  The loops carry them: computed after each update, they cross the loop
    boundary, so XLA materialises them once instead of fusing the 12-slot sum into
    every slot's update (which then read every message array 12 more times)."""
    return lax.add(base, lax.mul(_cast(c, x), _slot_sum(x)))


def _precision_term(op: Operator, p: Params):
    """What a precision message takes from its sender: ``−η (Γ/c)² / α``."""

    c, eta = _cast(p.c, op.diag), _cast(-p.damping, op.diag)

    def term(k, idx, alpha, beta):
        w = lax.div(_part(op.weights, k, *idx), c)
        return lax.div(lax.mul(eta, lax.mul(w, w)), alpha)

    return term


# The updates' jit options: ``a``, ``b`` and ``b_prev`` are donated (see update_call).
_UPDATE = {
    "static_argnames": ("n", "momentum", "delta", "form", "neighbours"),
    "donate_argnums": (0, 1, 2),
}


@jit(**_UPDATE)
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
    form: str | None = None,
    neighbours: bool = True,
) -> tuple[Array, Array, Array, Array, Array]:
    """``n ≥ 1`` synchronous damped updates of every message (DESIGN §2) with the halo
    held fixed.

    ``momentum > 0`` adds a heavy-ball term ``momentum·(b_t − b_{t−1})`` to the
    ``b`` update; it vanishes at a fixed point, so the answer is unchanged.  ``b_prev``
    is the previous ``b`` (any array when ``momentum == 0``; returned as given).
    ``form`` is how the border is read (:data:`FORMS`; default :func:`default_form`).
    ``neighbours`` false: the block has none, its halo is the domain edge's constant
    (which the ``pads`` form uses without reading ``halo_flat``, :class:`_Border`) and it
    sends nothing.

    Returns the new messages, ``b_prev``, the flat outgoing cavity buffer for the
    neighbours (empty without them), and
    ``[Σ|Δa|, Σ|Δb|]`` of the last update (for the paper's δ rule; zeros when ``delta``
    is false, which compiles a smaller program).
    """
    by, bx = a.shape[1:]
    border = _Border(halo_flat, by, bx, form, neighbours)
    term_a = _precision_term(op, p)
    c, neg_eta, decay = _cast(p.c, b), _cast(-p.damping, b), _cast(1 - p.damping, b)

    def term_b(k, idx, alpha, beta):
        w = lax.div(_part(op.weights, k, *idx), c)
        return lax.div(lax.mul(lax.mul(neg_eta, w), beta), alpha)

    edges_a, edges_b = border.edge_terms(term_a), border.edge_terms(term_b)

    def step(a, b, A, B, bp):
        def new_a(k):
            alpha = border.shift(lax.sub(A, _part(a, OPPOSITE[k])), k, "alpha")
            return lax.add(lax.mul(decay, _part(a, k)), term_a(k, ALL, alpha, None))

        def new_b(k):
            alpha = border.shift(lax.sub(A, _part(a, OPPOSITE[k])), k, "alpha")
            beta = border.shift(lax.sub(B, _part(b, OPPOSITE[k])), k, "beta")
            x = lax.add(lax.mul(decay, _part(b, k)), term_b(k, ALL, alpha, beta))
            return _momentum(x, b, bp, k, momentum)

        a2 = border.add(_slot_terms(new_a), edges_a)
        b2 = border.add(_slot_terms(new_b), edges_b)
        A2, B2 = _node_sum(op.diag, a2, p.c), _node_sum(op.rhs, b2, p.c)
        return a2, b2, A2, B2, (b if momentum else bp)

    def sums(a: Array, b: Array) -> tuple[Array, Array]:
        return _node_sum(op.diag, a, p.c), _node_sum(op.rhs, b, p.c)

    def refresh(s: tuple, i: Array) -> tuple:
        a, b, A, B, bp = s
        return a, b, *_fenced(lambda: sums(a, b), (A, B), i), bp

    start = (a, b, *_fenced(lambda: sums(a, b), (op.diag, op.rhs), _zero(p)), b_prev)
    pairs = refresh if momentum else None
    (a, b, _, _, b_prev), prev = _loop(step, start, n, delta, border.form == "pads", pairs)
    change = jnp.zeros(2, a.dtype)
    if delta:
        change = jnp.stack([_abs_change(a, prev[0]), _abs_change(b, prev[1])])
    return a, b, b_prev, _outgoing(a, b, op, p, neighbours), change


def _momentum(x: Array, b: Array, bp: Array, k: int, momentum: float) -> Array:
    """``x + momentum (b[k] − bp[k])`` (``x`` when ``momentum`` is 0)."""
    if not momentum:
        return x
    return lax.add(x, lax.mul(_cast(momentum, x), lax.sub(_part(b, k), _part(bp, k))))


def _loop(
    step, state: tuple, n: int, delta: bool, unroll_one: bool = False, refresh=None
) -> tuple[tuple, tuple | None]:
    """``n ≥ 1`` applications of ``step`` to ``state`` in one ``fori_loop``; with
    ``delta`` also the state before the last one (for the δ rule's change).

    ``unroll_one``: a single application runs without a loop, so the node sums it
    computes for a next step are dead code.  That pays for the ``pads`` form (one
    iteration per call: 2.8 instead of 3.6 ms at 256² on a CPU) but not for ``strips``,
    whose entry sums XLA then fuses into every slot (2.9 instead of 1.7 ms).

    ``refresh``: the loop body is two applications, with ``refresh(state, i)`` between
    them.  With momentum the step hands its input ``b`` on as the next ``b_prev``; in a
    one-step body XLA then copies ``b`` and ``b_prev`` at every iteration (three full
    copies of 12 arrays), in a two-step body it writes each new array in place (frozen
    update at 1024² on a CPU: 29–31 instead of 34–36 ms per iteration, RESULTS §12).
    Inside the body the node sums are no longer a loop boundary, so ``refresh`` must
    recompute them with :func:`_fenced` (RESULTS §14)."""

    def run(k: int, s: tuple) -> tuple:
        if refresh is not None and k >= 2:
            s = lax.fori_loop(0, k // 2, lambda i, s: step(*refresh(step(*s), i)), s)
            return step(*s) if k % 2 else s
        return lax.fori_loop(0, k, lambda _, s: step(*s), s) if k else s

    if not delta:
        if n == 1 and unroll_one:
            return step(*state), None
        return run(n, state), None
    prev = run(n - 1, state)
    return step(*prev), prev


FENCE: bool | None = None
"""Whether :func:`_fenced` fences; ``None``: on a CPU only.  Read when a program is
traced, so a change needs ``jax.clear_caches()``."""

# settings read when a program is traced belong to the programs' keys (programs.py)
# (and the border form from the environment, which a benchmark may change in-process)
key_settings(
    lambda: (
        FENCE,
        FUSED_MIN_UPDATES,
        FUSED_MIN_NODES,
        fused.settings(),
        os.environ.get(FORM_ENV, "").strip(),
    )
)


def _fenced(f, like, count: Array):
    """``f()``, computed in a loop of one trip whose count XLA cannot see, so XLA writes
    the result once.  ``count`` is an integer ≥ 0 known only at run time (a loop
    counter, or :func:`_zero`); ``like`` holds arrays of the result's shapes and
    dtypes (the loop's initial value).

    Without it XLA fuses a node sum into each of its consumers: all 12 slots' updates,
    each of which then reads the 12 message arrays again.  That happens between the
    two updates of a pair, and at the start of a call of one update, whose loop XLA
    removes (RESULTS §14).  ``lax.optimization_barrier`` does not keep them apart:
    XLA's CPU pipeline drops it.

    On a CPU only: on a GPU each loop trip waits for its condition on the host, and
    XLA's GPU fusion was not measured with or without the fence.  :data:`FENCE`
    (``None``: on a CPU only) lets a benchmark force it either way."""
    if not (trace_backend() == "cpu" if FENCE is None else FENCE):
        return f()
    return lax.fori_loop(0, 1 + jnp.minimum(count, 0), lambda _, __: f(), like)


def _zero(p: Params) -> Array:
    """0, computed from a parameter so that XLA cannot know it (see :func:`_fenced`)."""
    return jnp.isnan(p.c).astype(jnp.int32)


def _abs_change(new: Array, old: Array) -> Array:
    return jnp.sum(jnp.abs(new - old))


def update_call(
    a: Array,
    b: Array,
    b_prev: Array,
    g: Array | None,
    op: Operator,
    halo: Array,
    p: Params,
    n: int,
) -> tuple:
    """The jitted update for this state and ``n`` iterations, and its positional
    arguments: :func:`iterate_b` once ``a`` is frozen (``g`` its gains), else
    :func:`iterate`.  All take the same static arguments (``n`` among them) and return
    ``(a, b, b_prev, cavities, change)``.

    With momentum and an odd ``n`` it is the variant that takes ``b_prev`` before ``b``
    (:func:`iterate_odd`, :func:`iterate_b_odd`).  JAX aliases each donated input with
    the first output of its shape, in order, and the updates leave the new ``b`` in the
    buffer of the ``b`` before last: after an odd number, the input ``b_prev``'s.  In
    the plain order XLA copies ``b`` and ``b_prev`` three times per call (one update
    per call at 1024² on a CPU: 54 instead of 35 ms, RESULTS §14).  The arrays may be
    ``jax.ShapeDtypeStruct`` (a prefetch)."""
    odd = n % 2 == 1 and math.prod(b_prev.shape) > 0
    if g is None:
        return (
            (iterate_odd, (a, b_prev, b, op, halo, p))
            if odd
            else (iterate, (a, b, b_prev, op, halo, p))
        )
    if odd:
        return iterate_b_odd, (a, b_prev, b, g, op, halo, p)
    return iterate_b, (a, b, b_prev, g, op, halo, p)


def _b_prev_first(update: Jit) -> Jit:
    """``update`` with ``b_prev`` before ``b`` in its arguments (see :func:`update_call`);
    named ``<update>_odd``."""
    fun = update.__wrapped__

    def swapped(a, b_prev, b, *rest, **static):
        return fun(a, b, b_prev, *rest, **static)

    sig = inspect.signature(fun)
    params = list(sig.parameters.values())
    params[1], params[2] = params[2], params[1]
    swapped.__signature__ = sig.replace(parameters=params)
    swapped.__name__ = swapped.__qualname__ = f"{fun.__name__}_odd"
    swapped.__doc__ = (
        f":func:`{fun.__name__}` with ``b_prev`` before ``b`` (see :func:`update_call`)."
    )
    return jit(swapped, **_UPDATE)


iterate_odd = _b_prev_first(iterate)


# -- Frozen precisions ------------------------------------------------------------------
# The precision messages ``a`` do not depend on ``b`` or ``h``; they reach their fixed
# point (to rounding) in a few dozen iterations, long before the ``b`` messages.  Once
# they are there, each ``b`` update is ``(1 − η) b − g ⊙ β`` with constant gains
# ``g = η (Γ/c) / α``: no division, no ``a`` traffic, and the same fixed point.


@jit(static_argnames=("n", "form", "neighbours"), donate_argnums=(0,))
def iterate_a(
    a: Array,
    b: Array,
    op: Operator,
    halo_flat: Array,
    p: Params,
    n: int,
    form: str | None = None,
    neighbours: bool = True,
) -> tuple[Array, Array, Array]:
    """``n`` updates of ``a`` alone (``b`` only fills the outgoing buffer).  Returns
    ``a``, the outgoing cavity buffer (empty without ``neighbours``, see
    :func:`iterate`) and the largest ``|Δa| / |a|`` over the ``n`` updates."""
    by, bx = a.shape[1:]
    border = _Border(halo_flat, by, bx, form, neighbours)
    term = _precision_term(op, p)
    edges = border.edge_terms(term)

    decay = _cast(1 - p.damping, a)

    def step(a, A):
        def new(k):
            alpha = border.shift(lax.sub(A, _part(a, OPPOSITE[k])), k, "alpha")
            return lax.add(lax.mul(decay, _part(a, k)), term(k, ALL, alpha, None))

        a2 = border.add(_slot_terms(new), edges)
        return a2, _node_sum(op.diag, a2, p.c)

    start = (a, _fenced(lambda: _node_sum(op.diag, a, p.c), op.diag, _zero(p)))
    (new, _), _ = _loop(step, start, n, False)
    # Over the whole call, not its last update: that would need the step twice in the
    # program (a second copy to compile, 1.9 -> 1.2 s per block shape on a CPU) or the
    # previous state kept through the loop (a copy per iteration).  Relative to each
    # message itself: small messages far from the largest (those of observed nodes)
    # must have converged too.
    scale = jnp.maximum(jnp.maximum(jnp.abs(new), jnp.abs(a)), jnp.finfo(a.dtype).tiny)
    change = jnp.max(jnp.abs(new - a) / scale)
    return new, _outgoing(new, b, op, p, neighbours), change


@jit(static_argnames=("neighbours",))
def gains(a: Array, op: Operator, halo_flat: Array, p: Params, neighbours: bool = True) -> Array:
    """``g[k] = η (Γ_k/c) / α_k`` for frozen ``a`` (its cavities across the border come
    from ``halo_flat``, which must hold the frozen ``a``'s cavities; without
    ``neighbours``, from the domain edge, see :func:`iterate`)."""
    by, bx = a.shape[1:]
    border = _Border(halo_flat, by, bx, "pads", neighbours)
    A = _node_sum(op.diag, a, p.c)
    c, eta = _cast(p.c, a), _cast(p.damping, a)

    def gain(k: int) -> Array:
        alpha = border.shift(lax.sub(A, _part(a, OPPOSITE[k])), k, "alpha")
        return lax.div(lax.mul(eta, lax.div(_part(op.weights, k), c)), alpha)

    return _slot_terms(gain)


@jit(**_UPDATE)
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
    form: str | None = None,
    neighbours: bool = True,
) -> tuple[Array, Array, Array, Array]:
    """Like :func:`iterate` with ``a`` frozen at its fixed point and ``g = gains(a)``.

    Returns ``a`` (as given, donated: JAX pairs donated inputs with the first outputs
    of their shape, so with ``b`` and ``b_prev`` alone donated they would alias the
    outputs ``a`` and ``b``, and XLA would copy three full arrays per call), ``b``,
    ``b_prev``, the outgoing cavity buffer (empty without ``neighbours``, see
    :func:`iterate`) and ``[0, Σ|Δb|]``."""
    by, bx = b.shape[1:]
    form = frozen_form(form, n, by * bx)
    if form == FUSED:
        return _iterate_b_fused(a, b, b_prev, g, op, halo_flat, p, n, momentum, delta, neighbours)
    border = _Border(halo_flat, by, bx, form, neighbours)

    def term(k, idx, alpha, beta):
        return lax.mul(lax.neg(_part(g, k, *idx)), beta)

    edges = border.edge_terms(term)
    decay = _cast(1 - p.damping, b)

    def step(b, B, bp):
        def new(k):
            beta = border.shift(lax.sub(B, _part(b, OPPOSITE[k])), k, "beta")
            x = lax.add(lax.mul(decay, _part(b, k)), term(k, ALL, None, beta))
            return _momentum(x, b, bp, k, momentum)

        b2 = border.add(_slot_terms(new), edges)
        return b2, _node_sum(op.rhs, b2, p.c), (b if momentum else bp)

    def refresh(s: tuple, i: Array) -> tuple:
        b, B, bp = s
        return b, _fenced(lambda: _node_sum(op.rhs, b, p.c), B, i), bp

    start = (b, _fenced(lambda: _node_sum(op.rhs, b, p.c), op.rhs, _zero(p)), b_prev)
    pairs = refresh if momentum else None
    # With momentum each step hands its input b on as b_prev, so after the loop b_prev
    # is the b that the δ rule compares with: no state kept before the last step, and
    # no copy of the step after the loop (10 updates: 2 copies of it instead of 4).
    keep = delta and not momentum
    (b, _, b_prev), prev = _loop(step, start, n, keep, border.form == "pads", pairs)
    change = jnp.zeros(2, b.dtype)
    if delta:
        change = jnp.stack([jnp.zeros((), b.dtype), _abs_change(b, prev[0] if keep else b_prev)])
    return a, b, b_prev, _outgoing(a, b, op, p, neighbours), change


iterate_b_odd = _b_prev_first(iterate_b)


def framed_messages(x: Array, halo_flat: Array, neighbours: bool = True) -> Array:
    """``b`` messages ``(12, by, bx)`` padded for :mod:`fused`, with the halo in the
    frame.  The pass reads the cavity of slot ``k``'s sender at ``j + d`` as
    ``B[j + d] − b[OPPOSITE[k]][j + d]``; outside the block ``B``'s frame is 0, so
    ``b[m]``'s frame holds minus the halo's cavity β of slot ``OPPOSITE[m]`` (each
    frame node and slot is read by one update only).  The halo's pieces are written
    into the padded array where they lie (20 small writes in place), rather than each
    slot's shifted into a full-size array and all subtracted (on a CPU 2.7× the time
    of the padding alone, now about the same).  Without ``neighbours`` the halo is the
    domain edge's, ``β = 0``: the frame stays 0 and ``halo_flat`` is not read."""
    if not neighbours:
        return fused.pad(x)
    by, bx = x.shape[1:]
    pieces = _split(halo_flat, message_layout(by, bx).incoming)
    top, lead = fused.origin()
    rows, cols = slice(top, top + by), slice(lead, lead + bx)

    def beyond(d: int, size: int, origin: int) -> slice:
        """The frame's ``|d|`` rows (columns) past the block on the side of ``d``."""
        return slice(origin + size, origin + size + d) if d > 0 else slice(origin + d, origin)

    def put(out: Array, m: int, piece: Array, r: slice, c: slice) -> Array:
        """``out[m, r, c] = −piece`` as one ``dynamic_update_slice`` (``.at[].set``
        traced a scatter, 10 ms each: 0.2 s of each fused program's tracing)."""
        update = lax.neg(lax.reshape(piece, (1, *piece.shape)))
        return lax.dynamic_update_slice(out, update, (m, r.start, c.start))

    out = fused.pad(x)
    for m in range(NSLOTS):
        k = OPPOSITE[m]
        dy, dx = OFFSETS[k]
        beta = k + NSLOTS
        if dx:
            out = put(out, m, pieces[(beta, "x")], rows, beyond(dx, bx, lead))
        if dy:
            out = put(out, m, pieces[(beta, "y")], beyond(dy, by, top), cols)
        if dx and dy:
            out = put(out, m, pieces[(beta, "corner")], beyond(dy, by, top), beyond(dx, bx, lead))
    return out


def _iterate_b_fused(a, b, b_prev, g, op, halo_flat, p, n, momentum, delta, neighbours):
    """:func:`iterate_b` with each update one :func:`fused.step`; same results."""
    by, bx = b.shape[1:]
    bpad = framed_messages(b, halo_flat, neighbours)
    bppad = framed_messages(b_prev, halo_flat, neighbours) if momentum else bpad
    sums = fused.pad(_node_sum(op.rhs, b, p.c))
    gpad, rhs = fused.pad(g), fused.pad(op.rhs)
    scalars = jnp.stack([1 - p.damping, p.c]).astype(b.dtype)

    def step(b, bp, s, s_old):
        b2, s2 = fused.step(b, bp, s, s_old, gpad, rhs, scalars, (by, bx), momentum)
        return b2, b, s2, s

    def run(k, state):
        # unrolled: one kernel per update, and no loop condition for the host to read
        return lax.fori_loop(0, k, lambda _, s: step(*s), state, unroll=max(1, min(k, 16)))

    # The step hands its input b on as the next b_prev: after the loop, state[1] is the
    # b before the last update, which the δ rule compares with.
    state = run(n, (bpad, bppad, sums, jnp.zeros_like(sums)))
    new, last = fused.unpad(state[0], by, bx), fused.unpad(state[1], by, bx)
    if momentum:
        b_prev = last
    change = jnp.zeros(2, b.dtype)
    if delta:
        change = jnp.stack([jnp.zeros((), b.dtype), _abs_change(new, last)])
    return a, new, b_prev, _outgoing(a, new, op, p, neighbours), change


@jit
def initial_cavities(a: Array, b: Array, op: Operator, p: Params) -> Array:
    by, bx = a.shape[1:]
    return pack_cavities(a, b, op, p, message_layout(by, bx))


@jit(static_argnames=("neighbours",))
def marginal_mean(
    a: Array, b: Array, op: Operator, p: Params, neighbours: bool = True
) -> tuple[Array, Array]:
    """Posterior mean ``μ = B/A`` and the flat frame of ``μ`` for the neighbours (empty
    without ``neighbours``: nobody reads it)."""
    A, B = _beliefs(a, b, op, p.c)
    mu = lax.div(B, A)
    return mu, pack_frame(mu) if neighbours else jnp.zeros((0,), mu.dtype)


def pack_frame(x: Array, width: int = 2) -> Array:
    by, bx = x.shape
    layout = field_layout(by, bx, width)
    parts = [_part(x, pc.rows, pc.cols) for g in layout.outgoing for pc in g]
    return lax.concatenate([lax.reshape(v, (v.size,)) for v in parts], 0)


@jit
def outgoing_frame(x: Array) -> Array:
    """:func:`pack_frame` of a field, as one compiled program: called eagerly, its eight
    slices and the concatenation were nine dispatched ops (on two ranks at 512², about
    half of the coarse-grid corrections' time on a CPU)."""
    return pack_frame(x)


def framed(x: Array, frame_flat: Array, width: int) -> Array:
    """``x`` with a ``width``-wide frame around it, shape ``(by+2w, bx+2w)``.  An empty
    ``frame_flat`` is a block without neighbours (``HaloExchange.frame_edge``): the
    frame is the domain edge's 0, one padding instead of cutting and joining eight
    pieces."""
    if frame_flat.shape[0] == 0:
        return _pad(x, 0.0, ((width, width), (width, width)))
    by, bx = x.shape
    layout = field_layout(by, bx, width)
    pieces = {}
    pos = 0
    for d, group in zip(DIRECTIONS, layout.incoming, strict=True):
        (pc,) = group
        pieces[d] = lax.reshape(_part(frame_flat, slice(pos, pos + pc.size)), pc.shape)
        pos += pc.size
    top = lax.concatenate([pieces[(-1, -1)], pieces[(-1, 0)], pieces[(-1, 1)]], 1)
    mid = lax.concatenate([pieces[(0, -1)], x, pieces[(0, 1)]], 1)
    bottom = lax.concatenate([pieces[(1, -1)], pieces[(1, 0)], pieces[(1, 1)]], 1)
    return lax.concatenate([top, mid, bottom], 0)


def apply_operator(x: Array, frame_flat: Array, op: Operator) -> Array:
    """``Q x`` on the block, with ``x`` outside the block given by its 2-wide frame."""
    by, bx = x.shape
    xp = framed(x, frame_flat, 2)
    out = lax.mul(op.diag, x)
    for k, (dy, dx) in enumerate(OFFSETS):
        near = _part(xp, slice(2 + dy, 2 + dy + by), slice(2 + dx, 2 + dx + bx))
        out = lax.add(out, lax.mul(_part(op.weights, k), near))
    return out


def messages_from_mean(m: Array, frame_flat: Array, op: Operator, c: float) -> Array:
    """``b`` messages ``(12, by, bx)`` whose cavity means all equal the field ``m``.

    At a fixed point ``b_ij = −(Γ_ij/c)·β_i\\j/α_i\\j`` and the cavity mean
    ``β/α`` is close to ``μ_i``; so a mean interpolated from a coarser level becomes a
    starting point for the fine messages (the fixed point itself is unchanged).
    """
    by, bx = m.shape
    mp = framed(m, frame_flat, 2)
    c = _cast(c, m)

    def slot(k: int) -> Array:
        dy, dx = OFFSETS[k]
        near = _part(mp, slice(2 + dy, 2 + dy + by), slice(2 + dx, 2 + dx + bx))
        return lax.mul(lax.neg(lax.div(_part(op.weights, k), c)), near)

    return _slot_terms(slot)


@jit(donate_argnums=(0, 1))
def shift_messages(
    b: Array, b_prev: Array, m: Array, frame_flat: Array, op: Operator, c: float
) -> tuple[Array, Array]:
    """``b`` and ``b_prev`` moved as if every sender's cavity mean moved by the field
    ``m`` (a coarse-grid correction, an extrapolation): both shift by
    :func:`messages_from_mean` of ``m``, so the momentum term does not see the jump.
    A zero-size ``b_prev`` (no momentum) stays as it is.  One pass, in place."""
    db = messages_from_mean(m, frame_flat, op, c)
    return b + db, (b_prev + db if b_prev.size else b_prev)


@jit
def residual(x: Array, frame_flat: Array, op: Operator) -> Array:
    """``h − Q x`` on the block."""
    return lax.sub(op.rhs, apply_operator(x, frame_flat, op))


@jit
def scaled_residual(mu: Array, frame_flat: Array, op: Operator) -> tuple[Array, Array]:
    """``s = D⁻¹(h − Qμ)`` on the block, ``D = diag(Q)``, and the local
    ``[Σ s², non-finite flag]``.

    The Jacobi scaling keeps the test meaningful when ``σ_y ≪ σ``: unscaled, the
    observed nodes' ``1/σ_y²`` dominates both norms and the relative residual falls
    below 1e-5 while the mean is still far from the solution.
    """
    r = lax.div(lax.sub(op.rhs, apply_operator(mu, frame_flat, op)), op.diag)
    bad = jnp.logical_not(jnp.all(jnp.isfinite(mu)))
    return r, jnp.stack([jnp.sum(r * r), bad.astype(r.dtype)])


@jit
def residual_sq(mu: Array, frame_flat: Array, op: Operator) -> Array:
    """Local ``[Σ (D⁻¹(h − Qμ))², non-finite flag]`` (see :func:`scaled_residual`)."""
    return scaled_residual(mu, frame_flat, op)[1]
