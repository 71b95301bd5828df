"""Strict TOML configuration: every key known, every value of its declared type.

An operator's typo must not silently fall back to a default, so an unknown or
mistyped key is an error that names the key and the file.
"""

from __future__ import annotations

import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import attrs

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names file and key."""


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"{p}: file not found") from exc
    except OSError as exc:  # a directory, no permission...
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from exc


def load_config(cls: type[T], path: str | Path) -> T:
    """Read `path` into the attrs class `cls`, strictly."""
    return structure(cls, load_toml(path), file=str(path))


def structure(cls: type[T], data: Any, *, file: str, where: str = "") -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: {where or 'top level'} must be a table")
    attrs.resolve_types(cls)  # type: ignore[type-var]
    fields = {f.name: f for f in attrs.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(
            f"{file}: unknown key {_join(where, unknown[0])!r} (known keys here: {known})"
        )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(where, name)
        if name in data:
            kwargs[name] = _convert(f.type, data[name], file=file, key=key)
        elif f.default is attrs.NOTHING:
            raise ConfigError(f"{file}: missing required key {key!r}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{file}: {where or 'top level'}: {exc}") from exc


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _convert(tp: Any, value: Any, *, file: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, file=file, key=key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{file}: bad value for {key!r}")
    if origin is typing.Literal:
        if value not in args:
            allowed = " | ".join(repr(a) for a in args)
            raise ConfigError(f"{file}: key {key!r} must be one of {allowed}, not {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{file}: key {key!r} must be an array, not {_tname(value)}")
        item_t = args[0]
        return tuple(_convert(item_t, v, file=file, key=f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{file}: key {key!r} must be a table, not {_tname(value)}")
        return {k: _convert(args[1], v, file=file, key=f"{key}.{k}") for k, v in value.items()}
    if attrs.has(tp):
        return structure(tp, value, file=file, where=key)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    else:
        raise ConfigError(f"{file}: key {key!r} has an unsupported type {tp!r}")
    raise ConfigError(
        f"{file}: key {key!r} must be {getattr(tp, '__name__', tp)}, not {_tname(value)} "
        f"({value!r})"
    )


def _tname(value: Any) -> str:
    names: dict[type, str] = {dict: "table", list: "array"}
    return names.get(type(value), type(value).__name__)
