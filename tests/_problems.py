"""Small synthetic problems shared by the tests (built from the public pieces)."""

from __future__ import annotations

import numpy as np
import scipy.sparse.linalg as spla

from mpda_dist import observations as obsmod
from mpda_dist import prior, sphere
from mpda_dist.baselines import assemble_periodic, exact_solve
from mpda_dist.multigrid import schedule, sphere_level
from mpda_dist.observations import NodeObservations
from mpda_dist.stencil import build

LENGTHSCALE, AMPLITUDE = 0.15, 1.1


def problem(ny: int, nx: int, fraction: float, extent=(1.0, 1.0), seed: int = 0, noise=1e-3):
    """Truth, node observations, levels (min_size 16) and the exact interior solution."""
    rng = np.random.default_rng(seed)
    truth = prior.sample((ny, nx), extent, LENGTHSCALE, AMPLITUDE, rng)
    obs = obsmod.synthetic(truth, extent, fraction, noise, rng)
    nodes, _ = obsmod.to_nodes(obs, (ny, nx), extent, 0.0, "test")
    levels = schedule(ny, nx, extent[1] / (ny - 1), extent[0] / (nx - 1), 16)
    top = levels[-1]
    st = build(top, LENGTHSCALE, AMPLITUDE, nodes, (0, top.interior[0]), (0, top.interior[1]))
    return truth, nodes, levels, exact_solve(st)


def rel_rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2)))


def globe_problem(ny: int, nx: int, fraction: float = 0.1, seed: int = 0):
    """A small globe: prior-sample truth, node observations, the level and the exact
    interior solution (sparse direct solve of the periodic assembly)."""
    lr, ell, amp = (-70.0, 70.0), 1500.0, 1.9
    rng = np.random.default_rng(seed)
    truth = sphere.sample((ny, nx), lr, ell, amp, rng)
    k = int(fraction * (ny - 2) * nx)
    iy, ix = np.divmod(rng.choice((ny - 2) * nx, k, replace=False), nx)
    iy = iy + 1
    nodes = NodeObservations(iy, ix, truth[iy, ix] + 0.01 * rng.standard_normal(k), np.full(k, 1e4))
    levels = sphere_level(ny, nx, lr)
    st = build(levels[0], ell, amp, nodes, (0, ny - 2), (0, nx))
    exact = spla.spsolve(assemble_periodic(st).tocsc(), st.rhs.ravel()).reshape(ny - 2, nx)
    return truth, nodes, levels, exact, (ell, amp)
