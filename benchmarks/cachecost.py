"""What the persistent caches cost a cold start, and what a rerun still compiles: one
rank's first solve in a fresh process with empty caches, then a second process on the
caches the first filled, per cache setting, the settings alternated round by round.

  default   mpda's defaults: the program store on, JAX's persistent cache off
            (since benchmarks/RESULTS.md §28)
  both      JAX's cache on beside the store (JAX_COMPILATION_CACHE_DIR set, the
            default before §28)
  jax       the store off (MPDA_PROGRAM_CACHE_DIR empty): JAX's cache, its fallback

For the cold process the table sums, over its programs, the seconds spent in the
store's save (of which the executable's serialization, which holds Python's lock) and
in JAX's cache (the key it computes while enabled, the look-up and the write), and
counts XLA's compiles (not JAX's cache hits).  The rerun's row counts what it compiled
(0: every program came from a cache).  Each run is ``gpu_bench.solve_case`` at
``--size`` with 5 % observations and at most ``--cap`` iterations per level.

    python benchmarks/cachecost.py --size 512 --rounds 2

To compare two versions of the package, run each checkout's own copy of the script.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

INNER = r"""
import collections, sys, time
n, cap = int(sys.argv[1]), int(sys.argv[2])
sys.path.insert(0, sys.argv[3])
import gpu_bench as G  # (its _common puts this checkout first on sys.path)
comm = G._start()  # sets the environment, then imports JAX
import jax
from jax._src import compilation_cache as cc
from jax.experimental import serialize_executable as se
from mpda_dist import programs
spent = collections.defaultdict(float)
def timed(owner, name, label):
    fn = getattr(owner, name)
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spent[label] += time.perf_counter() - t0
    setattr(owner, name, wrapper)
for owner, name, label in [(programs.Store, "save", "save"), (se, "serialize", "serialize"),
        (cc, "get_cache_key", "jax"), (cc, "get_executable_and_time", "jax"),
        (cc, "put_executable_and_time", "jax")]:
    timed(owner, name, label)
def listen(event, seconds, **_):  # around every compile, a hit in JAX's cache too
    if event == "/jax/core/compile/backend_compile_duration":
        spent["compiles"] += 1
def hit(event, **_):
    if event == "/jax/compilation_cache/cache_hits":
        spent["compiles"] -= 1
jax.monitoring.register_event_duration_secs_listener(listen)
jax.monitoring.register_event_listener(hit)
out = G.solve_case(comm, n, 0.05, runs=1, first_max_iterations=cap)
print("RESULT", out["runs"][0]["wall"], spent["save"], spent["serialize"], spent["jax"],
      spent["compiles"], flush=True)
"""

SETTINGS = ("default", "both", "jax")
COLUMNS = ("first s", "save s", "serialize s", "JAX cache s", "compiles")


def run_once(args, setting: str, caches: str) -> tuple[float, ...]:
    env = {k: v for k, v in os.environ.items() if k not in _CACHE_VARS}
    env["XDG_CACHE_HOME"] = caches
    if setting == "both":
        env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(caches, "jax-set")
    elif setting == "jax":
        env["MPDA_PROGRAM_CACHE_DIR"] = ""
    here = str(Path(__file__).resolve().parent)
    return C.run_inner(INNER, [str(args.size), str(args.cap), here], env, caches, args.timeout)


_CACHE_VARS = (
    "JAX_COMPILATION_CACHE_DIR",
    "JAX_ENABLE_COMPILATION_CACHE",
    "MPDA_PROGRAM_CACHE_DIR",
    "XDG_CACHE_HOME",
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="grid side (512)")
    ap.add_argument("--cap", type=int, default=20, help="iterations per level at most (20)")
    ap.add_argument("--rounds", type=int, default=2, help="runs per setting, alternated (2)")
    ap.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run (900)")
    args = ap.parse_args(argv)
    rows: dict[tuple[str, str], list[tuple[float, ...]]] = {}
    for r in range(args.rounds):
        for setting in args.settings:
            with tempfile.TemporaryDirectory(prefix="mpda_cachecost") as caches:
                for when in ("cold", "rerun"):
                    got = run_once(args, setting, caches)
                    rows.setdefault((setting, when), []).append(got)
                    print(f"  round {r + 1}, {setting}, {when}: first solve {got[0]:.2f} s, "
                          f"save {got[1]:.2f} s, JAX cache {got[3]:.2f} s, "
                          f"{int(got[4])} compiles", flush=True)  # fmt: skip
    print(f"\none rank, {args.size}², 5 %, ≤ {args.cap} iterations per level; "
          f"medians of {args.rounds}:")  # fmt: skip
    print(f"  {'setting':8s} {'process':6s} " + " ".join(f"{c:>11s}" for c in COLUMNS))
    for (setting, when), runs in rows.items():
        med = [statistics.median(x) for x in zip(*runs, strict=True)]
        print(f"  {setting:8s} {when:6s} " + " ".join(f"{v:11.2f}" for v in med[:4])
              + f" {int(med[4]):11d}")  # fmt: skip
    print(f"machine: {C.machine_line(C.machine_info())}")
    print(f"command: {C.command_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
