"""The shared cache of compiled programs (mpda_dist/programs.py): keyed by function,
argument shapes and static arguments; the coarse-grid visits reuse the level solves'
programs."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, wait
from dataclasses import replace
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _problems import problem
from mpi4py import MPI

from mpda_dist import kernel, programs
from mpda_dist.solver import CONVERGED, Settings, solve


@partial(jax.jit, static_argnames=("k",))
def _scale(x, k: int = 1):
    return x * k


def test_programs_are_keyed_by_shape_dtype_and_static_arguments():
    p = programs.Programs()
    x, y = jnp.ones(3), jnp.ones(4)
    first = p(_scale, x)
    assert p(_scale, x + 1.0) is first and len(p) == 1
    assert p(_scale, y) is not first and len(p) == 2
    assert p(_scale, x, k=2) is not first and len(p) == 3
    assert p(_scale, x.astype(jnp.int32)) is not first and len(p) == 4
    np.testing.assert_array_equal(p(_scale, x, k=2)(x), 2 * np.ones(3))
    assert p.seconds > 0


@programs.jit
def _doubled_for_report(x):
    return 2 * x


def test_compile_report_counts_each_program_got(monkeypatch):
    """``compile_report`` names the programs got in this process, with how many and
    the seconds spent; one in memory already is not counted again."""
    monkeypatch.setattr(programs, "_STORE", programs.Store(None))
    name = "_doubled_for_report"
    before = dict((r[0], r[1]) for r in programs.compile_report(10**6)).get(name, 0)
    for n in (3, 4, 4):
        _doubled_for_report(jnp.ones(n))
    rows = {r[0]: r for r in programs.compile_report(10**6)}
    assert rows[name][1] == before + 2, rows[name]
    assert rows[name][3] + rows[name][4] > 0  # traced, lowered and compiled: it took time


def _tripled_for_waits(x):
    return 3 * x


def test_wait_report_says_where_the_caller_waited(monkeypatch):
    """A program compiled at its call is a wait ``here``; one that a background thread
    is still compiling is a wait for the ``background``; one in memory is no wait."""
    monkeypatch.setattr(programs, "_STORE", programs.Store(None))
    monkeypatch.setattr(programs, "_WAITS", [])
    compile_ = programs.Jit._compile

    def slow_in_background(self, key, args, static, background=False):
        if background:
            time.sleep(1.0)  # still compiling when the caller asks for it
        return compile_(self, key, args, static, background)

    monkeypatch.setattr(programs.Jit, "_compile", slow_in_background)
    tripled = programs.jit(_tripled_for_waits)  # a new wrapper: nothing in its memory
    tripled(jnp.ones(5, jnp.float32))
    with contextlib.closing(programs.Programs(threads=2)) as p:
        p.prefetch(tripled, jax.ShapeDtypeStruct((6,), jnp.float32))
        p(tripled, jnp.ones(6, jnp.float32))
    tripled(jnp.ones(5, jnp.float32))
    total, count, longest = programs.wait_report(10)
    waits = programs._WAITS
    name = "_tripled_for_waits"
    assert [(w[0], w[2]) for w in waits] == [(name, "here"), (name, "background")], waits
    assert waits[1][1] > 0.2  # it waited for the background thread
    assert count == 2 and total == pytest.approx(waits[0][1] + waits[1][1])
    assert longest == sorted(waits, key=lambda w: -w[1])


_FACTOR = {"k": 2}


@programs.jit
def _times_setting(x):
    return _FACTOR["k"] * x


def test_settings_read_when_tracing_are_part_of_the_key(monkeypatch, tmp_path):
    """A program traced under another module setting (registered with
    ``key_settings``, as the fused pass's tile is) is neither reused from memory nor
    loaded from the store (JAX's own trace caches, which do not know the setting, are
    cleared when it changes); set back, the first program is found again.  The factors
    are new to this run: a program that JAX's persistent cache (which outlives a run,
    under ``~/.cache``) already holds is not stored."""
    monkeypatch.setattr(programs, "_STORE", programs.Store(tmp_path))
    monkeypatch.setattr(programs, "_SETTINGS", [*programs._SETTINGS, lambda: _FACTOR["k"]])
    first, second = _unique_k(), _unique_k() + 10**6
    monkeypatch.setitem(_FACTOR, "k", first)
    x = jnp.ones(3)
    np.testing.assert_array_equal(_times_setting(x), first * np.ones(3))
    stored = set(tmp_path.iterdir())
    assert len(stored) == 1
    monkeypatch.setitem(_FACTOR, "k", second)
    np.testing.assert_array_equal(_times_setting(x), second * np.ones(3))
    assert len(set(tmp_path.iterdir()) - stored) == 1  # a second stored program
    monkeypatch.setitem(_FACTOR, "k", first)
    np.testing.assert_array_equal(_times_setting(x), first * np.ones(3))


def test_coarse_visits_run_the_level_solves_programs(monkeypatch):
    """One frozen-update program per level shape: the corrections' coarse visits
    (``smoothing`` = 2 × ``check_every`` iterations) run the level's own program."""
    compiled = []
    call = programs.Programs.__call__

    def counting(self, fn, *args, **static):
        before = len(self.cache)
        out = call(self, fn, *args, **static)
        if len(self.cache) > before and fn is kernel.iterate_b:
            compiled.append((args[1].shape, static.get("n")))
        return out

    monkeypatch.setattr(programs.Programs, "__call__", counting)
    _, nodes, levels, _ = problem(66, 66, 0.05, seed=1)
    s = Settings(dtype="float64", tol=1e-9, mode="sync", momentum=0.5, check_every=10)
    with jax.enable_x64(True):
        res = solve(MPI.COMM_SELF, levels, nodes, 0.15, 1.1, s)
    assert res.status == CONVERGED
    mp = [r for r in res.levels if r.solver == "mp"]
    assert sum(r.cycle_iterations for r in mp) > 0  # coarse visits ran
    assert all(n == 10 for _, n in compiled), compiled
    assert len(compiled) == len({shape for shape, _ in compiled}) == len(mp), compiled


# -- the on-disk store --------------------------------------------------------------
TRACES: list[int] = []


def _traced_scale(x, k: int = 1):
    TRACES.append(k)  # runs only while tracing
    return x * k


def _unique_k() -> int:
    """A static value that no earlier run compiled: JAX's own persistent cache must
    miss, or the program is not stored (see programs.Jit.compiled)."""
    return int(np.random.default_rng().integers(10**5, 10**6))


def test_a_stored_program_is_loaded_without_tracing(tmp_path):
    programs.set_store(programs.Store(tmp_path))
    try:
        k, x = _unique_k(), jnp.arange(5.0)
        first = programs.jit(_traced_scale, static_argnames=("k",))
        np.testing.assert_array_equal(first(x, k=k), k * np.arange(5.0))
        assert TRACES.count(k) == 1 and programs.store().saved == 1
        (path,) = tmp_path.iterdir()
        assert path.name.startswith("_traced_scale-")
        # A new wrapper of the same function has an empty memory, like a new process.
        again = programs.jit(_traced_scale, static_argnames=("k",))
        np.testing.assert_array_equal(again(x + 1, k), k * (np.arange(5.0) + 1))  # by position
        assert TRACES.count(k) == 1 and programs.store().loaded == 1
        # Another shape is another program.
        again(jnp.arange(3.0), k=k)
        assert TRACES.count(k) == 2 and len(list(tmp_path.iterdir())) == 2
    finally:
        programs.set_store(None)


def test_a_program_another_process_compiles_is_skipped_then_loaded(tmp_path):
    """Ranks on one node share the work: while another process holds a program's lock,
    a background compile skips it (None) and a needed program waits for the file and
    loads it, without tracing.  Here the other process is a thread of this one (its
    lock names this pid, which runs)."""
    import threading

    programs.set_store(programs.Store(tmp_path))
    try:
        k, x = _unique_k(), jnp.arange(4.0)
        fn = programs.jit(_traced_scale, static_argnames=("k",))
        args, static, key = fn._key((x,), {"k": k})
        st = programs.store()
        path = st.path(fn.name, (key, fn.options), programs._device_of(args))
        assert st.claim(path) and not st.claim(path)  # held, by a live process

        assert fn._compile(key, args, static, background=True) is None
        assert TRACES.count(k) == 0

        def other() -> None:  # compiles and stores it, then lets go
            compiled = fn.jitted.lower(x, k=k).compile()
            st.save(path, compiled)
            st.release(path)

        TRACES.clear()
        t = threading.Timer(0.3, other)
        t.start()
        out = fn(x, k=k)  # waits for the file
        t.join()
        np.testing.assert_array_equal(out, k * np.arange(4.0))
        assert st.loaded == 1 and TRACES.count(k) == 1  # traced once: by `other`
        assert not programs._lock_of(path).exists()
    finally:
        programs.set_store(None)


@pytest.mark.parametrize("left", ["dead pid", "live pid", "empty"])
def test_a_lock_file_left_behind_holds_no_one_up(tmp_path, left):
    """A lock file whose process ended (killed mid-compile) does not hold anyone up,
    whatever it says: a pid that runs again (here pid 1) or nothing at all used to
    make every later run wait LOCK_WAIT (300 s) per program.  A lock that goes without
    a stored file leaves the waiter to compile."""
    import platform as pf

    st = programs.Store(tmp_path)
    path = tmp_path / "prog-x.pkl"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    text = {"dead pid": f"{pf.node()} {int(dead.stdout)}", "live pid": f"{pf.node()} 1"}
    programs._lock_of(path).write_text(text.get(left, ""))
    t0 = time.monotonic()
    assert st.wait(path, 5.0) is None  # no holder, no file: compile it yourself
    assert time.monotonic() - t0 < 2.0
    assert st.claim(path)
    st.release(path)
    assert not programs._lock_of(path).exists()


def test_a_lock_another_process_holds_is_respected_until_it_ends(tmp_path):
    """The lock is the kernel's (flock): held while its process runs, let go when it
    is killed."""
    st = programs.Store(tmp_path)
    path = tmp_path / "prog-y.pkl"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
            str(programs._lock_of(path)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not st.claim(path)
        t0 = time.monotonic()
        assert st.wait(path, 0.5) is None and time.monotonic() - t0 >= 0.5  # waited
    finally:
        holder.kill()
        holder.wait()
    assert st.claim(path)
    st.release(path)


def test_a_damaged_program_file_is_compiled_again_and_removed(tmp_path):
    programs.set_store(programs.Store(tmp_path))
    try:
        k, x = _unique_k(), jnp.ones(4)
        programs.jit(_traced_scale, static_argnames=("k",))(x, k=k)
        (path,) = tmp_path.iterdir()
        path.write_bytes(b"not a program")
        out = programs.jit(_traced_scale, static_argnames=("k",))(x, k=k)
        np.testing.assert_array_equal(out, k * np.ones(4))
        assert programs.store().loaded == 0
        # Removed (JAX's own cache had the program: not stored again) or replaced.
        assert not path.exists() or path.read_bytes() != b"not a program"
    finally:
        programs.set_store(None)


def test_without_a_directory_nothing_is_stored(tmp_path, monkeypatch):
    monkeypatch.setenv(programs.CACHE_ENV, "")
    programs.set_store(None)
    try:
        k = _unique_k()
        assert programs.jit(_traced_scale, static_argnames=("k",))(jnp.ones(2), k=k)[0] == k
        assert programs.store().root is None and programs.store().saved == 0
    finally:
        programs.set_store(None)


def test_inside_another_jit_it_is_traced_as_usual():
    f = programs.jit(_traced_scale, static_argnames=("k",))
    out = jax.jit(lambda x: f(x, k=3) + 1)(jnp.ones(2))
    np.testing.assert_array_equal(out, [4.0, 4.0])
    with pytest.raises(TypeError, match="not static"):
        f.compiled(jnp.ones(2), j=1)


# A process that records the programs it traces (``traced``), for the scripts below.
_TRACING = """
import json, sys
import numpy as np
from jax import monitoring
from mpi4py import MPI
sys.path.insert(0, {tests!r})
from _problems import problem
traced = []
monitoring.register_event_duration_secs_listener(
    lambda name, d, **kw: traced.append(kw.get("fun_name")) if "jaxpr_trace" in name else None)
"""


def _twice(script: str, env: dict[str, str]) -> list[dict]:
    """Run ``script`` (after :data:`_TRACING`) in two processes one after the other, and
    return the JSON each printed last."""
    code = (_TRACING + script).format(tests=str(Path(__file__).parent))
    runs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs


SOLVE_TWICE = """
from mpda_dist import programs
from mpda_dist.solver import Settings, solve
_, nodes, levels, _ = problem(34, 34, 0.1, seed=3)
res = solve(MPI.COMM_SELF, levels, nodes, 0.15, 1.1, Settings(dtype="float32", tol=1e-4))
st = programs.store()
print(json.dumps(dict(status=res.status, mean=np.asarray(res.anomaly).tolist(), traced=traced,
                      loaded=st.loaded, saved=st.saved)))
"""


def test_a_second_process_loads_every_program_of_a_solve(tmp_path):
    """End to end, as a rerun of `mpda run` does: the second process traces none of the
    solver's programs and gets the same answer."""
    env = dict(
        os.environ,
        JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax"),  # empty: XLA compiles everything
        MPDA_PROGRAM_CACHE_DIR=str(tmp_path / "programs"),
        MPDA_LOWER_PROCESSES="0",  # the traced names are this process's own
    )
    runs = _twice(SOLVE_TWICE, env)
    first, second = runs
    assert first["status"] == second["status"] == CONVERGED
    assert first["saved"] > 10 and first["loaded"] == 0
    assert second["loaded"] == first["saved"] and second["saved"] == 0
    kernels = {"iterate", "iterate_odd", "iterate_a", "iterate_b", "iterate_b_odd", "gains"}
    kernels |= {"record", "shift_messages"}
    # (the traced names carry the source digest: iterate_b_<digest>)
    traced = [{t.rsplit("_", 1)[0] for t in run["traced"] if t} for run in runs]
    assert kernels & traced[0] and not kernels & traced[1], traced
    np.testing.assert_array_equal(first["mean"], second["mean"])


BASELINES_TWICE = """
from mpda_dist import krylov
_, nodes, levels, _ = problem(21, 19, 0.1, seed=5)
for method in krylov.METHODS:
    s = krylov.KrylovSettings(dtype="float32", tol=1e-4)
    res, _ = krylov.solve(MPI.COMM_SELF, levels[-1], nodes, 0.15, 1.1, method, s)
print(json.dumps(dict(status=[res.status], traced=traced)))
"""


def test_a_second_process_traces_nothing_for_the_baselines(tmp_path):
    """The Krylov baselines made their set-up vectors (``1/diag``, zeros, the Jacobi
    scaling) and 3D-Var's answer with eager device operations: programs outside the
    store, which a rerun compiled again once JAX's cache was off by default (8 for 3dvar,
    review helper).  Without JAX's cache, the second process traces nothing."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_ENABLE_COMPILATION_CACHE")
    }
    env.update(MPDA_PROGRAM_CACHE_DIR=str(tmp_path / "programs"), MPDA_LOWER_PROCESSES="0")
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    runs = _twice(BASELINES_TWICE, env)
    assert runs[0]["traced"] and runs[1]["traced"] == [], runs[1]["traced"]
    assert runs[1]["status"] == [CONVERGED]


@pytest.mark.parametrize("anderson", [None, 0])
def test_the_level_programs_compile_in_background_threads(monkeypatch, anderson):
    """With 2 compile threads every program of a one-rank solve is compiled (or loaded)
    ahead of use, off the main thread, each once: the prefetched shapes and statics are
    the calls' own.  Only the restrictions that build the coarse operators, before the
    prefetch starts, compile on the main thread.  The answer is the same as without.
    Without Anderson's mixing the check's residual was not prefetched (review helper)."""
    import threading

    where = []
    compile_ = programs.Jit._compile

    def recording(self, key, args, static, **kw):
        where.append((self.name.rsplit(".", 1)[-1], key, threading.current_thread().name))
        return compile_(self, key, args, static, **kw)

    monkeypatch.setattr(programs.Jit, "_compile", recording)
    # shapes no other test uses
    _, nodes, levels, _ = problem(42, 38, 0.1, seed=4) if anderson is None else problem(39, 43, 0.1)
    s = Settings(dtype="float32", tol=1e-5, momentum=0.5)
    s = s if anderson is None else replace(s, anderson=anderson)
    monkeypatch.setenv(programs.THREADS_ENV, "2")
    res = solve(MPI.COMM_SELF, levels, nodes, 0.15, 1.1, s)
    assert res.status == CONVERGED
    names = {name for name, *_ in where}
    check = "record" if anderson is None else "residual_sq"
    assert {"iterate_a", "iterate_b", "gains", check, "_prolong_jit"} <= names, names
    main = [name for name, _, t in where if not t.startswith("mpda-compile")]
    assert set(main) <= {"_restrict_jit"}, main
    keys = [(name, key) for name, key, _ in where]
    assert len(keys) == len(set(keys)), "a program was compiled twice"
    monkeypatch.setenv(programs.THREADS_ENV, "1")
    again = solve(MPI.COMM_SELF, levels, nodes, 0.15, 1.1, s)
    np.testing.assert_array_equal(again.anomaly, res.anomaly)


def test_compile_threads_come_from_the_environment(monkeypatch):
    monkeypatch.setenv(programs.THREADS_ENV, "3")
    assert programs.compile_threads() == 3 and programs.Programs().threads == 3
    monkeypatch.setenv(programs.THREADS_ENV, "0")
    assert programs.compile_threads() == 1
    monkeypatch.setenv(programs.THREADS_ENV, "many")
    with pytest.raises(ValueError, match="MPDA_COMPILE_THREADS='many'"):
        programs.compile_threads()
    monkeypatch.setenv(programs.THREADS_ENV, "-5")  # was taken as 1 (review helper)
    with pytest.raises(ValueError, match="MPDA_COMPILE_THREADS='-5'"):
        programs.compile_threads()
    monkeypatch.delenv(programs.THREADS_ENV)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert programs.compile_threads() == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a rank with one core still prefetches
    assert programs.compile_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "6,2")  # OpenMP's nesting list: the first count
    assert programs.compile_threads() == 6
    monkeypatch.setenv("OMP_NUM_THREADS", "dynamic")  # not ours to refuse: ignored
    assert programs.compile_threads() >= 2


def test_a_program_that_jax_cache_loaded_is_not_stored(tmp_path):
    """JAX's cache copy of an executable does not serialize whole (on a CPU the stored
    copy fails when run): such a program runs, and the store stays without it."""
    k = _unique_k()
    programs.set_store(programs.Store(None))
    try:
        programs.jit(_traced_scale, static_argnames=("k",))(jnp.ones(3), k=k)  # JAX's cache
        hits = programs._jax_cache_hits()
        programs.set_store(programs.Store(tmp_path))
        out = programs.jit(_traced_scale, static_argnames=("k",))(jnp.arange(3.0), k=k)
        np.testing.assert_array_equal(out, k * np.arange(3.0))
        if programs._jax_cache_hits() == hits:
            pytest.skip("JAX's persistent cache is off in this environment")
        assert programs.store().saved == 0 and list(tmp_path.iterdir()) == []
    finally:
        programs.set_store(None)


def test_store_failures_never_fail_the_call(tmp_path, monkeypatch):
    """A full disk leaves no temporary file; a damaged file that cannot be removed is
    compiled again; a directory that others may write to is not used."""
    programs.set_store(programs.Store(tmp_path))
    try:
        k = _unique_k()

        def full(*_):
            raise OSError(28, "No space left on device")

        with monkeypatch.context() as m:
            m.setattr(programs.os, "replace", full)
            out = programs.jit(_traced_scale, static_argnames=("k",))(jnp.ones(2), k=k)
        assert out[0] == k and list(tmp_path.iterdir()) == [] and programs.store().saved == 0

        programs.jit(_traced_scale, static_argnames=("k",))(jnp.ones(5), k=k)
        (path,) = tmp_path.iterdir()
        path.write_bytes(b"damaged")

        def refuse(*_, **__):
            raise PermissionError("read-only")

        with monkeypatch.context() as m:
            m.setattr(type(path), "unlink", refuse)
            out = programs.jit(_traced_scale, static_argnames=("k",))(jnp.ones(5), k=k)
        assert out[0] == k and programs.store().loaded == 0

        shared = tmp_path / "shared"
        shared.mkdir(mode=0o777)
        shared.chmod(0o777)
        programs.set_store(programs.Store(shared))
        programs.jit(_traced_scale, static_argnames=("k",))(jnp.ones(7), k=k)
        assert programs.store().root is None and list(shared.iterdir()) == []
    finally:
        programs.set_store(None)


def test_closing_drops_queued_compiles_and_later_calls_compile_themselves(monkeypatch):
    # The pool's 2 threads are held until the pool is closed, so 6 jobs are still queued
    # then however fast the compiles are (review helper).
    go, compile_ = threading.Event(), programs.Jit._compile

    def held(self, key, args, static, background=False):
        if background:
            go.wait(60)
        return compile_(self, key, args, static, background)

    monkeypatch.setattr(programs.Jit, "_compile", held)
    p = programs.Programs(threads=2)
    f = programs.jit(_traced_scale, static_argnames=("k",))
    ks = [_unique_k() for _ in range(8)]
    for k in ks:
        p.prefetch(f, jax.ShapeDtypeStruct((3,), jnp.float32), k=k)
    p.close()
    # the 6 queued jobs are cancelled and forgotten; the 2 running ones stay pending
    held_jobs = list(f.pending.values())
    go.set()
    assert len(held_jobs) == 2 and not any(job.cancelled() for job in held_jobs)
    # a later pool (another solve) queues again what the closed one cancelled
    again = programs.Programs(threads=2)
    for k in ks:
        again.prefetch(f, jax.ShapeDtypeStruct((3,), jnp.float32), k=k)
    assert not any(job.cancelled() for job in list(f.pending.values()))
    for k in ks:  # whether it ran, was cancelled or never started
        np.testing.assert_array_equal(f(jnp.ones(3), k=k), k * np.ones(3))
    again.close()
    # A job can still be in its last lines (the program in memory, the store's lock being
    # released) after the call above found the program: close() does not wait for it,
    # and a job leaves ``pending`` just after its future is done.
    wait(list(f.pending.values()), timeout=60)
    deadline = time.monotonic() + 10
    while f.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not f.pending


def test_a_job_that_ends_while_the_caller_looks_is_not_compiled_again(monkeypatch):
    """The caller looks for the job, then in memory: a job that ends between the two
    looks (its program in memory, then gone from ``pending``) is found.  In the other
    order both looks missed it and the caller traced and compiled it again (review
    helper)."""
    monkeypatch.setattr(programs, "_STORE", programs.Store(None))
    f = programs.jit(_traced_scale, static_argnames=("k",))
    k, x = _unique_k(), jnp.ones(4)
    _, _, key = f._key((x,), {"k": k})
    ready = f.jitted.lower(x, k=k).compile()
    job: Future = Future()
    job.set_running_or_notify_cancel()
    f.pending[key] = job

    class EndsTheJobOnLook(dict):
        def get(self, wanted, default=None):
            found = super().get(wanted, default)
            if wanted == key and job.running():  # the job ends just after this look
                self[key] = ready
                job.set_result(ready)
                f.pending.pop(key, None)
            return found

    f.programs = EndsTheJobOnLook()
    compiles, compile_ = [], programs.Jit._compile

    def counted(self, *args, **kwargs):
        compiles.append(self.name)
        return compile_(self, *args, **kwargs)

    monkeypatch.setattr(programs.Jit, "_compile", counted)
    np.testing.assert_array_equal(f(x, k=k), k * np.ones(4))
    assert compiles == []  # not compiled again
    assert job.done() and key not in f.pending


def test_the_store_key_takes_xla_flags_in_any_order(monkeypatch, tmp_path):
    """The same settings in another order, or a flag given twice (its last value wins in
    XLA), are one program in the store (review helper: the user's flag before or after
    the ones the ranks add made two)."""
    store, device = programs.Store(tmp_path / "store"), jax.devices()[0]
    paths = []
    for flags in ("--b=1 --a=2", "--a=2 --b=1", "--a=1 --b=1 --a=2", "--a=1 --b=1"):
        monkeypatch.setenv("XLA_FLAGS", flags)
        paths.append(store.path("m.f", ("key",), device))
    assert paths[0] == paths[1] == paths[2] != paths[3]
    monkeypatch.setenv("MPDA_KERNEL_FORM", "pads")
    assert store.path("m.f", ("key",), device) not in paths
