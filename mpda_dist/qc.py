"""Observation quality control: one flag per observation, never a silent drop (DESIGN §6).

Every row read gets exactly one flag from :data:`FLAGS`; only rows flagged ``ok`` are
assimilated.  The checks run in the order of the table and the first that fails sets
the flag, so a row with a NaN coordinate and zero noise is ``coordinate_not_finite``.

=====  ======================  ===============================================  ======
code   name                    meaning                                          error
=====  ======================  ===============================================  ======
0      ok                      assimilated                                      -
1      coordinate_not_finite   ``x`` or ``y`` is NaN or ±inf                    yes
2      outside_domain          outside ``[0, Lx] × [0, Ly]`` (1e-9 relative     yes
                               tolerance); on the sphere a latitude outside
                               ``lat_range`` or a longitude outside
                               ``[-360, 720]`` (a fill value, not a longitude)
3      value_invalid           ``value`` is NaN or ±inf, or a fill value        yes
                               (``|value| ≥ 1e18``, every dtype), or
                               ``|y − H f_b|/σ² > M``
4      noise_invalid           ``noise`` ≤ 0, NaN, ±inf, a fill value           yes
                               (``noise ≥ 1e18``), or ``1/σ² > M``
5      on_boundary             nearest node on the boundary, which is held at   no
                               the background (Dirichlet): cannot be used
6      gross_error             ``|y − H f_b| > k·σ`` (``qc.gross_error_k = k``,  yes
                               off by default)
7      duplicate_merged        same location as row ``duplicate_of``; merged    no
                               into it by inverse variance (``qc.duplicates:
                               merge``)
8      duplicate_rejected      same location as row ``duplicate_of``, which is  no
                               kept; this row is not used (``reject``)
=====  ======================  ===============================================  ======

``M`` is the bound of the solver's dtype (:data:`MAX_PRECISION`): 1e300 in float64,
1e30 in float32.  ``H f_b`` is the background through the run's observation operator
(at the nearest node, or interpolated bilinearly).  The fill-value bound 1e18
(:data:`FILL_BOUND`) is the same for every dtype: netCDF's default ``_FillValue``
9.97e36 and CF/CMIP's 1e20 are flagged in float64 and float32 alike, while any field
in the units one solves in (pressure 1e5 Pa, geopotential 1e6 m²/s²) is far below it.
Longitudes on the sphere may follow either convention, ``[-180, 180)`` or ``[0, 360)``,
with a full turn to spare (:data:`LONGITUDE_RANGE`); they are taken modulo 360.

"error" rows are what ``qc.on_error: fail`` stops on (naming the first such row);
boundary rows and duplicates are resolved by policy and never fail a run.  A duplicate
location means equal ``(x, y)`` to within 1e-9 of the domain size; observations at
different points that share a nearest node are independent data and are all used.
Merging a duplicate group keeps its first row with value ``Σ y_i/σ_i² / Σ 1/σ_i²`` and
noise ``(Σ 1/σ_i²)^{-1/2}``: for nearest-node observations that adds exactly the same
``Q`` and ``h`` as assimilating the rows one by one, so merging changes the diagnostics
(one merged observation), never the analysis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from mpda_dist.observations import (
    NodeObservations,
    ObservationError,
    Observations,
    apply_bilinear,
    bilinear_nodes,
    nearest_nodes,
)

__all__ = [
    "ERROR_FLAGS",
    "FLAGS",
    "QCReport",
    "flag_attrs",
    "quality_control",
]

OK, COORD, OUTSIDE, VALUE, NOISE, BOUNDARY, GROSS, MERGED, REJECTED = range(9)
# code -> (name, meaning); names are CF flag_meanings (no spaces).
FLAGS: dict[int, tuple[str, str]] = {
    OK: ("ok", "assimilated"),
    COORD: ("coordinate_not_finite", "x or y is NaN or inf"),
    OUTSIDE: (
        "outside_domain",
        "outside the domain [0, Lx] x [0, Ly] (sphere: lat_range, longitudes in [-360, 720])",
    ),
    VALUE: (
        "value_invalid",
        "value is NaN or inf, or |value| >= 1e18 (a fill value), or |value - H f_b|/noise^2 > M",
    ),
    NOISE: ("noise_invalid", "noise <= 0, NaN or inf, or noise >= 1e18, or 1/noise^2 > M"),
    BOUNDARY: ("on_boundary", "nearest node on the boundary (held at the background)"),
    GROSS: ("gross_error", "|value - H f_b| > qc.gross_error_k * noise"),
    MERGED: ("duplicate_merged", "same location as row duplicate_of; merged into it"),
    REJECTED: ("duplicate_rejected", "same location as row duplicate_of; not used"),
}
ERROR_FLAGS = (COORD, OUTSIDE, VALUE, NOISE, GROSS)
_LOCATION_TOL = 1e-9  # relative to the domain size: "inside" and "same location"
# Bound M on 1/σ² and on |y − H f_b|/σ² per solver dtype: far beyond any real
# observation, and far enough below the dtype's maximum (1.8e308, 3.4e38) that sums over
# many rows at one node stay finite.  Above 3.4e38 a float32 solve met an inf diagonal.
MAX_PRECISION = {"float64": 1e300, "float32": 1e30}
# |value| and noise at or above this are fill values, not data, whatever the dtype (M
# above only caught them in float32, through |y − H f_b|/σ²).  Fill values in use sit at
# 1e20 (CF/CMIP) and above (1e30, 1e35, netCDF's default 9.969e36, float32's maximum
# 3.4e38); 1e18 leaves them a factor of 100 (rounding, a unit conversion such as Pa to
# hPa), and is still 1e12 above the fields one solves for in the usual units (pressure
# 1e5 Pa, geopotential 1e6 m²/s², temperatures, winds, tracer columns in DU or mol/m²).
# Data in tiny units (column amounts in molecules/cm², ~1e19 for ozone) must be rescaled.
FILL_BOUND = 1e18
# Longitudes accepted on the sphere (degrees, taken modulo 360): both conventions,
# [-180, 180) and [0, 360), with a full turn to spare on each side (tracks continued
# across the seam).  Anything further is a fill value or garbage that np.mod would turn
# into an arbitrary longitude.
LONGITUDE_RANGE = (-360.0, 720.0)


def flag_attrs() -> dict[str, object]:
    """CF attributes of the flag variable: ``flag_values`` and ``flag_meanings``."""
    return {
        "long_name": "quality control flag",
        "flag_values": np.array(sorted(FLAGS), dtype=np.int8),
        "flag_meanings": " ".join(FLAGS[c][0] for c in sorted(FLAGS)),
    }


@dataclass(frozen=True)
class QCReport:
    """The outcome of quality control, one entry per observation read (length ``n``).

    ``flag`` (int8, codes of :data:`FLAGS`), ``duplicate_of`` (int64, the kept row of a
    duplicate group, −1 otherwise), ``iy, ix`` (int64 full-grid indices of the nearest
    node, −1 where the location is invalid), ``hfb`` (``H f_b`` through ``operator``,
    NaN where the location is invalid), ``value_used``/``noise_used`` (what was assimilated: the
    merged values for the kept row of a merged group; NaN for rows not used).
    """

    obs: Observations
    source: str
    flag: np.ndarray
    duplicate_of: np.ndarray
    iy: np.ndarray
    ix: np.ndarray
    hfb: np.ndarray
    value_used: np.ndarray
    noise_used: np.ndarray
    extent: tuple[float, float]
    gross_error_k: float | None = None
    periodic_x: bool = False  # the sphere: x is longitude, y latitude from y0
    y0: float = 0.0
    operator: str = "nearest"  # H of hfb: "nearest" or "bilinear"
    max_precision: float = MAX_PRECISION["float64"]

    @property
    def used(self) -> np.ndarray:
        """bool per observation: assimilated."""
        return self.flag == OK

    def counts(self) -> dict[str, int]:
        """Rows per flag name, every flag listed (zeros included)."""
        hist = np.bincount(self.flag, minlength=len(FLAGS))
        return {FLAGS[c][0]: int(hist[c]) for c in sorted(FLAGS)}

    def errors(self) -> np.ndarray:
        """Row indices whose flag is an error (what ``on_error: fail`` stops on)."""
        return np.flatnonzero(np.isin(self.flag, ERROR_FLAGS))

    def nodes(self) -> NodeObservations:
        """The used observations at their nodes, as the solver takes them (the
        nearest-node operator)."""
        if self.operator != "nearest":
            raise ValueError(f"QCReport.nodes: operator {self.operator!r}, not nearest")
        u = self.used
        precision = 1.0 / self.noise_used[u] ** 2
        return NodeObservations(self.iy[u], self.ix[u], self.value_used[u] - self.hfb[u], precision)

    def summary(self) -> str:
        """One line: rows read, used, and the count of every non-zero flag."""
        flagged = [f"{k} {v}" for k, v in self.counts().items() if v and k != "ok"]
        n = len(self.flag)
        return f"{n} read, {int(self.used.sum())} used" + (
            f"; flagged: {', '.join(flagged)}" if flagged else ""
        )

    def reason(self, row: int) -> str:
        """Why row ``row`` has its flag, with the values concerned."""
        code = int(self.flag[row])
        # plain floats print as "nan", not "np.float64(nan)"
        x, y, value, noise = (float(a[row]) for a in _columns(self.obs))
        lx, ly = self.extent
        if code == COORD:
            name, v = ("x", x) if not math.isfinite(x) else ("y", y)
            return f"{name}[{row}] = {v!r} is not finite"
        if code == OUTSIDE:
            lo, hi = LONGITUDE_RANGE
            if self.periodic_x and not lo <= x <= hi:  # a fill value, not a longitude
                return f"x[{row}] = {x!r} is not a longitude in [{lo:g}, {hi:g}] (a fill value?)"
            if self.periodic_x or _inside(np.array(x), lx):
                return f"y[{row}] = {y!r} is outside [{self.y0}, {self.y0 + ly}]"
            return f"x[{row}] = {x!r} is outside the domain [0, {lx}]"
        if code == VALUE:
            if not math.isfinite(value):
                return f"value[{row}] = {value!r} is not finite"
            if abs(value) >= FILL_BOUND:
                return f"value[{row}] = {value!r} is a fill value (|value| >= {FILL_BOUND:g})"
            return (
                f"value[{row}] = {value!r} with noise {noise!r}: "
                f"|value - H f_b|/noise^2 exceeds {self.max_precision:g}"
            )
        if code == NOISE:
            return (
                f"noise[{row}] = {noise!r} must be a finite number > 0 with 1/noise^2 <= "
                f"{self.max_precision:g} and below {FILL_BOUND:g} (fill values)"
            )
        if code == GROSS:
            dep = abs(value - float(self.hfb[row]))
            return (
                f"|value - H f_b| = {dep:.6g} > qc.gross_error_k * noise = "
                f"{self.gross_error_k} * {noise!r} (value[{row}] = {value!r})"
            )
        if code == BOUNDARY:
            return f"({x!r}, {y!r}) is nearest a boundary node"
        if code in (MERGED, REJECTED):
            how = "merged into it" if code == MERGED else "that row is kept"
            return f"same location as row {self.duplicate_of[row]} ({how})"
        return "ok"

    def first_rows(self, limit: int = 5) -> list[str]:
        """Reasons for the first ``limit`` flagged rows, for the log."""
        return [
            f"row {r}: {FLAGS[int(self.flag[r])][0]}: {self.reason(r)}"
            for r in np.flatnonzero(self.flag != OK)[:limit]
        ]


def _columns(obs: Observations) -> tuple[np.ndarray, ...]:
    return obs.x, obs.y, obs.value, obs.noise


def _inside(coord: np.ndarray, length: float) -> np.ndarray:
    tol = _LOCATION_TOL * length
    return (coord >= -tol) & (coord <= length + tol)


def quality_control(
    obs: Observations,
    shape: tuple[int, int],
    extent: tuple[float, float],
    background: np.ndarray | float,
    source: str,
    *,
    on_error: Literal["flag", "fail"] = "flag",
    duplicates: Literal["merge", "reject"] = "merge",
    gross_error_k: float | None = None,
    periodic_x: bool = False,
    y0: float = 0.0,
    operator: Literal["nearest", "bilinear"] = "nearest",
    dtype: Literal["float32", "float64"] = "float64",
) -> QCReport:
    """Flag every observation (see the module table) and map the usable ones to nodes.

    ``shape`` is ``(ny, nx)`` including the boundary, ``extent`` ``(Lx, Ly)``;
    ``background`` an ``(ny, nx)`` field or a constant.  With ``on_error="fail"`` the
    first row with an error flag raises :class:`ObservationError` naming ``source``,
    the row and the reason; with ``"flag"`` such rows are only flagged.  On the sphere
    (``periodic_x``) ``x`` is longitude in :data:`LONGITUDE_RANGE` (taken modulo
    ``Lx = 360``), ``y`` latitude must lie in ``[y0, y0 + Ly]`` and every column is
    interior.
    ``operator`` is the observation operator of ``H f_b`` (the gross-error check and the
    merging of duplicates use it); ``dtype`` the solver's, which bounds the precisions
    (:data:`MAX_PRECISION`).  Raises
    ObservationError too when no row is usable.  Never warns: inputs may hold any
    float64 values, NaN and inf included.
    """
    if on_error not in ("flag", "fail"):
        raise ValueError(f"on_error = {on_error!r}; choose flag or fail")
    if duplicates not in ("merge", "reject"):
        raise ValueError(f"duplicates = {duplicates!r}; choose merge or reject")
    if operator not in ("nearest", "bilinear"):
        raise ValueError(f"operator = {operator!r}; choose nearest or bilinear")
    bound = MAX_PRECISION[dtype]
    n = len(obs)
    x, y, value, noise = (np.asarray(a, dtype=np.float64) for a in _columns(obs))
    lx, ly = (float(e) for e in extent)
    flag = np.zeros(n, dtype=np.int8)

    def mark(code: int, bad: np.ndarray) -> None:
        flag[(flag == OK) & bad] = code

    with np.errstate(all="ignore"):  # NaN/inf/overflow are what we are looking for
        mark(COORD, ~(np.isfinite(x) & np.isfinite(y)))
        lo, hi = LONGITUDE_RANGE
        inside_x = ((x >= lo) & (x <= hi)) if periodic_x else _inside(x, lx)
        mark(OUTSIDE, ~(inside_x & _inside(y - y0, ly)))
        located = flag == OK  # hfb for every valid location, whatever its value or noise
        mark(VALUE, ~(np.abs(value) < FILL_BOUND))  # NaN, ±inf and fill values
        precision = 1.0 / noise**2
        mark(NOISE, ~((noise > 0) & (noise < FILL_BOUND) & (precision <= bound)))

        iy = np.full(n, -1, dtype=np.int64)
        ix = np.full(n, -1, dtype=np.int64)
        iy[located], ix[located] = nearest_nodes(
            x[located], y[located] - y0, shape, extent, periodic_x
        )
        hfb = np.full(n, np.nan)
        if operator == "bilinear":
            by, bx, w = bilinear_nodes(x[located], y[located] - y0, shape, extent, periodic_x)
            field = np.broadcast_to(np.asarray(background, dtype=np.float64), shape)
            hfb[located] = apply_bilinear(field, by, bx, w)
        elif isinstance(background, np.ndarray):
            hfb[located] = background[iy[located], ix[located]]
        else:
            hfb[located] = float(background)
        mark(VALUE, ~(np.abs(value - hfb) * precision <= bound) & located)
        ny, nx = shape
        x0 = 0 if periodic_x else 1
        interior = (iy >= 1) & (iy <= ny - 2) & (ix >= x0) & (ix <= nx - 1 - x0)
        mark(BOUNDARY, located & ~interior)
        if gross_error_k is not None:
            mark(GROSS, np.abs(value - hfb) > gross_error_k * noise)

        value_used = np.where(flag == OK, value, np.nan)
        noise_used = np.where(flag == OK, noise, np.nan)
        duplicate_of = np.full(n, -1, dtype=np.int64)
        xq = np.mod(x, lx) if periodic_x else x
        _resolve_duplicates(
            xq, y, hfb, (lx, ly), flag, duplicate_of, value_used, noise_used, duplicates
        )

    report = QCReport(
        obs,
        source,
        flag,
        duplicate_of,
        iy,
        ix,
        hfb,
        value_used,
        noise_used,
        (lx, ly),
        gross_error_k,
        periodic_x,
        y0,
        operator,
        bound,
    )
    errors = report.errors()
    if on_error == "fail" and errors.size:
        first = int(errors[0])
        raise ObservationError(
            f"{source}: row {first} fails quality control ({FLAGS[int(flag[first])][0]}): "
            f"{report.reason(first)}; {errors.size} of {n} row(s) fail "
            f"({_error_counts(report)}). Set qc.on_error: flag to flag such rows and "
            "continue without them"
        )
    if not report.used.any():
        raise ObservationError(
            f"{source}: no usable observation remains after quality control ({report.summary()})"
        )
    return report


def _error_counts(report: QCReport) -> str:
    counts = report.counts()
    return ", ".join(
        f"{FLAGS[c][0]} {counts[FLAGS[c][0]]}" for c in ERROR_FLAGS if counts[FLAGS[c][0]]
    )


def _resolve_duplicates(
    x: np.ndarray,
    y: np.ndarray,
    hfb: np.ndarray,
    extent: tuple[float, float],
    flag: np.ndarray,
    duplicate_of: np.ndarray,
    value_used: np.ndarray,
    noise_used: np.ndarray,
    policy: str,
) -> None:
    """Group rows still ``ok`` by location (quantised to 1e-9 of the domain size); keep
    the first row of each group, flag the others and, for ``merge``, give the kept row
    the inverse-variance mean.  Works in place."""
    rows = np.flatnonzero(flag == OK)
    if rows.size < 2:
        return
    qx = np.rint(x[rows] / (_LOCATION_TOL * extent[0])).astype(np.int64)
    qy = np.rint(y[rows] / (_LOCATION_TOL * extent[1])).astype(np.int64)
    # Groups of equal (qx, qy), numbered in sorted order.  (np.unique(axis=0) does the
    # same through a sort of byte strings: 0.1 s for 10^5 rows against 0.025 s.)
    order = np.lexsort((qy, qx))  # stable: a group's positions stay ascending
    sx, sy = qx[order], qy[order]
    new = np.ones(order.size, dtype=bool)
    new[1:] = (sx[1:] != sx[:-1]) | (sy[1:] != sy[:-1])
    starts = np.flatnonzero(new)
    sizes = np.diff(np.append(starts, order.size))
    if sizes.max() < 2:
        return
    first_pos = order[starts]
    group = np.empty(order.size, dtype=np.intp)
    group[order] = np.cumsum(new) - 1
    # rows are ascending, so a group's first occurrence is its lowest row index
    first = rows[first_pos]
    kept = first[group]
    dup = rows[kept != rows]
    duplicate_of[dup] = kept[kept != rows]
    flag[dup] = MERGED if policy == "merge" else REJECTED
    if policy != "merge":
        return
    # In departures from H f_b (one location, one H f_b): every w·d is <= the bound,
    # so the group sums stay finite where Σ w·y might overflow.
    w = 1.0 / noise_used[rows] ** 2
    wsum = np.bincount(group, weights=w)
    wd = np.bincount(group, weights=w * (value_used[rows] - hfb[rows]))
    many = np.flatnonzero(sizes > 1)
    value_used[first[many]] = hfb[first[many]] + wd[many] / wsum[many]
    noise_used[first[many]] = 1.0 / np.sqrt(wsum[many])
    value_used[dup] = np.nan
    noise_used[dup] = np.nan
