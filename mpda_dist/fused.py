"""The frozen ``b`` update as one hand-written pass per iteration (Pallas, Triton backend).

XLA compiles :func:`mpda_dist.kernel.iterate_b` into about 13 kernels per iteration on
a GPU (the node sums, then each slot's update), and with the ``pads`` form some slots
also read halo pieces that XLA expanded to full arrays: 2.2–2.7× the bytes floor on an
H100 (benchmarks/RESULTS.md §15); this pass is at 1.24–1.45× (§17).  Here one
program per tile of ``TILE`` nodes reads, for every slot ``k``, its own ``b[k]``,
``g[k]`` (and ``b_prev[k]`` with momentum), and
the sender's cavity ``B − b[OPPOSITE[k]]`` at ``j + OFFSETS[k]``, writes the new
``b[k]``, and sums the new messages into the next iteration's node sums as it goes:
51 values per node and iteration with momentum, against the floor's 49.

Everything works on *padded* arrays (:func:`padded_shape`): the block at
:func:`origin` (row 2; column 4 with ``ALIGNED``, else 2), its size rounded up to whole
tiles, a frame of at least 2 around it, and with ``ALIGNED`` rows of a multiple of 128
bytes.  The frame carries the halo (see :func:`mpda_dist.kernel.framed_messages`),
so the pass never branches on the block border; the rows and columns past the block
are computed and not stored.  The pass writes the new ``b`` over ``b_prev`` (each
program reads ``b_prev`` only where it writes) and the new node sums over the node
sums of the iteration before, so a loop needs two buffers of each and no copies.

Pure: padded arrays in, padded arrays out.  On a CPU it runs in Pallas's interpreter
(slow; for the tests).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import threading

import jax
import jax.numpy as jnp
from jax import lax

from mpda_dist._offsets import OFFSETS, OPPOSITE
from mpda_dist.programs import trace_backend

Array = jax.Array

TILE: tuple[int, int] = (8, 128)
"""Rows × columns of nodes per program (powers of 2, as Triton needs).  On an H100 at
2048² with momentum (§15): 8 × 128 491 µs per update, 16 × 64 555, 16 × 128 558,
32 × 64 609.  Read when a program is traced, so a change needs ``jax.clear_caches()``."""

WARPS = 8
"""Warps per program (Triton's ``num_warps``); read when a program is traced.  8 × 128
tiles at 2048² on an H100 (§17, all variants below on): 363 µs with 8 warps, 423 with 4."""

FRAME = 2  # the stencil's reach

ALIGNED = True
"""Start the block at column ``ALIGN_LEAD`` (16 bytes in float32) instead of ``FRAME``
and round the rows up to ``ALIGN_ROW`` values (128 bytes), so that the loads and
stores of a tile at its own nodes are whole aligned vectors; the shifted reads of the
neighbours stay as they are.  Read when a program is traced."""

ALIGN_LEAD, ALIGN_ROW = 4, 32  # a lead of 32 would start each tile row on a 128-byte line

STORE_LAST = True
"""Compute the 12 new messages first and store them at the end of the program, so that
no load waits behind a store (Triton keeps loads and stores in program order when it
cannot tell that they do not overlap).  Read when a program is traced."""

ALONG_ROWS = True
"""Number the programs along a row of tiles first (consecutive programs read
consecutive memory) instead of down a column of tiles (consecutive programs share the
rows of their vertical neighbours' halo).  Read when a program is traced."""

HINTS = False
"""L2 eviction hints: ``b`` and the node sums, which the neighbouring programs read
again, kept (``evict_last``); gains, ``b_prev`` and ``rhs``, read once, streamed
(``evict_first``).  Read when a program is traced."""

INTERPRET: bool | None = None
"""Run in Pallas's interpreter; ``None``: on a CPU only.  ``False`` on a CPU lowers for
Triton (``jax.export`` for a GPU platform checks the lowering without a GPU)."""


def settings() -> tuple:
    """The settings above, which a traced program depends on."""
    return TILE, WARPS, ALIGNED, ALIGN_LEAD, ALIGN_ROW, STORE_LAST, ALONG_ROWS, HINTS, INTERPRET


SUPPORTED: list[bool | None] = [None]  # set in a lowering helper: the requester's answer


def supported(device=None) -> bool:
    """Whether the pass builds for ``device`` (default: the first): a CUDA GPU of
    compute capability 8.0 or later, what Pallas's Triton backend supports."""
    if device is None and SUPPORTED[0] is not None:
        return SUPPORTED[0]
    device = device if device is not None else jax.devices()[0]
    if device.platform != "gpu" or "cuda" not in str(device.client.platform_version).lower():
        return False
    try:
        return int(str(getattr(device, "compute_capability", "")).split(".")[0]) >= 8
    except ValueError:
        return False


def origin() -> tuple[int, int]:
    """Row and column of the block's first node in a padded array."""
    return FRAME, ALIGN_LEAD if ALIGNED else FRAME


def padded_shape(by: int, bx: int) -> tuple[int, int]:
    """The padded array's last two dimensions for a ``by × bx`` block."""
    tr, tc = TILE
    cols = origin()[1] + math.ceil(bx / tc) * tc + FRAME
    if ALIGNED:
        cols = math.ceil(cols / ALIGN_ROW) * ALIGN_ROW
    return math.ceil(by / tr) * tr + 2 * FRAME, cols


def pad(x: Array) -> Array:
    """``x (…, by, bx)`` into a zero padded array (frame and tile remainder zero)."""
    by, bx = x.shape[-2:]
    (r, c), (r0, c0) = padded_shape(by, bx), origin()
    widths = [(0, 0)] * (x.ndim - 2)
    widths += [(r0, r - by - r0), (c0, c - bx - c0)]
    return jnp.pad(x, widths)


def unpad(x: Array, by: int, bx: int) -> Array:
    r0, c0 = origin()
    return x[..., r0 : r0 + by, c0 : c0 + bx]


def step(
    b: Array,
    b_prev: Array,
    sums: Array,
    sums_out: Array,
    g: Array,
    rhs: Array,
    scalars: Array,
    block: tuple[int, int],
    momentum: float,
) -> tuple[Array, Array]:
    """One frozen update on padded arrays.

    ``b``, ``b_prev``: ``(12, *padded_shape(by, bx))`` messages with the halo in their frames;
    ``sums``: the node sums ``B = rhs + c Σ_k b[k]`` with a zero frame; ``g``, ``rhs``:
    padded gains and potentials; ``scalars = [1 − η, c]``.  Returns the new ``b``
    (in ``b_prev``'s buffer, its frame kept) and its node sums (in ``sums_out``'s
    buffer, whose frame must be zero).  ``block = (by, bx)``, the unpadded size."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    by, bx = block
    tr, tc = TILE
    grid = (math.ceil(by / tr), math.ceil(bx / tc))
    top, lead = origin()
    interpret = trace_backend() == "cpu" if INTERPRET is None else INTERPRET
    whole = by % tr == 0 and bx % tc == 0  # no tile sticks out: no masks
    keep_hint, stream_hint = ("evict_last", "evict_first") if HINTS else (None, None)

    def body(b_ref, bp_ref, s_ref, _so_in, g_ref, rhs_ref, k_ref, out_ref, so_ref):
        ti, tj = (
            (pl.program_id(1), pl.program_id(0))
            if ALONG_ROWS
            else (
                pl.program_id(0),
                pl.program_id(1),
            )
        )
        r0, c0 = ti * tr, tj * tc
        keep, c = k_ref[0], k_ref[1]
        # the tile's first row and column in the padded arrays, each shift added once
        # where it is not 0 (every + is one more operation to trace and lower)
        row, col = r0 + top, c0 + lead
        here = (pl.ds(row, tr), pl.ds(col, tc))
        inside = None
        if not whole:
            ii = r0 + lax.broadcasted_iota(jnp.int32, (tr, tc), 0)
            jj = c0 + lax.broadcasted_iota(jnp.int32, (tr, tc), 1)
            inside = (ii < by) & (jj < bx)

        def load(ref, idx, hint):
            return ref[idx] if interpret else plgpu.load(ref.at[idx], eviction_policy=hint)

        total = jnp.zeros((tr, tc), b_ref.dtype)
        pending = []
        for k, (dy, dx) in enumerate(OFFSETS):
            there = (pl.ds(row + dy if dy else row, tr), pl.ds(col + dx if dx else col, tc))
            bk = load(b_ref, (k, *here), keep_hint)
            cavity = load(s_ref, there, keep_hint) - load(b_ref, (OPPOSITE[k], *there), keep_hint)
            new = keep * bk - load(g_ref, (k, *here), stream_hint) * cavity
            if momentum:
                new = new + momentum * (bk - load(bp_ref, (k, *here), stream_hint))
            pending.append((out_ref.at[(k, *here)], new))
            if not STORE_LAST:
                _store(*pending.pop(), inside, interpret)
            total = total + new
        for ref, new in pending:
            _store(ref, new, inside, interpret)
        sums = load(rhs_ref, here, stream_hint) + c * total
        _store(so_ref.at[here], sums, inside, interpret)

    if not interpret:
        _register_dialect_module()
    kwargs = {} if interpret else {"compiler_params": _triton_params()}
    return pl.pallas_call(
        body,
        out_shape=(
            jax.ShapeDtypeStruct(b_prev.shape, b_prev.dtype),
            jax.ShapeDtypeStruct(sums_out.shape, sums_out.dtype),
        ),
        grid=grid[::-1] if ALONG_ROWS else grid,
        input_output_aliases={1: 0, 3: 1},
        interpret=interpret,
        name="frozen_update",
        **kwargs,
    )(b, b_prev, sums, sums_out, g, rhs, scalars)


def _store(ref, value: Array, mask: Array | None, interpret: bool) -> None:
    """``ref[...] = value`` where ``mask`` (everywhere if ``None``); elsewhere ``ref``
    keeps what it holds."""
    if interpret:
        ref[...] = value if mask is None else jnp.where(mask, value, ref[...])
    else:
        from jax.experimental.pallas import triton as plgpu

        plgpu.store(ref, value, mask=mask)


DIALECT_MODULE = "jaxlib.mlir.dialects.tt"

# What lowering the pass for a GPU imports the first time (Pallas, its Triton and
# Mosaic GPU back ends, MLIR's dialects): 121 modules, about 0.5 s (:func:`preload`;
# jax 0.10.2).
_PRELOAD = (
    "jax.experimental.pallas",
    "jax.experimental.pallas.triton",
    "jax._src.pallas.triton.pallas_call_registration",
    "jax._src.pallas.mosaic_gpu.pallas_call_registration",
    "jaxlib.mlir.dialects.mhlo",
)


def preload() -> None:
    """Import now what the first lowering of :func:`step` for a GPU would import (a
    lowering helper does this while its rank reads its inputs: its first fused program
    then takes 0.45–0.57 instead of 0.67–1.05 s here, benchmarks/RESULTS.md §24).  A module this jax
    does not have is skipped: the lowering imports what it needs as before."""
    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # private modules move between jax versions
            pass
    _register_dialect_module()


def _register_dialect_module() -> None:
    """Make the Triton dialect's Python module importable under the name that MLIR's
    bindings look for (``<prefix>.tt``, :data:`DIALECT_MODULE` first).  jaxlib ships it
    as ``jaxlib.triton.dialect``, so each time the bindings meet a ``tt`` operation or
    type they tried three imports that fail, and Python caches no failure: 0.1 s of
    file-system lookups per program, a fifth of the Triton lowering (benchmarks/RESULTS.md
    §23).  With the module found the bindings remember it; the lowered IR is the same
    byte for byte (tests/test_kernel.py)."""
    # a lock: the imports ahead (mpda_dist.lowering) and a compile thread may both be here
    with _REGISTERING:
        if DIALECT_MODULE in sys.modules or _REGISTERED[0]:
            return
        _REGISTERED[0] = True
        try:
            if importlib.util.find_spec(DIALECT_MODULE) is not None:
                return  # a jaxlib that ships it under that name: nothing to do
            from jaxlib.triton import dialect
        except ImportError:  # another jaxlib: leave the bindings as they are
            return
        sys.modules[DIALECT_MODULE] = dialect


_REGISTERED = [False]
_REGISTERING = threading.Lock()


def _triton_params():
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=WARPS, num_stages=1)
