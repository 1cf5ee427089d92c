"""The prior stencil, its boundary rows and the exact DST sampler (DESIGN §1)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from mpda_dist import prior
from mpda_dist.baselines import assemble
from mpda_dist.multigrid import Level
from mpda_dist.observations import NodeObservations
from mpda_dist.stencil import build

NO_OBS = NodeObservations(*(np.zeros(0, dtype=t) for t in (np.int64, np.int64, float, float)))


def independent_l(ny: int, nx: int, extent, lengthscale, amplitude) -> sp.csr_matrix:
    """``L = s (κ² I − Δ_h)`` assembled from 1-D second differences (Kronecker sums)."""
    n, m = ny - 2, nx - 2
    dx, dy = extent[0] / (nx - 1), extent[1] / (ny - 1)
    kappa = np.sqrt(2.0) / lengthscale
    q = 4 * np.pi * kappa**2
    s = np.sqrt(dx * dy / (q * amplitude**2))
    d2 = lambda k, h: sp.diags([1.0, -2.0, 1.0], [-1, 0, 1], shape=(k, k)) / h**2  # noqa: E731
    lap = sp.kron(sp.eye(n), d2(m, dx)) + sp.kron(d2(n, dy), sp.eye(m))
    return (s * (kappa**2 * sp.eye(n * m) - lap)).tocsr()


def prior_stencil(ny, nx, extent, lengthscale=0.15, amplitude=1.1, rows=None, cols=None):
    level = Level(ny, nx, 1, extent[1] / (ny - 1), extent[0] / (nx - 1))
    rows = rows or (0, ny - 2)
    cols = cols or (0, nx - 2)
    return build(level, lengthscale, amplitude, NO_OBS, rows, cols)


@pytest.mark.parametrize(
    "ny,nx,extent,ell,amp",
    [
        (12, 12, (1.0, 1.0), 0.15, 1.1),
        (11, 17, (2.0, 0.7), 0.3, 2.0),
        (20, 9, (1.0, 3.0), 0.1, 0.5),
    ],
)
def test_stencil_equals_independent_ltl(ny, nx, extent, ell, amp):
    L = independent_l(ny, nx, extent, ell, amp)
    expected = (L.T @ L).toarray()
    got = assemble(prior_stencil(ny, nx, extent, ell, amp)).toarray()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max())


def test_blocks_are_slices_of_the_whole():
    whole = prior_stencil(15, 13, (1.0, 1.0))
    part = prior_stencil(15, 13, (1.0, 1.0), rows=(3, 9), cols=(0, 5))
    np.testing.assert_array_equal(part.diag, whole.diag[3:9, 0:5])
    np.testing.assert_array_equal(part.weights, whole.weights[:, 3:9, 0:5])


def test_boundary_rows_differ_from_interior_ones():
    st = prior_stencil(12, 12, (1.0, 1.0))
    assert st.diag[0, 0] < st.diag[5, 5]  # truncated rows of A lose squared terms
    assert np.all(st.weights[:, 5, 5] != 0)
    assert st.weights[0, 5, -1] == 0 and st.weights[4, 5, -2] == 0  # (0,+1), (0,+2) leave


@pytest.mark.parametrize("n,expected", [(129, 1.214)])
def test_centre_variance_tends_to_sigma_squared(n, expected):
    st = prior_stencil(n, n, (1.0, 1.0))
    q = assemble(st).tocsc()
    m = n - 2
    e = np.zeros(m * m)
    c = (m // 2) * m + m // 2
    e[c] = 1.0
    var = spla.spsolve(q, e)[c]
    assert var == pytest.approx(expected, abs=0.002)
    assert abs(var - 1.1**2) < 0.01


def test_dst_sampler_equals_sparse_solve():
    ny, nx, extent = 17, 23, (1.5, 1.0)
    rng = np.random.default_rng(3)
    z = rng.standard_normal((ny - 2, nx - 2))
    field = prior.sample((ny, nx), extent, 0.2, 1.3, rng, z=z)
    L = independent_l(ny, nx, extent, 0.2, 1.3)
    f = spla.spsolve(L.tocsc(), z.ravel()).reshape(z.shape)
    np.testing.assert_allclose(field[1:-1, 1:-1], f, rtol=1e-10, atol=1e-12)
    assert np.all(field[0] == 0) and np.all(field[:, -1] == 0)


def test_sample_variance_matches_prior():
    """Empirical variance of DST samples at the centre ≈ the exact marginal variance."""
    rng = np.random.default_rng(0)
    draws = np.array(
        [prior.sample((33, 33), (1.0, 1.0), 0.15, 1.1, rng)[16, 16] for _ in range(4000)]
    )
    q = assemble(prior_stencil(33, 33, (1.0, 1.0))).tocsc()
    e = np.zeros(31 * 31)
    e[15 * 31 + 15] = 1
    exact = spla.spsolve(q, e)[15 * 31 + 15]
    assert np.var(draws) == pytest.approx(exact, rel=0.08)
