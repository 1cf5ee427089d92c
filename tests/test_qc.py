"""Observation quality control and observation-space diagnostics (in-process)."""

from __future__ import annotations

import numpy as np
import pytest

from mpda_dist import diagnostics, prior, qc
from mpda_dist import observations as obsmod
from mpda_dist.baselines import exact_solve
from mpda_dist.multigrid import schedule
from mpda_dist.observations import ObservationError, Observations
from mpda_dist.stencil import build

SHAPE, EXTENT = (11, 21), (2.0, 1.0)  # (ny, nx), (Lx, Ly): dx = dy = 0.1
NAMES = {name: code for code, (name, _) in qc.FLAGS.items()}


def make(rows: list[tuple[float, float, float, float]]) -> Observations:
    x, y, value, noise = (np.array(c, dtype=float) for c in zip(*rows, strict=True))
    return Observations(x, y, value, noise)


def run(rows, background=0.0, **kw) -> qc.QCReport:
    return qc.quality_control(make(rows), SHAPE, EXTENT, background, "obs.h5", **kw)


GOOD = (0.5, 0.5, 1.0, 0.1)

# (row, expected flag) -- one defect per row, each after a good row 0
CASES = [
    ((np.nan, 0.5, 1.0, 0.1), "coordinate_not_finite"),
    ((0.5, -np.inf, 1.0, 0.1), "coordinate_not_finite"),
    ((2.5, 0.5, 1.0, 0.1), "outside_domain"),
    ((0.5, -0.01, 1.0, 0.1), "outside_domain"),
    ((0.5, 1e300, 1.0, 0.1), "outside_domain"),
    ((0.7, 0.5, np.nan, 0.1), "value_invalid"),
    ((0.7, 0.5, -np.inf, 0.1), "value_invalid"),
    ((0.7, 0.5, 1e17, 1e-142), "value_invalid"),  # (y - H f_b)/σ² = 1e301 > M
    ((0.7, 0.5, 9.969209968386869e36, 0.05), "value_invalid"),  # netCDF's _FillValue
    ((0.7, 0.5, -1e20, 0.05), "value_invalid"),  # CF/CMIP's fill value, negated
    ((0.7, 0.5, 1.0, 0.0), "noise_invalid"),
    ((0.7, 0.5, 1.0, -1.0), "noise_invalid"),
    ((0.7, 0.5, 1.0, np.nan), "noise_invalid"),
    ((0.7, 0.5, 1.0, np.inf), "noise_invalid"),
    ((0.7, 0.5, 1.0, 1e-200), "noise_invalid"),  # 1/σ² overflows
    ((0.7, 0.5, 1.0, 9.969209968386869e36), "noise_invalid"),  # a fill value: weight 0
    ((0.0, 0.5, 1.0, 0.1), "on_boundary"),
    ((1.96, 0.5, 1.0, 0.1), "on_boundary"),  # nearest node is x = Lx
    ((0.5, 0.5, 3.0, 0.1), "duplicate_merged"),
    ((np.nan, 0.5, np.nan, 0.0), "coordinate_not_finite"),  # first check wins
]


@pytest.mark.parametrize("row,name", CASES)
def test_each_defect_gets_its_flag(row, name):
    r = run([GOOD, row])
    assert r.flag.tolist() == [0, NAMES[name]]
    assert r.used.tolist() == [True, False]
    assert r.counts()[name] == 1 and r.counts()["ok"] == 1
    assert r.reason(1) and "np.float64" not in r.reason(1)
    if name in ("coordinate_not_finite", "outside_domain"):
        assert r.iy[1] == -1 and np.isnan(r.hfb[1])


@pytest.mark.parametrize("row,name", [c for c in CASES if NAMES[c[1]] in qc.ERROR_FLAGS])
def test_fail_names_the_first_bad_row(row, name):
    with pytest.raises(ObservationError) as err:
        run([GOOD, row, row], on_error="fail")
    msg = str(err.value)
    assert msg.startswith("obs.h5: row 1 fails quality control")
    assert f"({name})" in msg and "2 of 3 row(s) fail" in msg and "qc.on_error: flag" in msg


def test_boundary_rows_and_duplicates_never_fail():
    r = run([GOOD, (0.0, 0.5, 1.0, 0.1), GOOD], on_error="fail")
    assert r.flag.tolist() == [0, NAMES["on_boundary"], NAMES["duplicate_merged"]]


def test_merge_is_inverse_variance_and_leaves_q_and_h_unchanged():
    rows = [(0.9, 0.3, 1.0, 0.1), (0.5, 0.5, 7.0, 1.0), (0.9, 0.3, 2.0, 0.2), (0.9, 0.3, 4.0, 0.4)]
    bg = np.random.default_rng(0).normal(size=SHAPE)
    merged = run(rows, background=bg)
    assert merged.flag.tolist() == [0, 0, NAMES["duplicate_merged"], NAMES["duplicate_merged"]]
    assert merged.duplicate_of.tolist() == [-1, -1, 0, 0]
    w = np.array([1 / 0.1**2, 1 / 0.2**2, 1 / 0.4**2])
    np.testing.assert_allclose(merged.value_used[0], np.sum(w * [1.0, 2.0, 4.0]) / w.sum())
    np.testing.assert_allclose(merged.noise_used[0], 1 / np.sqrt(w.sum()))
    assert np.isnan(merged.value_used[2:]).all()
    # The same Q and h as the rows one by one (merging changes only the diagnostics).
    separate = obsmod.NodeObservations(
        np.array([3, 5, 3, 3]),
        np.array([9, 5, 9, 9]),
        np.array([r[2] for r in rows]) - bg[[3, 5, 3, 3], [9, 5, 9, 9]],
        np.array([1 / r[3] ** 2 for r in rows]),
    )
    level = schedule(*SHAPE, 0.1, 0.1, 64)[-1]
    a = build(level, 0.15, 1.1, merged.nodes(), (0, level.interior[0]), (0, level.interior[1]))
    b = build(level, 0.15, 1.1, separate, (0, level.interior[0]), (0, level.interior[1]))
    np.testing.assert_allclose(a.diag, b.diag, rtol=1e-12)
    np.testing.assert_allclose(a.rhs, b.rhs, rtol=1e-12, atol=1e-9)


def test_reject_keeps_the_first_of_each_location():
    rows = [(0.9, 0.3, 1.0, 0.1), (0.9, 0.3, 2.0, 0.2), (0.5, 0.5, 7.0, 1.0), (0.5, 0.5, 1.0, 1.0)]
    r = run(rows, duplicates="reject")
    assert r.flag.tolist() == [0, NAMES["duplicate_rejected"], 0, NAMES["duplicate_rejected"]]
    assert r.duplicate_of.tolist() == [-1, 0, -1, 2]
    assert r.value_used[0] == 1.0 and r.noise_used[0] == 0.1  # not merged


def test_many_duplicate_groups_match_a_grouping_by_dictionary():
    """Hundreds of rows at 40 locations in random order (x and y each repeated across
    groups): each row after the first at its location points at that first row, which
    holds the group's inverse-variance mean (and the reject policy keeps it unmerged)."""
    rng = np.random.default_rng(3)
    locs = [(0.1 * rng.integers(1, 20), 0.1 * rng.integers(1, 10)) for _ in range(40)]
    rows = []
    for _ in range(300):
        x, y = locs[rng.integers(len(locs))]
        rows.append((x, y, float(rng.normal()), float(rng.uniform(0.1, 1.0))))
    first: dict[tuple[float, float], int] = {}
    members: dict[int, list[int]] = {}
    for i, (x, y, _, _) in enumerate(rows):
        k = first.setdefault((round(x, 9), round(y, 9)), i)
        members.setdefault(k, []).append(i)
    expect_of = [-1] * len(rows)
    for k, idx in members.items():
        for i in idx[1:]:
            expect_of[i] = k
    merged = run(rows)
    assert merged.duplicate_of.tolist() == expect_of
    for k, idx in members.items():
        w = np.array([1 / rows[i][3] ** 2 for i in idx])
        v = np.array([rows[i][2] for i in idx])
        np.testing.assert_allclose(merged.value_used[k], np.sum(w * v) / w.sum())
        np.testing.assert_allclose(merged.noise_used[k], 1 / np.sqrt(w.sum()))
    rejected = run(rows, duplicates="reject")
    assert rejected.duplicate_of.tolist() == expect_of
    kept = sorted(members)
    assert rejected.value_used[kept].tolist() == [rows[k][2] for k in kept]


def test_locations_equal_to_rounding_are_duplicates_but_a_shared_node_is_not():
    r = run([(0.3, 0.5, 1.0, 0.1), (0.1 + 0.2, 0.5, 1.0, 0.1), (0.31, 0.5, 1.0, 0.1)])
    assert r.flag.tolist() == [0, NAMES["duplicate_merged"], 0]  # 0.31 shares node 3: used
    assert r.ix.tolist() == [3, 3, 3]


def test_gross_error_check_is_off_by_default_and_uses_k_sigma():
    bg = np.zeros(SHAPE)
    bg[5, 5] = 10.0
    rows = [(0.5, 0.5, 10.25, 0.1), (0.5, 0.6, 0.35, 0.1), (0.5, 0.4, 0.25, 0.1)]
    assert run(rows, background=bg).flag.tolist() == [0, 0, 0]
    r = run(rows, background=bg, gross_error_k=3.0)
    assert r.flag.tolist() == [0, NAMES["gross_error"], 0]
    np.testing.assert_array_equal(r.hfb, [10.0, 0.0, 0.0])
    assert "|value - H f_b| = 0.35 > qc.gross_error_k * noise = 3.0 * 0.1" in r.reason(1)
    with pytest.raises(ObservationError, match=r"row 1 fails quality control \(gross_error\)"):
        run(rows, background=bg, gross_error_k=3.0, on_error="fail")


def test_gross_error_check_uses_the_run_s_operator():
    """With the bilinear H, H f_b is the background interpolated in the cell: a row
    exactly on a linear background's interpolant passes, at 0.45 dx from a node.  The
    check used the nearest node's background (0.45 dx × slope 10 = 0.45 away: flagged
    at k σ = 5 × 0.05, review helper)."""
    xs = np.linspace(0.0, EXTENT[0], SHAPE[1])
    bg = np.broadcast_to(10.0 * xs, SHAPE).copy()
    rows = [(0.5, 0.5, 5.0, 0.05), (0.545, 0.5, 5.45, 0.05), (0.745, 0.3, 7.45 + 0.3, 0.05)]
    nearest = run(rows, background=bg, gross_error_k=5.0)
    assert nearest.flag.tolist() == [0, NAMES["gross_error"], NAMES["gross_error"]]
    r = run(rows, background=bg, gross_error_k=5.0, operator="bilinear")
    np.testing.assert_allclose(r.hfb, [5.0, 5.45, 7.45], rtol=1e-12)
    assert r.flag.tolist() == [0, 0, NAMES["gross_error"]]
    with pytest.raises(ValueError, match="not nearest"):
        r.nodes()  # the bilinear operator's rows are not node observations


def test_precision_bound_follows_the_solver_dtype():
    """1/σ² = 1e40 fits a float64 solve but is inf in a float32 one (which then
    diverged on an inf diagonal, review helper)."""
    rows = [GOOD, (0.7, 0.5, 1.0, 1e-20)]
    assert run(rows).flag.tolist() == [0, 0]
    r = run(rows, dtype="float32")
    assert r.flag.tolist() == [0, NAMES["noise_invalid"]]
    assert "1/noise^2 <= 1e+30" in r.reason(1)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_fill_values_are_invalid_in_every_dtype(dtype):
    """netCDF's default _FillValue (9.97e36) and CF/CMIP's 1e20 with an ordinary noise
    passed float64's bound M on |y - H f_b|/σ² and were assimilated (analysis mean
    5e36); float32 flagged 9.97e36 only through M, and 1e20 not at all."""
    fills = [9.969209968386869e36, 1e20, -1e20, 1e30, 3.4e38]
    r = run([GOOD, *[(0.1 * i + 0.2, 0.3, v, 0.05) for i, v in enumerate(fills)]], dtype=dtype)
    assert r.flag.tolist() == [0] + [NAMES["value_invalid"]] * len(fills)
    assert r.reason(1) == "value[1] = 9.969209968386869e+36 is a fill value (|value| >= 1e+18)"
    assert not np.isnan(r.hfb[1:]).any()  # the location is valid, only the value is not


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_large_physical_values_are_not_fill_values(dtype):
    """Pressure in Pa, geopotential in m²/s², a NO2 column in molecules/cm²: far below
    the fill-value bound, used in both dtypes (departures from a background near them)."""
    rows = [(0.3, 0.3, 101325.0, 50.0), (0.5, 0.5, 5.5e5, 100.0), (0.7, 0.7, 3e15, 1e14)]
    bg = np.full(SHAPE, 1e5)
    bg[7, 7] = 2.9e15  # the NO2 column's node
    r = run(rows, background=bg, dtype=dtype)
    assert r.flag.tolist() == [0, 0, 0]


def test_longitudes_far_outside_both_conventions_are_flagged_on_the_sphere():
    """x = 1e20 or a fill value was taken modulo 360, to an arbitrary longitude, and
    assimilated.  [-180, 180), [0, 360) and a turn beyond are longitudes; the rest is
    outside the domain, as a far x is on the rectangle."""
    shape, extent, y0 = (11, 36), (360.0, 100.0), -50.0
    good = [-360.0, -180.0, -0.5, 359.0, 540.0, 720.0]
    bad = [1e20, 9.969209968386869e36, -9.969209968386869e36, 720.5, -361.0, 1e4]
    lons = good + bad
    rows = [(lon, -40.0 + 8.0 * (i % 11), 280.0, 0.5) for i, lon in enumerate(lons)]
    r = qc.quality_control(make(rows), shape, extent, 280.0, "obs.h5", periodic_x=True, y0=y0)
    outside = NAMES["outside_domain"]
    assert r.flag.tolist() == [0] * len(good) + [outside] * len(bad)
    assert r.reason(6) == "x[6] = 1e+20 is not a longitude in [-360, 720] (a fill value?)"
    assert (r.iy[len(good) :] == -1).all() and np.isnan(r.hfb[len(good) :]).all()
    # the rectangle has no such range: a far x is outside its domain, as before
    assert run([GOOD, (1e20, 0.5, 1.0, 0.1)]).flag.tolist() == [0, NAMES["outside_domain"]]


def test_hfb_is_given_for_every_valid_location():
    """README: hfb is NaN where the location is invalid, not where value or noise is."""
    rows = [GOOD, (0.7, 0.5, np.inf, 0.1), (0.7, 0.4, 1.0, 0.0), (np.nan, 0.5, 1.0, 0.1)]
    r = run(rows, background=2.0)
    assert r.flag.tolist() == [0, NAMES["value_invalid"], NAMES["noise_invalid"], 1]
    assert r.hfb[:3].tolist() == [2.0, 2.0, 2.0] and np.isnan(r.hfb[3])
    assert r.iy.tolist() == [5, 5, 4, -1]


def test_no_usable_observation_is_an_error_naming_the_file():
    with pytest.raises(ObservationError, match=r"^obs.h5: no usable observation .*0 used"):
        run([(0.0, 0.5, 1.0, 0.1), (np.nan, 0.5, 1.0, 0.1)])
    empty = Observations(*(np.zeros(0) for _ in range(4)))
    with pytest.raises(ObservationError, match=r"0 read, 0 used"):
        qc.quality_control(empty, SHAPE, EXTENT, 0.0, "obs.h5")


def test_to_nodes_keeps_its_contract():
    rows = [GOOD, (0.0, 0.5, 1.0, 0.1), (1.2, 0.8, -1.0, 0.5)]
    nodes, used = obsmod.to_nodes(make(rows), SHAPE, EXTENT, 0.25, "obs.h5")
    assert used.tolist() == [True, False, True]
    assert nodes.iy.tolist() == [5, 8] and nodes.ix.tolist() == [5, 12]
    np.testing.assert_allclose(nodes.innovation, [0.75, -1.25])
    np.testing.assert_allclose(nodes.precision, [100.0, 4.0])


def test_flag_table_is_cf():
    attrs = qc.flag_attrs()
    assert attrs["flag_values"].dtype == np.int8
    assert attrs["flag_values"].tolist() == list(range(len(qc.FLAGS)))
    assert attrs["flag_meanings"].split() == [qc.FLAGS[c][0] for c in range(len(qc.FLAGS))]


def test_summary_names_every_nonzero_flag():
    r = run([GOOD, (np.nan, 0.5, 1.0, 0.1), (0.5, 0.5, 2.0, 0.1)])
    assert r.summary() == "3 read, 1 used; flagged: coordinate_not_finite 1, duplicate_merged 1"
    assert r.first_rows() == [
        "row 1: coordinate_not_finite: x[1] = nan is not finite",
        "row 2: duplicate_merged: same location as row 0 (merged into it)",
    ]


# ---------------------------------------------------------------------- diagnostics


def test_diagnostics_columns_and_summary_by_hand():
    bg = np.zeros(SHAPE)
    mean = np.zeros(SHAPE)
    mean[5, 5], mean[3, 9] = 0.8, 1.5
    rows = [(0.5, 0.5, 1.0, 0.5), (0.9, 0.3, 2.0, 1.0), (np.nan, 0.1, 5.0, 1.0)]
    r = run(rows, background=bg)
    cols, s = diagnostics.observation_diagnostics(r, mean)
    np.testing.assert_array_equal(cols["hmu"][:2], [0.8, 1.5])
    assert np.isnan(cols["hmu"][2]) and np.isnan(cols["hfb"][2])
    assert s["n_used"] == 2
    np.testing.assert_allclose([s["omb_bias"], s["omb_rmse"]], [1.5, np.sqrt(2.5)])
    np.testing.assert_allclose([s["oma_bias"], s["oma_rmse"]], [0.35, np.sqrt(0.145)])
    np.testing.assert_allclose(s["jo_over_n"], (0.16 + 0.25) / 2)
    np.testing.assert_allclose(s["desroziers_ratio"], (0.2 * 1.0 / 0.25 + 0.5 * 2.0) / 2)
    assert "2 observations" in diagnostics.summary_line(s)


def test_desroziers_ratio_is_about_one_when_the_model_is_right():
    """E[(O-A)(O-B)/σ²] = 1 for the exact posterior mean when truth ~ prior and the
    noise is as stated; Jo/n is below 1 by tr(HK)/n."""
    shape, extent = (48, 48), (1.0, 1.0)
    ratios, jo = [], []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        truth = prior.sample(shape, extent, 0.15, 1.1, rng)
        obs = obsmod.synthetic(truth, extent, 0.15, 0.3, rng)
        r = qc.quality_control(obs, shape, extent, 0.0, "synthetic")
        level = schedule(*shape, 1 / 47, 1 / 47, 64)[-1]
        st = build(level, 0.15, 1.1, r.nodes(), (0, level.interior[0]), (0, level.interior[1]))
        mean = np.zeros(shape)
        mean[1:-1, 1:-1] = exact_solve(st)
        _, s = diagnostics.observation_diagnostics(r, mean)
        ratios.append(s["desroziers_ratio"])
        jo.append(s["jo_over_n"])
    assert abs(np.mean(ratios) - 1.0) < 0.15, ratios
    assert all(j < 1.0 for j in jo), jo
