"""The kernel's two border forms (``strips``, ``pads``) give the same updates.

The solver's own tests (answer = exact, several ranks = one rank) run the default form
of this backend; these compare the two forms directly, with a random halo, so that the
other one is checked too.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpda_dist import kernel
from mpda_dist.halo import message_layout


def _block(ny: int, nx: int, seed: int = 0):
    """A random diagonally dominant operator, random messages and a random halo."""
    rng = np.random.default_rng(seed)
    w = -rng.uniform(0.0, 1.0, (12, ny, nx))
    diag = 12.0 + rng.uniform(0.0, 5.0, (ny, nx))
    op = kernel.Operator(
        jnp.asarray(diag), jnp.asarray(w), jnp.asarray(rng.standard_normal((ny, nx)))
    )
    # cavity precisions α > 0 for slots 0-11, any cavity potential β for 12-23
    halo = jnp.asarray(
        np.concatenate(
            [
                rng.uniform(5.0, 9.0, p.size) if p.array < 12 else rng.standard_normal(p.size)
                for g in message_layout(ny, nx).incoming
                for p in g
            ]
        )
    )
    msgs = [jnp.asarray(0.05 * rng.standard_normal((12, ny, nx))) for _ in range(3)]
    return op, halo, msgs


def _close(x, y, rtol=1e-12):
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == y.shape
    scale = max(np.abs(y).max(), 1e-300)
    assert np.abs(x - y).max() <= rtol * scale, np.abs(x - y).max() / scale


@pytest.mark.parametrize("shape", [(5, 4), (13, 18)])
def test_border_forms_agree(shape):
    p = kernel.Params(10.0, 0.6)
    with jax.enable_x64(True):
        op, halo, (a, b, bp) = _block(*shape)
        runs = {}
        for form in kernel.FORMS:
            copies = [jnp.array(x) for x in (a, b, bp)]
            coupled = kernel.iterate(*copies, op, halo, p, n=5, momentum=0.3, form=form)
            prec = kernel.iterate_a(jnp.array(a), b, op, halo, p, n=4, form=form)
            g = kernel.gains(jnp.abs(a) + 1.0, op, halo, p)
            frozen = kernel.iterate_b(
                *(jnp.array(x) for x in (a, b, bp)), g, op, halo, p, n=6, momentum=0.4, form=form
            )
            # one iteration per call (several ranks), which the forms compile differently
            one = kernel.iterate(
                *(jnp.array(x) for x in (a, b, bp)),
                op,
                halo,
                p,
                n=1,
                momentum=0.3,
                delta=False,
                form=form,
            )
            runs[form] = (coupled, prec, frozen, one)
    for got, want in zip(runs["strips"], runs["pads"], strict=True):
        for x, y in zip(got, want, strict=True):
            _close(x, y)


def test_a_block_without_neighbours_reads_the_edge_and_sends_nothing():
    """``neighbours=False``: the block's halo is the domain edge's constant (α = 1,
    β = 0), which the ``pads`` programs then use without reading the halo (a NaN halo
    here; ``strips`` still reads it), and it sends nothing.  The same messages, change
    and gains as with that halo passed in, an empty outgoing buffer, and programs with
    fewer operations (the buffer was half of them).  Each update in one of the two
    forms; the fused pass's framing too."""
    from mpda_dist import fused

    p = kernel.Params(10.0, 0.6)
    with jax.enable_x64(True):
        op, _, (a, b, bp) = _block(5, 4)
        layout = message_layout(5, 4)
        edge = jnp.asarray(
            np.concatenate([layout.fill_segment(i) for i in range(len(layout.incoming))])
        )
        nowhere = jnp.full(edge.shape, jnp.nan)  # not read without neighbours
        g = kernel.gains(jnp.abs(a) + 1.0, op, edge, p)
        g_edge = kernel.gains(jnp.abs(a) + 1.0, op, nowhere, p, neighbours=False)
        _close(g_edge, g)
        calls = {
            "iterate (strips)": lambda halo, nb: kernel.iterate(
                *(jnp.array(x) for x in (a, b, bp)), op, halo, p, n=5, momentum=0.3,
                form="strips", neighbours=nb,
            ),
            "iterate_a (pads)": lambda halo, nb: kernel.iterate_a(
                jnp.array(a), b, op, halo, p, n=4, form="pads", neighbours=nb
            ),
            "iterate_b (strips)": lambda halo, nb: kernel.iterate_b(
                *(jnp.array(x) for x in (a, b, bp)), g, op, halo, p, n=6, momentum=0.4,
                form="strips", neighbours=nb,
            ),
        }  # fmt: skip
        for name, call in calls.items():
            sent = call(edge, True)
            quiet = call(nowhere if "pads" in name else edge, False)
            out = 1 if name.startswith("iterate_a") else 3  # where the buffer is
            assert sent[out].size > 0 and quiet[out].shape == (0,), name
            for i, (x, y) in enumerate(zip(quiet, sent, strict=True)):
                if i != out:
                    _close(x, y)
        framed = kernel.framed_messages(b, edge)
        np.testing.assert_array_equal(kernel.framed_messages(b, nowhere, False), framed)
        assert np.all(np.asarray(framed) == np.asarray(fused.pad(b)))  # β = 0: a zero frame
        lowered = {
            nb: kernel.iterate_b.lower(a, b, bp, g, op, edge, p, n=6, form="pads", neighbours=nb)
            for nb in (True, False)
        }
    ops = {k: v.as_text().count(" = stablehlo.") for k, v in lowered.items()}
    assert ops[False] < 0.7 * ops[True], ops


def test_an_empty_field_frame_is_the_domain_edge():
    """A block without neighbours passes an empty field frame
    (:meth:`HaloExchange.frame_edge`): the field programs read it as the domain edge's
    0, as the full frame of zeros they took before, in fewer operations; the mean's
    outgoing frame is empty.  (The transfers between levels frame with
    :func:`kernel.framed` too.)"""
    from mpda_dist.halo import field_layout

    p = kernel.Params(10.0, 0.6)
    with jax.enable_x64(True):
        op, _, (a, b, bp) = _block(13, 18)
        x = op.rhs * 0.5 + 1.0  # no zeros near the border: a missed frame would show
        zero = jnp.zeros((field_layout(13, 18).in_offsets[-1],))
        empty = zero[:0]
        np.testing.assert_array_equal(kernel.framed(x, empty, 2), kernel.framed(x, zero, 2))
        assert kernel.framed(x, empty, 2).shape == (17, 22)
        fns = {  # the arguments, fresh for each call (shift_messages donates b, b_prev)
            "residual": (kernel.residual, lambda f: (x, f, op)),
            "residual_sq": (kernel.residual_sq, lambda f: (x, f, op)),
            "shift_messages": (
                kernel.shift_messages,
                lambda f: (jnp.array(b), jnp.array(bp), x, f, op, p.c),
            ),
        }
        for name, (fn, args) in fns.items():
            for got, want in zip(
                jax.tree.leaves(fn(*args(empty))), jax.tree.leaves(fn(*args(zero))), strict=True
            ):
                np.testing.assert_array_equal(got, want, err_msg=name)
            ops = [fn.lower(*args(f)).as_text().count(" = stablehlo.") for f in (empty, zero)]
            assert ops[0] < ops[1], (name, ops)
        mu, frame = kernel.marginal_mean(jnp.abs(a) + 1.0, b, op, p)
        mu2, quiet = kernel.marginal_mean(jnp.abs(a) + 1.0, b, op, p, neighbours=False)
        np.testing.assert_array_equal(mu2, mu)
        assert frame.size > 0 and quiet.shape == (0,)


def test_halo_reaches_the_border_only():
    """One update with another halo β changes the two border rows and columns only."""
    ny, nx = 9, 11
    p = kernel.Params(10.0, 0.6)
    with jax.enable_x64(True):
        op, halo, (a, b, bp) = _block(ny, nx)
        pieces = [q for g in message_layout(ny, nx).incoming for q in g]
        bump = np.concatenate([np.full(q.size, float(q.array >= 12)) for q in pieces])
        g = kernel.gains(jnp.abs(a) + 1.0, op, halo, p)
        out = {}
        for form in kernel.FORMS:
            for name, h in (("same", halo), ("bumped", halo + jnp.asarray(bump))):
                r = kernel.iterate_b(
                    *(jnp.array(x) for x in (a, b, bp)), g, op, h, p, n=1, delta=False, form=form
                )
                out[form, name] = np.asarray(r[1])
    for form in kernel.FORMS:
        diff = np.abs(out[form, "bumped"] - out[form, "same"]).max(axis=0)
        assert np.all(diff[2:-2, 2:-2] == 0), form
        frame = diff.copy()
        frame[2:-2, 2:-2] = 1.0
        assert np.all(frame > 0), form


@pytest.mark.parametrize("shape", [(4, 4), (9, 11), (5, 17)])
def test_outgoing_cavities_are_node_sums_minus_the_message(shape):
    """Each outgoing piece is the sender's node sum (over the whole block here) minus
    the message in the opposite slot, in the layout's order; ``pack_cavities`` sums
    the nodes on the border bands only."""
    from mpda_dist._offsets import OPPOSITE

    p = kernel.Params(1.7, 0.6)
    layout = message_layout(*shape)
    with jax.enable_x64(True):
        op, _, (a, b, _) = _block(*shape, seed=3)
        got = np.asarray(kernel.pack_cavities(a, b, op, p, layout))
        whole = [np.asarray(op.diag + p.c * a.sum(0)), np.asarray(op.rhs + p.c * b.sum(0))]
    want = []
    for piece in (q for g in layout.outgoing for q in g):
        beta = piece.array >= 12
        msgs = np.asarray(b if beta else a)[OPPOSITE[piece.slot]]
        want.append((whole[beta] - msgs)[piece.rows, piece.cols].ravel())
    np.testing.assert_allclose(got, np.concatenate(want), rtol=1e-13, atol=1e-13)


def test_border_form_from_the_environment(monkeypatch):
    monkeypatch.setenv(kernel.FORM_ENV, "pads")
    assert kernel.default_form() == "pads"
    monkeypatch.setenv(kernel.FORM_ENV, "fast")
    with pytest.raises(ValueError, match="MPDA_KERNEL_FORM='fast'.*strips, pads, fused"):
        kernel.default_form()
    monkeypatch.delenv(kernel.FORM_ENV)
    assert kernel.default_form() == ("strips" if jax.default_backend() == "cpu" else "pads")


_OLD_LAYOUT = {"ALIGNED": False, "STORE_LAST": False, "ALONG_ROWS": False}  # RESULTS §15


@pytest.mark.parametrize("variant", ["default", "tuned", "old"])
def test_fused_frozen_update_equals_pads(monkeypatch, variant):
    """The hand-written frozen update (``fused``: one Pallas pass per iteration, here in
    Pallas's interpreter) gives the ``pads`` form's results, with a random halo, on a
    block of 2 × 2 tiles whose last row and column of tiles stick out past the block;
    with and without momentum, an odd and an even count, and the δ rule's change.
    ``tuned``: eviction hints too, and a block of 2 × 3 whole tiles (no masks);
    ``old``: the layout and order of RESULTS §15 (rows not aligned, stores in slot
    order, programs down columns of tiles)."""
    from mpda_dist import fused

    # TILE is read when a program is traced: this block's shape is used nowhere else
    monkeypatch.setattr(fused, "TILE", (8, 32))
    shape, runs_of = (13, 41), ((0.4, 3, True), (0.0, 2, False))
    if variant == "tuned":
        for knob in ("ALIGNED", "STORE_LAST", "ALONG_ROWS", "HINTS"):
            monkeypatch.setattr(fused, knob, True)
        shape, runs_of = (16, 96), runs_of[:1]  # 2 × 3 tiles
        assert fused.origin() == (fused.FRAME, fused.ALIGN_LEAD)
        assert fused.padded_shape(*shape)[1] % fused.ALIGN_ROW == 0
    if variant == "old":
        for knob, value in _OLD_LAYOUT.items():
            monkeypatch.setattr(fused, knob, value)
        runs_of = runs_of[:1]
        assert fused.origin() == (fused.FRAME, fused.FRAME)
    p = kernel.Params(10.0, 0.6)
    with jax.enable_x64(True):
        op, halo, (a, b, bp) = _block(*shape, seed=7)
        g = kernel.gains(jnp.abs(a) + 1.0, op, halo, p)
        for mom, n, delta in runs_of:
            runs = {}
            for form in ("pads", kernel.FUSED):
                copies = (jnp.array(x) for x in (a, b, bp))
                runs[form] = kernel.iterate_b(
                    *copies, g, op, halo, p, n=n, momentum=mom, delta=delta, form=form
                )
            for got, want in zip(runs[kernel.FUSED], runs["pads"], strict=True):
                _close(got, want)
            assert not np.allclose(runs["pads"][1], b)  # the messages moved


def test_frozen_form_by_backend_count_and_size(monkeypatch):
    """The frozen update's form: ``strips`` on a CPU; on an accelerator ``fused`` for
    calls of ``FUSED_MIN_UPDATES`` updates or more on blocks of ``FUSED_MIN_NODES``
    nodes or more, ``pads`` otherwise; an explicit form or ``$MPDA_KERNEL_FORM`` wins."""
    monkeypatch.delenv(kernel.FORM_ENV, raising=False)
    m, big = kernel.FUSED_MIN_UPDATES, kernel.FUSED_MIN_NODES
    monkeypatch.setattr(kernel.jax, "default_backend", lambda: "cpu")
    assert [kernel.frozen_form(None, n, big) for n in (1, m)] == ["strips", "strips"]
    monkeypatch.setattr(kernel.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(kernel.fused, "supported", lambda: False)
    assert kernel.frozen_form(None, m, big) == "pads"  # an older GPU, or ROCm
    monkeypatch.setattr(kernel.fused, "supported", lambda: True)
    assert [kernel.frozen_form(None, n, big) for n in (1, m - 1, m, 5 * m)] == [
        "pads",
        "pads",
        kernel.FUSED,
        kernel.FUSED,
    ]
    assert [kernel.frozen_form(None, 5 * m, k) for k in (big - 1, big, 4 * big)] == [
        "pads",
        kernel.FUSED,
        kernel.FUSED,
    ]
    assert 254 * 254 < big <= 510 * 510  # a 1024² solve: its two finest levels fused
    monkeypatch.setattr(kernel.jax, "default_backend", lambda: "tpu")
    assert kernel.frozen_form(None, m, big) == "pads"
    assert kernel.frozen_form("strips", m, big) == "strips"
    monkeypatch.setenv(kernel.FORM_ENV, "fused")
    assert kernel.frozen_form(None, 1, 1) == kernel.FUSED


def test_fused_pass_supported_devices():
    """CUDA GPUs of compute capability 8.0 (Ampere) or later; not a CPU, not ROCm, not
    an older GPU."""
    from types import SimpleNamespace as NS

    from mpda_dist import fused

    def dev(platform, version, cc=None):
        return NS(platform=platform, client=NS(platform_version=version), compute_capability=cc)

    assert fused.supported(dev("gpu", "PJRT C API\ncuda 12080", "9.0"))
    assert fused.supported(dev("gpu", "cuda 12.8", "8.0"))
    assert not fused.supported(dev("gpu", "cuda 12.8", "7.0"))
    assert not fused.supported(dev("gpu", "rocm 6.3", "9.0"))
    assert not fused.supported(dev("gpu", "cuda 12.8", None))
    assert not fused.supported(dev("cpu", "cpu"))
    if jax.default_backend() == "cpu":
        assert not fused.supported()


@pytest.mark.parametrize("variant", ["default", "tuned", "old"])
def test_fused_pass_lowers_for_a_gpu(monkeypatch, variant):
    """The fused pass lowers to a Triton kernel for a CUDA GPU (no GPU needed: JAX
    lowers for another platform), with the default settings, with eviction hints and
    without masks, and with the layout of RESULTS §15; the tests above run it in
    Pallas's interpreter."""
    from mpda_dist import fused

    monkeypatch.setattr(fused, "INTERPRET", False)
    by, bx = 20, 70
    for knob, value in _OLD_LAYOUT.items() if variant == "old" else ():
        monkeypatch.setattr(fused, knob, value)
    if variant == "tuned":
        for knob in ("ALIGNED", "STORE_LAST", "ALONG_ROWS", "HINTS"):
            monkeypatch.setattr(fused, knob, True)
        by, bx = 2 * fused.TILE[0], 2 * fused.TILE[1]
    r, c = fused.padded_shape(by, bx)
    f32 = jnp.float32
    msgs, field = jax.ShapeDtypeStruct((12, r, c), f32), jax.ShapeDtypeStruct((r, c), f32)
    args = (msgs, msgs, field, field, msgs, field, jax.ShapeDtypeStruct((2,), f32))
    f = jax.jit(lambda *a: fused.step(*a, block=(by, bx), momentum=0.5))
    text = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1


_LOWER_FOR_GPU = """
import hashlib, re, sys
import jax, jax.numpy as jnp
from mpda_dist import fused

tried = []
class Finder:  # records the imports that Python's finders are asked for
    def find_spec(self, name, path=None, target=None):
        tried.append(name)
sys.meta_path.insert(0, Finder())
if sys.argv[1] == "as-shipped":
    fused._register_dialect_module = lambda: None
if sys.argv[1] == "preloaded":
    fused.preload()
fused.INTERPRET = False
before = set(sys.modules)
r, c = fused.padded_shape(20, 70)
msgs, field = (jax.ShapeDtypeStruct(s, jnp.float32) for s in ((12, r, c), (r, c)))
args = (msgs, msgs, field, field, msgs, field, jax.ShapeDtypeStruct((2,), jnp.float32))
f = jax.jit(lambda *a: fused.step(*a, block=(20, 70), momentum=0.5))
text = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
ir = re.findall(r'ir = "([^"]*)"', text)
new = len(set(sys.modules) - before)  # modules the lowering imported
failed = sum(n.endswith(".tt") for n in tried)
print(len(ir), hashlib.sha256(ir[0].encode()).hexdigest(), failed, new)
"""


def test_triton_dialect_module_registered():
    """With the Triton dialect's module registered under the name MLIR's bindings look
    for, lowering the fused pass for a GPU tries no failing ``….tt`` imports (jaxlib as
    shipped: several per Triton operation), and the Triton IR is the same byte for byte.
    After :func:`fused.preload` (what a lowering helper runs at start) the lowering
    imports no module at all, and the IR is the same again.  Each in a fresh process:
    the bindings remember a module once found."""
    import subprocess
    import sys

    def lowered(how: str) -> tuple[int, str, int, int]:
        done = subprocess.run(
            [sys.executable, "-c", _LOWER_FOR_GPU, how],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        count, digest, imports, new = done.stdout.split()
        return int(count), digest, int(imports), int(new)

    shipped, registered = lowered("as-shipped"), lowered("registered")
    preloaded = lowered("preloaded")
    assert shipped[0] == registered[0] == preloaded[0] == 1
    assert registered[1] == shipped[1] == preloaded[1]  # the same Triton IR
    assert shipped[2] > 100  # what the registration saves
    assert registered[2] <= 1  # (one look whether jaxlib ships the name itself)
    assert registered[3] > 50  # Pallas's GPU lowering, imported on first use
    assert preloaded[3] == 0  # what the preload saves a helper's first program


# every pair of (even/odd count, δ or not, frozen or coupled) once: 4 cases, not 8
@pytest.mark.parametrize(
    "n,delta,frozen", [(4, False, True), (4, True, False), (5, False, False), (5, True, True)]
)
def test_loop_in_pairs_equals_single_steps(n, delta, frozen):
    """With momentum the loops run two updates per body, the node sums recomputed
    between them (odd ``n``: one more update after the loop); the result equals ``n``
    calls of one update each."""
    p = kernel.Params(10.0, 0.6)
    with jax.enable_x64(True):
        op, halo, (a, b, bp) = _block(7, 9, seed=5)
        g = kernel.gains(jnp.abs(a) + 1.0, op, halo, p) if frozen else None

        def call(a, b, bp, n, delta):
            fn, args = kernel.update_call(a, b, bp, g, op, halo, p, n)
            return fn(*args, n=n, momentum=0.5, delta=delta)

        whole = call(*(jnp.array(x) for x in (a, b, bp)), n, delta)
        a1, b1, bp1 = (jnp.array(x) for x in (a, b, bp))
        for _ in range(n):
            last = (jnp.array(a1), jnp.array(b1))  # a, b and b_prev are donated
            a1, b1, bp1, _, _ = call(a1, b1, bp1, 1, False)
        for got, want in zip(whole[:3], (a1, b1, bp1), strict=True):
            _close(got, want)
        if frozen:
            _close(a1, a)
        if delta:  # the change of the last update
            want = [jnp.sum(jnp.abs(x - y)) for x, y in zip((a1, b1), last, strict=True)]
            _close(whole[4], jnp.stack(want))


@pytest.mark.skipif(
    jax.default_backend() != "cpu",
    reason="XLA's CPU buffer assignment; on an H100 a single strips update copies "
    "b (strips is not the GPU form; RESULTS §22)",
)
@pytest.mark.parametrize("frozen", [True, False])
def test_updates_copy_no_message_array(frozen):
    """The compiled update writes the new messages where the donated ones were, for
    an odd number of updates too (:func:`kernel.update_call` then passes ``b_prev``
    first): no full copy of a ``(12, by, bx)`` array in the program.  In the plain
    order an odd count copied ``b`` and ``b_prev`` three times per call.  The ``strips``
    form (the CPU default): with ``pads`` a single update still copies ``b_prev``
    (and ``a`` in the coupled update) on a CPU."""
    op, halo, (a, b, bp) = _block(24, 32, seed=2)
    op = kernel.Operator(*(x.astype(jnp.float32) for x in op))
    a, b, bp, halo = (x.astype(jnp.float32) for x in (a, b, bp, halo))
    g = jnp.abs(a) if frozen else None
    p = kernel.Params(10.0, 0.6)
    for n in (1, 3):  # the odd counts; an even one (10) in the next test
        fn, args = kernel.update_call(a, b, bp, g, op, halo, p, n)
        text = fn.lower(*args, n=n, momentum=0.5, delta=False, form="strips").compile().as_text()
        copies = [ln for ln in text.splitlines() if "f32[12,24,32]" in ln and " copy(" in ln]
        assert not copies, (n, copies)


def _slot_sum_fusions(hlo: str) -> list[int]:
    """Per loop body of a compiled program (a computation with 12 fusions or more): how
    many of its fusions read 10 or more slots of one ``(12, by, bx)`` array."""
    comps = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^(%[\w.\-]+) \(.*?\) -> .*? \{\n(.*?)^\}", hlo, re.S | re.M)
    }
    out = []
    for body in comps.values():
        calls = re.findall(r"fusion\(.*?calls=(%[\w.\-]+)", body)
        if len(calls) >= 12:
            slot = r"slice\(%param[\w.]*\), slice=\{\[\d+:\d+\]"
            out.append(sum(len(re.findall(slot, comps.get(c, ""))) >= 10 for c in calls))
    return out


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fence is for XLA's CPU fusion")
@pytest.mark.parametrize("frozen", [True, False])
def test_paired_updates_sum_each_node_once(frozen):
    """With momentum the loop body holds two updates; the node sums between them are
    computed once (``kernel._fenced``), not in each of the 12 slots' updates: the body
    has one fusion per node sum that reads all 12 message arrays (2 frozen: ``B`` twice;
    4 coupled).  Without the fence XLA gave 13 and 26.  Reads the compiled HLO, so a new
    XLA may need this test updated."""
    op, halo, (a, b, bp) = _block(24, 32, seed=2)
    op = kernel.Operator(*(x.astype(jnp.float32) for x in op))
    a, b, bp, halo = (x.astype(jnp.float32) for x in (a, b, bp, halo))
    g = jnp.abs(a) if frozen else None
    fn, args = kernel.update_call(a, b, bp, g, op, halo, kernel.Params(10.0, 0.6), 10)
    hlo = fn.lower(*args, n=10, momentum=0.5, delta=False, form="strips").compile().as_text()
    assert _slot_sum_fusions(hlo) == [2 if frozen else 4]
    # and, an even count, no copy of a message array (test_updates_copy_no_message_array)
    copies = [ln for ln in hlo.splitlines() if "f32[12,24,32]" in ln and " copy(" in ln]
    assert not copies, copies
