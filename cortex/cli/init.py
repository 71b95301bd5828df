"""`cortex init`: write a starter cortex.toml (and an empty catalogue) for this machine.

The starter sets where cortex listens (9400 unless taken) and the neurons it
manages (by default the one on this machine), and lists every other key
commented out at its default; `cortex check` and `cortex serve` accept it
unchanged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from cortex.config import CortexConfig
from shared.starter import free_port_from, render, short_hostname, write_new

EXIT_OK, EXIT_USAGE = 0, 2

HELP = """\
Write a starter cortex.toml: listen on 127.0.0.1:9400 (the next free port if
9400 is taken), manage the neurons given with --neuron NAME=URL (default: this
machine's, http://127.0.0.1:9410), and a catalogue file next to it; when that
does not exist yet, an empty one with an example entry is written too. Every
other key is listed commented out at its default. An existing cortex.toml is
left alone unless --force.

example:
  cortex init -o cortex.toml --neuron studio-1=http://10.0.0.11:9410 --neuron studio-2=http://10.0.0.12:9410
  cortex check -c cortex.toml"""

CATALOGUE = """\
# The cortex catalogue: every model the fleet may serve (written by `cortex init`,
# empty: add [[models]] entries). The shipped models.toml documents every key.
#
# [[models]]
# id = "qwen2.5-7b"
# source = "mlx-community/Qwen2.5-7B-Instruct-4bit"   # a hub id, or a local directory
# memory_gb = 4.3
# keep_loaded = true

models = []
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "init",
        help="write a commented starter cortex.toml for this machine",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-o", "--output", type=Path, default=Path("cortex.toml"), help="default: ./cortex.toml"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing cortex.toml")
    p.add_argument(
        "--neuron",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="a neuron to manage (repeatable; default: this machine's on port 9410)",
    )
    p.set_defaults(func=main)


def _neurons(specs: list[str]) -> list[dict[str, str]]:
    if not specs:
        return [{"name": short_hostname(), "url": "http://127.0.0.1:9410"}]
    out = []
    for spec in specs:
        name, sep, url = spec.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise ValueError(f"--neuron {spec!r}: expected NAME=http://HOST:PORT")
        out.append({"name": name, "url": url})
    return out


def render_starter(neurons: list[dict[str, str]]) -> str:
    port = free_port_from("127.0.0.1", 9400)
    notes = {
        "host": "Loopback only; 0.0.0.0 (with [[api_keys]]) to serve other machines.",
        "neurons": "The neurons cortex polls and routes to, one table each.",
    }
    if port != 9400:
        notes["port"] = "9400 (the default) was taken on this machine when this file was written."
    values = {"host": "127.0.0.1", "port": port, "catalogue": "models.toml", "neurons": neurons}
    header = (
        "cortex.toml: written by `cortex init`; see the README's configuration\n"
        "reference for every key. Keys commented out show their default.\n"
        "Check it with `cortex check -c cortex.toml`; run with `cortex serve -c cortex.toml`."
    )
    tables = {
        "api_keys": "[[api_keys]]        # once one is listed, every client needs a key\n"
        'key = "sk-at-least-8-characters"\nmodels = ["*"]\nname = "team-a"'
    }
    return render(CortexConfig, values, header=header, notes=notes, tables=tables)


def main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        text = render_starter(_neurons(args.neuron))
    except ValueError as exc:
        print(f"cortex init: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        write_new(args.output, text, force=args.force)
    except FileExistsError:
        print(f"cortex init: {args.output} exists; --force to overwrite it", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"cortex init: cannot write {args.output}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {args.output}", file=out)
    catalogue = args.output.parent / "models.toml"
    if not catalogue.exists():
        write_new(catalogue, CATALOGUE, force=False)
        print(f"wrote {catalogue} (empty: add [[models]])", file=out)
    print(f"next: cortex check -c {args.output}", file=out)
    return EXIT_OK
