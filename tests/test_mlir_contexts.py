"""One MLIR context per thread for JAX's lowerings (mpda_dist.mlir_contexts)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.interpreters import mlir

from mpda_dist import kernel, mlir_contexts, programs  # noqa: F401 - programs installs it
from mpda_dist.halo import message_layout

F32 = jnp.float32


def _frozen_update_specs(ny: int, nx: int) -> tuple:
    arr = lambda *shape: jax.ShapeDtypeStruct(shape, F32)  # noqa: E731
    msg = arr(12, ny, nx)
    op = kernel.Operator(arr(ny, nx), arr(12, ny, nx), arr(ny, nx))
    scalar = jax.ShapeDtypeStruct((), F32, weak_type=True)
    halo = arr(message_layout(ny, nx).in_offsets[-1])
    return (msg, msg, msg, msg, op, halo, kernel.Params(scalar, scalar))


def _lowered_texts() -> list[str]:
    """The frozen update lowered for this CPU (strips) and for CUDA (the fused pass,
    through Pallas's Triton lowering, and pads), and a small transfer program."""
    specs = _frozen_update_specs(20, 70)
    static = {"n": 10, "momentum": 0.5, "delta": True}
    out = []
    with jax.enable_x64(False):
        for form, platforms in (("strips", None), (kernel.FUSED, ("cuda",)), ("pads", ("cuda",))):
            traced = kernel.iterate_b.jitted.trace(*specs, **static, form=form)
            out.append(traced.lower(lowering_platforms=platforms).as_text())
        x = jax.ShapeDtypeStruct((34, 34), F32)
        out.append(jax.jit(lambda v: jnp.cumsum(v, axis=1)).trace(x).lower().as_text())
    return out


def test_each_thread_reuses_its_own_context(monkeypatch):
    # A thread takes a new context after REUSES lowerings: this worker's main thread may
    # be one short of it (CI: the two calls below then differed, by the tests' order).
    monkeypatch.setattr(mlir_contexts, "REUSES", 10**9)
    assert mlir_contexts.install()  # (programs did at import; a second call is a no-op)
    make = mlir.make_ir_context
    assert getattr(make, "_mpda_reused_per_thread", False)
    assert make() is make()
    other: list = []
    t = threading.Thread(target=lambda: other.extend([make(), make()]))
    t.start()
    t.join()
    assert other[0] is other[1] and other[0] is not make()
    mlir_contexts.install()
    assert mlir.make_ir_context is make  # not wrapped twice


def test_lowered_programs_are_the_same_text_as_with_fresh_contexts(monkeypatch):
    """Reused contexts change nothing in what is lowered: the same programs lowered in
    fresh contexts (JAX's own function, its caches cleared) are the same text, the
    fused pass's Triton kernel included."""
    from mpda_dist import fused

    monkeypatch.setattr(fused, "INTERPRET", False)  # Triton, as for a GPU
    reused = _lowered_texts()
    jax.clear_caches()  # (else JAX's cache returns the modules lowered the first time)
    reused += _lowered_texts()  # the second time in a context that holds the first
    monkeypatch.setattr(mlir, "make_ir_context", mlir.make_ir_context.__wrapped__)
    jax.clear_caches()
    try:
        fresh = _lowered_texts()
    finally:
        jax.clear_caches()
    assert "xla.gpu.triton" in fresh[1]
    assert reused[:4] == fresh and reused[4:] == fresh


def test_a_context_is_replaced_after_its_reuses(monkeypatch):
    """A context keeps every constant it uniqued: a thread takes a new one after
    REUSES lowerings."""
    monkeypatch.setattr(mlir_contexts, "REUSES", 3)
    got: list = []

    def lowerings():  # in a new thread, so that its count starts at 0
        got.extend(mlir.make_ir_context() for _ in range(7))

    t = threading.Thread(target=lowerings)
    t.start()
    t.join()
    assert got[0] is got[1] is got[2] and got[3] is got[4] is got[5]
    assert got[3] is not got[0] and got[6] is not got[3]


def test_a_lowering_inside_a_lowering_gets_its_own_context():
    """A lowering rule that compiles and runs a program while the outer program is being
    lowered: sharing the entered context nested the inner module in the outer one (an
    MLIRError, 'symbol's parent must have the SymbolTable trait'); it now gets a fresh
    context and both programs are right."""
    from jax.extend.core import Primitive

    nest = Primitive("mpda_test_nested_lowering")
    nest.def_abstract_eval(lambda v: v)
    inner = []

    def rule(ctx, v):
        inner.append(np.asarray(jax.jit(lambda a: a * 3)(np.ones(4, np.float32))))
        return mlir.lower_fun(jnp.sin, multiple_results=False)(ctx, v)

    mlir.register_lowering(nest, rule)
    x = np.arange(8, dtype=np.float32)
    out = jax.jit(lambda v: nest.bind(v) * 2)(x)
    np.testing.assert_allclose(np.asarray(out), np.sin(x) * 2, rtol=1e-6)
    np.testing.assert_array_equal(inner[0], np.full(4, 3.0, np.float32))
    assert mlir.make_ir_context() is mlir.make_ir_context()  # reuse again at the top


def test_the_fused_pass_computes_the_same_in_a_reused_context():
    """A program lowered in a context that already lowered others runs as before."""
    x = np.arange(12.0, dtype=np.float32).reshape(3, 4)
    f = jax.jit(lambda v: jnp.cumsum(v, axis=0) * 2)
    _lowered_texts()
    np.testing.assert_array_equal(np.asarray(f(x)), np.cumsum(x, axis=0) * 2)


@pytest.mark.parametrize("value, reused", [("fresh", False), ("", True), ("REUSE", True)])
def test_the_variable_picks_jax_own_contexts(value, reused):
    code = (
        "import mpda_dist.programs\n"
        "from jax._src.interpreters import mlir\n"
        "print(getattr(mlir.make_ir_context, '_mpda_reused_per_thread', False))\n"
    )
    env = dict(os.environ, MPDA_MLIR_CONTEXTS=value, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(reused)


def test_a_bad_value_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(mlir_contexts.ENV, "sometimes")
    with pytest.raises(ValueError, match="MPDA_MLIR_CONTEXTS='sometimes': expected one of"):
        mlir_contexts.mode()
    assert mlir_contexts.install() is True  # already installed: a bad value changes nothing
