"""Process start-up: the C allocator keeps freed memory (``runtime.configure_malloc``)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from mpda_dist import runtime

GLIBC = hasattr(ctypes.CDLL(None), "gnu_get_libc_version")

# Allocate, touch and free 64 MiB, then allocate and touch 64 MiB again: the page
# faults of the second allocation, and whether the allocator was configured.
_PROBE = """
import resource
from mpda_dist import runtime
applied = runtime.configure_malloc()
import numpy as np
x = np.ones(1 << 24, np.float32)
del x
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
y = np.ones(1 << 24, np.float32)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _probe(mode: str) -> tuple[bool, int]:
    env = {**os.environ, runtime.MALLOC_ENV: mode}
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not GLIBC, reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    """With ``keep`` (the default) a second 64 MiB buffer reuses the first one's pages;
    with ``system`` glibc maps it anew and every page faults again."""
    kept, kept_faults = _probe("keep")
    system, system_faults = _probe("system")
    assert kept and not system
    assert kept_faults < 16 < system_faults, (kept_faults, system_faults)


def test_malloc_mode_from_the_environment(monkeypatch):
    monkeypatch.setenv(runtime.MALLOC_ENV, "system")
    assert runtime.configure_malloc() is False
    monkeypatch.setenv(runtime.MALLOC_ENV, "jemalloc")
    with pytest.raises(ValueError, match="MPDA_MALLOC='jemalloc': expected keep or system"):
        runtime.configure_malloc()
