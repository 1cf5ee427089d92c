"""Matérn (ν = 1) prior on a rectangle via the SPDE ``(κ² − Δ) f = W/s`` (DESIGN §1).

Unknowns live on the interior ``(ny-2) × (nx-2)`` nodes; the boundary is held at the
background (homogeneous Dirichlet anomaly).  ``A = κ² I − Δ_h`` with the 5-point
Laplacian truncated at the boundary, ``L = s·A`` and the prior precision ``P = LᵀL``.

``P`` is the 13-point stencil returned by :func:`rectangle_stencil` for any block of
the interior; :func:`sample` draws exact prior samples with two type-I DSTs.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import fft

from mpda_dist._offsets import OFFSETS

NU = 1.0
DIM = 2


def matern_kappa_scale(
    lengthscale: float, amplitude: float, dx: float, dy: float
) -> tuple[float, float]:
    """Return ``(κ, s)`` for grid spacings ``dx, dy`` (domain units).

    ``κ = √(2ν)/ℓ`` and ``s = √(dx·dy / (q σ²))`` with
    ``q = (4π)^{d/2} κ^{2ν} Γ(ν + d/2)/Γ(ν)``.
    """
    kappa = math.sqrt(2.0 * NU) / lengthscale
    q = (4.0 * math.pi) ** (DIM / 2) * kappa ** (2 * NU) * math.gamma(NU + DIM / 2) / math.gamma(NU)
    s = math.sqrt(dx * dy / (q * amplitude**2))
    return kappa, s


def rectangle_stencil(
    interior: tuple[int, int],
    spacing: tuple[float, float],
    lengthscale: float,
    amplitude: float,
    rows: tuple[int, int],
    cols: tuple[int, int],
    weights_dtype: Any = np.float64,
) -> tuple[np.ndarray, np.ndarray]:
    """Prior precision ``P`` on the block ``rows × cols`` of the interior.

    Args:
      interior: ``(n, m)`` interior nodes in y and x (grid points minus 2).
      spacing: ``(dy, dx)``.
      rows, cols: half-open global interior index ranges of the block.
      weights_dtype: of the weights (the solver's float32 ones are written at once
        rather than as float64 and then converted: 12 full-size arrays).

    Returns:
      ``diag`` of shape ``(by, bx)``, float64, and ``weights`` of shape
      ``(12, by, bx)``, where ``weights[k][j] = P[j, j + OFFSETS[k]]`` and 0 where that
      neighbour is not an interior node.
    """
    n, m = interior
    dy, dx = spacing
    kappa, s = matern_kappa_scale(lengthscale, amplitude, dx, dy)
    a0 = kappa**2 + 2.0 / dx**2 + 2.0 / dy**2
    ax = -1.0 / dx**2
    ay = -1.0 / dy**2
    s2 = s * s
    iy = np.arange(rows[0], rows[1])
    ix = np.arange(cols[0], cols[1])

    def outside(i: np.ndarray, o: int, size: int) -> np.ndarray:
        """Where the neighbour ``i + o`` along one axis is not an interior node."""
        return (i + o < 0) | (i + o >= size)

    # (A²)_jj sums A_jk² over the interior neighbours k of j: rows of A are truncated at
    # the boundary, which is the only place the stencil differs from the interior one.
    # Each count depends on one axis only: the full arrays are outer sums, and each
    # slot's weights one constant with its boundary rows and columns zeroed.
    nbx = 2.0 - outside(ix, 1, m) - outside(ix, -1, m)
    nby = 2.0 - outside(iy, 1, n) - outside(iy, -1, n)
    diag = s2 * (a0 * a0 + (nby * ay * ay)[:, None] + (nbx * ax * ax)[None, :])
    coef = {
        (0, 1): 2 * a0 * ax,
        (1, 0): 2 * a0 * ay,
        (0, 2): ax * ax,
        (2, 0): ay * ay,
        (1, 1): 2 * ax * ay,
        (1, -1): 2 * ax * ay,
    }
    weights = np.empty((len(OFFSETS),) + diag.shape, weights_dtype)
    for k, (oy, ox) in enumerate(OFFSETS):
        value = coef.get((oy, ox), coef.get((-oy, -ox)))
        weights[k].fill(s2 * value)
        weights[k][outside(iy, oy, n), :] = 0.0
        weights[k][:, outside(ix, ox, m)] = 0.0
    return diag, weights


def dst_eigenvalues(
    interior: tuple[int, int], spacing: tuple[float, float], kappa: float
) -> np.ndarray:
    """Eigenvalues of ``A`` on the interior, shape ``(n, m)``, in type-I DST order."""
    n, m = interior
    dy, dx = spacing
    kx = np.arange(1, m + 1)
    ky = np.arange(1, n + 1)
    lx = (2.0 - 2.0 * np.cos(kx * np.pi / (m + 1))) / dx**2
    ly = (2.0 - 2.0 * np.cos(ky * np.pi / (n + 1))) / dy**2
    return kappa**2 + ly[:, None] + lx[None, :]


def apply_inverse_a(z: np.ndarray, spacing: tuple[float, float], kappa: float) -> np.ndarray:
    """``A⁻¹ z`` for ``z`` of shape ``(n, m)`` by two orthonormal type-I DSTs."""
    lam = dst_eigenvalues(z.shape, spacing, kappa)
    return fft.idstn(fft.dstn(z, type=1, norm="ortho") / lam, type=1, norm="ortho")


def sample(
    shape: tuple[int, int],
    extent: tuple[float, float],
    lengthscale: float,
    amplitude: float,
    rng: np.random.Generator,
    z: np.ndarray | None = None,
) -> np.ndarray:
    """Exact prior sample on the whole grid, shape ``(ny, nx)``, zero on the boundary.

    ``f = A⁻¹ z / s`` with ``z ~ N(0, I)`` on the interior has covariance
    ``(s² A²)⁻¹ = P⁻¹``.  Pass ``z`` (shape ``(ny-2, nx-2)``) to reuse a draw.
    """
    ny, nx = shape
    dy, dx = extent[1] / (ny - 1), extent[0] / (nx - 1)
    kappa, s = matern_kappa_scale(lengthscale, amplitude, dx, dy)
    if z is None:
        z = rng.standard_normal((ny - 2, nx - 2))
    field = np.zeros((ny, nx))
    field[1:-1, 1:-1] = apply_inverse_a(z, (dy, dx), kappa) / s
    return field
