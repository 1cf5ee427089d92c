"""Generic validation of frozen config dataclasses (private; used by ``config``).

A section is a frozen, slotted dataclass deriving from :class:`Section`.  Its fields'
type hints say what is accepted (``int``, ``float``, ``bool``, ``str``, ``Literal``
choices, ``X | None``, fixed-length tuples, nested sections) and ``opt(..., ge=, gt=,
le=, lt=, nonzero=)`` adds numeric bounds in the field metadata.  ``__post_init__``
coerces (int -> float, list -> tuple, mapping -> section) and checks every field, so a
section built in Python obeys the same rules as one read from YAML.  Errors are
:class:`ConfigError` carrying the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range.

    ``key`` is the dotted key concerned (``"solver.dtype"``), or None when the problem
    is with the file as a whole.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class _Mismatch(ConfigError):
    """The value is not of the expected type or choice; another member of a union may
    still accept it (a value of the right type but out of range is a plain ConfigError)."""


def opt(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, **bounds):
    """A dataclass field whose numeric ``bounds`` (ge, gt, le, lt, nonzero) are checked."""
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=bounds)
    return dataclasses.field(default=default, metadata=bounds)


# Dotted place of each section class in the root config ("solver.multigrid"), filled by
# register_sections(); a class not registered is named by its class name.
SECTION_PATH: dict[type, str] = {}
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def register_sections(cls: type, prefix: str = "") -> None:
    """Record the dotted path of ``cls`` and of every section below it."""
    SECTION_PATH[cls] = prefix
    for name, tp in _hints(cls).items():
        for member in get_args(tp) or (tp,):  # `Section | None` counts too
            if dataclasses.is_dataclass(member):
                register_sections(member, f"{prefix}.{name}" if prefix else name)


def validate(obj: Any) -> None:
    """Coerce and check every field of a section instance, in place."""
    cls = type(obj)
    prefix = SECTION_PATH.get(cls, cls.__name__)
    hints = _hints(cls)
    for f in dataclasses.fields(obj):
        key = f"{prefix}.{f.name}" if prefix else f.name
        value = coerce(getattr(obj, f.name), hints[f.name], key)
        _check_bounds(value, f.metadata, key)
        # Frozen dataclass: normalised values (int -> float, list -> tuple) are stored
        # once here, before anyone can observe the instance.
        object.__setattr__(obj, f.name, value)


class Section:
    """Base of config sections: validates on construction."""

    __slots__ = ()

    def __post_init__(self) -> None:
        validate(self)


# --------------------------------------------------------------------------------------
# Generic coercion and checks


def show(value: Any) -> str:
    """A value as the user wrote it in YAML (true, null), strings quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, tuple):
        value = list(value)
    return repr(value)


def _describe(tp: Any) -> str:
    """What a type hint accepts, in words."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin is tuple:
        args = get_args(tp)
        return f"a list of {len(args)} {_describe(args[0]).split(' ', 1)[1]}s"
    if dataclasses.is_dataclass(tp):
        keys = ", ".join(f.name for f in dataclasses.fields(tp))
        return f"a mapping with keys: {keys}"
    return {
        bool: "a boolean (true or false)",
        int: "an integer",
        float: "a number",
        str: "a string",
        type(None): "null",
    }[tp]


def type_name(value: Any) -> str:
    """The YAML-ish name of a value's type, for error messages."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, Mapping):
        return "mapping"
    if isinstance(value, list | tuple):
        return "list"
    if value is None:
        return "null"
    return {int: "integer", float: "number", str: "string"}.get(type(value), type(value).__name__)


def _wrong_type(key: str, value: Any, tp: Any) -> ConfigError:
    note = "; true/false is not a number" if isinstance(value, bool) else ""
    return _Mismatch(
        f"{key} = {show(value)} has the wrong type ({type_name(value)}{note}); "
        f"expected {_describe(tp)}",
        key=key,
    )


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to the type hint ``tp`` or raise ConfigError.

    Accepted conversions only: int -> float, list -> tuple, mapping -> section.  bool is
    never an int or a float (``nx: true`` is a mistake, not 1).
    """
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except _Mismatch:
                # A mapping meant for a section: its own, more precise error wins.
                if dataclasses.is_dataclass(arg) and isinstance(value, Mapping):
                    raise
        if any(get_origin(a) is Literal for a in args) and isinstance(value, str):
            return _raise_choice(key, value, tp)
        raise _wrong_type(key, value, tp)
    if origin is Literal:
        if isinstance(value, str) and value in get_args(tp):
            return value
        return _raise_choice(key, value, tp)
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise _wrong_type(key, value, tp)
        try:
            return tuple(coerce(v, a, key) for v, a in zip(value, args, strict=True))
        except _Mismatch:
            raise _wrong_type(key, value, tp) from None
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise _wrong_type(key, value, tp)
        check_known_keys(value, tp, key)
        return tp(**value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key} = {show(value)} must be a finite number", key=key)
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            if not value.strip():
                raise ConfigError(f"{key} = {show(value)} must not be empty", key=key)
            return value
    else:  # pragma: no cover - a field type this module does not know yet
        raise TypeError(f"config field {key}: unsupported type hint {tp!r}")
    raise _wrong_type(key, value, tp)


def _raise_choice(key: str, value: Any, tp: Any) -> Any:
    choices = _flatten_literals(tp)
    extra = [_describe(a) for a in get_args(tp) if get_origin(a) not in (Literal, None)]
    allowed = ", ".join(choices) + "".join(f", or {e}" for e in extra)
    raise _Mismatch(f"{key} = {show(value)} is not allowed; choose one of: {allowed}", key=key)


def _flatten_literals(tp: Any) -> list[str]:
    if get_origin(tp) is Literal:
        return [str(a) for a in get_args(tp)]
    return [s for a in get_args(tp) for s in _flatten_literals(a)]


def check_known_keys(raw: Mapping, cls: type, key: str) -> None:
    """Reject keys that are not fields of ``cls``, suggesting the closest field name."""
    names = [f.name for f in dataclasses.fields(cls)]
    for k in raw:
        if k in names:
            continue
        dotted = f"{key}.{k}" if key else str(k)
        msg = f"{dotted} = {show(raw[k])} is not a known key"
        close = difflib.get_close_matches(str(k), names, n=1, cutoff=0.6)
        if close:
            msg += f"; did you mean '{key + '.' if key else ''}{close[0]}'?"
        where = f"in '{key}'" if key else "at the top level"
        raise ConfigError(f"{msg} (allowed {where}: {', '.join(names)})", key=dotted)


_BOUND_OPS = {
    "ge": (">=", lambda v, b: v >= b),
    "gt": (">", lambda v, b: v > b),
    "le": ("<=", lambda v, b: v <= b),
    "lt": ("<", lambda v, b: v < b),
}


def _check_bounds(value: Any, bounds: Mapping[str, Any], key: str) -> None:
    """Check numeric bounds; tuples element-wise, strings and None are left alone."""
    if not bounds or value is None or isinstance(value, str | bool):
        return
    items = value if isinstance(value, tuple) else (value,)
    for v in items:
        if not isinstance(v, int | float):
            continue
        ok = all(op(v, bounds[name]) for name, (_, op) in _BOUND_OPS.items() if name in bounds)
        if bounds.get("nonzero") and v == 0:
            ok = False
        if not ok:
            rules = [
                f"{sym} {bounds[name]}" for name, (sym, _) in _BOUND_OPS.items() if name in bounds
            ]
            if bounds.get("nonzero"):
                rules.append("!= 0")
            each = "each value " if isinstance(value, tuple) else ""
            raise ConfigError(
                f"{key} = {show(value)} is out of range; {each}must be {' and '.join(rules)}",
                key=key,
            )


# --------------------------------------------------------------------------------------
# YAML reading and writing


_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
# Plain scalars that are numbers, by the YAML 1.2 core schema (spec 1.2.2, section
# 10.3.2).  PyYAML follows YAML 1.1, where `065` is octal (53), `1:05` sexagesimal (65),
# `1_000` is 1000, and `1e-5` and `.5e3` are strings; here `065` is 65, `0o17` octal and
# `0x1F` hex, and `1e-5`, `.5e3` are floats.  A plain `1:05` or `1_000` stays a string,
# which the type check then refuses, naming the key (`065` read as 53 went unnoticed).
_INT_RE = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT_RE = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_NUMBER_START = list("-+0123456789.")


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads numbers by the YAML 1.2 core schema (:data:`_INT_RE`,
    :data:`_FLOAT_RE`) and rejects duplicate keys instead of silently keeping the last
    one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                k = self.construct_object(key_node, deep=True)
                if k in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {k!r}",
                        key_node.start_mark,
                    )
                seen.add(k)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        """An integer of :data:`_INT_RE` (PyYAML's own reads `065` as octal)."""
        text = str(self.construct_scalar(node))
        problem = "expected decimal digits, 0o and octal digits, or 0x and hex digits"
        if _INT_RE.match(text):
            try:
                if text.startswith(("0o", "0x")):
                    return int(text[2:], 8 if text[1] == "o" else 16)
                return int(text, 10)
            except ValueError:  # Python's limit on the digits of an int (4300)
                problem = "too many digits"
        raise yaml.constructor.ConstructorError(
            None, None, f"invalid integer {text[:40]!r}: {problem}", node.start_mark
        )


_Loader.add_constructor(_INT, _Loader.construct_yaml_int)
# Replace YAML 1.1's number resolvers (a class-level table shared with SafeLoader, so
# copied) by YAML 1.2's; the integer pattern is tried first, as `1` matches both.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_INT, _INT_RE, _NUMBER_START[:-1])
_Loader.add_implicit_resolver(_FLOAT, _FLOAT_RE, _NUMBER_START)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings :class:`_Loader` would read as a number
    (``'0o17'``, ``'.5'``), so that a dumped config reads back unchanged, by
    :func:`parse_yaml` and by a YAML 1.1 reader alike (it keeps SafeDumper's rules)."""


_Dumper.add_implicit_resolver(_INT, _INT_RE, _NUMBER_START[:-1])
_Dumper.add_implicit_resolver(_FLOAT, _FLOAT_RE, _NUMBER_START)


def dump_yaml(data: Any) -> str:
    """YAML text of plain ``data`` (block style, keys in order) that :func:`parse_yaml`
    reads back unchanged."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, default_flow_style=False)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text; errors become ConfigError naming ``source``, line and column."""
    try:
        return yaml.load(text, Loader=_Loader)  # _Loader derives from SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}: invalid YAML{where}: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None
