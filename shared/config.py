"""Strict TOML configuration: every key known, every value of its declared type.

An operator's typo must not silently fall back to a default, so an unknown or
mistyped key is an error that names the key and the file.
"""

from __future__ import annotations

import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import attrs

T = TypeVar("T")

# attrs metadata of a field no TOML file may set (a secret resolved from its source).
NOT_IN_TOML = {"toml": False}
MIN_TOKEN_CHARS = 16


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
    fields = {
        f.name: f
        for f in attrs.fields(cls)  # type: ignore[arg-type]
        if f.metadata.get("toml", True)
    }
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


def check_token(token: str, what: str = "fleet token") -> None:
    """ValueError unless `token` is long enough and fits an Authorization header."""
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the {what} must be at least {MIN_TOKEN_CHARS} characters")
    if not all("!" <= c <= "~" for c in token):
        raise ValueError(f"the {what} must be printable ASCII without spaces")


def read_token(
    *, file: str | None, env: str | None, base: Path, config: str, what: str = "fleet_token"
) -> str | None:
    """A secret from the environment variable `env` if it is set, else from `file`.

    None when neither is configured. A configured source that yields nothing is an
    error, never an open service. The message names the source, never the secret.
    """
    source = ""
    token: str | None = None
    if env is not None and os.environ.get(env):
        source, token = f"environment variable {env}", os.environ[env].strip()
    elif file is not None:
        path = Path(file).expanduser()
        path = path if path.is_absolute() else base / path
        source = f"file {path}"
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{config}: {what}_file: cannot read {path}: {exc}") from exc
    elif env is not None:
        raise ConfigError(
            f"{config}: {what}_env names {env}, which is not set (and no {what}_file is given)"
        )
    if token is None:
        return None
    try:
        check_token(token, what.replace("_", " "))
    except ValueError as exc:
        raise ConfigError(f"{config}: {exc} (read from the {source})") from exc
    return token
