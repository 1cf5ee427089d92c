"""One MLIR context per thread for JAX's lowerings, instead of one per program.

JAX lowers each program into a new MLIR context (``jax._src.interpreters.mlir.
make_ir_context``): it creates the context, registers and loads its dialects, 4 ms each
on a 2-core CPU, 0.22 s of the 56 programs of a 1024² solve's hierarchy.  That time holds
Python's lock, which sets the pace of a cold start on a GPU (benchmarks/RESULTS.md §30).
:func:`install` makes JAX reuse one context per thread: a context can hold any number
of modules, and the lowered modules are the same text (tests/test_mlir_contexts.py).
Each thread keeps its own, since MLIR's dialect registry is not thread-safe.

``$MPDA_MLIR_CONTEXTS``: ``reuse`` (the default) or ``fresh`` (JAX's own behaviour).
A JAX without the function is left alone.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any

ENV = "MPDA_MLIR_CONTEXTS"
MODES = ("reuse", "fresh")
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
        mlir.make_ir_context = _per_thread(make)
    return True


def _per_thread(make: Any) -> Any:
    local = threading.local()

    @functools.wraps(make)
    def make_ir_context(*args: Any, **kwargs: Any) -> Any:
        if args or kwargs:  # a variant this wrapper does not know: JAX's own
            return make(*args, **kwargs)
        context = getattr(local, "context", None)
        if context is None:
            context = local.context = make()
        return context

    setattr(make_ir_context, _MARK, True)
    return make_ir_context
