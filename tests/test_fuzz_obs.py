"""Fuzzing observation files: random bad rows and damaged files (hypothesis).

Every case must end either with a QC report whose flags account for each bad row, or
with a clear error (InputError / ObservationError naming the file): never another
exception.  Most cases run the reading + QC + mapping path in-process
(``driver.build_problem``); a few go through the real ``mpda run`` on a 24 x 24 grid.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpda_dist import qc
from mpda_dist.config import config_from_dict
from mpda_dist.driver import build_problem
from mpda_dist.io import InputError
from mpda_dist.observations import ObservationError

N = 24  # grid points per side; dx = 1/23, so x in [0.05, 0.95] is nearest an interior node
CODE = {name: code for code, (name, _) in qc.FLAGS.items()}
KEYS = ("x", "y", "value", "noise")

# kind -> the flag it must get (duplicates: see expected_flags)
ROW_KINDS = {
    "nan_value": "value_invalid",
    "inf_value": "value_invalid",
    "nan_coord": "coordinate_not_finite",
    "inf_coord": "coordinate_not_finite",
    "outside": "outside_domain",
    "zero_noise": "noise_invalid",
    "negative_noise": "noise_invalid",
    "nan_noise": "noise_invalid",
    "inf_noise": "noise_invalid",
    "tiny_noise": "noise_invalid",
    "boundary": "on_boundary",
    "gross": "gross_error",
    "duplicate": None,
}
FILE_FAULTS = (
    "string_dtype",
    "complex_dtype",
    "bool_dtype",
    "empty",
    "null_dataspace",
    "length_mismatch",
    "missing_dataset",
    "two_dimensional",
    "truncated",
    "zeroed_block",
    "noise_attribute",  # valid: a scalar root attribute instead of the dataset
    "bad_noise_attribute",
    "integer_dtype",  # valid: converted to float64
)
GROSS_K = 5.0
TALLY: Counter[str] = Counter()  # kinds tried, for the report printed at the end


def make_rows(
    seed: int, n_good: int, bad: list[str]
) -> list[tuple[float, float, float, float, str]]:
    """``n_good`` good rows at distinct interior points, then one row per ``bad`` kind,
    shuffled.  Good values are in [-1, 1] with noise in [0.5, 1], so no good row is a
    gross error for k = GROSS_K."""
    rng = np.random.default_rng(seed)
    cells = rng.choice(181 * 181, size=n_good, replace=False)
    good = [
        (
            0.05 + 0.005 * (c % 181),
            0.05 + 0.005 * (c // 181),
            rng.uniform(-1, 1),
            rng.uniform(0.5, 1),
        )
        for c in cells
    ]
    rows = [(*r, "good") for r in good]
    for kind in bad:
        x, y, v, s = 0.05 + 0.9 * rng.random(), 0.05 + 0.9 * rng.random(), rng.uniform(-1, 1), 0.7
        coord = rng.integers(2)
        if kind == "nan_value":
            v = np.nan
        elif kind == "inf_value":
            v = rng.choice([np.inf, -np.inf])
        elif kind in ("nan_coord", "inf_coord"):
            bad_v = np.nan if kind == "nan_coord" else rng.choice([np.inf, -np.inf])
            x, y = (bad_v, y) if coord else (x, bad_v)
        elif kind == "outside":
            far = rng.choice([-0.5, -1e-3, 1.001, 7.0, 1e300, -1e300])
            x, y = (far, y) if coord else (x, far)
        elif kind == "zero_noise":
            s = 0.0
        elif kind == "negative_noise":
            s = -rng.uniform(1e-6, 10)
        elif kind == "nan_noise":
            s = np.nan
        elif kind == "inf_noise":
            s = np.inf
        elif kind == "tiny_noise":
            s = 1e-200
        elif kind == "boundary":
            edge = rng.choice([0.0, 1.0, 0.01, 0.99])
            x, y = (edge, y) if coord else (x, edge)
        elif kind == "gross":
            v = rng.choice([-1, 1]) * rng.uniform(10, 1e6)
        elif kind == "duplicate":
            if not good:
                continue
            gx, gy, *_ = good[rng.integers(len(good))]
            x, y = gx, gy
        rows.append((x, y, v, s, kind))
    order = rng.permutation(len(rows))
    return [rows[i] for i in order]


def expected_flags(rows, duplicates: str, gross: bool) -> list[int]:
    """The flags a correct QC gives, from the kinds (an oracle independent of qc.py)."""
    out, first_at = [], {}
    for i, (x, y, _v, _s, kind) in enumerate(rows):
        name = ROW_KINDS.get(kind)
        if kind == "gross" and not gross:
            name = None
        if name is not None:
            out.append(CODE[name])
            continue
        if (x, y) in first_at:  # good rows and duplicates share exact coordinates
            out.append(CODE["duplicate_merged" if duplicates == "merge" else "duplicate_rejected"])
        else:
            first_at[(x, y)] = i
            out.append(CODE["ok"])
    return out


READABLE = (None, "noise_attribute", "integer_dtype")  # faults that leave a valid file


def oracle(rows, fault: str | None, duplicates: str, gross: bool) -> list[int]:
    """Expected flags of a readable file, after what ``fault`` did to the rows."""
    if fault == "noise_attribute":  # every noise is the attribute's 0.8
        rows = [
            (x, y, v, 0.8, "good" if ROW_KINDS.get(k) == "noise_invalid" else k)
            for x, y, v, _s, k in rows
        ]
    elif fault == "integer_dtype":  # values rounded: NaN -> 0, ±inf -> ±1e9 (gross)
        rows = [
            (x, y, v, s, {"nan_value": "good", "inf_value": "gross"}.get(k, k))
            for x, y, v, s, k in rows
        ]
    return expected_flags(rows, duplicates, gross)


def write_file(path: Path, rows, fault: str | None, seed: int) -> None:
    cols = {k: np.array([r[i] for r in rows], dtype=float) for i, k in enumerate(KEYS)}
    rng = np.random.default_rng(seed)
    victim = KEYS[rng.integers(4)]
    if fault == "string_dtype":
        cols[victim] = np.array([f"{v}" for v in cols[victim]] or ["a"], dtype="S")
    elif fault == "complex_dtype":
        cols[victim] = cols[victim] + 1j
    elif fault == "bool_dtype":
        cols[victim] = cols[victim] > 0
    elif fault == "empty":
        cols = {k: np.zeros(0) for k in KEYS}
    elif fault == "length_mismatch":
        cols[victim] = np.append(cols[victim], 0.5)
    elif fault == "two_dimensional":
        cols[victim] = np.stack([cols[victim], cols[victim]])
    elif fault == "integer_dtype":
        cols["value"] = np.nan_to_num(cols["value"]).clip(-1e9, 1e9).astype(np.int32)
    with h5py.File(path, "w") as f:
        for k, v in cols.items():
            if fault == "missing_dataset" and k == victim:
                continue
            if fault in ("noise_attribute", "bad_noise_attribute") and k == "noise":
                continue
            if fault == "null_dataspace" and k == victim:
                f.create_dataset(k, data=h5py.Empty("f8"))
                continue
            f.create_dataset(k, data=v)
        if fault == "noise_attribute":
            f.attrs["noise"] = 0.8
        elif fault == "bad_noise_attribute":
            f.attrs["noise"] = (
                str(rng.choice(["0.8", "[0.8, 0.9]"])) if rng.integers(2) else [0.8, 0.9]
            )
    if fault in ("truncated", "zeroed_block"):
        data = bytearray(path.read_bytes())
        at = int(rng.integers(0, len(data)))
        if fault == "truncated":
            data = data[:at]
        else:
            data[at : at + 16] = bytes(min(16, len(data) - at))
        path.write_bytes(bytes(data))


def config(path: Path, on_error: str = "flag", duplicates: str = "merge", gross: bool = False):
    return config_from_dict(
        {
            "grid": {"nx": N, "ny": N},
            "observations": {"file": str(path)},
            "qc": {
                "on_error": on_error,
                "duplicates": duplicates,
                "gross_error_k": GROSS_K if gross else None,
            },
        }
    )


def check_report(problem, n_rows: int) -> None:
    """Internal consistency of any successful QC: one flag per row, used rows usable."""
    r = problem.qc
    assert r.flag.shape == (n_rows,) and set(np.unique(r.flag)) <= set(qc.FLAGS)
    assert sum(r.counts().values()) == n_rows
    np.testing.assert_array_equal(problem.used, r.flag == 0)
    nodes = problem.nodes
    assert len(nodes.iy) == int(problem.used.sum()) >= 1
    assert ((nodes.iy >= 1) & (nodes.iy <= N - 2) & (nodes.ix >= 1) & (nodes.ix <= N - 2)).all()
    assert np.isfinite(nodes.innovation).all() and (nodes.precision > 0).all()
    assert np.isfinite(nodes.precision).all()


bad_kinds = st.lists(st.sampled_from(sorted(ROW_KINDS)), max_size=8)


def run_case(rows, fault, seed, on_error="flag", duplicates="merge", gross=False) -> None:
    """Write the file, run reading + QC + mapping, and check the outcome."""
    TALLY.update(r[4] for r in rows if r[4] != "good")
    TALLY[f"file: {fault}"] += 1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz_obs.h5"
        write_file(path, rows, fault, seed)
        try:
            problem = build_problem(config(path, on_error, duplicates, gross))
        except (InputError, ObservationError) as exc:
            TALLY[f"outcome: {type(exc).__name__}"] += 1
            assert str(path) in str(exc)
            if fault in READABLE:
                # a valid file: only QC may refuse it, for a reason it names
                assert isinstance(exc, ObservationError)
                want = oracle(rows, fault, duplicates, gross)
                errors = [i for i, c in enumerate(want) if c in qc.ERROR_FLAGS]
                if on_error == "fail" and errors:
                    assert f"row {errors[0]} fails quality control" in str(exc)
                else:
                    assert "no usable observation" in str(exc)
                    assert CODE["ok"] not in want
            return
        TALLY["outcome: flagged"] += 1
    check_report(problem, len(problem.observations))
    if fault in READABLE:
        want = oracle(rows, fault, duplicates, gross)
        assert problem.qc.flag.tolist() == want
        if on_error == "fail":
            assert not any(c in qc.ERROR_FLAGS for c in want)
    else:  # a damaged file that still reads: garbage values, but every row is flagged
        assert fault == "zeroed_block"


@pytest.mark.filterwarnings("error")
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n_good=st.integers(0, 10),
    bad=bad_kinds,
    fault=st.sampled_from(READABLE),
    on_error=st.sampled_from(["flag", "flag", "fail"]),
    duplicates=st.sampled_from(["merge", "reject"]),
    gross=st.booleans(),
)
def test_bad_rows_are_flagged_or_a_clear_error(
    seed, n_good, bad, fault, on_error, duplicates, gross
):
    run_case(make_rows(seed, n_good, bad), fault, seed, on_error, duplicates, gross)


@pytest.mark.filterwarnings("error")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n_good=st.integers(0, 10),
    bad=bad_kinds,
    fault=st.sampled_from([f for f in FILE_FAULTS if f not in READABLE]),
)
def test_malformed_or_damaged_files_are_a_clear_error(seed, n_good, bad, fault):
    run_case(make_rows(seed, n_good, bad), fault, seed)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("fault", FILE_FAULTS)
def test_every_file_fault_once(fault):
    """Each fault at least once, whatever hypothesis draws."""
    run_case(make_rows(3, 6, ["nan_value", "duplicate", "boundary"]), fault, 3)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), cut=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_files_are_an_input_error(seed, cut):
    rows = make_rows(seed, 20, [])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "obs.h5"
        write_file(path, rows, None, seed)
        data = path.read_bytes()
        path.write_bytes(data[: int(cut * len(data))])
        with pytest.raises(InputError, match=str(path)):
            build_problem(config(path))
    TALLY["file: truncated (dedicated)"] += 1


_FLIP_SCRIPT = r"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
import numpy as np
from mpda_dist.io import InputError, read_observations
good, seed, count = open(sys.argv[1], "rb").read(), int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(seed)
outcome = {"ok": 0, "InputError": 0}
for _ in range(count):
    data = bytearray(good)
    for _ in range(rng.integers(1, 8)):
        data[rng.integers(0, len(data))] = rng.integers(0, 256)
    open(sys.argv[4], "wb").write(bytes(data))
    try:
        read_observations(sys.argv[4])
        outcome["ok"] += 1
    except InputError:
        outcome["InputError"] += 1
print(outcome)
"""


def test_random_byte_flips_are_read_or_an_input_error(tmp_path):
    """Bytes flipped anywhere in the file.  libhdf5 itself may ask for absurd amounts of
    memory on some damaged headers (about 1 % of such files); under an address-space
    limit that comes back as an error, which must become an InputError too."""
    good = tmp_path / "good.h5"
    write_file(good, make_rows(0, 50, []), None, 0)

    proc = subprocess.run(
        [sys.executable, "-c", _FLIP_SCRIPT, str(good), "1", "400", str(tmp_path / "bad.h5")],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert sum(outcome.values()) == 400
    TALLY["file: random byte flips (subprocess)"] += 400
    TALLY["outcome: byte flips read"] += outcome["ok"]
    TALLY["outcome: byte flips InputError"] += outcome["InputError"]


# ------------------------------------------------------------------ the real command

MPDA = Path(sys.executable).with_name("mpda")
GRID = ["--set", f"grid.nx={N}", "--set", f"grid.ny={N}"]


def mpda(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(MPDA), "run", *args, *GRID], capture_output=True, text=True, timeout=180
    )


CLI_BAD = ["nan_value", "outside", "zero_noise", "inf_coord", "duplicate", "boundary", "gross"]


def test_cli_flags_bad_rows_and_writes_them(tmp_path):
    rows = make_rows(7, 12, CLI_BAD)
    obs, out = tmp_path / "obs.h5", tmp_path / "a.h5"
    write_file(obs, rows, None, 7)
    proc = mpda(
        "-o", str(out), "--set", f"observations.file={obs}", "--set", f"qc.gross_error_k={GROSS_K}"
    )
    assert proc.returncode == 0, proc.stderr
    want = expected_flags(rows, "merge", gross=True)
    with h5py.File(out) as f:
        assert f["observations/flag"][()].tolist() == want
        counts = Counter(want)
        for code, (name, _) in qc.FLAGS.items():
            assert f.attrs[f"qc_count_{name}"] == counts.get(code, 0)
        assert f.attrs["qc_read"] == len(rows) and f.attrs["qc_used"] == counts[0]
    assert f"{len(rows)} read, {counts[0]} used" in proc.stderr
    TALLY.update(k for *_, k in rows if k != "good")
    TALLY["outcome: CLI exit 0, flagged"] += 1


def test_cli_fail_policy_names_the_first_bad_row(tmp_path):
    rows = make_rows(8, 6, CLI_BAD)
    obs, out = tmp_path / "obs.h5", tmp_path / "a.h5"
    write_file(obs, rows, None, 8)
    proc = mpda("-o", str(out), "--set", f"observations.file={obs}", "--set", "qc.on_error=fail")
    want = expected_flags(rows, "merge", False)
    first = next(i for i, c in enumerate(want) if c in qc.ERROR_FLAGS)
    assert proc.returncode == 2, proc.stderr
    assert f"{obs}: row {first} fails quality control" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))
    TALLY.update(k for *_, k in rows if k != "good")
    TALLY["outcome: CLI exit 2, first bad row named"] += 1


def test_cli_wrong_dtype_is_an_input_error(tmp_path):
    obs, out = tmp_path / "obs.h5", tmp_path / "a.h5"
    write_file(obs, make_rows(9, 5, []), "string_dtype", 9)
    proc = mpda("-o", str(out), "--set", f"observations.file={obs}")
    assert proc.returncode == 2, proc.stderr
    assert str(obs) in proc.stderr and "expected real numbers" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()
    TALLY["file: string_dtype (CLI)"] += 1
    TALLY["outcome: CLI exit 2, InputError"] += 1


def test_zz_report_tally(capsys):
    """Prints what the fuzzing tried (pytest -s shows it); always passes."""
    with capsys.disabled():
        print("\nfuzz tally:", dict(sorted(TALLY.items())))
