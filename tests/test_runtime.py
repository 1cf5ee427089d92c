"""Process start-up: the C allocator keeps freed memory (``runtime.configure_malloc``);
threads and GPU memory per rank (``runtime.configure_jax_env``)."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest
from _procs import MPIEXEC

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


# settle_gc twice, with a cycle made garbage in between: what each call returned, the
# frozen count after each, and whether the cycle was still collected afterwards.
_GC_PROBE = """
import gc, weakref
from mpda_dist import runtime
class Node: pass
first = runtime.settle_gc()
frozen = gc.get_freeze_count()
a, b = Node(), Node()
a.other, b.other = b, a
alive = weakref.ref(a)
del a, b
second = runtime.settle_gc()
gc.collect()
print(first, frozen > 1000, second, gc.get_freeze_count() == frozen, alive() is None)
"""


def _gc_probe(mode: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != runtime.GC_ENV}
    if mode is not None:
        env[runtime.GC_ENV] = mode
    out = subprocess.run(
        [sys.executable, "-c", _GC_PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_settle_gc_freezes_once_and_later_garbage_is_collected():
    """By default the first call freezes what the process holds (the imports), a second
    call freezes nothing more, and a cycle that became garbage after it is collected;
    ``python`` leaves the collector alone."""
    assert _gc_probe(None) == ["True", "True", "False", "True", "True"]
    assert _gc_probe("python") == ["False", "False", "False", "True", "True"]


def test_gc_paused_turns_the_collector_off_inside_only(monkeypatch):
    """Off inside (the package's imports), on again after, also after an error; left
    alone with ``python``."""
    import gc

    monkeypatch.delenv(runtime.GC_ENV, raising=False)
    assert gc.isenabled()
    with runtime.gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(ImportError), runtime.gc_paused():
        raise ImportError("a module that fails to import")
    assert gc.isenabled()
    monkeypatch.setenv(runtime.GC_ENV, "python")
    with runtime.gc_paused():
        assert gc.isenabled()


def test_gc_mode_from_the_environment(monkeypatch):
    monkeypatch.setenv(runtime.GC_ENV, " Python ")
    assert runtime.gc_mode() == "python"
    monkeypatch.delenv(runtime.GC_ENV)
    assert runtime.gc_mode() == "freeze"
    monkeypatch.setenv(runtime.GC_ENV, "off")
    with pytest.raises(ValueError, match="MPDA_GC='off': expected freeze or python"):
        runtime.gc_mode()


_ENV_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "XLA_FLAGS",
    "XLA_PYTHON_CLIENT_PREALLOCATE",
    *runtime.MEM_FRACTION_VARS,
)


@pytest.fixture
def clean_env(monkeypatch):
    for var in _ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(runtime, "LEGACY_EMITTERS_JAXLIB", frozenset())
    return monkeypatch


def test_the_older_cpu_emitters_only_with_a_jaxlib_they_were_measured_with(clean_env):
    """An XLA that does not know a flag aborts: none for another jaxlib, and the user's
    own setting of it wins."""
    clean_env.setattr(runtime, "jaxlib_version", lambda: "0.10.2")
    clean_env.setattr(runtime, "LEGACY_EMITTERS_JAXLIB", frozenset({"0.10.2"}))
    runtime.configure_jax_env(2, threads=3)
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_use_fusion_emitters=false"
    for var in _ENV_VARS:
        clean_env.delenv(var, raising=False)
    clean_env.setenv("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=true")
    runtime.configure_jax_env(1, threads=1)
    assert os.environ["XLA_FLAGS"] == (
        "--xla_cpu_use_fusion_emitters=true --xla_cpu_multi_thread_eigen=false"
    )
    for var in _ENV_VARS:
        clean_env.delenv(var, raising=False)
    clean_env.setattr(runtime, "jaxlib_version", lambda: "0.10.3")
    runtime.configure_jax_env(2, threads=3)
    assert "XLA_FLAGS" not in os.environ
    # the measured version is the one installed here, or a newer one was installed
    assert runtime.jaxlib_version() is not None


def test_threads_are_the_rank_share_unless_the_user_gave_a_count(clean_env):
    runtime.configure_jax_env(2, threads=3)
    assert os.environ["OPENBLAS_NUM_THREADS"] == "3" and "XLA_FLAGS" not in os.environ
    for var in _ENV_VARS:
        clean_env.delenv(var, raising=False)
    # The user's OMP_NUM_THREADS (the first of an OpenMP list) is the count for the
    # other libraries and for XLA's Eigen pool too (review helper: they got 2).
    clean_env.setenv("OMP_NUM_THREADS", "1,4")
    runtime.configure_jax_env(1, threads=2)
    assert os.environ["OPENBLAS_NUM_THREADS"] == os.environ["MKL_NUM_THREADS"] == "1"
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_multi_thread_eigen=false"
    assert os.environ["OMP_NUM_THREADS"] == "1,4"


def test_the_usable_cores_are_the_affinity():
    if hasattr(os, "sched_getaffinity"):
        assert runtime.usable_cores() == frozenset(os.sched_getaffinity(0))


def test_ranks_on_a_gpu_with_few_cores_are_warned_about():
    """The start-up table's warning: GPU ranks with fewer than FEW_CORES usable cores
    (Open MPI binds each of 2 ranks to one core) are named, with their core counts and
    how to give them more; CPU ranks, and GPU ranks with enough cores, are not (by JAX's
    platform, whatever the device's name)."""
    few = runtime.FEW_CORES
    cpu = [(0, "h", "cpu:0", 1, "cpu"), (1, "h", "TFRT_CPU_0", 1, "cpu")]
    assert runtime.few_cores_advice(cpu) is None
    enough = [(0, "h", "cuda:0", few, "gpu"), (1, "h", "cuda:1", 16, "gpu")]
    assert runtime.few_cores_advice(enough) is None
    rows = [(0, "h", "cuda:0", 16, "gpu"), (1, "h", "cuda:0", 1, "gpu")]
    rows += [(2, "g", "cuda:1", few - 1, "gpu"), (3, "g", "cpu:0", 1, "cpu")]
    advice = runtime.few_cores_advice(rows)
    assert advice is not None and advice.startswith("rank(s) 1, 2 run on a GPU")
    assert f"with 1/{few - 1} usable core(s)" in advice
    assert "--cpus-per-task" in advice and "--bind-to none" in advice
    many = runtime.few_cores_advice([(r, "h", "cuda:0", 1, "gpu") for r in range(11)])
    assert many is not None and "rank(s) 0, 1, 2, 3, 4, 5, 6, 7 and 3 more run" in many


@pytest.mark.parametrize("user", runtime.MEM_FRACTION_VARS)
def test_a_gpu_memory_share_the_user_set_is_kept_under_either_name(clean_env, user):
    """jaxlib refuses both names at once: setting the older one beside the user's
    newer one stopped a GPU run (review helper)."""
    clean_env.setenv(user, "0.3")
    runtime.configure_jax_env(4, threads=1)
    assert [os.environ.get(v) for v in runtime.MEM_FRACTION_VARS].count("0.3") == 1
    assert [v for v in runtime.MEM_FRACTION_VARS if v in os.environ] == [user]
    for var in runtime.MEM_FRACTION_VARS:
        clean_env.delenv(var, raising=False)
    runtime.configure_jax_env(4, threads=1)
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.225"


def test_which_gpu_a_rank_uses_and_who_shares_it(clean_env, tmp_path):
    """A rank's GPU is entry ``local_rank mod n`` of ``CUDA_VISIBLE_DEVICES`` (CUDA
    stops at ``-1``); ranks with a GPU each keep JAX's share, ranks sharing one split
    it (a review found four ranks with four GPUs limited to 0.225 each)."""
    for value, rank, gpu in [
        ("0,1,2,3", 5, "1"),
        ("0, 1", 1, "1"),
        ("GPU-a,GPU-b", 2, "GPU-a"),
        ("MIG-a,MIG-b", 1, "MIG-a"),  # a process sees one MIG instance: every rank shares it
        ("3,-1,2", 1, "3"),
        ("", 0, "?"),
        ("-1", 0, "?"),
    ]:
        clean_env.setenv("CUDA_VISIBLE_DEVICES", value)
        assert runtime.gpu_of(rank) == gpu, (value, rank)
    runtime.configure_jax_env(4, threads=1, gpu_share=1)
    assert not any(v in os.environ for v in runtime.MEM_FRACTION_VARS)
    runtime.configure_jax_env(4, threads=1, gpu_share=2)
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.450"
    # and through start(): 3 ranks, 2 GPUs: ranks 0 and 2 share GPU 0, rank 1 has GPU 1
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    clean_env.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
    script = tmp_path / "share.py"
    script.write_text(
        "import os\nfrom mpda_dist import runtime\ncomm = runtime.start()\n"
        "rows = comm.gather((comm.Get_rank(), os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION')))\n"
        "if rows:\n    print(*(f'{r} {f}' for r, f in rows), sep='\\n')\n"
    )
    cmd = [str(MPIEXEC), "-n", "3", sys.executable, str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    assert sorted(out.split("\n")[:-1]) == ["0 0.450", "1 None", "2 0.450"], out


def test_gpu_memory_is_not_preallocated_unless_the_user_asks(clean_env):
    """Preallocating 75 % of an H200 cost the first allocation 1.6-2.0 s (RESULTS §25):
    off for one rank too, with no share set; the user's own value is kept."""
    runtime.configure_jax_env(1, threads=1)
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert not any(v in os.environ for v in runtime.MEM_FRACTION_VARS)
    clean_env.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    runtime.configure_jax_env(1, threads=1)
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"


@pytest.mark.parametrize(
    ("user", "jax_dir", "store"),
    [
        ({}, None, "mpda_dist/programs"),  # the store alone (a rerun compiles nothing)
        ({"MPDA_PROGRAM_CACHE_DIR": ""}, "mpda_dist/jax", ""),  # store off: JAX's cache
        ({"JAX_COMPILATION_CACHE_DIR": "/j"}, "/j", "mpda_dist/programs"),  # the user's
        # a store the program cache will not use (others may write to it): JAX's cache
        ({"MPDA_PROGRAM_CACHE_DIR": "shared"}, "mpda_dist/jax", "shared"),
    ],
)
def test_one_persistent_cache_of_programs_unless_the_user_asks_for_both(
    monkeypatch, tmp_path, user, jax_dir, store
):
    """A cold start serialised every program twice, for JAX's cache and for mpda's
    store (on a CPU 0.7 s each for a 512² solve), and the store holds all of them: JAX's
    cache is the fallback when the store is off or unusable, or the user's choice;
    otherwise it is disabled."""
    for var in (*_CACHE_VARS, _JAX_ON):
        monkeypatch.setenv(var, "")  # recorded, so that the test's values are undone
        monkeypatch.delenv(var)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    (tmp_path / "shared").mkdir(mode=0o777)
    (tmp_path / "shared").chmod(0o777)
    for var, value in user.items():
        monkeypatch.setenv(var, str(tmp_path / value) if value == "shared" else value)
    runtime.configure_caches()
    got = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if jax_dir is None:
        assert got is None
    else:
        assert got == (jax_dir if jax_dir.startswith("/") else str(tmp_path / jax_dir))
    want = str(tmp_path / store) if store else ""
    assert os.environ["MPDA_PROGRAM_CACHE_DIR"] == want
    # without a directory JAX still computes each program's key, unless disabled
    assert os.environ.get(_JAX_ON) == (None if jax_dir else "false")


_JAX_ON = "JAX_ENABLE_COMPILATION_CACHE"
_CACHE_VARS = (
    "JAX_COMPILATION_CACHE_DIR",
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
    "MPDA_PROGRAM_CACHE_DIR",
)


def test_the_command_line_imports_neither_numpy_nor_jax():
    """``mpda run`` sets the thread counts before numpy loads: OpenBLAS reads its count
    once, when numpy is imported (review helper: ranks kept 2 threads each)."""
    code = "import sys, mpda_dist.cli; print(sorted({'numpy', 'jax'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


_EARLY = """
import os, signal, sys, time
from mpda_dist import checkpoint, runtime
runtime.start(catch_signals=sys.argv[1] == "run")
if sys.argv[1] == "library":  # start() alone leaves SIGUSR1's handler alone
    print(signal.getsignal(signal.SIGUSR1) is runtime._record_signal)
    sys.exit()
os.kill(os.getpid(), signal.SIGUSR1)  # Slurm's warning, while the run starts
time.sleep(0.2)
for i in range(2):  # two runs in one process: the second does not see it again
    with checkpoint.handlers_kept():
        if i == 0:  # again, while the run reads its inputs: recorded, not fatal
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.2)
        requests = checkpoint.Requests()
        requests.install()
        print(requests.signal_name)
    print(signal.getsignal(signal.SIGUSR1) is runtime._record_signal)
"""


def test_a_sigusr1_during_start_up_is_not_lost():
    """MPICH's own SIGUSR1 handler, installed when MPI starts, swallowed Slurm's warning
    before a time limit that came before the run's handlers: it went on without a
    checkpoint (review helper).  Now ``mpda run`` records it and the first run takes
    it; afterwards the handler from before start-up is back (a signal between two runs
    stopped the second), and a library's ``start()`` changes no handler."""

    def run(mode: str) -> list[str]:
        cmd = [str(MPIEXEC), "-n", "1", sys.executable, "-c", _EARLY, mode]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
        return proc.stdout.split()

    assert run("run") == ["SIGUSR1", "False", "None", "False"]
    assert run("library") == ["False"]


_FROM_LAUNCHER = """
import os
from mpda_dist import checkpoint, runtime
runtime.start(catch_signals=True)
print(os.environ.get("MPDA_EARLY_SIGNAL"))
for i in range(2):  # the first run takes it, the second does not see it again
    with checkpoint.handlers_kept():
        requests = checkpoint.Requests()
        requests.install()
        print(requests.signal_name)
"""


def test_a_signal_before_the_rank_started_counts_as_one_during_start_up():
    """The batch script passes on a SIGUSR1 that came during its set-up, before mpda
    ran, as ``MPDA_EARLY_SIGNAL``: ``mpda run`` takes it as one that came while it
    started (a checkpoint at the first check), and leaves it out of the environment of
    what it starts.  (Start-up in a process of its own; the names below.)"""
    env = {**os.environ, "MPDA_EARLY_SIGNAL": "USR1"}
    proc = subprocess.run(
        [sys.executable, "-c", _FROM_LAUNCHER], capture_output=True, text=True, timeout=120,
        env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["None", "SIGUSR1", "None"]


@pytest.mark.parametrize(
    ("value", "taken"),
    [("USR1", "SIGUSR1"), ("sigterm", "SIGTERM"), ("USR9", None), ("INT", None), ("", None)],
)
def test_the_early_signals_a_run_takes_from_the_launcher(monkeypatch, capsys, value, taken):
    """Only the signals a run acts on, SIGUSR1 and SIGTERM, in either spelling; another
    name (no signal, or one a run does not act on) is reported and ignored."""
    monkeypatch.setattr(runtime, "_EARLY_SIGNALS", [])
    monkeypatch.setenv(runtime.EARLY_SIGNAL_ENV, value)
    runtime._signal_from_launcher()
    assert runtime.early_signal() == taken
    assert runtime.EARLY_SIGNAL_ENV not in os.environ
    assert ("ignored" in capsys.readouterr().err) == (taken is None and value != "")


def test_ctrl_c_inside_start_aborts_the_started_mpi(monkeypatch, capsys):
    """SIGINT while ``runtime.start`` runs its collectives (MPI started, the
    communicator not yet kept): the rank-tagged line and exit 130 through MPI_Abort's
    path, not a bare exit that would leave the other ranks waiting."""
    from mpi4py import MPI

    assert MPI.Is_initialized()
    monkeypatch.setattr(runtime, "_COMM", None)
    with pytest.raises(SystemExit) as exc:
        runtime.end_interrupted()
    assert exc.value.code == 130
    assert "[rank 0] error: interrupted (SIGINT)" in capsys.readouterr().err
