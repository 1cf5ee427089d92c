"""Sphere prior (Laplace–Beltrami Matérn on a clipped lat/lon grid), its sampler, and
the global problem built on it."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as spla
from _problems import globe_problem

from mpda_dist import sphere
from mpda_dist.baselines import assemble_periodic
from mpda_dist.stencil import BlockStencil


def _matrix(shape, lat_range, ell, amp):
    ny, nx = shape
    diag, weights = sphere.sphere_stencil(shape, lat_range, ell, amp, (0, ny - 2), (0, nx))
    st = BlockStencil(diag, weights, np.zeros_like(diag))
    return assemble_periodic(st), diag, weights


def test_sphere_precision_is_symmetric_positive_definite():
    q, _, _ = _matrix((24, 36), (-80.0, 80.0), 2000.0, 1.9)
    diff = abs(q - q.T).max()
    assert diff <= 1e-12 * abs(q).max(), diff
    dense = q.toarray()
    assert np.linalg.eigvalsh(dense).min() > 0


def test_sphere_stencil_blocks_match_whole():
    shape, lr = (20, 32), (-70.0, 75.0)
    _, diag, weights = _matrix(shape, lr, 1500.0, 2.0)
    d2, w2 = sphere.sphere_stencil(shape, lr, 1500.0, 2.0, (3, 11), (5, 17))
    np.testing.assert_array_equal(d2, diag[3:11, 5:17])
    np.testing.assert_array_equal(w2, weights[:, 3:11, 5:17])


def test_sphere_marginal_variance_near_equator():
    """At fine resolution the prior variance at the equator is close to σ² (1.030,
    1.017, 1.011 × σ² at 480, 720, 960 longitudes; the clip rows at ±30° are 5.5 ℓ
    away).  A band keeps the sparse solve to about a second."""
    shape, lr, ell, amp = (91, 720), (-30.0, 30.0), 600.0, 1.9
    q, _, _ = _matrix(shape, lr, ell, amp)
    ny, nx = shape
    lat = sphere.latitudes(ny, lr)[1:-1]
    j = int(np.argmin(np.abs(lat)))
    e = np.zeros((ny - 2) * nx)
    e[j * nx + 7] = 1.0
    var = spla.splu(q.tocsc()).solve(e)[j * nx + 7]
    assert abs(var / amp**2 - 1.0) < 0.05, var / amp**2
    assert lat[j] == 0.0


def test_sphere_sample_has_the_prior_covariance():
    """L f = z: the sampler's field satisfies P f = Lᵀ z (checks the FFT/tridiagonal
    solve against the assembled stencil)."""
    shape, lr, ell, amp = (30, 48), (-75.0, 80.0), 1500.0, 1.9
    q, _, _ = _matrix(shape, lr, ell, amp)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((shape[0] - 2, shape[1]))
    f = sphere.sample(shape, lr, ell, amp, rng, z=z)
    assert np.all(f[0] == 0) and np.all(f[-1] == 0)
    # ‖L f‖² = zᵀz and fᵀ P f = ‖L f‖²
    quad = float(f[1:-1].ravel() @ (q @ f[1:-1].ravel()))
    assert quad == pytest.approx(float(z.ravel() @ z.ravel()), rel=1e-9)


def test_sphere_rejects_polar_range():
    with pytest.raises(ValueError, match="lat_range"):
        sphere.sphere_stencil((10, 16), (-90.0, 80.0), 1000.0, 1.0, (0, 8), (0, 16))


@pytest.mark.parametrize("c,damping", [(-2.0, 0.7), (10.0, 0.6)])
def test_mp_equals_exact_on_a_small_globe(c, damping):
    import jax
    from mpi4py import MPI

    from mpda_dist.solver import CONVERGED, Settings, solve

    _, nodes, levels, exact, (ell, amp) = globe_problem(30, 48)
    s = Settings(c=c, damping=damping, dtype="float64", tol=1e-10, max_iterations=20000)
    with jax.enable_x64(True):
        res = solve(MPI.COMM_SELF, levels, nodes, ell, amp, s)
    assert res.status == CONVERGED, res.levels
    err = np.abs(res.anomaly - exact).max() / np.abs(exact).max()
    assert err < 1e-7, err
