"""Shared helpers for the benchmark scripts: machine metadata, timing, tables, CSV.

Nothing here imports JAX or MPI at module level: a script must call
``mpda_dist.runtime.start()`` (which sets JAX's environment) before JAX is imported,
so the helpers that need JAX import it when they are called.

Conventions (DESIGN §6, "honest benchmarks"):

* compile time is measured apart (``lower(...).compile()``) and never inside a solve time;
* device work is synchronised with ``jax.block_until_ready`` before a timer stops;
* for MPI runs the reported time is the maximum over ranks (``max_over_ranks``);
* every CSV carries the machine and versions as ``# key: value`` header lines and a
  sidecar ``<csv>.json`` with the same metadata plus the rows.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python benchmarks/x.py` without installing
    sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------- machine metadata


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def core_count() -> dict[str, int]:
    """Logical CPUs, those this process may run on, and physical cores when known."""
    out = {"logical_cpus": os.cpu_count() or 0}
    try:
        out["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        out["usable_cpus"] = out["logical_cpus"]
    try:
        pairs = set()
        phys = core = None
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                    pairs.add((phys, core))
        if pairs:
            out["physical_cores"] = len(pairs)
    except OSError:
        pass
    return out


def memory_total_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "unknown")
    except Exception:  # noqa: BLE001 - a missing optional package is reported as None
        return None


def mpi_library_version() -> str | None:
    try:
        from mpi4py import MPI

        from mpda_dist.provenance import one_line  # (Open MPI's ends in a NUL)

        return one_line(MPI.Get_library_version())
    except Exception:  # noqa: BLE001
        return None


def git_revision() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) or None
    except Exception:  # noqa: BLE001
        return None


def source_digest() -> str | None:
    """sha256 (12 hex digits) of the mpda_dist sources as they are now: identifies the
    code measured when the tree is dirty or being edited."""
    import hashlib

    h = hashlib.sha256()
    files = sorted((REPO / "mpda_dist").rglob("*.py"))
    if not files:
        return None
    for f in files:
        h.update(str(f.relative_to(REPO)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def jax_devices() -> list[str]:
    import jax

    return [f"{d.platform}:{d.device_kind}:{d.id}" for d in jax.devices()]


def machine_info(with_jax: bool = True, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Host, CPU, cores, memory, versions (python, jax, numpy, mpi4py, MPI) and devices."""
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        **core_count(),
        "memory_gib": memory_total_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "scipy": _version("scipy"),
        "mpi4py": _version("mpi4py"),
        "mpi_library": mpi_library_version(),
        "mpda_dist_git": git_revision(),
        "mpda_dist_sources_sha256": source_digest(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_at_start": loadavg(),
        "env": {
            k: os.environ[k]
            for k in (
                "XLA_FLAGS",
                "OMP_NUM_THREADS",
                "XLA_PYTHON_CLIENT_PREALLOCATE",
                "XLA_PYTHON_CLIENT_MEM_FRACTION",
                "LD_PRELOAD",
                "JAX_PLATFORMS",
            )
            if k in os.environ
        },
    }
    if with_jax:
        import jax

        info["jax"] = jax.__version__
        try:
            import jaxlib

            info["jaxlib"] = jaxlib.__version__
        except Exception:  # noqa: BLE001
            pass
        info["devices"] = jax_devices()
    if extra:
        info.update(extra)
    return info


def machine_line(info: dict[str, Any]) -> str:
    """One line naming the machine, for printing next to a table."""
    dev = ", ".join(info.get("devices", [])) or "n/a"
    return (
        f"{info['hostname']}: {info['cpu_model']}, {info.get('usable_cpus')} usable CPUs, "
        f"{info.get('memory_gib')} GiB; python {info['python']}, jax {info.get('jax')}, "
        f"numpy {info['numpy']}, mpi4py {info['mpi4py']}, MPI {info['mpi_library']}; "
        f"devices {dev}"
    )


def loadavg() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat", encoding="utf-8") as fh:
            f = [int(v) for v in fh.readline().split()[1:]]
        idle = f[3] + (f[4] if len(f) > 4 else 0)
        return sum(f), idle
    except (OSError, ValueError, IndexError):
        return None


def cpu_busy(interval: float = 0.5) -> float | None:
    """Fraction of all CPUs busy over ``interval`` seconds (other processes included):
    a benchmark's own idle wait shows what else is running on the machine."""
    a = _cpu_times()
    time.sleep(interval)
    b = _cpu_times()
    if a is None or b is None or b[0] == a[0]:
        return None
    return 1.0 - (b[1] - a[1]) / (b[0] - a[0])


def wait_for_quiet(max_wait: float, threshold: float = 0.25, interval: float = 0.5) -> float | None:
    """Wait (at most ``max_wait`` s) until the machine is below ``threshold`` busy;
    returns the last busy fraction seen (record it next to the timing)."""
    t_end = time.perf_counter() + max_wait
    busy = cpu_busy(interval)
    while busy is not None and busy > threshold and time.perf_counter() < t_end:
        busy = cpu_busy(interval)
    return busy


# ---------------------------------------------------------------- timing


def block(x: Any) -> Any:
    """Wait for every JAX array in ``x`` (a pytree); returns ``x``."""
    import jax

    return jax.block_until_ready(x)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds for ``fn()`` with its (JAX) result synchronised before the clock stops."""
    t0 = time.perf_counter()
    out = block(fn())
    return time.perf_counter() - t0, out


def compile_timed(jitted: Any, *args: Any, **static: Any) -> tuple[float, Any]:
    """Ahead-of-time compile ``jitted`` for ``args``; returns (seconds, compiled)."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args, **static).compile()
    return time.perf_counter() - t0, compiled


class MainThreadSampler:
    """Where this process's main thread spends the wall time of a block: a thread looks
    at the main thread's stack every ``interval`` seconds and charges the time since
    its last look to what it finds (a call that holds the interpreter lock delays the
    look, and is charged on the next one).  For a cold start whose wall time the compile
    report does not explain (RESULTS §22: 7.6 s at 1024² on a GPU, 1.8 s of it solving
    and waiting).  ``report()`` lists the innermost frames of the package and the
    innermost frames overall that took the most time.

        with C.MainThreadSampler() as sampler:
            ...
        print("\n".join(sampler.report()))
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.ours: dict[str, float] = {}
        self.leaves: dict[str, float] = {}
        self.total = 0.0
        self._stop = threading.Event()
        self._main = threading.main_thread().ident

    def __enter__(self) -> MainThreadSampler:
        self._thread = threading.Thread(target=self._run, name="main-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _where(code: Any) -> str:
        path = Path(code.co_filename)
        return f"{path.parent.name}/{path.name}:{code.co_name}"

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(self.interval):
            now = time.perf_counter()
            frame, spent, last = sys._current_frames().get(self._main), now - last, now
            if frame is None:
                continue
            self.total += spent
            leaf, ours = self._where(frame.f_code), None
            while frame is not None and ours is None:
                if "mpda_dist" in frame.f_code.co_filename:
                    ours = self._where(frame.f_code)
                frame = frame.f_back
            self.leaves[leaf] = self.leaves.get(leaf, 0.0) + spent
            key = ours or "(outside mpda_dist)"
            self.ours[key] = self.ours.get(key, 0.0) + spent

    def report(self, top: int = 12) -> list[str]:
        lines = [f"main thread sampled for {self.total:.2f} s; innermost mpda_dist frames:"]
        for table, head in ((self.ours, None), (self.leaves, "innermost frames:")):
            if head:
                lines.append(head)
            for where, sec in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
                lines.append(f"  {sec:6.2f} s  {where}")
        return lines


def summary(samples: Sequence[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "median": statistics.median(s),
        "min": s[0],
        "max": s[-1],
        "n": len(s),
    }


def max_over_ranks(comm: Any, value: float) -> float:
    """The maximum of a per-rank float over ``comm`` (every rank gets it)."""
    from mpi4py import MPI

    return float(comm.allreduce(float(value), op=MPI.MAX))


def stream_triad(nbytes_per_array: int = 256 * 2**20, repeats: int = 5) -> dict[str, float]:
    """Host memory bandwidth from a numpy triad ``a = b + s·c`` (float64).

    numpy cannot fuse the triad, so it runs as two passes: ``a = s·c`` (reads c, writes a)
    then ``a += b`` (reads a and b, writes a): 5 array transfers per element, which is
    what is counted (write-allocate traffic is not counted, as in STREAM).  A copy
    ``a[:] = b`` (2 transfers) is measured too.  Median over ``repeats``; GB = 1e9 B.
    """
    import numpy as np

    n = nbytes_per_array // 8
    a = np.zeros(n)
    b = np.ones(n)
    c = np.full(n, 2.0)
    s = 3.0
    triad, copy = [], []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        np.multiply(c, s, out=a)
        np.add(a, b, out=a)
        triad.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        np.copyto(a, b)
        copy.append(time.perf_counter() - t0)
    triad, copy = triad[1:], copy[1:]  # the first pass faults the pages in
    return {
        "array_mib": nbytes_per_array / 2**20,
        "triad_gbs": 5 * n * 8 / statistics.median(triad) / 1e9,
        "copy_gbs": 2 * n * 8 / statistics.median(copy) / 1e9,
    }


def jax_triad(nbytes_per_array: int = 256 * 2**20, repeats: int = 5) -> dict[str, float]:
    """Device memory bandwidth from a jitted (fused) triad ``a = b + s·c`` in float32,
    written into the donated ``a``: 3 array transfers per element (2 reads, 1 write).
    Median over ``repeats``; compile time apart."""
    import warnings

    import jax
    import jax.numpy as jnp

    n = nbytes_per_array // 4
    a = jnp.zeros(n, jnp.float32)
    b = jnp.ones(n, jnp.float32)
    c = jnp.full(n, 2.0, jnp.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*donated buffers.*")
        ct, comp = compile_timed(jax.jit(lambda a, b, c: b + 3.0 * c, donate_argnums=0), a, b, c)
        a = block(comp(a, b, c))
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            a = block(comp(a, b, c))
            ts.append(time.perf_counter() - t0)
    return {"triad_gbs": 3 * n * 4 / statistics.median(ts) / 1e9, "compile_seconds": ct}


def exact_anomaly(st: Any) -> Any:
    """``Q⁻¹ h`` by a sparse direct solve, like ``baselines.exact_solve`` but with the
    symmetric minimum-degree ordering (``MMD_AT_PLUS_A``): Q is symmetric, and on these
    grids it is 3–4× faster than SuperLU's default COLAMD (measured here: 11.5 s vs
    33.5 s at 512², 45 s vs 175 s at 1024²), same answer to rounding."""
    import scipy.sparse.linalg as spla

    from mpda_dist.baselines import assemble

    q = assemble(st).tocsc()
    return spla.spsolve(q, st.rhs.ravel(), permc_spec="MMD_AT_PLUS_A").reshape(st.diag.shape)


def rms(x: Any) -> float:
    import numpy as np

    return float(np.sqrt(np.mean(np.square(x))))


# ---------------------------------------------------------------- output


def fmt(v: Any, spec: str | None = None) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if spec:
            return format(v, spec)
        if v == 0:
            return "0"
        a = abs(v)
        return f"{v:.3g}" if (a >= 1e-3 and a < 1e5) else f"{v:.2e}"
    return str(v)


def markdown_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str | tuple[str, str]] | None = None,
    formats: dict[str, str] | None = None,
) -> str:
    """A GitHub markdown table; ``columns`` are keys or ``(key, header)`` pairs."""
    if not rows:
        return "(no rows)"
    cols = columns or list(rows[0].keys())
    keys = [c if isinstance(c, str) else c[0] for c in cols]
    heads = [c if isinstance(c, str) else c[1] for c in cols]
    formats = formats or {}
    lines = [
        "| " + " | ".join(heads) + " |",
        "|" + "|".join("---" for _ in heads) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k), formats.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def _flatten(d: dict[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def write_csv(
    path: str | os.PathLike[str],
    rows: Sequence[dict[str, Any]],
    meta: dict[str, Any],
    notes: Sequence[str] = (),
    json_rows: Sequence[dict[str, Any]] | None = None,
) -> Path:
    """CSV with ``# key: value`` metadata header lines, plus ``<path>.json`` sidecar
    (metadata, notes and ``json_rows`` — the rows with any nested detail — or ``rows``).

    Read back with ``pandas.read_csv(path, comment="#")``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        for k, v in _flatten(meta):
            fh.write(f"# {k}: {v}\n")
        for n in notes:
            fh.write(f"# note: {n}\n")
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
    side = path.with_suffix(path.suffix + ".json")
    with open(side, "w", encoding="utf-8") as fh:
        json.dump(
            {"meta": meta, "notes": list(notes), "rows": list(json_rows or rows)},
            fh,
            indent=1,
            default=str,
        )
    return path


def run_inner(code: str, args: Sequence[str], env: dict[str, str], cwd: str, timeout: float):
    """Run ``python -c code *args`` (a benchmark's case in a fresh process) in ``cwd``
    (an empty directory: ``python -c`` puts its working directory first on ``sys.path``,
    which could shadow this checkout's package) and return the numbers of its line
    ``RESULT …``; a run that fails ends the benchmark with its error output."""
    import subprocess

    cmd = [sys.executable, "-c", code, *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")]
    if p.returncode or not line:
        raise SystemExit(f"a run failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
    return tuple(float(v) for v in line[0].split()[1:])


def command_line() -> str:
    """The command that ran this script, for the record."""
    return " ".join([Path(sys.executable).name] + sys.argv)


def demo_parser(doc: str, size: int, fraction: float, min_size: int = 16) -> Any:
    """An argument parser with the demo problem's ``--size``, ``--fraction`` and
    ``--min-size`` (16 by default, as the scripts have always used, for comparison with
    earlier RESULTS sections; the configuration's default, ``config.MIN_SIZE``, is 64)."""
    import argparse

    from mpda_dist.config import MIN_SIZE

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--size", type=int, default=size, help=f"grid side (default {size})")
    ap.add_argument(
        "--fraction", type=float, default=fraction, help=f"observed share ({fraction:g})"
    )
    ap.add_argument(
        "--min-size",
        type=int,
        default=min_size,
        help=f"multigrid's coarsest level: its longest side (default {min_size}, as in "
        f"earlier RESULTS sections; not the configuration's default, {MIN_SIZE})",
    )
    return ap


def demo_problem(n: int, fraction: float, source: str, min_size: int = 16) -> tuple[Any, list]:
    """The demo's problem at ``n``² (Matérn prior ℓ = 0.15, σ = 1.1, noise 1e-3, seed
    0, ``fraction`` observed): its observations on the nodes and its multigrid levels
    down to a longest side of ``min_size``."""
    import numpy as np

    from mpda_dist import observations as obsmod
    from mpda_dist import prior
    from mpda_dist.multigrid import schedule

    extent = (1.0, 1.0)
    rng = np.random.default_rng(0)
    truth = prior.sample((n, n), extent, 0.15, 1.1, rng)
    obs = obsmod.synthetic(truth, extent, fraction, 1e-3, rng)
    nodes, _ = obsmod.to_nodes(obs, (n, n), extent, 0.0, source)
    return nodes, schedule(n, n, 1.0 / (n - 1), 1.0 / (n - 1), min_size)


def print_report(rows: list[dict], extra: str = "") -> None:
    """The rows as a markdown table, then the machine (``extra`` appended) and the
    command that produced them."""
    print(markdown_table(rows))
    print(f"machine: {machine_line(machine_info())}{extra}")
    print(f"command: {command_line()}")
