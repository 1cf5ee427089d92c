"""HDF5 input and output (h5py).

Array layout: fields are ``(ny, nx)``, y first, the whole grid including the boundary;
``/grid/x`` has shape ``(nx,)`` and ``/grid/y`` shape ``(ny,)`` in domain units (on the
sphere: longitude and latitude in degrees, CF units ``degrees_east``/``degrees_north``).
Observations are 1-D arrays of one length ``n``: ``x``, ``y`` (domain units, or
longitude and latitude), ``value`` (field units) and ``noise`` (standard deviation,
field units).

Outputs are written to a temporary name in the target directory and renamed when
complete, so a file at the final path is always a finished result.  Analysis files are
laid out as netCDF-4 (dimension scales ``y``, ``x`` and ``obs``, CF attributes), so
``xarray.open_dataset(path, engine="h5netcdf")`` reads the root, and ``group="analysis"``
or ``group="observations"`` those groups, as they are.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

__all__ = [
    "InputError",
    "atomic_output",
    "check_writable",
    "h5_output",
    "read_field",
    "read_observations",
    "read_truth",
    "OtherGrid",
    "split_field_spec",
    "to_json",
    "write_analysis",
    "write_problem",
]

OBS_KEYS = ("x", "y", "value", "noise")
DEFAULT_FIELD_DATASET = "background"


class InputError(ValueError):
    """An input file (or the output location) is missing, unreadable or malformed."""


# --------------------------------------------------------------------------------------
# Reading


# What h5py raises on damaged files varies with the damage: OSError for a bad signature
# or truncation, KeyError/RuntimeError for broken links and heaps, ValueError/TypeError
# for a garbled datatype message.  All of them mean "this file cannot be read".
H5_FAILURES = (OSError, RuntimeError, KeyError, ValueError, TypeError)


@contextlib.contextmanager
def _open_h5(path: str | os.PathLike[str]) -> Iterator[h5py.File]:
    """Open ``path`` read-only; any failure to read it inside the block becomes an
    InputError naming the file (InputErrors raised there pass unchanged)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if not p.is_file():
        raise InputError(f"{p}: not a regular file")
    try:
        f = h5py.File(p, "r")
    except H5_FAILURES as exc:
        # h5py says "file signature not found" for non-HDF5 and "truncated file" for a
        # copy cut short; both are worth passing on.
        raise InputError(f"{p}: cannot open as HDF5 ({exc})") from None
    try:
        with f:
            yield f
    except InputError:
        raise
    except H5_FAILURES as exc:
        raise InputError(
            f"{p}: cannot be read; the file looks damaged or truncated "
            f"({type(exc).__name__}: {exc})"
        ) from None


def _read_numeric(f: h5py.File, name: str, ndim: int) -> np.ndarray:
    """Read dataset ``name`` as float64, checking it is real-valued with ``ndim`` dims."""
    return _values(f, _numeric(f, name, ndim))


def _numeric(f: h5py.File, name: str, ndim: int) -> h5py.Dataset:
    """Dataset ``name``, checked to be real-valued with ``ndim`` dims (not read)."""
    if name not in f:
        raise InputError(f"{f.filename}: missing dataset '{name}'")
    ds = f[name]
    if not isinstance(ds, h5py.Dataset):
        raise InputError(f"{f.filename}: '{name}' is a group, expected a dataset")
    if ds.shape is None:  # HDF5 null dataspace (h5py.Empty): no values at all
        raise InputError(f"{f.filename}: dataset '{name}' is empty (null dataspace)")
    if ds.dtype.kind not in "iuf":
        raise InputError(
            f"{f.filename}: dataset '{name}' has dtype {ds.dtype}; expected real numbers"
        )
    if ds.ndim != ndim:
        raise InputError(
            f"{f.filename}: dataset '{name}' has shape {ds.shape}; expected {ndim} dimension(s)"
        )
    if ds.chunks is None and ds.size and 0 < ds.id.get_storage_size() < ds.nbytes:
        # A contiguous dataset stores every value; fewer bytes means a damaged header
        # (reading it could ask for absurd amounts of memory).
        raise InputError(
            f"{f.filename}: dataset '{name}' claims shape {ds.shape} but stores only "
            f"{ds.id.get_storage_size()} bytes; the file looks damaged"
        )
    return ds


def _values(f: h5py.File, ds: h5py.Dataset) -> np.ndarray:
    """A dataset checked by :func:`_numeric`, read as float64."""
    try:
        return np.asarray(ds[()], dtype=np.float64)
    except H5_FAILURES as exc:  # data blocks missing from a truncated or damaged file
        raise InputError(f"{f.filename}: dataset '{ds.name}' cannot be read ({exc})") from None
    except MemoryError:
        raise InputError(
            f"{f.filename}: dataset '{ds.name}' has shape {ds.shape}: too large to read "
            f"into memory ({ds.size * 8 / 2**30:.1f} GiB as float64)"
        ) from None


def read_observations(
    path: str | os.PathLike[str], *, default_noise: float | None = None
) -> dict[str, np.ndarray]:
    """Read an observation file: 1-D datasets ``x``, ``y``, ``value`` and ``noise``.

    ``noise`` may instead be a scalar attribute ``noise`` on the root group, broadcast
    to every observation; ``default_noise`` is used when the file has neither.  Returns
    float64 arrays of one length ``n`` under keys x, y, value, noise.  Values are not
    checked here (non-finite, outside the domain, ...): quality control does that and
    reports rows.
    """
    with _open_h5(path) as f:
        names = ("x", "y", "value", "noise") if "noise" in f else ("x", "y", "value")
        sets = {k: _numeric(f, k, 1) for k in names}
        # lengths first: a damaged or odd file may claim a huge dataset beside small ones
        lengths = {k: ds.shape[0] for k, ds in sets.items()}
        if len(set(lengths.values())) != 1:
            listed = ", ".join(f"{k} has {m}" for k, m in lengths.items())
            raise InputError(f"{f.filename}: observation datasets differ in length: {listed}")
        obs = {k: _values(f, ds) for k, ds in sets.items()}
        n = obs["x"].shape[0]
        if "noise" in obs:
            return obs
        if "noise" in f.attrs:
            attr = np.asarray(f.attrs["noise"])
            if attr.size != 1 or attr.dtype.kind not in "iuf":
                raise InputError(
                    f"{f.filename}: root attribute 'noise' = {attr!r} must be one number "
                    "(or make 'noise' a dataset with one value per observation)"
                )
            obs["noise"] = np.full(n, float(attr.reshape(())), dtype=np.float64)
        elif default_noise is not None:
            obs["noise"] = np.full(n, float(default_noise), dtype=np.float64)
        else:
            raise InputError(
                f"{f.filename}: missing dataset 'noise' (and no scalar root attribute "
                "'noise'; set observations.noise in the config to give one value for all)"
            )
    return obs


def split_field_spec(spec: str) -> tuple[Path, str]:
    """Split ``file.h5[:dataset]`` into the path and the dataset (default ``background``).

    A file that exists under the full name wins, so paths containing ``:`` still work.
    """
    if Path(spec).exists() or ":" not in spec:
        return Path(spec), DEFAULT_FIELD_DATASET
    file, _, dataset = spec.rpartition(":")
    return Path(file), dataset or DEFAULT_FIELD_DATASET


def read_field(spec: str, shape: tuple[int, int]) -> np.ndarray:
    """Read a 2-D field from ``file.h5[:dataset]``; ``shape`` is ``(ny, nx)``, y first.

    Returns float64 of that shape; a wrong shape (a transposed one included) is an
    InputError that says what was expected.
    """
    path, dataset = split_field_spec(spec)
    expected = tuple(int(s) for s in shape)
    with _open_h5(path) as f:
        ds = _numeric(f, dataset, 2)
        if ds.shape != expected:  # before reading: the shape may be huge
            hint = " (transposed? fields are stored y first)" if ds.shape == expected[::-1] else ""
            raise InputError(
                f"{path}: dataset '{dataset}' has shape {ds.shape}; expected "
                f"(ny, nx) = {expected}{hint}"
            )
        return _values(f, ds)


class OtherGrid(InputError):
    """A file's ``/truth`` is on another grid than the run's."""


def read_truth(
    path: str | os.PathLike[str], grid: tuple[np.ndarray, np.ndarray] | None = None
) -> np.ndarray | None:
    """The ``/truth`` field ``(ny, nx)`` of a problem or analysis file, or None.

    A truth that is not 2-D (real numbers of another number of dimensions), or, with
    ``grid`` (the run's ``x`` and ``y`` coordinates), a truth of another shape or a file
    whose ``/grid/{x,y}`` are other coordinates, is :class:`OtherGrid` saying which
    (checked before the field is read): the truth is optional, so the caller may go on
    without it."""
    with _open_h5(path) as f:
        if "truth" not in f:
            return None
        ds = f["truth"]
        if (
            isinstance(ds, h5py.Dataset)
            and ds.shape is not None
            and ds.dtype.kind in "iuf"
            and ds.ndim != 2
        ):
            want = "" if grid is None else f", the run's grid {(grid[1].size, grid[0].size)}"
            raise OtherGrid(f"{f.filename}: /truth has shape {ds.shape}, not 2-D (ny, nx){want}")
        ds = _numeric(f, "truth", 2)
        if grid is not None:
            _same_grid(f, ds.shape, grid)
        return _values(f, ds)


def _same_grid(f: h5py.File, shape: tuple[int, ...], grid: tuple[np.ndarray, np.ndarray]) -> None:
    ours = dict(zip("xy", grid, strict=True))
    want = (ours["y"].size, ours["x"].size)
    if tuple(shape) != want:
        raise OtherGrid(
            f"{f.filename}: /truth has (ny, nx) = {tuple(shape)}, the run's grid {want}"
        )
    for name in "xy":
        key = f"grid/{name}"
        if key not in f:
            continue
        ds = _numeric(f, key, 1)
        theirs = _values(f, ds) if ds.shape == ours[name].shape else None
        if theirs is None or not np.allclose(theirs, ours[name], rtol=1e-9, atol=1e-12):
            span = "" if theirs is None else f" [{theirs.min():g}, {theirs.max():g}]"
            raise OtherGrid(
                f"{f.filename}: /{key} has {ds.shape[0]} points{span}; the run's grid has "
                f"{ours[name].size} [{ours[name].min():g}, {ours[name].max():g}]"
            )


# --------------------------------------------------------------------------------------
# Writing


def check_writable(path: str | os.PathLike[str]) -> None:
    """Fail early (before hours of solving) if ``path`` cannot be written.

    Creates and removes a probe file in the target directory: that also catches
    read-only file systems and quotas, which permission bits do not show.
    """
    p = Path(path)
    parent = p.parent
    if p.is_dir():
        raise InputError(f"{p}: is a directory; give an output file name")
    if not parent.is_dir():
        raise InputError(f"{p}: output directory '{parent}' does not exist")
    # A name as long as atomic_output's temporary one (mkstemp adds 8 characters): that
    # must fit too.
    prefix = temporary_path(p).name[:-8]
    try:
        fd, probe = tempfile.mkstemp(prefix=prefix, dir=parent)
    except OSError as exc:
        raise InputError(f"{p}: output directory '{parent}' is not writable ({exc})") from None
    os.close(fd)
    os.unlink(probe)


def temporary_path(final: Path) -> Path:
    """Where :func:`atomic_output` writes ``final`` until it is complete."""
    return final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path ``.{name}.tmp-{host}-{pid}`` beside ``path``; on success
    rename it onto ``path`` (atomic within one file system), on any exception remove it.
    The host's name keeps apart two jobs on two nodes of a shared file system whose
    processes have the same number."""
    final = Path(path)
    tmp = temporary_path(final)
    try:
        yield tmp
        # Flush to disk before the rename, so a crash cannot leave a complete-looking
        # name over incomplete data.
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:  # SIGTERM/KeyboardInterrupt too: never leave the temporary
        tmp.unlink(missing_ok=True)
        raise


def nbytes(*arrays: Any) -> int:
    """The bytes of ``arrays`` (``None`` counts 0), for :func:`h5_output`."""
    return sum(0 if a is None else np.asarray(a).nbytes for a in arrays)


IN_MEMORY_LIMIT = 1 << 30
"""Files up to this size are built in memory and written by Python (:func:`h5_output`)."""


@contextlib.contextmanager
def h5_output(path: str | os.PathLike[str], nbytes: int) -> Iterator[h5py.File]:
    """An HDF5 file for writing that appears at ``path`` only when complete
    (:func:`atomic_output`); ``nbytes``: the size of the data the caller will write.

    A write that fails (a full disk, a quota, an I/O error) is an ``OSError`` naming
    ``path``, with nothing left behind.  HDF5 must not meet that failure itself: h5py
    then reports it from its clean-up, and the process later crashes in HDF5 when the
    file's objects are freed (a segmentation fault, with h5py 3.16 and HDF5 2.0).  So
    the space is checked first, and a file of up to :data:`IN_MEMORY_LIMIT` is built
    in memory and written by Python (twice its size in memory for a moment); a larger
    one is written by HDF5 directly, protected only by the check."""
    final = Path(path)
    need = int(nbytes * 1.02) + (1 << 18)  # the data, its metadata and a margin
    free = shutil.disk_usage(final.parent).free
    if free < need:
        raise OSError(
            errno.ENOSPC, f"needs about {need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free", path
        )
    with atomic_output(final) as tmp:
        if need > IN_MEMORY_LIMIT:
            with h5py.File(tmp, "w") as f:
                yield f
            return
        f = h5py.File(str(tmp), "w", driver="core", backing_store=False)
        try:
            yield f
            f.flush()
            image = f.id.get_file_image()
        finally:
            f.close()
        with open(tmp, "wb") as fh:
            fh.write(image)


def _json_ready(value: Any) -> Any:
    """``value`` with NaN and ±inf as None (JSON's null), NumPy scalars and arrays as
    Python numbers and lists, tuples as lists: what strict JSON can hold."""
    if isinstance(value, Mapping):
        return {k if isinstance(k, str) else str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


def to_json(value: Any) -> str:
    """Strict JSON text of ``value`` (RFC 8259: no bare ``NaN`` or ``Infinity``, which
    most JSON readers outside Python refuse): a non-finite number is ``null``."""
    return json.dumps(_json_ready(value), default=str, allow_nan=False)


def _attr_value(key: str, value: Any) -> Any:
    """Convert a value to something HDF5 and netCDF readers both understand.  A string
    loses any NUL characters: HDF5's strings end at one, and h5py refuses to write one
    inside a string (which would fail the whole file after the solve)."""
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, bool | np.bool_):
        return np.int8(value)  # netCDF has no boolean attribute type
    if isinstance(value, int | float | np.integer | np.floating):
        return value
    if isinstance(value, Mapping) or value is None:
        return to_json(value)
    arr = np.asarray(value)
    if arr.dtype.kind in "iuf" and arr.ndim <= 1:
        return arr
    if arr.dtype.kind == "b" and arr.ndim <= 1:
        return arr.astype(np.int8)
    try:
        return to_json(value)
    except (TypeError, ValueError):
        raise TypeError(f"attribute {key!r}: cannot store {type(value).__name__}") from None


def _field(name: str, value: Any, shape: tuple[int, int]) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}; expected (ny, nx) = {shape}")
    return arr


def _obs_arrays(observations: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Observation arrays as float64 1-D of one length; a scalar noise is broadcast."""
    missing = [k for k in OBS_KEYS if k not in observations]
    if missing:
        raise ValueError(f"observations lack {missing}; need {list(OBS_KEYS)}")
    n = np.asarray(observations["x"]).shape[0]
    out = {}
    for k, v in observations.items():
        arr = np.asarray(v)
        if k == "noise" and arr.ndim == 0:
            arr = np.full(n, float(arr))
        if arr.shape != (n,):
            raise ValueError(f"observations[{k!r}] has shape {arr.shape}; expected ({n},)")
        out[k] = arr.astype(np.float64) if arr.dtype.kind in "iufb" and k in OBS_KEYS else arr
    return out


def _dim(group: h5py.Group, name: str, data: np.ndarray, **attrs: Any) -> h5py.Dataset:
    ds = group.create_dataset(name, data=data)
    ds.make_scale(name)
    ds.attrs.update(attrs)
    return ds


def _attach(ds: h5py.Dataset, *scales: h5py.Dataset) -> None:
    for axis, scale in enumerate(scales):
        ds.dims[axis].attach_scale(scale)


_COORDS = {
    "x": {"axis": "X", "long_name": "x coordinate of the grid node", "units": "1"},
    "y": {"axis": "Y", "long_name": "y coordinate of the grid node", "units": "1"},
}
# The sphere (grid.domain: sphere): CF longitude and latitude.
_LONLAT_COORDS = {
    "x": {
        "axis": "X",
        "long_name": "longitude of the grid node",
        "standard_name": "longitude",
        "units": "degrees_east",
    },
    "y": {
        "axis": "Y",
        "long_name": "latitude of the grid node",
        "standard_name": "latitude",
        "units": "degrees_north",
    },
}
_FIELDS = {  # name -> (group, long_name); group "" is the root
    "mean": ("analysis", "posterior (analysis) mean"),
    "increment": ("analysis", "analysis increment (mean - background)"),
    "background": ("", "background field"),
    "truth": ("", "synthetic truth"),
}
_OBS_ATTRS = {
    "x": {"long_name": "observation x coordinate", "units": "1"},
    "y": {"long_name": "observation y coordinate", "units": "1"},
    "value": {"long_name": "observed value"},
    "noise": {"long_name": "observation error standard deviation"},
}
_LONLAT_OBS_ATTRS = {
    "x": {"long_name": "observation longitude", "units": "degrees_east"},
    "y": {"long_name": "observation latitude", "units": "degrees_north"},
}


def _coords(
    group: h5py.Group, xs: np.ndarray, ys: np.ndarray, coords: Mapping[str, Mapping[str, Any]]
) -> tuple[h5py.Dataset, ...]:
    """Coordinate variables (netCDF dimensions) ``y``, ``x`` of ``group``."""
    return _dim(group, "y", ys, **coords["y"]), _dim(group, "x", xs, **coords["x"])


def write_analysis(
    path: str | os.PathLike[str],
    *,
    mean: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    observations: Mapping[str, Any],
    background: np.ndarray,
    truth: np.ndarray | None = None,
    increment: np.ndarray | None = None,
    attrs: Mapping[str, Any],
    observation_attrs: Mapping[str, Mapping[str, Any]] | None = None,
    lonlat: bool = False,
) -> None:
    """Write the analysis file atomically, laid out as netCDF-4 with CF attributes.

    Layout: ``/analysis/mean`` and ``/analysis/increment`` (``mean - background`` when
    not given), ``/background``, ``/truth`` (when given), all ``(ny, nx)`` float64;
    ``/grid/x`` ``(nx,)``, ``/grid/y`` ``(ny,)``; ``/observations/{x,y,value,noise}``
    ``(n,)`` plus any further 1-D diagnostics of length n in ``observations`` (H f_b,
    QC flags, ...), with per-column attributes from ``observation_attrs`` (``long_name``,
    ``flag_values``, ...).  Root attributes from ``attrs``: strings, numbers, numeric
    1-D arrays; dicts and other values are stored as strict JSON strings (a NaN or an
    infinity inside them is ``null``: :func:`to_json`).

    netCDF view: the root and ``/analysis`` each have coordinate variables ``y``, ``x``
    (``axis``, ``long_name``, ``units``), so ``xarray.open_dataset(path,
    engine="h5netcdf")`` and ``..., group="analysis")`` both come with coordinates;
    ``/observations`` has the dimension ``obs`` and ``x``, ``y`` as auxiliary
    coordinates (CF ``coordinates`` attribute).

    ``lonlat``: ``x``, ``y`` are longitude and latitude in degrees (the sphere); the grid
    coordinates and the observations' ``x``, ``y`` then carry the CF units
    ``degrees_east`` and ``degrees_north`` (and ``standard_name`` on the grid) instead
    of the rectangle's dimensionless ``"1"``.
    """
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if xs.ndim != 1 or ys.ndim != 1:
        raise ValueError(f"x and y must be 1-D, got shapes {xs.shape} and {ys.shape}")
    shape = (ys.size, xs.size)
    fields = {
        "mean": _field("mean", mean, shape),
        "background": _field("background", background, shape),
    }
    fields["increment"] = (
        fields["mean"] - fields["background"]
        if increment is None
        else _field("increment", increment, shape)
    )
    if truth is not None:
        fields["truth"] = _field("truth", truth, shape)
    obs = _obs_arrays(observations)
    coords = _LONLAT_COORDS if lonlat else _COORDS
    col_attrs = {k: dict(_OBS_ATTRS.get(k, {})) for k in obs}
    for k, extra in (observation_attrs or {}).items():
        if k in col_attrs:
            col_attrs[k].update({a: _attr_value(a, v) for a, v in extra.items()})
    if lonlat:  # the coordinates' units are this function's to set, whatever the caller
        for k, extra in _LONLAT_OBS_ATTRS.items():
            col_attrs[k].update(extra)
    converted = {k: _attr_value(k, v) for k, v in attrs.items()}

    with h5_output(path, nbytes(xs, ys, *fields.values(), *obs.values())) as f:
        f.attrs["Conventions"] = "CF-1.8"
        f.attrs.update(converted)
        groups = {"": f, "analysis": f.create_group("analysis")}
        scales = {name: _coords(g, xs, ys, coords) for name, g in groups.items()}
        grid = f.create_group("grid")
        for name, data, scale in (("x", xs, scales[""][1]), ("y", ys, scales[""][0])):
            ds = grid.create_dataset(name, data=data)
            _attach(ds, scale)
            ds.attrs.update(coords[name])
        for key, data in fields.items():
            where, long_name = _FIELDS[key]
            ds = groups[where].create_dataset(key, data=data)
            _attach(ds, *scales[where])
            ds.attrs["long_name"] = long_name
        og = f.create_group("observations")
        dobs = _dim(
            og, "obs", np.arange(obs["x"].size, dtype=np.int64), long_name="observation index"
        )
        for key, data in obs.items():
            ds = og.create_dataset(key, data=data)
            _attach(ds, dobs)
            ds.attrs.update(col_attrs[key])
            if key not in ("x", "y"):
                ds.attrs["coordinates"] = "x y"


def write_problem(
    path: str | os.PathLike[str],
    *,
    truth: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    observations: Mapping[str, Any],
    background: np.ndarray,
    attrs: Mapping[str, Any] | None = None,
) -> None:
    """Write a synthetic problem atomically (``mpda simulate``).

    Observation datasets ``x, y, value, noise`` sit at the root, so the file is itself
    a valid observation file for :func:`read_observations`; also ``/truth`` and
    ``/background`` ``(ny, nx)``, ``/grid/x`` ``(nx,)``, ``/grid/y`` ``(ny,)``.
    """
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    shape = (ys.size, xs.size)
    fields = {
        "truth": _field("truth", truth, shape),
        "background": _field("background", background, shape),
    }
    obs = _obs_arrays(observations)
    converted = {k: _attr_value(k, v) for k, v in (attrs or {}).items()}
    with h5_output(path, nbytes(xs, ys, *fields.values(), *obs.values())) as f:
        f.attrs.update(converted)
        for key, data in obs.items():
            f.create_dataset(key, data=data)
        for key, data in fields.items():
            f.create_dataset(key, data=data)
        f.create_dataset("grid/x", data=xs)
        f.create_dataset("grid/y", data=ys)
