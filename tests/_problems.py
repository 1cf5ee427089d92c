"""Small synthetic problems shared by the tests (built from the public pieces)."""

from __future__ import annotations

import numpy as np

from mpda_dist import observations as obsmod
from mpda_dist import prior
from mpda_dist.baselines import exact_solve
from mpda_dist.multigrid import schedule
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
