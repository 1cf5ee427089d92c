"""Ahead-of-time compiled programs, shared by every caller that runs the same one.

The solver times compilation apart from solving (``LevelResult.compile_seconds``), so
it compiles with ``fn.lower(*args).compile()`` instead of calling ``jax.jit`` functions
directly.  One :class:`Programs` per hierarchy (or baseline solve) serves every level
and the coarse-grid visits alike: a program is keyed by the function, the shapes and
dtypes of its arguments and its static arguments, so a coarse level's own solve and its
visits inside the corrections of finer levels run the same compiled program.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np


class Programs:
    """A cache of compiled programs and the seconds spent compiling them."""

    def __init__(self) -> None:
        self.cache: dict[Any, Any] = {}
        self.seconds = 0.0

    def __call__(self, fn: Any, *args: Any, **static: Any) -> Any:
        """The compiled ``fn`` for arguments like ``args`` and these static ones."""
        sig = tuple(
            (np.shape(x), str(x.dtype) if hasattr(x, "dtype") else type(x).__name__)
            for x in jax.tree.leaves(args)
        )
        key = (fn, sig, tuple(sorted(static.items())))
        if key not in self.cache:
            t0 = time.perf_counter()
            self.cache[key] = fn.lower(*args, **static).compile()
            self.seconds += time.perf_counter() - t0
        return self.cache[key]

    def __len__(self) -> int:
        return len(self.cache)
