"""Strict TOML configuration: every key known, every value of its declared type.

An operator's typo must not silently fall back to a default, so an unknown or
mistyped key is an error that names the key and the file.
"""

from __future__ import annotations

import os
import tomllib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import attrs

T = TypeVar("T")

# attrs metadata of a field no TOML file may set (a secret resolved from its source).
NOT_IN_TOML = {"toml": False}
MIN_TOKEN_CHARS = 16


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names file and key."""


@attrs.frozen
class ServerConfig:
    """The settings cortex and neuron share: how each listens, drains, and journals.

    Each service redeclares `port`, `max_body_bytes` and `idle_read_timeout_s` with
    its own default; subclasses call `check_server` first in their own check.
    """

    host: str = "127.0.0.1"
    port: int = 0
    max_body_bytes: int = 8 * 1024 * 1024
    # The longest an upstream may stay silent once its answer has begun.
    idle_read_timeout_s: float = 5.0
    # On SIGTERM: requests in flight may finish for this long, then streams still
    # running end with an error frame. Service managers must wait longer than this.
    drain_s: float = 30.0
    # aiohttp's line per request (off: it costs more than handling a small request).
    access_log: bool = False
    # Log lines as text (to stderr), or "json": one object per line on stdout, with
    # ts, level, logger, message, service, and the request id, model and node where
    # known (shared.logjson). Read at start; a reload does not change it.
    log_format: Literal["text", "json"] = "text"
    # What one client may cost before a handler runs (shared.serve): a request's headers
    # must arrive within header_timeout_s of its first byte (a new connection's, of its
    # opening), its body within body_timeout_s (else 408, the connection closed); one
    # address may hold max_connections_per_address connections (more get 429
    # too_many_connections and are closed; 0: no cap).
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections_per_address: int = 1024
    # The fleet token cortex and every neuron share: from this environment variable
    # if set, else from this file. On a neuron, every endpoint but /health and
    # /metrics needs it once set.
    fleet_token_env: str | None = None
    fleet_token_file: str | None = None
    # The token itself, resolved by from_file; never read from TOML, never in repr.
    fleet_token: str | None = attrs.field(default=None, repr=False, metadata=NOT_IN_TOML)
    # Traces and the event log (shared.journal): JSONL files in journal_dir beside the
    # rings (None: memory only), rotated past journal_max_mb keeping journal_keep of
    # them; below journal_min_free_mb free they only count the lines they drop.
    journal_dir: str | None = None
    journal_max_mb: float = 16.0
    journal_keep: int = 4
    journal_min_free_mb: float = 512.0
    journal_events_kept: int = 2000
    journal_traces_kept: int = 1000

    def check_server(self) -> None:
        """ValueError naming the first shared setting out of range."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} outside 0..65535")
        if self.idle_read_timeout_s <= 0:
            raise ValueError("idle_read_timeout_s must be > 0")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be >= 1024")
        if self.drain_s < 0:
            raise ValueError("drain_s must be >= 0")
        if self.header_timeout_s <= 0 or self.body_timeout_s <= 0:
            raise ValueError("header_timeout_s and body_timeout_s must be > 0")
        if self.max_connections_per_address < 0:
            raise ValueError("max_connections_per_address must be >= 0 (0: no cap)")
        if self.fleet_token is not None:
            check_token(self.fleet_token)
        if self.journal_max_mb <= 0 or self.journal_keep < 1 or self.journal_min_free_mb < 0:
            raise ValueError("journal_max_mb must be > 0, journal_keep >= 1, min_free_mb >= 0")
        if self.journal_events_kept < 1 or self.journal_traces_kept < 1:
            raise ValueError("journal_events_kept and journal_traces_kept must be >= 1")


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
        return _convert_union(args, value, file=file, key=key)
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
    return _convert_scalar(tp, value, file=file, key=key)


def _convert_union(args: tuple[Any, ...], value: Any, *, file: str, key: str) -> Any:
    """The first member type `value` converts to; else the first member's error."""
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


# A TOML value a scalar type takes as it is (float also takes an int); bool is no number.
_SCALARS: dict[Any, Callable[[Any], bool]] = {
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    bool: lambda v: isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    Any: lambda v: True,
}


def _convert_scalar(tp: Any, value: Any, *, file: str, key: str) -> Any:
    fits = _SCALARS.get(tp)
    if fits is None:
        raise ConfigError(f"{file}: key {key!r} has an unsupported type {tp!r}")
    if fits(value):
        return float(value) if tp is float else value
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
