"""The first allocation on a GPU, with and without JAX's preallocation (RESULTS §25).

Each case is a fresh Python process: seconds to import JAX, to get the devices, for the
first and second ``device_put`` of a scalar, for a 16 MB array and for a first small
jitted call.  Then the first ``device_put`` in a background thread, and how many loops
the main thread ran meanwhile (many: the wait releases Python's lock).

    python benchmarks/firstput.py        # on a GPU machine; on a CPU it shows ~0
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

TIMES = r"""
import time
t0 = time.perf_counter()
import jax, numpy as np
t1 = time.perf_counter()
jax.devices()
t2 = time.perf_counter()
jax.device_put(1.0).block_until_ready()
t3 = time.perf_counter()
jax.device_put(2.0).block_until_ready()
t4 = time.perf_counter()
z = jax.device_put(np.zeros(1 << 22, np.float32))
z.block_until_ready()
t5 = time.perf_counter()
jax.jit(lambda a: a * 2 + 1)(z).block_until_ready()
t6 = time.perf_counter()
steps = ("import", "devices", "put1", "put2", "put16MB", "jit1")
times = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)
print("  ".join(f"{s} {t:.3f}" for s, t in zip(steps, times)))
"""

THREAD = r"""
import threading, time
import jax
jax.devices()
t0 = time.perf_counter()
th = threading.Thread(target=lambda: jax.device_put(0.0).block_until_ready())
th.start()
n = 0
while th.is_alive():
    sum(range(1000))
    n += 1
print(f"put1 in a thread {time.perf_counter() - t0:.3f} s; main thread ran {n} loops meanwhile")
"""

CASES = (
    ("JAX's default (preallocate 75 %)", {}, TIMES),
    ("XLA_PYTHON_CLIENT_PREALLOCATE=false", {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, TIMES),
    ("XLA_PYTHON_CLIENT_MEM_FRACTION=0.2", {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.2"}, TIMES),
    ("JAX's default again", {}, TIMES),
    ("thread, JAX's default", {}, THREAD),
    ("thread, no preallocation", {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, THREAD),
)


def main() -> int:
    base = {k: v for k, v in os.environ.items() if not k.startswith("XLA_PYTHON_CLIENT_")}
    for label, extra, code in CASES:
        t = time.perf_counter()
        r = subprocess.run(
            [sys.executable, "-c", code], env={**base, **extra}, capture_output=True, text=True
        )
        out = r.stdout.strip() or r.stderr.strip()[-800:]
        print(f"{label:38s} {out}  (process {time.perf_counter() - t:.2f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
