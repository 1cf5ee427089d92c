"""Matérn (ν = 1) prior on a regular latitude/longitude grid of the sphere (DESIGN §1).

Grid: ``nx`` longitudes ``θ_i = i·360/nx`` (degrees, ``0 ≤ θ < 360``, periodic: node
``nx`` is node 0, so there is no seam) and ``ny`` latitudes ``λ_j`` evenly spaced over
``[lat_min, lat_max]`` inclusive.  Arrays are latitude first, ``(ny, nx)``.

Polar treatment: the domain is clipped away from the poles.  The two clip rows
``λ = lat_min`` and ``λ = lat_max`` are held at the background (zero anomaly,
homogeneous Dirichlet), exactly like the rectangle's boundary; unknowns live on the
``(ny-2) × nx`` nodes between them (every longitude).  With clips at ±80° the rows
dropped cover 1.5% of the sphere's area, and the prior variance only dips within about
one lengthscale of the clip rows.

Operator: Laplace–Beltrami in latitude ``λ`` and longitude ``θ`` on a sphere of radius
``R = 6371 km``,
``Δf = (R² cos λ)⁻¹ ∂_λ(cos λ ∂_λ f) + (R² cos² λ)⁻¹ ∂²_θ f``, discretised in the
symmetric finite-volume (area-weighted) form: with cell areas
``w_j = R² cos λ_j dθ dλ`` (km²),

``A_sym = κ² W + K``,  ``K = −W Δ_h`` symmetric,

where ``K`` couples latitude neighbours with ``dθ cos(λ_j ± dλ/2)/dλ`` and longitude
neighbours with ``dλ/(dθ cos λ_j)`` (dimensionless, as ``dy/dx`` on the rectangle).
``A = W⁻¹A_sym = κ² I − Δ_h`` is the SPDE operator, ``L = s·A`` with the per-row scale
``s_j = √(w_j/(q σ²))`` of DESIGN §1 (``sin φ`` of colatitude = ``cos λ``), so
``L = W^{-1/2} A_sym/√(q σ²)`` and ``P = LᵀL = A_sym W⁻¹ A_sym/(q σ²)``: symmetric
positive definite, 13-point.  Lengthscale ``ℓ`` in km, ``κ = √2/ℓ``, ``q = 4πκ²``;
amplitude ``σ`` in field units.

Coefficients depend on latitude only, which also makes exact sampling cheap: an FFT in
longitude splits ``A_sym`` into one tridiagonal system in latitude per zonal
wavenumber (:func:`sample`).
"""

from __future__ import annotations

import math

import numpy as np

from mpda_dist._offsets import OFFSETS

EARTH_RADIUS_KM = 6371.0


def longitudes(nx: int) -> np.ndarray:
    """Longitudes of the ``nx`` grid columns in degrees, ``i·360/nx``."""
    return np.arange(nx) * (360.0 / nx)


def latitudes(ny: int, lat_range: tuple[float, float]) -> np.ndarray:
    """Latitudes of the ``ny`` grid rows in degrees, clip rows included."""
    return np.linspace(float(lat_range[0]), float(lat_range[1]), ny)


def check_lat_range(lat_range: tuple[float, float]) -> None:
    lo, hi = lat_range
    if not (-90.0 < lo < hi < 90.0):
        raise ValueError(
            f"grid.lat_range = [{lo}, {hi}] must satisfy -90 < lat_min < lat_max < 90 "
            "(the grid is clipped away from the poles)"
        )


def _rows(ny: int, nx: int, lat_range: tuple[float, float], lengthscale: float) -> dict:
    """Per interior row (length ``ny-2``) coefficients of ``A_sym`` and the cell areas."""
    check_lat_range(lat_range)
    dlat = math.radians((lat_range[1] - lat_range[0]) / (ny - 1))
    dlon = 2.0 * math.pi / nx
    lat = np.radians(latitudes(ny, lat_range)[1:-1])
    kappa = math.sqrt(2.0) / lengthscale
    r2 = EARTH_RADIUS_KM**2
    w = r2 * np.cos(lat) * dlon * dlat
    ex = dlat / (dlon * np.cos(lat))
    eyp = dlon * np.cos(lat + dlat / 2) / dlat
    eym = dlon * np.cos(lat - dlat / 2) / dlat
    d = kappa**2 * w + eyp + eym + 2.0 * ex
    return {"w": w, "ex": ex, "eyp": eyp, "eym": eym, "d": d, "kappa": kappa}


def _q(kappa: float) -> float:
    return 4.0 * math.pi * kappa**2


def _shift(v: np.ndarray, k: int, fill: float) -> np.ndarray:
    """``v[j + k]`` with ``fill`` where ``j + k`` is outside."""
    out = np.full_like(v, fill)
    n = len(v)
    if k >= 0:
        out[: n - k] = v[k:]
    else:
        out[-k:] = v[: n + k]
    return out


def sphere_stencil(
    shape: tuple[int, int],
    lat_range: tuple[float, float],
    lengthscale: float,
    amplitude: float,
    rows: tuple[int, int],
    cols: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """Prior precision ``P`` on the block ``rows × cols`` of the interior ``(ny-2, nx)``.

    Args:
      shape: ``(ny, nx)`` grid points, clip rows included.
      lat_range: ``(lat_min, lat_max)`` in degrees.
      lengthscale: km; amplitude: field units.
      rows, cols: half-open global interior index ranges of the block.

    Returns:
      ``diag (by, bx)`` and ``weights (12, by, bx)`` (float64), ``weights[k][j] =
      P[j, j + OFFSETS[k]]``.  Longitude is periodic, so weights wrap (nothing is zeroed
      at the x edges); they are 0 where a latitude neighbour is a clip row or beyond.
    """
    ny, nx = shape
    c = _rows(ny, nx, lat_range, lengthscale)
    w, ex, eyp, eym, d = c["w"], c["ex"], c["eyp"], c["eym"], c["d"]
    n = ny - 2
    j = np.arange(n)
    has = {k: ((j + k >= 0) & (j + k < n)).astype(float) for k in (-2, -1, 1, 2)}
    wn, wp = _shift(w, 1, 1.0), _shift(w, -1, 1.0)
    dn, dp = _shift(d, 1, 0.0), _shift(d, -1, 0.0)
    exn, exp_ = _shift(ex, 1, 0.0), _shift(ex, -1, 0.0)
    # Row sums over the intermediate node b of A[a,b] A[b,c] / w_b (see module doc).
    diag = (d * d + 2 * ex * ex) / w + has[1] * eyp**2 / wn + has[-1] * eym**2 / wp
    coef = {
        (0, 1): -2 * ex * d / w,
        (0, -1): -2 * ex * d / w,
        (0, 2): ex * ex / w,
        (0, -2): ex * ex / w,
        (1, 0): -has[1] * eyp * (d / w + dn / wn),
        (-1, 0): -has[-1] * eym * (d / w + dp / wp),
        (2, 0): has[2] * eyp * _shift(eyp, 1, 0.0) / wn,
        (-2, 0): has[-2] * eym * _shift(eym, -1, 0.0) / wp,
        (1, 1): has[1] * eyp * (ex / w + exn / wn),
        (1, -1): has[1] * eyp * (ex / w + exn / wn),
        (-1, -1): has[-1] * eym * (ex / w + exp_ / wp),
        (-1, 1): has[-1] * eym * (ex / w + exp_ / wp),
    }
    scale = 1.0 / (_q(c["kappa"]) * amplitude**2)
    r = slice(rows[0], rows[1])
    bx = cols[1] - cols[0]
    out_diag = np.repeat((scale * diag[r])[:, None], bx, axis=1)
    weights = np.empty((len(OFFSETS),) + out_diag.shape)
    for k, off in enumerate(OFFSETS):
        weights[k] = (scale * coef[off][r])[:, None]
    return out_diag, weights


def _tridiagonal_solve(lower: np.ndarray, diag: np.ndarray, upper: np.ndarray, rhs: np.ndarray):
    """Thomas algorithm along axis 0 for many systems at once (columns of ``rhs``).

    ``diag`` has shape ``(n, k)``, ``lower[j]`` couples row ``j`` to ``j-1`` and
    ``upper[j]`` to ``j+1`` (shape ``(n,)``); ``rhs`` ``(n, k)``, possibly complex.
    The systems here are diagonally dominant, so no pivoting is needed.
    """
    n = diag.shape[0]
    cp = np.empty(diag.shape)
    dp = np.empty(rhs.shape, dtype=rhs.dtype)
    cp[0] = upper[0] / diag[0]
    dp[0] = rhs[0] / diag[0]
    for j in range(1, n):
        den = diag[j] - lower[j] * cp[j - 1]
        cp[j] = upper[j] / den
        dp[j] = (rhs[j] - lower[j] * dp[j - 1]) / den
    x = np.empty_like(dp)
    x[-1] = dp[-1]
    for j in range(n - 2, -1, -1):
        x[j] = dp[j] - cp[j] * x[j + 1]
    return x


def sample(
    shape: tuple[int, int],
    lat_range: tuple[float, float],
    lengthscale: float,
    amplitude: float,
    rng: np.random.Generator,
    z: np.ndarray | None = None,
) -> np.ndarray:
    """Exact prior sample on the whole grid ``(ny, nx)``, zero on the clip rows.

    ``f = L⁻¹ z = A_sym⁻¹ (√(w q σ²) z)`` with ``z ~ N(0, I)`` on the interior has
    covariance ``(LᵀL)⁻¹ = P⁻¹``.  ``A_sym`` is solved by a real FFT in longitude and one
    tridiagonal solve in latitude per zonal wavenumber: O(n log n), no factorisation.
    """
    ny, nx = shape
    c = _rows(ny, nx, lat_range, lengthscale)
    n = ny - 2
    if z is None:
        z = rng.standard_normal((n, nx))
    rhs = np.sqrt(c["w"] * _q(c["kappa"]) * amplitude**2)[:, None] * z
    spec = np.fft.rfft(rhs, axis=1)
    m = np.arange(spec.shape[1])
    lam = 2.0 - 2.0 * np.cos(2.0 * np.pi * m / nx)  # eigenvalues of −(shift + shift⁻¹ − 2)
    diag = (c["d"] - 2.0 * c["ex"])[:, None] + c["ex"][:, None] * lam[None, :]
    lower = -_shift(c["eyp"], -1, 0.0)  # A[j, j-1] = −eyp[j-1] = −eym[j]
    upper = -c["eyp"]
    upper[-1] = 0.0
    lower[0] = 0.0
    x = _tridiagonal_solve(lower, diag, upper, spec)
    field = np.zeros((ny, nx))
    field[1:-1] = np.fft.irfft(x, n=nx, axis=1)
    return field


def area_weights(ny: int, lat_range: tuple[float, float]) -> np.ndarray:
    """``cos λ`` per grid row ``(ny,)``, for area-weighted means."""
    return np.cos(np.radians(latitudes(ny, lat_range)))


def area_rmse(a: np.ndarray, b: np.ndarray, lat_range: tuple[float, float]) -> float:
    """Area-weighted (cos latitude) root-mean-square difference of two ``(ny, nx)`` fields."""
    w = np.broadcast_to(area_weights(a.shape[0], lat_range)[:, None], a.shape)
    return float(np.sqrt(np.sum(w * (a - b) ** 2) / np.sum(w)))
