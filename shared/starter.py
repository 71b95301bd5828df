"""Starter config files (`cortex init`, `neuron init`): values by tomli-w, comments around.

The values chosen for this machine are written as TOML by tomli-w; every other
key of the config class follows, commented out at its default, so the file
shows the whole surface and loads unchanged with the strict loader.
"""

from __future__ import annotations

import os
import shutil
import socket
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import tomli_w


@attrs.frozen
class Key:
    """One TOML key of a config class: dotted name, and its default (None: no default)."""

    name: str
    default: Any
    # A table ([runner]) or an array of tables ([[neurons]]), not a scalar.
    table: bool = False
    array: bool = False


def config_keys(cls: type, prefix: str = "") -> Iterator[Key]:
    """Every key a TOML file may set for `cls`, nested tables as `table.key`, in order."""
    attrs.resolve_types(cls)
    for f in attrs.fields(cls):
        if not f.metadata.get("toml", True):
            continue
        name = prefix + f.name
        default = f.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        elif default is attrs.NOTHING:
            default = None
        args = typing.get_args(f.type)
        if isinstance(f.type, type) and attrs.has(f.type):
            yield Key(name, None, table=True)
            yield from config_keys(f.type, name + ".")
        elif args and isinstance(args[0], type) and attrs.has(args[0]):
            yield Key(name, None, array=True)
            yield from config_keys(args[0], name + ".")
        else:
            yield Key(name, default)


def _toml(name: str, value: Any) -> str:
    return tomli_w.dumps({name: list(value) if isinstance(value, tuple) else value}).strip()


def _commented(text: str) -> str:
    return "\n".join("# " + line if line else "#" for line in text.splitlines())


def render(
    cls: type,
    values: Mapping[str, Any],
    *,
    header: str,
    notes: Mapping[str, str] | None = None,
    tables: Mapping[str, str] | None = None,
) -> str:
    """The file: `header`, then every key of `cls` (set from `values`, else commented).

    `values` uses dotted names for nested tables ("admission.max_in_flight") and
    a list of dicts for an array of tables; `notes` puts a comment line above a
    key; `tables` gives a commented example for an array of tables left unset.
    """
    notes = notes or {}
    tables = tables or {}
    top: list[str] = [_commented(header), ""]
    sections: dict[str, list[str]] = {}
    arrays: list[str] = []
    keys = list(config_keys(cls))
    array_names = {k.name for k in keys if k.array}
    for k in keys:
        owner, _, leaf = k.name.rpartition(".")
        if k.array:
            note = [_commented(notes[k.name])] if k.name in notes else []
            if values.get(k.name):
                body = "\n\n".join(
                    f"[[{k.name}]]\n" + tomli_w.dumps(item).strip() for item in values[k.name]
                )
            else:
                body = _commented(tables.get(k.name, f"[[{k.name}]]"))
            arrays.append("\n".join([*note, body]))
            continue
        if owner in array_names:
            continue  # an array's fields: shown by its example
        if k.table:
            sections[k.name] = [f"[{k.name}]"]
            continue
        out = sections[owner] if owner else top
        if k.name in notes:
            out.append(_commented(notes[k.name]))
        if k.name in values:
            out.append(_toml(leaf, values[k.name]))
        elif k.default is None:
            out.append(f"# {leaf} = ...  (unset by default)")
        else:
            out.append(_commented(_toml(leaf, k.default)))
    parts = ["\n".join(top)]
    parts += ["\n".join(s) for s in sections.values()]
    parts += arrays
    return "\n\n".join(parts) + "\n"


# -- this machine ------------------------------------------------------------------------


def memory_total_bytes() -> int | None:
    """Physical memory (Linux and macOS both have these sysconf names)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def disk_usage(path: Path) -> tuple[int, int] | None:
    """(total, free) bytes of the file system `path` is, or would be, on."""
    p = path.expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return None
    return usage.total, usage.free


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port_from(host: str, port: int, tries: int = 50) -> int:
    """`port` if nothing listens there, else the next free one above it."""
    for p in range(port, min(port + tries, 65536)):
        if port_free(host, p):
            return p
    return port


def short_hostname() -> str:
    return socket.gethostname().split(".")[0] or "node"


def write_new(path: Path, text: str, *, force: bool) -> None:
    """Write `text` to `path`; an existing file only with `force` (FileExistsError)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w" if force else "x") as f:
        f.write(text)
