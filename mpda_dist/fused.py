"""The frozen ``b`` update as one hand-written pass per iteration (Pallas, Triton backend).

XLA compiles :func:`mpda_dist.kernel.iterate_b` into about 13 kernels per iteration on
a GPU (the node sums, then each slot's update), and with the ``pads`` form some slots
also read halo pieces that XLA expanded to full arrays: 2.2–2.7× the bytes floor on an
H100 (benchmarks/RESULTS.md §15).  Here one program per tile of ``TILE`` nodes reads,
for every slot ``k``, its own ``b[k]``, ``g[k]`` (and ``b_prev[k]`` with momentum), and
the sender's cavity ``B − b[OPPOSITE[k]]`` at ``j + OFFSETS[k]``, writes the new
``b[k]``, and sums the new messages into the next iteration's node sums as it goes:
51 values per node and iteration with momentum, against the floor's 49.

Everything works on *padded* arrays of shape ``(…, R + 4, C + 4)``: the block at
``[2 : 2 + by, 2 : 2 + bx]``, ``R`` and ``C`` the block's size rounded up to whole
tiles.  The 2-wide frame carries the halo (see :func:`mpda_dist.kernel.framed_messages`),
so the pass never branches on the block border; the rows and columns past the block
are computed and not stored.  The pass writes the new ``b`` over ``b_prev`` (each
program reads ``b_prev`` only where it writes) and the new node sums over the node
sums of the iteration before, so a loop needs two buffers of each and no copies.

Pure: padded arrays in, padded arrays out.  On a CPU it runs in Pallas's interpreter
(slow; for the tests).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from mpda_dist._offsets import OFFSETS, OPPOSITE

Array = jax.Array

TILE: tuple[int, int] = (8, 128)
"""Rows × columns of nodes per program (powers of 2, as Triton needs).  On an H100 at
2048² with momentum (§15): 8 × 128 491 µs per update, 16 × 64 555, 16 × 128 558,
32 × 64 609.  Read when a program is traced, so a change needs ``jax.clear_caches()``."""

WARPS = 4
"""Warps per program (Triton's ``num_warps``); read when a program is traced."""

FRAME = 2  # the stencil's reach

INTERPRET: bool | None = None
"""Run in Pallas's interpreter; ``None``: on a CPU only.  ``False`` on a CPU lowers for
Triton (``jax.export`` for a GPU platform checks the lowering without a GPU)."""


def supported(device=None) -> bool:
    """Whether the pass builds for ``device`` (default: the first): a CUDA GPU of
    compute capability 8.0 or later, what Pallas's Triton backend supports."""
    device = device if device is not None else jax.devices()[0]
    if device.platform != "gpu" or "cuda" not in str(device.client.platform_version).lower():
        return False
    try:
        return int(str(getattr(device, "compute_capability", "")).split(".")[0]) >= 8
    except ValueError:
        return False


def padded_shape(by: int, bx: int) -> tuple[int, int]:
    """The padded array's last two dimensions for a ``by × bx`` block."""
    tr, tc = TILE
    return math.ceil(by / tr) * tr + 2 * FRAME, math.ceil(bx / tc) * tc + 2 * FRAME


def pad(x: Array) -> Array:
    """``x (…, by, bx)`` into a zero padded array (frame and tile remainder zero)."""
    by, bx = x.shape[-2:]
    r, c = padded_shape(by, bx)
    widths = [(0, 0)] * (x.ndim - 2)
    widths += [(FRAME, r - by - FRAME), (FRAME, c - bx - FRAME)]
    return jnp.pad(x, widths)


def unpad(x: Array, by: int, bx: int) -> Array:
    return x[..., FRAME : FRAME + by, FRAME : FRAME + bx]


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

    ``b``, ``b_prev``: ``(12, R+4, C+4)`` messages with the halo in their frames;
    ``sums``: the node sums ``B = rhs + c Σ_k b[k]`` with a zero frame; ``g``, ``rhs``:
    padded gains and potentials; ``scalars = [1 − η, c]``.  Returns the new ``b``
    (in ``b_prev``'s buffer, its frame kept) and its node sums (in ``sums_out``'s
    buffer, whose frame must be zero).  ``block = (by, bx)``, the unpadded size."""
    from jax.experimental import pallas as pl

    by, bx = block
    tr, tc = TILE
    rows, cols = b.shape[1] - 2 * FRAME, b.shape[2] - 2 * FRAME
    interpret = jax.default_backend() == "cpu" if INTERPRET is None else INTERPRET

    def body(b_ref, bp_ref, s_ref, _so_in, g_ref, rhs_ref, k_ref, out_ref, so_ref):
        r0 = pl.program_id(0) * tr
        c0 = pl.program_id(1) * tc
        keep, c = k_ref[0], k_ref[1]
        here = (pl.ds(r0 + FRAME, tr), pl.ds(c0 + FRAME, tc))
        ii = r0 + lax.broadcasted_iota(jnp.int32, (tr, tc), 0)
        jj = c0 + lax.broadcasted_iota(jnp.int32, (tr, tc), 1)
        inside = (ii < by) & (jj < bx)
        total = jnp.zeros((tr, tc), b_ref.dtype)
        for k, (dy, dx) in enumerate(OFFSETS):
            there = (pl.ds(r0 + FRAME + dy, tr), pl.ds(c0 + FRAME + dx, tc))
            bk = b_ref[(k, *here)]
            cavity = s_ref[there] - b_ref[(OPPOSITE[k], *there)]
            new = keep * bk - g_ref[(k, *here)] * cavity
            if momentum:
                new = new + momentum * (bk - bp_ref[(k, *here)])
            _store(out_ref.at[(k, *here)], new, inside, interpret)
            total = total + new
        _store(so_ref.at[here], rhs_ref[here] + c * total, inside, interpret)

    kwargs = {} if interpret else {"compiler_params": _triton_params()}
    return pl.pallas_call(
        body,
        out_shape=(
            jax.ShapeDtypeStruct(b_prev.shape, b_prev.dtype),
            jax.ShapeDtypeStruct(sums_out.shape, sums_out.dtype),
        ),
        grid=(rows // tr, cols // tc),
        input_output_aliases={1: 0, 3: 1},
        interpret=interpret,
        name="frozen_update",
        **kwargs,
    )(b, b_prev, sums, sums_out, g, rhs, scalars)


def _store(ref, value: Array, mask: Array, interpret: bool) -> None:
    """``ref[...] = value`` where ``mask``; elsewhere ``ref`` keeps what it holds."""
    if interpret:
        ref[...] = jnp.where(mask, value, ref[...])
    else:
        from jax.experimental.pallas import triton as plgpu

        plgpu.store(ref, value, mask=mask)


def _triton_params():
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=WARPS, num_stages=1)
