"""The shared cache of compiled programs (mpda_dist/programs.py): keyed by function,
argument shapes and static arguments; the coarse-grid visits reuse the level solves'
programs."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
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
