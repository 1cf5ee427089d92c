"""One MLIR context per thread for JAX's lowerings, instead of one per program.

JAX lowers each program into a new MLIR context (``jax._src.interpreters.mlir.
make_ir_context``): it creates the context, registers and loads its dialects, 4 ms each
on a 2-core CPU, 0.22 s of the 56 programs of a 1024² solve's hierarchy.  That time holds
Python's lock, which sets the pace of a cold start on a GPU (benchmarks/RESULTS.md §30).
:func:`install` makes JAX reuse a context per thread: one context holds many modules,
and the lowered modules are the same text (tests/test_mlir_contexts.py).

Limits:

- A lowering that starts while another is under way on the thread (a lowering rule that
  compiles or runs a program) gets a fresh context, as before: sharing the entered one
  would nest the inner module in the outer one.
- A context keeps what it uniqued, a program's embedded constants included, as long as
  it lives.  So a thread's context is replaced after :data:`REUSES` lowerings: a solve's
  hierarchy has about 60 programs, mostly without large constants.
- JAX's lowering cache is shared between threads, so a module lowered in one thread's
  context may be used in another (as with JAX's own contexts).

``$MPDA_MLIR_CONTEXTS``: ``reuse`` (the default) or ``fresh`` (JAX's own behaviour).
``mpda run`` refuses another value; elsewhere one means ``fresh``.  A JAX without the
function is left alone.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any

ENV = "MPDA_MLIR_CONTEXTS"
MODES = ("reuse", "fresh")
REUSES = 256  # lowerings per context before a thread takes a new one
_MARK = "_mpda_reused_per_thread"
_LOCK = threading.Lock()


def mode() -> str:
    """``$MPDA_MLIR_CONTEXTS`` checked: ``reuse`` unless set to ``fresh``."""
    value = os.environ.get(ENV, "").strip().lower() or "reuse"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(MODES)}")
    return value


def install() -> bool:
    """Make JAX's lowerings take this thread's MLIR context (:func:`mode` ``reuse``);
    returns whether JAX's function is now the reusing one.  A bad value of the variable
    installs nothing here (the command reports it: ``driver._start``)."""
    try:
        from jax._src.interpreters import mlir
        from jax._src.lib.mlir import ir
    except ImportError:
        return False
    with _LOCK:
        make = getattr(mlir, "make_ir_context", None)
        if make is None or getattr(make, _MARK, False):
            return make is not None
        try:
            if mode() != "reuse":
                return False
        except ValueError:
            return False
        mlir.make_ir_context = _per_thread(make, ir)
    return True


def _entered(ir: Any) -> bool:
    """Whether an MLIR context is entered on this thread (a lowering under way)."""
    try:
        return ir.Context.current is not None
    except Exception:  # bindings that raise when none is: none
        return False


def _per_thread(make: Any, ir: Any) -> Any:
    local = threading.local()

    @functools.wraps(make)
    def make_ir_context(*args: Any, **kwargs: Any) -> Any:
        if args or kwargs or _entered(ir):  # a variant, or a nested lowering: JAX's own
            return make(*args, **kwargs)
        context = getattr(local, "context", None)
        uses = getattr(local, "uses", 0)
        if context is None or uses >= REUSES:
            context, uses = make(), 0
            local.context = context
        local.uses = uses + 1
        return context

    setattr(make_ir_context, _MARK, True)
    return make_ir_context
