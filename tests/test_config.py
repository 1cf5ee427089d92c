"""Config loading: defaults, round trips, overrides and every class of error."""

from __future__ import annotations

import dataclasses
import math
import pickle
import re
from pathlib import Path

import pytest
import yaml

from mpda_dist import config as config_module
from mpda_dist.config import (
    Config,
    ConfigError,
    DecompositionConfig,
    GridConfig,
    ObservationsConfig,
    OutputConfig,
    SolverConfig,
    SyntheticObsConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------ defaults and files


def test_dataclass_defaults() -> None:
    cfg = Config()
    assert (cfg.grid.nx, cfg.grid.ny, cfg.grid.extent) == (256, 256, (1.0, 1.0))
    assert (cfg.prior.lengthscale, cfg.prior.amplitude, cfg.prior.background) == (0.15, 1.1, 0.0)
    assert cfg.observations.synthetic == SyntheticObsConfig(fraction=0.05, noise=1e-3, seed=0)
    assert cfg.observations.file is None
    s = cfg.solver
    assert (s.method, s.c, s.damping, s.stopping, s.dtype) == (
        "mp",
        10.0,
        0.6,
        "residual",
        "float32",
    )
    assert (s.tol, s.check_every, s.max_iterations) == (None, 10, 10000)
    assert (s.multigrid.min_size, s.multigrid.enabled) == (64, True)
    assert (s.exchange.mode, s.exchange.every, s.exchange.max_staleness) == ("async", 1, 1)
    assert cfg.decomposition == DecompositionConfig("auto")
    assert cfg.output.file == "analysis.h5"
    assert (cfg.logging.level, cfg.logging.per_rank, cfg.logging.heartbeat_seconds) == (
        "info",
        False,
        10.0,
    )


def test_bundled_demo_matches_contract() -> None:
    cfg = load_config(None)
    assert (cfg.grid.nx, cfg.grid.ny) == (256, 256)
    assert cfg.observations.synthetic is not None
    assert cfg.observations.synthetic.fraction == 0.05
    assert cfg.solver.effective_tol() == 1e-5
    # Apart from the explicit tol, the demo spells out the defaults.
    assert dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, tol=None)) == Config()


def test_top_level_demo_is_the_bundled_one() -> None:
    bundled = ROOT / "mpda_dist" / "configs" / "demo.yaml"
    assert (ROOT / "configs" / "demo.yaml").read_text() == bundled.read_text()
    assert load_config(ROOT / "configs" / "demo.yaml") == load_config(None)


def test_small_config() -> None:
    cfg = load_config(ROOT / "configs" / "small.yaml")
    assert (cfg.grid.nx, cfg.grid.ny, cfg.solver.dtype) == (64, 64, "float64")
    assert cfg.solver.effective_tol() == 1e-10


def test_empty_file_and_partial_sections_take_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()
    cfg = load_config(write(tmp_path, "grid: {nx: 33}\nsolver:\n  exchange: {mode: sync}\n"))
    assert (cfg.grid.nx, cfg.grid.ny) == (33, 256)
    assert cfg.solver.exchange.mode == "sync"
    assert cfg.solver.exchange.every == 1


@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-5), ("float64", 1e-10)])
def test_effective_tol_follows_dtype(dtype: str, tol: float) -> None:
    assert SolverConfig(dtype=dtype).effective_tol() == tol
    assert SolverConfig(dtype=dtype, tol=1e-3).effective_tol() == 1e-3
    # the δ rule's ratio (the paper's 1e-4) for message passing; not for a baseline
    assert SolverConfig(dtype=dtype, stopping="delta").effective_tol() == 1e-4
    assert SolverConfig(dtype=dtype, stopping="delta", method="cg").effective_tol() == tol


def test_int_accepted_for_float_and_lists_become_tuples(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "grid: {extent: [2, 1]}\nsolver: {c: -2, damping: 1}\n"))
    assert cfg.grid.extent == (2.0, 1.0)
    assert isinstance(cfg.grid.extent[0], float)
    assert cfg.solver.c == -2.0 and isinstance(cfg.solver.c, float)


def test_exponent_without_dot_is_a_float(tmp_path: Path) -> None:
    # Plain PyYAML reads `1e-6` as a string (YAML 1.1); users write it anyway.
    cfg = load_config(
        write(tmp_path, "solver: {tol: 1e-6}\nobservations: {synthetic: {noise: 2E-3}}")
    )
    assert cfg.solver.tol == 1e-6
    assert cfg.observations.synthetic is not None and cfg.observations.synthetic.noise == 2e-3


@pytest.mark.parametrize("how", ["file", "--set"])
def test_integers_are_read_by_yaml_1_2(tmp_path: Path, how: str) -> None:
    """YAML 1.1 (PyYAML's) read a leading zero as octal: nx 065 was 53, seed 010 was 8."""
    values = {
        "grid.nx": "065",
        "grid.ny": "0033",
        "solver.max_iterations": "010000",
        "observations.synthetic.seed": "010",
        "solver.check_every": "0o17",
        "solver.multigrid.smoothing": "0x1F",
        "solver.anderson": "+3",
    }
    if how == "file":
        cfg = load_config(
            write(
                tmp_path,
                "grid: {nx: 065, ny: 0033}\n"
                "solver: {max_iterations: 010000, check_every: 0o17, anderson: +3,"
                " multigrid: {smoothing: 0x1F}}\n"
                "observations: {synthetic: {seed: 010}}\n",
            )
        )
    else:
        cfg = load_config(None, [f"{k}={v}" for k, v in values.items()])
    assert (cfg.grid.nx, cfg.grid.ny) == (65, 33)
    assert cfg.solver.max_iterations == 10000
    assert cfg.observations.synthetic is not None and cfg.observations.synthetic.seed == 10
    assert (cfg.solver.check_every, cfg.solver.multigrid.smoothing) == (15, 31)
    assert cfg.solver.anderson == 3


@pytest.mark.parametrize("value", ["1:05", "1_000", "0b101", "0o9"])
def test_yaml_1_1_only_integers_are_strings(tmp_path: Path, value: str) -> None:
    """Sexagesimal `1:05` was 65; now a string, which the type check names."""
    expected = f"grid.nx = '{value}' has the wrong type (string); expected an integer"
    assert expected in error_of(tmp_path, f"grid: {{nx: {value}}}")
    with pytest.raises(ConfigError, match=re.escape(f"--set grid.nx={value}: {expected}")):
        load_config(None, [f"grid.nx={value}"])


@pytest.mark.parametrize(
    ("text", "value"),
    [(".5e3", 500.0), ("-.5", -0.5), ("+.25", 0.25), ("1.e-2", 0.01), ("2E+1", 20.0)],
)
def test_floats_are_read_by_yaml_1_2(tmp_path: Path, text: str, value: float) -> None:
    """`.5e3` and `-.5` were strings (YAML 1.1 wants a digit first or no sign)."""
    assert load_config(write(tmp_path, f"solver: {{c: {text}}}")).solver.c == value
    assert load_config(None, [f"solver.c={text}"]).solver.c == value


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("!!int 0b101", "invalid integer '0b101'"),
        ("1" * 5000, "invalid integer '1111111111111111111111111111111111111111': too many"),
    ],
)
def test_unreadable_integer_is_a_config_error(value: str, expected: str) -> None:
    """Python's int() limit (4300 digits) escaped as a ValueError with a traceback."""
    with pytest.raises(ConfigError, match=f"--set grid.nx: invalid YAML at line 1.*{expected}"):
        load_config(None, [f"grid.nx={value}"])


@pytest.mark.parametrize("name", ["0o17", "065", ".5", "-.5e3", "1:05", "1_000", "0x1F"])
def test_dump_quotes_a_string_that_reads_as_a_number(tmp_path: Path, name: str) -> None:
    cfg = dataclasses.replace(load_config(None), output=OutputConfig(file=name))
    text = dump_config(cfg)
    assert load_config(write(tmp_path, text)) == cfg
    assert config_from_dict(yaml.safe_load(text)) == cfg  # a YAML 1.1 reader too


def test_file_observations_and_background_file(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, "observations: {file: obs.h5, noise: 0.01}\nprior: {background: bg.h5:f}")
    )
    assert cfg.observations.file == "obs.h5" and cfg.observations.synthetic is None
    assert cfg.observations.noise == 0.01
    assert cfg.prior.background == "bg.h5:f"


def test_process_grid_tuple(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "decomposition: {process_grid: [2, 3]}"))
    assert cfg.decomposition.process_grid == (2, 3)


def test_config_is_frozen_hashable_and_picklable() -> None:
    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.grid.nx = 3  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert hash(cfg) == hash(load_config(None))


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("solver.dtype=float64", "decomposition.process_grid=[2,1]", "prior.background=b.h5"),
        ("observations.file=o.h5", "observations.noise=0.5", "solver.tol=3e-7"),
    ],
)
def test_dump_load_round_trip(tmp_path: Path, overrides: tuple[str, ...]) -> None:
    cfg = load_config(None, overrides)
    path = write(tmp_path, dump_config(cfg))
    assert load_config(path) == cfg
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg
    assert config_to_dict(cfg) == yaml.safe_load(dump_config(cfg))


def test_config_to_dict_is_plain() -> None:
    d = config_to_dict(Config())
    assert d["grid"]["extent"] == [1.0, 1.0]
    assert d["solver"]["multigrid"] == {
        "min_size": 64,
        "enabled": True,
        "cycle": "fas",
        "smoothing": 20,
    }
    assert set(d) == {f.name for f in dataclasses.fields(Config)}


# ---------------------------------------------------------------------------- overrides


def test_overrides_apply_in_order_and_nest() -> None:
    cfg = load_config(
        None,
        [
            "grid.nx=64",
            "grid.nx=65",
            "solver.multigrid.min_size=8",
            "solver.exchange.mode=sync",
            "grid.extent=[2.0, 1.5]",
            "logging.per_rank=true",
        ],
    )
    assert cfg.grid.nx == 65
    assert cfg.solver.multigrid.min_size == 8
    assert cfg.solver.exchange.mode == "sync"
    assert cfg.grid.extent == (2.0, 1.5)
    assert cfg.logging.per_rank is True


def test_override_to_observation_file_replaces_synthetic() -> None:
    cfg = load_config(None, ["observations.file=problem.h5"])
    assert cfg.observations.file == "problem.h5"
    assert cfg.observations.synthetic is None


def test_override_of_synthetic_drops_the_file_from_the_config(tmp_path: Path) -> None:
    path = write(tmp_path, "observations: {file: obs.h5}")
    cfg = load_config(path, ["observations.synthetic={seed: 3}"])
    assert cfg.observations.file is None
    assert cfg.observations.synthetic == SyntheticObsConfig(seed=3)


@pytest.mark.parametrize(
    "synthetic", ["observations.synthetic.seed=2", "observations.synthetic={seed: 2}"]
)
@pytest.mark.parametrize("file_first", [False, True])
def test_overrides_of_synthetic_and_file_conflict_in_any_order(
    synthetic: str, file_first: bool
) -> None:
    """`--set ...seed=2 --set observations.file=p.h5` silently dropped the user's seed;
    the other order was an error.  The config's own synthetic block is still dropped."""
    overrides = [synthetic, "observations.file=p.h5"]
    if file_first:
        overrides.reverse()
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "small.yaml", overrides)
    assert str(err.value) == (
        f"{ROOT / 'configs' / 'small.yaml'}, --set {synthetic} and --set observations.file=p.h5"
        ": observations: both 'synthetic' and 'file' are given; choose exactly one"
    )
    assert err.value.key == "observations"


@pytest.mark.parametrize("value", ["", " ", "null", "~"])
def test_empty_observation_file_override_is_an_error(value: str) -> None:
    """It used to be null, so the synthetic block stayed and the run went on with it."""
    small = ROOT / "configs" / "small.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(small, [f"observations.file={value}"])
    assert str(err.value) == (
        f"{small}, --set observations.file={value}: observations.file = null must not be "
        "empty: give an HDF5 observation file, or leave the key out to use "
        "observations.synthetic"
    )
    assert err.value.key == "observations.file"


@pytest.mark.parametrize("key", ["output.file", "checkpoint.file"])
def test_empty_output_file_override_is_an_error(key: str) -> None:
    with pytest.raises(ConfigError, match=f"--set {key}=: {key} = null has the wrong type"):
        load_config(None, [f"{key}="])


def test_empty_output_option_is_an_error() -> None:
    from mpda_dist.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["run", "configs/small.yaml", "-o", ""])
    assert exit_.value.code == 2


def test_override_error_names_file_and_override() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "demo.yaml", ["solver.dtype=float16"])
    msg = str(err.value)
    assert msg.startswith(str(ROOT / "configs" / "demo.yaml"))
    assert "--set solver.dtype=float16" in msg
    assert "solver.dtype = 'float16' is not allowed; choose one of: float32, float64" in msg
    assert err.value.key == "solver.dtype"


@pytest.mark.parametrize("bad", ["nonsense", "=3", "grid.=3", ".nx=3"])
def test_malformed_override(bad: str) -> None:
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, [bad])


def test_override_into_a_value_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"'grid.nx' = 256 is a value, not a section"):
        load_config(None, ["grid.nx.deep=1"])


def test_override_with_bad_yaml() -> None:
    with pytest.raises(ConfigError, match=r"--set grid.extent: invalid YAML"):
        load_config(None, ["grid.extent=[1, 2"])


# ------------------------------------------------------------------------------- errors


def error_of(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: "), msg
    return msg


def test_exact_message_for_bad_choice(tmp_path: Path) -> None:
    path = write(tmp_path, "solver: {dtype: float16}\n", "x.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"{path}: solver.dtype = 'float16' is not allowed; choose one of: float32, float64"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "solver: {dtpye: float64}",
            "solver.dtpye = 'float64' is not a known key; did you mean 'solver.dtype'?",
        ),
        ("gird: {nx: 3}", "did you mean 'grid'?"),
        ("solver: {multigrid: {min_sise: 8}}", "did you mean 'solver.multigrid.min_size'?"),
        ("grid: {nz: 3}", "allowed in 'grid': nx, ny, extent"),
        ("grid: {zzzz: 3}", "grid.zzzz = 3 is not a known key (allowed in 'grid'"),
    ],
)
def test_unknown_keys_with_suggestions(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_of(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("grid: {nx: 12.5}", "grid.nx = 12.5 has the wrong type (number); expected an integer"),
        ("grid: {nx: '64'}", "grid.nx = '64' has the wrong type (string); expected an integer"),
        ("solver: {c: ten}", "solver.c = 'ten' has the wrong type (string); expected a number"),
        (
            "grid: {extent: 1.0}",
            "grid.extent = 1.0 has the wrong type (number); expected a list of 2 numbers",
        ),
        ("grid: {extent: [1.0, 1.0, 1.0]}", "expected a list of 2 numbers"),
        (
            "grid: 5",
            "grid = 5 has the wrong type (integer); expected a mapping with keys: nx, ny, extent",
        ),
        ("solver: {multigrid: {enabled: 1}}", "expected a boolean (true or false)"),
        ("prior: {background: [1, 2]}", "expected a number or a string"),
        ("output: {file: 3}", "output.file = 3 has the wrong type (integer); expected a string"),
        (
            "observations: {synthetic: 3}",
            "expected a mapping with keys: fraction, noise, seed, tracks or null",
        ),
    ],
)
def test_wrong_types(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_of(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("grid: {nx: true}", "grid.nx"),
        ("observations: {synthetic: {seed: false}}", "observations.synthetic.seed"),
        ("solver: {damping: true}", "solver.damping"),
    ],
)
def test_bool_is_not_a_number(tmp_path: Path, text: str, key: str) -> None:
    msg = error_of(tmp_path, text)
    assert f"{key} = " in msg
    assert "wrong type (boolean; true/false is not a number)" in msg


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("grid: {nx: 4}", "grid.nx = 4 is out of range; must be >= 5 and <= 1048576"),
        (
            "grid: {ny: 10000000000000000000000}",  # numpy failed later, naming no key
            "grid.ny = 10000000000000000000000 is out of range; must be >= 5 and <= 1048576",
        ),
        (
            "grid: {extent: [1.0, 0.0]}",
            "grid.extent = [1.0, 0.0] is out of range; each value must be > 0.0",
        ),
        ("solver: {damping: 0}", "solver.damping = 0.0 is out of range; must be > 0.0 and <= 1.0"),
        ("solver: {damping: 1.5}", "must be > 0.0 and <= 1.0"),
        ("solver: {c: 0}", "solver.c = 0.0 is out of range; must be != 0"),
        ("solver: {tol: -1.0e-5}", "solver.tol = -1e-05 is out of range; must be > 0.0"),
        ("solver: {check_every: 0}", "solver.check_every = 0 is out of range; must be >= 1"),
        ("solver: {exchange: {every: 0}}", "solver.exchange.every = 0 is out of range"),
        ("solver: {exchange: {max_staleness: -1}}", "must be >= 0"),
        (
            "observations: {synthetic: {fraction: 0}}",
            "observations.synthetic.fraction = 0.0 is out of range",
        ),
        ("observations: {synthetic: {fraction: 1.01}}", "must be > 0.0 and <= 1.0"),
        (
            "observations: {synthetic: {noise: 0}}",
            "observations.synthetic.noise = 0.0 is out of range",
        ),
        ("observations: {file: o.h5, noise: -1}", "observations.noise = -1.0 is out of range"),
        ("decomposition: {process_grid: [2, 0]}", "each value must be >= 1"),
        ("prior: {lengthscale: .nan}", "prior.lengthscale = nan must be a finite number"),
        ("prior: {amplitude: .inf}", "must be a finite number"),
        ("output: {file: ''}", "output.file = '' must not be empty"),
    ],
)
def test_out_of_range(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_of(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "solver: {method: gbp}",
            "solver.method = 'gbp' is not allowed; choose one of: mp, exact, cg, 3dvar, amg_cg",
        ),
        ("solver: {stopping: never}", "choose one of: residual, delta"),
        ("solver: {exchange: {mode: blocking}}", "choose one of: sync, async"),
        ("logging: {level: verbose}", "choose one of: debug, info, warning"),
        ("decomposition: {process_grid: manual}", "choose one of: auto, or a list of 2 integers"),
        (
            "solver: {dtype: 32}",
            "solver.dtype = 32 is not allowed; choose one of: float32, float64",
        ),
    ],
)
def test_enums(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_of(tmp_path, text)


@pytest.mark.parametrize(
    "text",
    [
        "observations:\n  file:\n  noise: 0.1\n",
        "observations: {file: null}",
        "observations: {file: ~, synthetic: null}",
    ],
)
def test_empty_observation_file_is_an_error(tmp_path: Path, text: str) -> None:
    """`file:` with nothing after it ran the default synthetic problem, exit 0."""
    msg = error_of(tmp_path, text)
    assert msg.endswith(
        ": observations.file = null must not be empty: give an HDF5 observation file, or "
        "leave the key out to use observations.synthetic"
    ), msg


def test_null_observation_file_beside_synthetic_is_what_config_prints(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "observations: {synthetic: {seed: 4}, file: null}"))
    assert cfg.observations.file is None
    assert cfg.observations.synthetic == SyntheticObsConfig(seed=4)


def test_both_observation_sources(tmp_path: Path) -> None:
    msg = error_of(tmp_path, "observations: {file: o.h5, synthetic: {seed: 1}}")
    assert "both 'synthetic' and 'file' are given; choose exactly one" in msg


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("prior: {background: climatology}", "prior.background"),
        ("observations: {synthetic: {tracks: {}}}", "observations.synthetic.tracks"),
    ],
)
def test_sphere_only_options_on_a_rectangle(tmp_path: Path, text: str, key: str) -> None:
    """`mpda config` refuses what run and simulate would (they used to check it later)."""
    msg = error_of(tmp_path, text)
    assert key in msg and "needs grid.domain: sphere" in msg, msg
    load_config(write(tmp_path, text + "\ngrid: {domain: sphere}"))  # fine on the sphere


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=rf"^{path}: no such config file$"):
        load_config(path)


def test_directory_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("grid: {nx: 3\n", "invalid YAML at line"),
        ("grid:\n  nx: 64\n nx: 3\n", "invalid YAML at line 3"),
        ("grid:\n  nx: 64\n  nx: 65\n", "found duplicate key 'nx'"),
        ("- 1\n- 2\n", "the top level must be a mapping of sections"),
    ],
)
def test_bad_yaml(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in error_of(tmp_path, text)


def test_errors_are_value_errors() -> None:
    assert issubclass(ConfigError, ValueError)


# ----------------------------------------------------------- direct construction checks


def test_direct_construction_is_validated() -> None:
    with pytest.raises(
        ConfigError, match=r"^grid.nx = 2 is out of range; must be >= 5 and <= 1048576$"
    ):
        GridConfig(nx=2)
    with pytest.raises(ConfigError, match="solver.damping = 2.0 is out of range"):
        dataclasses.replace(SolverConfig(), damping=2)
    with pytest.raises(ConfigError, match="choose exactly one"):
        ObservationsConfig(synthetic=SyntheticObsConfig(), file="o.h5")
    assert ObservationsConfig().synthetic == SyntheticObsConfig()
    assert GridConfig(extent=[3, 2]).extent == (3.0, 2.0)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- prior scale

SMALL33 = ["grid.nx=33", "grid.ny=33"]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "prior.lengthscale=1e300",  # ZeroDivisionError in prior.matern_kappa_scale
            "prior.lengthscale = 1e+300 is out of range; must be >= 4.6e-77 and <= 3.8e+73 "
            "with grid.extent = [1.0, 1.0], grid.nx = 33, grid.ny = 33, prior.amplitude = 1.1 "
            "and solver.dtype = float64 (the prior precision's coefficients must lie between "
            "1e-150 and 1e+150 in float64: the solver squares them)",
        ),
        ("prior.lengthscale=1e-300", "prior.lengthscale = 1e-300 is out of range; must be >= "),
        (
            "prior.amplitude=1e-300",
            "prior.amplitude = 1e-300 is out of range; must be >= 4.4e-75 and <= 1.3e+75 with "
            "grid.extent = [1.0, 1.0], grid.nx = 33, grid.ny = 33, prior.lengthscale = 0.15 ",
        ),
        ("prior.amplitude=1e300", "prior.amplitude = 1e+300 is out of range; must be >= 4.4e-75"),
        (
            "grid.extent=[1e-200,1e-200]",  # divide-by-zero warnings, then a QC error
            "grid.extent = [1e-200, 1e-200] is out of range; each value must be >= 3.9e-75 and "
            "<= 3.3e+75 with grid.nx = 33, grid.ny = 33, prior.lengthscale = 0.15, ",
        ),
        ("grid.extent=[1e-200,1]", "grid.extent = [1e-200, 1.0] is out of range; the first "),
    ],
)
def test_prior_beyond_float_range_is_a_config_error(override: str, expected: str) -> None:
    small = ROOT / "configs" / "small.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(small, [*SMALL33, override])
    assert str(err.value).startswith(f"{small}, --set {override}: {expected}"), str(err.value)
    assert err.value.key == override.split("=")[0]


def test_prior_range_ends_are_accepted() -> None:
    """The reported range is what the check accepts: its ends pass, just beyond fail."""
    small = ROOT / "configs" / "small.yaml"
    for key, lo, hi in [("lengthscale", 4.6e-77, 3.8e73), ("amplitude", 4.4e-75, 1.3e75)]:
        for ok in (lo, hi):
            assert getattr(load_config(small, [*SMALL33, f"prior.{key}={ok!r}"]).prior, key) == ok
        for bad in (lo / 2, hi * 2):
            with pytest.raises(
                ConfigError, match=f"prior.{key} = .* is out of range; must be >= {lo}"
            ):
                load_config(small, [*SMALL33, f"prior.{key}={bad!r}"])


def test_float32_prior_range_is_narrower_and_says_so() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["grid.nx=33", "grid.ny=33", "prior.amplitude=1e-9"])
    msg = str(err.value)
    assert "prior.amplitude = 1e-09 is out of range; must be >= 1.4e-07 and <= 1.3e+08" in msg
    assert "between 1e-15 and 1e+15 in float32" in msg
    assert msg.endswith("; it fits with solver.dtype: float64"), msg
    load_config(None, ["grid.nx=33", "grid.ny=33", "prior.amplitude=1e-9", "solver.dtype=float64"])


def test_prior_range_on_the_sphere() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs" / "global.yaml", ["prior.lengthscale=1e300"])
    assert err.value.key == "prior.lengthscale"
    assert "prior.lengthscale = 1e+300 is out of range; must be >= " in str(err.value)
    assert "grid.lat_range = [-80.0, 80.0]" in str(err.value)


@pytest.mark.parametrize(
    ("ell", "amp"), [(1e-70, 1e-60), (1e-3, 1.1), (0.15, 1.1), (3.0, 1e50), (1e60, 1e-80)]
)
def test_prior_check_reads_the_whole_level_from_a_small_block(ell: float, amp: float) -> None:
    """The check takes a level's diagonal range from the solver's own stencils on a 3 x 3
    corner block (rectangle) or one column (sphere): the same as the whole level's."""
    import numpy as np

    from mpda_dist import prior, sphere
    from mpda_dist.multigrid import Level

    with np.errstate(all="ignore"):
        for dy, dx in [(1 / 32, 1 / 32), (1e-3, 0.5)]:
            level = Level(11, 9, 1, dy, dx)
            whole, _ = prior.rectangle_stencil((9, 7), (dy, dx), ell, amp, (0, 9), (0, 7))
            got = config_module._prior_diagonal(level, ell, amp)
            want = (whole.min(), whole.max()) if np.isfinite(whole).all() else (0.0, math.inf)
            assert got == pytest.approx(want, rel=1e-12)
        level = Level(41, 90, 1, 4.0, 4.0, "sphere", (-80.0, 80.0))
        whole, _ = sphere.sphere_stencil((41, 90), (-80.0, 80.0), ell * 1e4, amp, (0, 39), (0, 90))
        got = config_module._prior_diagonal(level, ell * 1e4, amp)
        want = (whole.min(), whole.max()) if np.isfinite(whole).all() else (0.0, math.inf)
        assert got == pytest.approx(want, rel=1e-12)
