"""Typed configuration: dataclasses loaded from YAML, overridable from the command line, validated in one place.

Every component and stage declares a dataclass that derives from :class:`Config`. Its fields carry the defaults
(defined once, here in code) and, through :func:`param`, the help text and numeric bounds. Construction -- from
code, from YAML or from ``key.sub=value`` overrides -- goes through ``Config.__post_init__``, which coerces and
type-checks every field, checks bounds and ``Literal`` choices, then calls the class's own ``check()`` for rules
that relate several fields. Errors are :class:`ConfigError` and name the full dotted key.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import operator
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from .io import write_text_atomic

C = TypeVar("C", bound="Config")


class ConfigError(ValueError):
    """A configuration problem, with the dotted key it concerns."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"config key '{key}': {message}" if key else message)

    def under(self, prefix: str) -> "ConfigError":
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.message)


def param(default: Any = dataclasses.MISSING, *, help: str = "", ge: float | None = None, gt: float | None = None,
          le: float | None = None, lt: float | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with help text and numeric bounds that validation enforces."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise ConfigError naming ``key``. Only lossless coercions are made."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(key, f"got {value!r}; allowed values: {', '.join(repr(a) for a in allowed)}")
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ConfigError(key, f"must not be null (expected {_type_name(tp)})")
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"got {value!r}, expected {_type_name(tp)}")
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list ({_type_name(tp)}), got {type(value).__name__} {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(key, f"expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping, got {type(value).__name__}")
        return dict(value)
    if isinstance(tp, type) and issubclass(tp, Config):
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, f"expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, f"expected a string, got {type(value).__name__} {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(key, f"expected a path, got {type(value).__name__}")
    raise TypeError(f"unsupported config type {tp!r} for key {key!r}")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def _closest(name: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(sorted(candidates))}"


_BOUNDS = (("ge", ">=", operator.ge), ("gt", ">", operator.gt), ("le", "<=", operator.le), ("lt", "<", operator.lt))


class Config:
    """Base of every config dataclass. Subclasses are ``@dataclasses.dataclass`` and may override ``check``."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(getattr(self, f.name), hints[f.name], f.name)
            object.__setattr__(self, f.name, value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                for op, word, holds in _BOUNDS:
                    bound = f.metadata.get(op)
                    if bound is not None and not holds(value, bound):
                        raise ConfigError(f.name, f"must be {word} {bound}, got {value}")
        self.check()

    def check(self) -> None:
        """Rules between fields; raise ConfigError(key, message)."""

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def build(cls: type[C], data: Any, prefix: str = "") -> C:
    """Construct ``cls`` from a mapping; unknown keys are an error with the closest valid spelling."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(prefix, f"expected a mapping for {cls.__name__}, got {type(data).__name__} {data!r}")
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in data:
        if key not in names:
            raise ConfigError(f"{prefix}.{key}" if prefix else str(key), "unknown key" + _closest(str(key), names))
    try:
        return cls(**data)
    except ConfigError as err:
        raise err.under(prefix) if prefix else err


def to_dict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Path):
        return str(cfg)
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _set_dotted(tree: dict, cls: type, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, checking each part against the dataclass schema."""
    parts = dotted.split(".")
    node, node_cls, path = tree, cls, []
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node_cls)]
        path.append(part)
        if part not in names:
            raise ConfigError(".".join(path), "unknown key" + _closest(part, names))
        if i == len(parts) - 1:
            node[part] = value
            return
        sub = _hints(node_cls)[part]
        if not (isinstance(sub, type) and issubclass(sub, Config)):
            raise ConfigError(".".join(path), f"is a {_type_name(sub)}, it has no sub-keys")
        node = node.setdefault(part, {})
        node_cls = sub


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` -> (key.sub, value); the value is read as YAML (numbers, booleans, lists, null)."""
    if "=" not in text:
        raise ConfigError(text, "an override must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> C:
    """Defaults from ``cls``, then the YAML file at ``path``, then ``key.sub=value`` overrides."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError("", f"{path}: not valid YAML: {err}") from err
        if not isinstance(tree, dict):
            raise ConfigError("", f"{path}: the top level must be a mapping")
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, cls, key, value)
    try:
        return build(cls, tree)
    except ConfigError as err:
        if path is not None:
            raise ConfigError(err.key, f"{err.message} (in {path} or the command-line overrides)") from None
        raise


def save_config(cfg: Config, path: str | Path) -> None:
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Flatten the schema for ``--help``: (dotted key, type, default, help)."""
    rows = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if isinstance(tp, type) and issubclass(tp, Config):
            rows.extend(describe(tp, key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        rows.append((key, _type_name(tp), to_dict(default), f.metadata.get("help", "")))
    return rows


__all__ = ["Config", "ConfigError", "param", "build", "load_config", "save_config", "to_dict", "describe",
           "parse_override"]
