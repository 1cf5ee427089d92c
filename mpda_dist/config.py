"""Run configuration: YAML -> frozen dataclasses, validated in one generic place.

Every section is a frozen dataclass whose fields are the options.  Validation (in
``_schema``) is driven by the field type hints (``int``, ``float``, ``Literal[...]``
choices, ``X | None``, fixed-length tuples, nested sections) plus numeric bounds kept in
each field's metadata; ``__post_init__`` runs the same checks, so a ``Config`` built in
Python is held to the same rules as one read from a file.  Errors name the file, the dotted key,
the value given and what is allowed::

    configs/x.yaml: solver.dtype = 'float16' is not allowed; choose one of: float32, float64

Units: grid ``extent`` and ``prior.lengthscale`` are in domain units (the grid spans
``[0, Lx] x [0, Ly]``); ``amplitude``, ``background`` and observation ``noise`` are in
the units of the field (noise is a standard deviation, not a variance).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from mpda_dist._schema import (
    ConfigError,
    Section,
    coerce,
    dump_yaml,
    opt,
    parse_yaml,
    register_sections,
    show,
    type_name,
    validate,
)

__all__ = [
    "Config",
    "ConfigError",
    "DecompositionConfig",
    "ExchangeConfig",
    "GridConfig",
    "LoggingConfig",
    "MultigridConfig",
    "ObservationsConfig",
    "OutputConfig",
    "PriorConfig",
    "QCConfig",
    "SolverConfig",
    "SyntheticObsConfig",
    "TracksConfig",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
]

BUNDLED_DEMO = "bundled demo config (mpda_dist/configs/demo.yaml)"

# Default stopping tolerance per dtype: a relative residual much below ~1e-6 is not
# reachable in float32 arithmetic, so a single default would either stall float32 runs
# or under-test float64 ones.
DEFAULT_TOL: dict[str, float] = {"float32": 1e-5, "float64": 1e-10}
DEFAULT_DELTA_TOL = 1e-4
"""``stopping: delta``: the paper's ratio δ/δ₀ at which a level stops."""


MAX_SIDE = 1 << 20
"""Points per grid side at most: a million a side is already 8 TB per field in float64;
a larger value failed later with numpy's message, naming no key."""


@dataclass(frozen=True, slots=True)
class GridConfig(Section):
    """Grid of ``nx x ny`` points including the boundary, spanning ``extent = (Lx, Ly)``.

    ``domain: sphere`` is a global lat/lon grid instead (``mpda_dist.sphere``): ``nx``
    longitudes ``i*360/nx`` (periodic, no boundary columns) and ``ny`` latitudes over
    ``lat_range`` (degrees, inclusive; the two clip rows are held at the background);
    ``extent`` is not used there."""

    nx: int = opt(256, ge=5, le=MAX_SIDE)
    ny: int = opt(256, ge=5, le=MAX_SIDE)
    extent: tuple[float, float] = opt((1.0, 1.0), gt=0.0)
    domain: Literal["rectangle", "sphere"] = "rectangle"
    lat_range: tuple[float, float] = opt((-80.0, 80.0), gt=-90.0, lt=90.0)

    def __post_init__(self) -> None:
        validate(self)
        if self.lat_range[0] >= self.lat_range[1]:
            raise ConfigError(
                f"grid.lat_range = {show(self.lat_range)} must be [lat_min, lat_max] with "
                "lat_min < lat_max (degrees)",
                key="grid.lat_range",
            )


@dataclass(frozen=True, slots=True)
class PriorConfig(Section):
    """Matérn (nu = 1) prior: correlation ``lengthscale`` (domain units; km on the
    sphere), marginal std ``amplitude`` (field units) and the background: a constant,
    ``file.h5[:dataset]`` holding an ``(ny, nx)`` field (dataset ``background`` by
    default), or ``climatology`` (sphere only: the built-in latitude-dependent surface
    temperature in kelvin, ``mpda_dist.globe.climatology``)."""

    lengthscale: float = opt(0.15, gt=0.0)
    amplitude: float = opt(1.1, gt=0.0)
    background: float | str = 0.0


@dataclass(frozen=True, slots=True)
class TracksConfig(Section):
    """Synthetic satellite swaths on the sphere (``mpda_dist.globe.satellite_swaths``):
    ``satellites`` sun-synchronous polar orbiters (inclination ``inclination_deg``,
    period ``period_minutes``) with ascending nodes spread evenly in longitude, each
    observing every grid node within ``swath_km / 2`` of its ground track during
    ``window_hours``."""

    satellites: int = opt(4, ge=1)
    swath_km: float = opt(120.0, gt=0.0)
    window_hours: float = opt(3.0, gt=0.0)
    inclination_deg: float = opt(98.7, gt=0.0, lt=180.0)
    period_minutes: float = opt(101.0, gt=0.0)


@dataclass(frozen=True, slots=True)
class SyntheticObsConfig(Section):
    """Synthetic problem: a prior sample as truth, observed at a random ``fraction`` of
    the interior nodes with Gaussian ``noise`` (std, field units), seeded by ``seed``."""

    fraction: float = opt(0.05, gt=0.0, le=1.0)
    noise: float = opt(1e-3, gt=0.0)
    seed: int = opt(0, ge=0)
    # null: a random ``fraction`` of the nodes; a mapping: satellite swaths instead
    # (sphere only; ``fraction`` is then not used).
    tracks: TracksConfig | None = None


@dataclass(frozen=True, slots=True)
class ObservationsConfig(Section):
    """Exactly one of ``synthetic`` or ``file`` (an HDF5 observation file).  ``noise``,
    when set, replaces the noise std of every observation (field units)."""

    synthetic: SyntheticObsConfig | None = None
    file: str | None = None
    noise: float | None = opt(None, gt=0.0)
    # H: ``nearest`` node, or ``bilinear`` in the cell (periodic in longitude on the
    # sphere); both keep the 13-point stencil.
    operator: Literal["nearest", "bilinear"] = "nearest"

    def __post_init__(self) -> None:
        validate(self)
        if self.synthetic is None and self.file is None:
            # Neither given: the synthetic default, so `observations: {}` still runs.
            object.__setattr__(self, "synthetic", SyntheticObsConfig())
        elif self.synthetic is not None and self.file is not None:
            raise ConfigError(
                "observations: both 'synthetic' and 'file' are given; choose exactly one",
                key="observations",
            )


@dataclass(frozen=True, slots=True)
class QCConfig(Section):
    """Observation quality control (see ``mpda_dist.qc`` for the flags).  ``on_error``:
    ``flag`` flags bad rows and assimilates the rest, ``fail`` stops (exit 2) at the
    first bad row.  ``duplicates`` at one location: ``merge`` by inverse variance, or
    ``reject`` all but the first.  ``gross_error_k``: flag ``|y - H f_b| > k * noise``
    (null: off)."""

    on_error: Literal["flag", "fail"] = "flag"
    duplicates: Literal["merge", "reject"] = "merge"
    gross_error_k: float | None = opt(None, gt=0.0)


MIN_SIZE = 64
"""The default longest side of the coarsest level, solved exactly (a sparse
factorisation: 30 ms at 64² on a 2-core CPU).  32 until 0.1.0's last changes: one more
level of message passing, 15 more programs to compile (a cold 256² solve 23–27 instead
of 12–17 s; warm solves the same; benchmarks/RESULTS.md §20)."""


@dataclass(frozen=True, slots=True)
class MultigridConfig(Section):
    """Coarse-to-fine levels, halving down to a longest side of ``min_size`` nodes (the
    coarsest is solved exactly).  ``cycle``: ``fas`` corrects each level from the
    coarser ones at every convergence check (full-approximation scheme); ``nested``
    only starts each level from the one below.  ``smoothing``: iterations per visit
    of a coarser level inside a correction."""

    min_size: int = opt(MIN_SIZE, ge=5)
    enabled: bool = True
    cycle: Literal["fas", "nested"] = "fas"
    smoothing: int = opt(20, ge=1)


@dataclass(frozen=True, slots=True)
class ExchangeConfig(Section):
    """Border-message exchange: ``sync`` waits every exchange; ``async`` computes on
    messages at most ``max_staleness`` exchanges old.  Exchange every ``every`` iterations."""

    mode: Literal["sync", "async"] = "async"
    every: int = opt(1, ge=1)
    max_staleness: int = opt(1, ge=0)


@dataclass(frozen=True, slots=True)
class SolverConfig(Section):
    """Solver options.  ``c`` and ``damping`` are the re-weighted BP weight and learning
    rate; ``momentum`` a heavy-ball term on the ``b`` messages (0 turns it off; it
    vanishes at the fixed point); ``tol`` is the Jacobi-scaled relative residual (or
    ratio δ/δ₀ of ``stopping: delta``) at which to stop, None for the default (see
    ``effective_tol``)."""

    method: Literal["mp", "exact", "cg", "3dvar", "amg_cg"] = "mp"
    c: float = opt(10.0, nonzero=True)
    damping: float = opt(0.6, gt=0.0, le=1.0)
    momentum: float = opt(0.5, ge=0.0, lt=1.0)
    stopping: Literal["residual", "delta"] = "residual"
    tol: float | None = opt(None, gt=0.0)
    check_every: int = opt(10, ge=1)
    # Checks without a 10 % fall of the residual, near the dtype's rounding and above
    # tol, after which a level stops as stalled (at least 500 iterations; 0: never).
    stall_checks: int = opt(30, ge=0)
    # Anderson mixing of the last `anderson` + 1 check means (mpda_dist/anderson.py).
    anderson: int = opt(2, ge=0)
    max_iterations: int = opt(10000, ge=1)
    dtype: Literal["float32", "float64"] = "float32"
    # Iterate the precision messages a alone to their fixed point (16 ulp), then the b
    # messages alone with constant gains: ~2.5x cheaper iterations, the same answer.
    freeze_precisions: bool = True
    multigrid: MultigridConfig = opt(factory=MultigridConfig)
    exchange: ExchangeConfig = opt(factory=ExchangeConfig)

    def effective_tol(self) -> float:
        """The stopping tolerance in force: ``tol``, or 1e-5 (float32) / 1e-10 (float64);
        with ``method: mp`` and ``stopping: delta``, the ratio δ/δ₀, 1e-4 by default."""
        if self.tol is not None:
            return self.tol
        if self.method == "mp" and self.stopping == "delta":
            return DEFAULT_DELTA_TOL
        return DEFAULT_TOL[self.dtype]


@dataclass(frozen=True, slots=True)
class DecompositionConfig(Section):
    """``process_grid``: ``auto`` or ``(Px, Py)`` ranks along x and y, the same for
    every multigrid level (coarse levels stop where a block would have fewer than 4
    nodes a side)."""

    process_grid: Literal["auto"] | tuple[int, int] = opt("auto", ge=1)


@dataclass(frozen=True, slots=True)
class OutputConfig(Section):
    """Where the analysis goes (HDF5, written atomically)."""

    file: str = "analysis.h5"


@dataclass(frozen=True, slots=True)
class LoggingConfig(Section):
    """Rank-0 logging ``level``; ``per_rank`` adds one log file per rank; a heartbeat
    line every ``heartbeat_seconds`` (0 turns it off)."""

    level: Literal["debug", "info", "warning"] = "info"
    per_rank: bool = False
    heartbeat_seconds: float = opt(10.0, ge=0.0)


@dataclass(frozen=True, slots=True)
class CheckpointConfig(Section):
    """Checkpoints of the solver state for restarts (``mpda run --resume FILE``).

    Written every ``every_seconds`` (0: only on a signal) and on SIGTERM/SIGUSR1."""

    file: str = "checkpoint.h5"
    every_seconds: float = opt(0.0, ge=0.0)


@dataclass(frozen=True, slots=True)
class Config(Section):
    """The whole run configuration; every section has defaults."""

    grid: GridConfig = opt(factory=GridConfig)
    prior: PriorConfig = opt(factory=PriorConfig)
    observations: ObservationsConfig = opt(factory=ObservationsConfig)
    qc: QCConfig = opt(factory=QCConfig)
    solver: SolverConfig = opt(factory=SolverConfig)
    decomposition: DecompositionConfig = opt(factory=DecompositionConfig)
    output: OutputConfig = opt(factory=OutputConfig)
    checkpoint: CheckpointConfig = opt(factory=CheckpointConfig)
    logging: LoggingConfig = opt(factory=LoggingConfig)

    def __post_init__(self) -> None:
        validate(self)
        # Options of one section that need another's: checked here, so `mpda config`
        # refuses what `run` and `simulate` would.
        if self.grid.domain != "sphere":
            if self.prior.background == "climatology":
                raise ConfigError(
                    "prior.background = 'climatology' needs grid.domain: sphere",
                    key="prior.background",
                )
            syn = self.observations.synthetic
            if syn is not None and syn.tracks is not None:
                raise ConfigError(
                    "observations.synthetic.tracks (satellite swaths) needs grid.domain: sphere",
                    key="observations.synthetic.tracks",
                )
        _check_prior_scale(self)


# --------------------------------------------------------------------------------------
# Prior scale: lengthscale, amplitude and grid spacing whose prior can be computed

PRIOR_PRECISION_RANGE: dict[str, tuple[float, float]] = {
    "float64": (1e-150, 1e150),
    "float32": (1e-15, 1e15),
}
"""Where the diagonal of the prior precision ``P`` (and so its 12 weights, none larger)
must lie on every level, per solver dtype: ``[1/√M, √M]``, ``M`` being quality
control's bound on an observation's precision (``mpda_dist.qc.MAX_PRECISION``), as the
message update squares the weights.  small.yaml at 33²: ``prior.lengthscale = 1e100``
(a diagonal of ~1e203) diverged in float64, and in float32 stopped with a traceback (a
singular coarsest factor after the cast overflowed); 1e70, 1e-70 and the float64 range's
ends (3.8e73, 4.6e-77) converged, as did the float32 range's lower end 1.5e-9 (its upper
end, 1.2e6, ran to max_iterations, exit 4, as did 1e7)."""


def _prior_diagonal(level: Any, ell: float, amp: float) -> tuple[float, float]:
    """The smallest and largest diagonal entry of the prior precision on ``level``, from
    the solver's own stencils on a small block (a corner and an inner node of the
    rectangle, whose coefficients do not vary further in; one column of the sphere, all
    rows); ``(0, inf)`` where they overflow or divide by zero."""
    import numpy as np

    from mpda_dist import prior, sphere

    n, m = level.interior
    try:
        with np.errstate(all="ignore"):
            if level.domain == "sphere":
                shape, lat = (level.ny, level.nx), level.lat_range
                diag, _ = sphere.sphere_stencil(shape, lat, ell, amp, (0, n), (0, 1))
            else:
                block = ((0, min(n, 3)), (0, min(m, 3)))
                diag, _ = prior.rectangle_stencil((n, m), (level.dy, level.dx), ell, amp, *block)
    except (OverflowError, ZeroDivisionError):
        return 0.0, math.inf
    if not np.isfinite(diag).all():
        return 0.0, math.inf
    return float(diag.min()), float(diag.max())


def _prior_fits(
    cfg: Config, ell: float, amp: float, dtype: str, extent: tuple[float, float] | None = None
) -> bool:
    """Whether the prior's diagonal lies in :data:`PRIOR_PRECISION_RANGE` on every level
    the solver builds (:mod:`mpda_dist.multigrid`'s), with ``prior.lengthscale = ell``,
    ``prior.amplitude = amp`` (and ``grid.extent``)."""
    from mpda_dist import multigrid

    g, mg = cfg.grid, cfg.solver.multigrid
    halve = mg.enabled and cfg.solver.method == "mp"
    if g.domain == "sphere":
        levels = multigrid.sphere_schedule(g.ny, g.nx, g.lat_range, mg.min_size, halve)
    else:
        lx, ly = extent or g.extent
        dy, dx = ly / (g.ny - 1), lx / (g.nx - 1)
        levels = multigrid.schedule(g.ny, g.nx, dy, dx, mg.min_size, halve)
    low, high = PRIOR_PRECISION_RANGE[dtype]
    for level in levels:
        a, b = _prior_diagonal(level, ell, amp)
        if not low <= a <= b <= high:  # also False for nan
            return False
    return True


def _allowed_range(fits: Callable[[float], bool], value: float) -> tuple[float, float] | None:
    """The interval of positive numbers that ``fits``, nearest to ``value`` (powers of ten
    scanned, the ends bisected), its ends rounded inwards to two digits; None if none."""
    ok = [e for e in range(-320, 309) if fits(10.0**e)]
    if not ok:
        return None
    runs: list[list[int]] = []
    for e in ok:
        if runs and e == runs[-1][-1] + 1:
            runs[-1].append(e)
        else:
            runs.append([e])
    here = math.log10(value)
    run = min(runs, key=lambda r: max(r[0] - here, here - r[-1], 0.0))

    def edge(inside: float, outside: float) -> float:  # exponents of 10
        for _ in range(60):
            mid = (inside + outside) / 2
            inside, outside = (mid, outside) if fits(10.0**mid) else (inside, mid)
        return 10.0**inside

    lo, hi = edge(run[0], run[0] - 1), edge(run[-1], run[-1] + 1)

    def rounded(v: float, up: bool) -> float:
        e = math.floor(math.log10(v)) - 1
        m = v / 10.0**e
        return float(f"{math.ceil(m) if up else math.floor(m)}e{e}")

    rlo, rhi = rounded(lo, True), rounded(hi, False)
    return (rlo, rhi) if rlo <= rhi and fits(rlo) and fits(rhi) else (lo, hi)


def _check_prior_scale(cfg: Config) -> None:
    """Refuse a prior whose precision cannot be computed in the solver's dtype (it
    overflowed, divided by zero or diverged), naming the key to change and its range:
    ``prior.lengthscale``, ``prior.amplitude``, or ``grid.extent`` when neither helps."""
    g, ell, amp = cfg.grid, cfg.prior.lengthscale, cfg.prior.amplitude
    exact = cfg.solver.method in ("exact", "amg_cg")  # rank 0 solves in float64
    dtype = "float64" if exact else cfg.solver.dtype
    if _prior_fits(cfg, ell, amp, dtype):
        return
    if g.domain == "sphere":
        grid = f"grid.nx = {g.nx}, grid.ny = {g.ny}, grid.lat_range = {show(g.lat_range)}"
    else:
        grid = f"grid.extent = {show(g.extent)}, grid.nx = {g.nx}, grid.ny = {g.ny}"
    low, high = PRIOR_PRECISION_RANGE[dtype]
    why = (
        f" (the prior precision's coefficients must lie between {low:g} and {high:g} in "
        f"{dtype}: the solver squares them)"
    )
    if dtype == "float32" and _prior_fits(cfg, ell, amp, "float64"):
        why += "; it fits with solver.dtype: float64"

    def rng(r: tuple[float, float]) -> str:
        return f"must be >= {r[0]:.2g} and <= {r[1]:.2g}"

    ells = _allowed_range(lambda v: _prior_fits(cfg, v, amp, dtype), ell)
    amps = _allowed_range(lambda v: _prior_fits(cfg, ell, v, dtype), amp)
    with_ell = f"prior.lengthscale = {show(ell)}"
    with_amp = f"prior.amplitude = {show(amp)}"
    # Often either key alone would do (for a large lengthscale only ℓ/σ counts): blame
    # the lengthscale if it is unlike the grid (finer than its spacing or wider than the
    # domain), else the amplitude, and name the other's range too.
    if g.domain == "sphere":
        from mpda_dist.sphere import EARTH_RADIUS_KM as radius

        step = math.radians(min((g.lat_range[1] - g.lat_range[0]) / (g.ny - 1), 360.0 / g.nx))
        like_grid = radius * step <= ell <= math.pi * radius
    else:
        spacing = min(g.extent[0] / (g.nx - 1), g.extent[1] / (g.ny - 1))
        like_grid = spacing <= ell <= max(g.extent)
    if ells and not (amps and like_grid):
        alt = f" (or prior.amplitude {rng(amps)} with this lengthscale)" if amps else ""
        raise ConfigError(
            f"{with_ell} is out of range; {rng(ells)} with {grid}, {with_amp} and "
            f"solver.dtype = {dtype}{alt}{why}",
            key="prior.lengthscale",
        )
    if amps:
        alt = f" (or prior.lengthscale {rng(ells)} with this amplitude)" if ells else ""
        raise ConfigError(
            f"{with_amp} is out of range; {rng(amps)} with {grid}, {with_ell} and "
            f"solver.dtype = {dtype}{alt}{why}",
            key="prior.amplitude",
        )
    if g.domain != "sphere":  # the grid spacing: both sides in proportion, or one
        lx, ly = g.extent
        both = "each value" if lx == ly else "the first value, and the second in proportion,"
        tries: list[tuple[str, float, Callable[[float], tuple[float, float]]]] = [
            (both, lx, lambda v: (v, v * ly / lx)),
            (f"the first value (with the second {show(ly)})", lx, lambda v: (v, ly)),
            (f"the second value (with the first {show(lx)})", ly, lambda v: (lx, v)),
        ]
        for which, value, extent in tries:
            fit = _allowed_range(
                lambda v, extent=extent: _prior_fits(cfg, ell, amp, dtype, extent(v)), value
            )
            if fit:
                raise ConfigError(
                    f"grid.extent = {show(g.extent)} is out of range; {which} {rng(fit)} "
                    f"with grid.nx = {g.nx}, grid.ny = {g.ny}, {with_ell}, {with_amp} and "
                    f"solver.dtype = {dtype}{why}",
                    key="grid.extent",
                )
    raise ConfigError(
        f"{grid}, {with_ell} and {with_amp} give a prior that cannot be computed in "
        f"{dtype}, and no lengthscale or amplitude alone would{why}",
        key="prior.lengthscale" if g.domain == "sphere" else "grid.extent",
    )


register_sections(Config)

# Keys that exclude each other.  An override that sets one of them (to anything but
# null) drops the others from the file before any override is applied, so `--set
# observations.file=obs.h5` works on the synthetic demo, while overrides of two of them
# (a key under one counts) are the error they would be in a file, in either order.
_ONE_OF: dict[tuple[str, ...], tuple[str, ...]] = {("observations",): ("synthetic", "file")}


def _parse_override(text: str) -> tuple[str, list[str], Any, str]:
    """``(key, its parts, value, value text)`` of ``--set section.key=value``."""
    key, sep, vtext = text.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError(
            f"--set {text!r}: expected section.key=value, e.g. --set solver.dtype=float64"
        )
    return key, parts, parse_yaml(vtext, f"--set {key}"), vtext


def _drop_replaced(raw: dict, parsed: Sequence[tuple[str, list[str], Any, str]]) -> None:
    """Drop from the file's ``raw`` the keys of :data:`_ONE_OF` that an override replaces."""
    for _, parts, value, _ in parsed:
        group = _ONE_OF.get(tuple(parts[:-1]), ())
        if parts[-1] not in group or value is None:
            continue
        node: Any = raw
        for part in parts[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            for other in group:
                if other != parts[-1]:
                    node.pop(other, None)


def _apply_override(
    raw: dict,
    parsed: tuple[str, list[str], Any, str],
    origins: dict[str, str],
    source: str,
) -> None:
    key, parts, value, vtext = parsed
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(
                f"{source}, --set {key}={vtext}: '{'.'.join(parts[: i + 1])}' = "
                f"{show(child)} is a value, not a section",
                key=".".join(parts[: i + 1]),
            )
        node = child
    node[parts[-1]] = value
    origins[key] = f"--set {key}={vtext}"


def _check_sources(raw: dict, origins: Mapping[str, str], source: str) -> None:
    """The keys of :data:`_ONE_OF` after the overrides: two given by overrides is an
    error naming both; ``observations.file`` given but null (``--set
    observations.file=``, or ``file:`` without a ``synthetic`` block) is an error, not
    the synthetic problem (what a missing key means)."""
    for path, group in _ONE_OF.items():
        node: Any = raw
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        parent = ".".join(path)
        hows = [_override_for(f"{parent}.{k}", origins) for k in group if node.get(k) is not None]
        if len(hows) > 1 and all(hows):
            names = " and ".join(repr(k) for k in group)
            raise ConfigError(
                f"{source}, {' and '.join(dict.fromkeys(hows))}: {parent}: "
                f"both {names} are given; choose exactly one",
                key=parent,
            )
    obs = raw.get("observations")
    if isinstance(obs, dict) and "file" in obs and obs["file"] is None:
        if "observations.file" in origins or obs.get("synthetic") is None:
            raise ConfigError(
                f"{_source_for('observations.file', source, origins)}: observations.file = "
                "null must not be empty: give an HDF5 observation file, or leave the key "
                "out to use observations.synthetic",
                key="observations.file",
            )


def _override_for(key: str, origins: Mapping[str, str]) -> str | None:
    """The override that set ``key``, a section above it or a key under it, if any."""
    for okey, how in sorted(origins.items(), key=lambda kv: -len(kv[0])):
        if key == okey or key.startswith(okey + ".") or okey.startswith(key + "."):
            return how
    return None


def _source_for(key: str | None, source: str, origins: Mapping[str, str]) -> str:
    """Name where a bad value came from: the file, or the file plus an override."""
    how = _override_for(key, origins) if key is not None else None
    return f"{source}, {how}" if how else source


def config_from_dict(
    data: Mapping[str, Any] | None,
    *,
    source: str = "<config>",
    overrides: Sequence[str] = (),
) -> Config:
    """Build a validated Config from a plain mapping (as YAML gives), applying overrides.

    Errors are ConfigError naming ``source``, the dotted key, the value and what is
    allowed.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections "
            f"(grid, prior, ...), got {type_name(data)}"
        )
    raw = _deepcopy_mappings(data)
    origins: dict[str, str] = {}
    parsed = [_parse_override(text) for text in overrides]
    _drop_replaced(raw, parsed)
    for override in parsed:
        _apply_override(raw, override, origins, source)
    _check_sources(raw, origins, source)
    try:
        return coerce(raw, Config, "")
    except ConfigError as exc:
        raise ConfigError(f"{_source_for(exc.key, source, origins)}: {exc}", key=exc.key) from None


def _deepcopy_mappings(data: Mapping) -> dict:
    return {k: _deepcopy_mappings(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config file (None: the bundled demo) and apply ``section.key=value``
    overrides, whose values are parsed as YAML.  Raises ConfigError on any problem."""
    if path is None:
        source = BUNDLED_DEMO
        text = resources.files("mpda_dist").joinpath("configs/demo.yaml").read_text("utf-8")
    else:
        source = os.fspath(path)
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{source}: no such config file")
        if not p.is_file():
            raise ConfigError(f"{source}: not a regular file")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{source}: cannot read config file ({exc})") from None
    return config_from_dict(parse_yaml(text, source), source=source, overrides=overrides)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-ready types (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        return v

    return plain(cfg)


def dump_config(cfg: Config) -> str:
    """YAML text of the full effective config; ``load_config`` reads it back unchanged."""
    return dump_yaml(config_to_dict(cfg))
