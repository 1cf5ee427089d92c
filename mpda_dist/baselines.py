"""Reference solvers on the assembled posterior precision (single process).

``assemble`` turns a whole-interior stencil into a sparse matrix; ``exact_solve`` is the
direct sparse solve used as the reference in tests and benchmarks.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from mpda_dist._offsets import OFFSETS
from mpda_dist.stencil import BlockStencil


def assemble(st: BlockStencil) -> sp.csr_matrix:
    """Sparse ``Q`` (row-major node order, y first) from a stencil over the interior."""
    n, m = st.diag.shape
    idx = np.arange(n * m).reshape(n, m)
    rows = [idx.ravel()]
    cols = [idx.ravel()]
    vals = [st.diag.ravel()]
    for k, (dy, dx) in enumerate(OFFSETS):
        w = st.weights[k]
        iy, ix = np.nonzero(w)
        rows.append(idx[iy, ix])
        cols.append(idx[iy + dy, ix + dx])
        vals.append(w[iy, ix])
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n * m,) * 2
    )


def exact_solve(st: BlockStencil) -> np.ndarray:
    """``Q⁻¹ h`` on the interior, shape ``(n, m)``, by a sparse direct solve."""
    q = assemble(st).tocsc()
    return spla.spsolve(q, st.rhs.ravel()).reshape(st.diag.shape)
