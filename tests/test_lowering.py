"""Programs traced and lowered in helper processes (mpda_dist/lowering.py): the same
program as one lowered here, the fused pass lowered for a CUDA GPU on this CPU, a solve
through them, and every way a helper can fail falling back to lowering here."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _problems import problem, rel_rmse
from mpi4py import MPI

from mpda_dist import fused, kernel, lowering, programs
from mpda_dist.halo import message_layout
from mpda_dist.solver import CONVERGED, Settings, solve

F32 = jnp.float32


def _update_args(ny: int, nx: int, real: bool = False, seed: int = 0):
    """Arguments of ``iterate_b`` for a ``ny × nx`` block: shapes, or random arrays."""
    rng = np.random.default_rng(seed)
    halo_size = message_layout(ny, nx).in_offsets[-1]

    def arr(*shape, scale=1.0, shift=0.0):
        if not real:
            return jax.ShapeDtypeStruct(shape, F32)
        return jnp.asarray(shift + scale * rng.standard_normal(shape), F32)

    msg = lambda: arr(12, ny, nx, scale=0.05)  # noqa: E731
    op = kernel.Operator(arr(ny, nx, shift=20.0), arr(12, ny, nx, scale=0.01), arr(ny, nx))
    halo = arr(halo_size, scale=0.1, shift=6.0)
    scalar = jax.ShapeDtypeStruct((), F32, weak_type=True)
    p = kernel.Params(10.0, 0.6) if real else kernel.Params(scalar, scalar)
    return (msg(), msg(), msg(), msg(), op, halo, p)


STATIC = {"n": 3, "momentum": 0.5, "delta": True, "form": "strips"}


@pytest.fixture(autouse=True)
def _wait_for_helpers(monkeypatch):
    """These tests ask a helper as soon as it is started: they wait for it (the default
    lowers a program here while every helper is busy or starting; tested below)."""
    monkeypatch.setattr(lowering, "HELPER_WAIT", lowering.REPLY_TIMEOUT)


@pytest.fixture
def pool():
    pool = lowering.Helpers(1)
    yield pool
    pool.close()


def test_a_helper_lowers_the_program_this_process_would(pool):
    """A frozen update lowered by a helper compiles to a program with the same
    operations, gives the same numbers bit for bit, and takes the donated inputs."""
    specs = _update_args(11, 9)
    _, _, key = kernel.iterate_b._key(specs, STATIC)
    lower = pool.lower(kernel.iterate_b, specs, STATIC, key)
    assert lower is not None and pool.lowered == 1 and not pool.refused and pool.lost == 0
    there = lower().compile()
    here = kernel.iterate_b.jitted.lower(*specs, **STATIC).compile()
    a, b = _update_args(11, 9, real=True, seed=1), _update_args(11, 9, real=True, seed=1)
    got, want = there(*a), here(*b)
    for x, y in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a[1].is_deleted() and b[1].is_deleted()  # b, donated
    hlo = [c.as_text().count(" fusion(") for c in (there, here)]
    assert hlo[0] == hlo[1] > 0, hlo


def test_a_gpu_request_lowers_the_fused_pass_for_cuda(pool):
    """What a GPU process asks of its helpers, asked on this CPU: the frozen update with
    the fused pass (Pallas's Triton lowering), exported for CUDA, whose one-call wrapper
    lowers here for CUDA to one Triton kernel call."""
    specs = _update_args(20, 70)  # (a small block runs pads by default: named here)
    static = {"n": 10, "momentum": 0.5, "delta": False, "form": kernel.FUSED}
    _, _, key = kernel.iterate_b._key(specs, static)
    target = lowering.Target("gpu", "cuda", True, "9.0", "NVIDIA H200", 132)  # an H200's
    request = (kernel.iterate_b.name, "mpda_dist.kernel", specs, static, key[-1], key[2], target)
    request += (programs._source_digest(),)
    helper = pool._take()
    status, payload = helper.ask(pickle.dumps(request), lowering.REPLY_TIMEOUT)
    pool.idle.put(helper)
    assert status == "ok", payload
    exported = pickle.loads(payload)
    assert exported.platforms == ("cuda",)
    wrapper = jax.jit(exported.call, donate_argnums=(0, 1, 2))
    text = wrapper.trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 1
    # another GPU: jaxlib 0.10 would lower the kernel for 9.0 anyway, so it is refused
    a100 = dataclasses.replace(target, capability="8.0", device_kind="NVIDIA A100-SXM4-80GB")
    helper = pool._take()
    status, payload = helper.ask(pickle.dumps(request[:6] + (a100,) + request[7:]), 30.0)
    pool.idle.put(helper)
    assert status == "error" and "xla.gpu.triton" in payload


_DEVICES_SEEN: list = []


@programs.jit
def _records_its_abstract_device(x):
    _DEVICES_SEEN.append(jax.sharding.get_abstract_mesh().abstract_device)
    return x + 1.0


def test_a_helper_exports_a_cuda_request_for_the_requesters_gpu():
    """What a helper runs for a request (:func:`lowering._export`, here in this
    process): the program is traced with the requester's GPU as the abstract device,
    which jax 0.11's Pallas lowering asks for."""
    x = jax.ShapeDtypeStruct((3,), F32)
    _, _, key = _records_its_abstract_device._key((x,), {})
    target = lowering.Target("gpu", "cuda", True, "9.0", "NVIDIA H200", 132)
    request = (_records_its_abstract_device.name, __name__, lowering._specs((x,)), {})
    request += (key[-1], key[2], target, programs._source_digest())
    saved = programs.TRACE_BACKEND[0], fused.SUPPORTED[0]  # _export sets the target's
    _DEVICES_SEEN.clear()
    try:
        exported = pickle.loads(lowering._export(request))
    finally:
        programs.TRACE_BACKEND[0], fused.SUPPORTED[0] = saved
    assert exported.platforms == ("cuda",)
    assert [d.device_kind for d in _DEVICES_SEEN] == ["NVIDIA H200"]


def test_a_helper_lowers_for_the_requesters_gpu():
    """jax 0.11 lowers Pallas's Triton kernels for the abstract mesh's device, else the
    default device (a helper's CPU: refused on an H200).  A CUDA request sets the
    requester's GPU there, on an empty mesh; a CPU request sets nothing."""
    gpu = lowering.Target("gpu", "cuda", True, "9.0", "NVIDIA H100 80GB HBM3", 132)
    with lowering._abstract_device(gpu):
        mesh = jax.sharding.get_abstract_mesh()
        assert mesh.empty
        assert (mesh.abstract_device.device_kind, mesh.abstract_device.platform) == (
            "NVIDIA H100 80GB HBM3",
            "gpu",
        )
    assert jax.sharding.get_abstract_mesh().abstract_device is None
    with lowering._abstract_device(lowering.Target("cpu", "cpu", False)):
        assert jax.sharding.get_abstract_mesh().abstract_device is None


def test_a_solve_with_helpers_lowers_its_programs_there(monkeypatch):
    """A cold solve with one helper and 2 compile threads: every background program is
    lowered by the helper, or here when it was busy (none refused, none lost), and the
    answer is exact's."""
    monkeypatch.setattr(programs, "_STORE", programs.Store(None))
    monkeypatch.setenv(programs.THREADS_ENV, "2")
    monkeypatch.setenv(lowering.ENV, "1")
    asked = []
    elsewhere = programs.Jit._lowered_elsewhere

    def recording(self, *a):
        got = elsewhere(self, *a)
        asked.append((self.name, got is not None))
        return got

    monkeypatch.setattr(programs.Jit, "_lowered_elsewhere", recording)
    monkeypatch.setattr(lowering, "HELPER_WAIT", 0.0)  # the default: no waiting
    lowering.reset()
    try:
        pool = lowering.helpers()
        assert pool.wait_ready(60)  # as `mpda run` starts them while it reads its inputs
        _, nodes, levels, exact = problem(21, 19, 0.1, seed=6)  # shapes no other test uses
        res = solve(MPI.COMM_SELF, levels, nodes, 0.15, 1.1, Settings(dtype="float64", tol=1e-5))
        assert res.status == CONVERGED
        assert rel_rmse(res.anomaly, exact) < 1e-4
        assert pool.lowered >= 1 and not pool.refused and pool.lost == 0
        assert [ok for _, ok in asked].count(True) == pool.lowered
        assert pool.lowered + pool.busy == len(asked), asked
    finally:
        lowering.reset()


@programs.jit
def _not_importable_by_a_helper(x):
    return 3.0 * x + 1.0


def test_a_program_a_helper_cannot_find_is_lowered_here(pool):
    """A helper imports the program's module by name: this test module is not on its
    path, so it refuses, the caller lowers the program itself, and the helper is not
    asked again for it."""
    x = jax.ShapeDtypeStruct((5,), F32)
    _, _, key = _not_importable_by_a_helper._key((x,), {})
    assert pool.lower(_not_importable_by_a_helper, (x,), {}, key) is None
    assert {name for name, _ in pool.refused} == {_not_importable_by_a_helper.name}
    assert pool.lost == 0
    # the report says why, since the fallback costs this process the lowering
    summary = pool.summary()
    assert "1 refused (_not_importable_by_a_helper), 0 lost; " in summary
    assert summary.endswith(
        "_not_importable_by_a_helper: ModuleNotFoundError: No module named 'test_lowering'"
    )
    assert pool.lower(_not_importable_by_a_helper, (x,), {}, key) is None
    assert len(pool.all) == 1  # the helper lives on for other programs


def test_a_fresh_helper_lowers_a_program_outside_the_kernel(pool, monkeypatch, tmp_path):
    """The first request to a new helper may be a program of a module that registers no
    settings (``programs.subtract``): the helper imports the kernel's first and
    compares all of them.  And the helper runs this copy of the package, whatever the
    current directory holds."""
    fake = tmp_path / "mpda_dist"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('the wrong copy')\n")
    monkeypatch.chdir(tmp_path)
    x = jax.ShapeDtypeStruct((6,), F32)
    _, _, key = programs.subtract._key((x, x), {})
    lower = pool.lower(programs.subtract, (x, x), {}, key)
    assert lower is not None and not pool.refused and pool.lost == 0
    got = lower().compile()(jnp.arange(6.0, dtype=F32), jnp.ones(6, F32))
    np.testing.assert_array_equal(np.asarray(got), np.arange(6.0) - 1.0)


def test_a_busy_or_starting_helper_is_not_waited_for(pool, monkeypatch):
    """By default a request is not queued behind a helper that is busy or still
    starting (on an H200 the first program needed waited 2.1 s so): the caller lowers
    it itself, and it is not counted refused; a ready, free helper is asked."""
    monkeypatch.setattr(lowering, "HELPER_WAIT", 0.0)
    x = jax.ShapeDtypeStruct((4,), F32)
    _, _, key = programs.add._key((x, x), {})
    t0 = time.perf_counter()
    assert pool.lower(programs.add, (x, x), {}, key) is None  # started now: importing JAX
    assert pool.lower(programs.add, (x, x), {}, key) is None
    assert time.perf_counter() - t0 < 1.0 and len(pool.all) == 1
    assert pool.busy == 2 and not pool.refused and pool.lost == 0
    assert "2 here while all were busy or starting" in pool.summary()
    assert pool.wait_ready(60)
    helper = pool._take(0)  # the pool's one helper, ready, now busy
    assert helper is not None and helper.ready
    assert pool.lower(programs.add, (x, x), {}, key) is None and pool.busy == 3
    pool.idle.put(helper)
    assert pool.lower(programs.add, (x, x), {}, key) is not None and pool.lowered == 1


def test_a_helper_of_another_version_disables_the_helpers(pool, monkeypatch):
    """A helper whose package source differs from this process's answers ``stale``; no
    helper is asked again."""
    monkeypatch.setattr(programs, "_source_digest", lambda: "another version")
    x = jax.ShapeDtypeStruct((6,), F32)
    _, _, key = programs.subtract._key((x, x), {})
    assert pool.lower(programs.subtract, (x, x), {}, key) is None
    assert not pool.usable and not pool.refused
    assert pool._take() is None


def test_a_helper_that_answers_garbage_is_lost_not_leaked(pool, monkeypatch):
    """Whatever goes wrong while asking (here: a reply that is not one), the helper is
    ended and counted lost, that program is not sent again, and the next request
    starts a new helper."""

    def garbage(self, request, timeout):
        raise MemoryError("a length read from stray output")

    x = jax.ShapeDtypeStruct((6,), F32)
    _, _, key = programs.subtract._key((x, x), {})
    with monkeypatch.context() as m:
        m.setattr(lowering._Helper, "ask", garbage)
        assert pool.lower(programs.subtract, (x, x), {}, key) is None
    assert pool.lost == 1 and not pool.all
    assert {name for name, _ in pool.refused} == {programs.subtract.name}
    assert pool.lower(programs.subtract, (x, x), {}, key) is None and not pool.all
    assert pool.lower(programs.add, (x, x), {}, key) is not None
    assert len(pool.all) == 1
    with pytest.raises(ValueError, match="not a lowering reply"):
        lowering._read(io.BytesIO(b"hello from a banner\n"))


def test_a_bad_count_in_a_library_call_means_no_helpers(monkeypatch, caplog):
    """``mpda run`` refuses a bad ``MPDA_LOWER_PROCESSES`` at start-up (test_cli); a
    library call logs it and lowers everything itself."""
    monkeypatch.setenv(lowering.ENV, "four")
    lowering.reset()
    try:
        with caplog.at_level("WARNING", logger="mpda_dist"):
            assert lowering.helpers() is None
        assert "MPDA_LOWER_PROCESSES='four'" in caplog.text
    finally:
        lowering.reset()


def test_a_helper_that_does_not_answer_is_dropped(monkeypatch):
    """A helper that takes longer than ``REPLY_TIMEOUT`` is killed, the program lowered
    by the caller and not sent again; after ``MAX_LOST`` such helpers the rest are
    ended and none is started again."""
    monkeypatch.setattr(lowering, "REPLY_TIMEOUT", 0.01)
    pool = lowering.Helpers(2)
    try:
        specs = _update_args(6, 5)
        x = jax.ShapeDtypeStruct((6,), F32)
        calls = [(kernel.iterate_b, specs, STATIC), (programs.add, (x, x), {})]
        calls.append((programs.subtract, (x, x), {}))
        for lost, (fn, args, static) in enumerate(calls, 1):
            _, _, key = fn._key(args, static)
            assert pool.lower(fn, args, static, key) is None
            assert pool.lost == lost and (fn.name, key[2]) in pool.refused
            assert pool.lower(fn, args, static, key) is None and pool.lost == lost
        assert lowering.MAX_LOST == len(calls)
        assert pool._take() is None and not pool.all and not pool.usable
    finally:
        pool.close()


def test_through_the_program_cache_a_lost_helper_changes_nothing(monkeypatch):
    """End to end through :class:`programs.Jit`: a background program whose helper is
    lost is lowered in this process and computes what the program computes."""
    monkeypatch.setattr(programs, "_STORE", programs.Store(None))
    monkeypatch.setattr(lowering, "REPLY_TIMEOUT", 0.01)
    monkeypatch.setenv(lowering.ENV, "1")
    lowering.reset()
    try:
        x = jnp.arange(7.0, dtype=F32)
        p = programs.Programs(threads=2)
        p.prefetch(programs.subtract, x, x + 1)
        assert np.array_equal(np.asarray(programs.subtract(x, 2 * x)), -np.asarray(x))
        p.close()
        assert lowering.helpers().lost == 1
    finally:
        lowering.reset()


def test_the_helper_environment_and_count(monkeypatch):
    """Helpers run JAX on the CPU with one thread, never see an MPI launcher's wiring,
    and start no helpers of their own; the count comes from the environment, else none
    on a CPU."""
    monkeypatch.setenv("PMI_RANK", "3")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    monkeypatch.setenv("SOMETHING_ELSE", "kept")
    env = lowering._helper_env()
    assert "PMI_RANK" not in env and "OMPI_COMM_WORLD_RANK" not in env
    assert env["SOMETHING_ELSE"] == "kept"
    assert env["JAX_PLATFORMS"] == "cpu" and env[lowering.ENV] == "0"
    monkeypatch.setenv("MPI_LOCALRANKID", "1")
    assert "MPI_LOCALRANKID" not in lowering._helper_env()
    package = Path(lowering.__file__).resolve().parent.parent
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(package)
    monkeypatch.setenv(lowering.ENV, "3")
    assert lowering.processes() == 3
    monkeypatch.setenv(lowering.ENV, "many")
    with pytest.raises(ValueError, match="MPDA_LOWER_PROCESSES='many'"):
        lowering.requested()
    monkeypatch.delenv(lowering.ENV)
    assert lowering.processes() == 0  # none unless asked for, on any backend
    if jax.default_backend() == "cpu":
        assert lowering.target_platform() == "cpu"


def test_start_imports_what_the_first_solve_needs():
    """``lowering.start()`` (``mpda run``, before it reads its inputs) imports scipy's
    sparse solver and the solver's modules in a background thread, once."""
    code = (
        "import sys\n"
        "from mpda_dist import lowering\n"
        "ahead = ('scipy.sparse.linalg', 'mpda_dist.baselines', 'mpda_dist.cycle')\n"
        "assert not any(m in sys.modules for m in ahead), [m for m in ahead if m in sys.modules]\n"
        "lowering.start()\n"
        "thread = lowering.import_ahead()\n"
        "assert thread is lowering.import_ahead() and not thread.daemon\n"
        "thread.join(120)\n"
        "missing = [m for m in ahead if m not in sys.modules]\n"
        "assert not missing and not thread.is_alive(), missing\n"
        "print('imported ahead')\n"
    )
    env = {**os.environ, lowering.ENV: "0", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0 and "imported ahead" in out.stdout, out.stderr[-3000:]
