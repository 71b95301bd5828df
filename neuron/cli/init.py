"""`neuron init` writes a starter neuron.toml for this machine; `neuron check` reads one.

The starter sets what depends on the machine (a free port, the node's name,
the disk budget of the store, concurrency for its memory) and lists every
other key commented out at its default; `neuron check` and `neuron serve`
accept it unchanged.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from neuron.config import NeuronConfig
from shared.config import ConfigError
from shared.starter import (
    disk_usage,
    free_port_from,
    memory_total_bytes,
    render,
    short_hostname,
    write_new,
)

GIB = 1024**3
GB = 10**9
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

INIT_HELP = """\
Write a starter neuron.toml for this machine: a free port (9410 unless taken),
this host's name as node_name, the staging budget and free-space floor scaled
to the disk under store_dir, runner and admission concurrency for its memory.
Every other key is listed commented out at its default. An existing file is
left alone unless --force.

example:
  neuron init -o /etc/cortex-neuron/neuron.toml && neuron check -c /etc/cortex-neuron/neuron.toml"""


def add_parsers(sub: Any) -> None:
    init = sub.add_parser(
        "init",
        help="write a commented starter neuron.toml for this machine",
        description=INIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    init.add_argument(
        "-o", "--output", type=Path, default=Path("neuron.toml"), help="default: ./neuron.toml"
    )
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.add_argument("--store-dir", default="~/.neuron", help="model store (default ~/.neuron)")
    init.set_defaults(func=lambda a: init_main(a))

    check = sub.add_parser(
        "check",
        help="validate neuron.toml, then exit",
        description="Load neuron.toml strictly (as `neuron serve` does) and print a summary.",
    )
    check.add_argument("-c", "--config", type=Path, required=True, help="path to neuron.toml")
    check.set_defaults(func=lambda a: check_main(a))


def starter_values(store_dir: str) -> tuple[dict[str, Any], dict[str, str]]:
    """What to set for this machine, and a comment per value saying why."""
    values: dict[str, Any] = {}
    notes: dict[str, str] = {}
    port = free_port_from("127.0.0.1", 9410)
    values["host"] = "127.0.0.1"
    notes["host"] = "Loopback only; to serve a LAN bind its address and set a fleet token."
    values["port"] = port
    if port != 9410:
        notes["port"] = "9410 (the default) was taken on this machine when this file was written."
    values["store_dir"] = store_dir
    values["node_name"] = short_hostname()
    disk = disk_usage(Path(store_dir))
    if disk is not None:
        total, free = disk
        keep = round(min(40.0, 0.25 * free / GB), 1)
        floor = round(min(5.0, 0.05 * total / GB), 1)
        values["staging_keep_recent_gb"] = keep
        values["min_free_gb"] = floor
        notes["staging_keep_recent_gb"] = (
            f"This disk: {total / GB:.0f} GB, {free / GB:.0f} GB free: a quarter of it, at most 40."
        )
        notes["min_free_gb"] = "5 % of the disk, at most 5 GB."
    memory = memory_total_bytes()
    if memory is not None:
        # Fewer sequences at once on a small machine: each holds its own KV cache.
        small = memory < 16 * GIB
        values["runner.decode_concurrency"] = 4 if small else 8
        values["admission.max_in_flight"] = 4 if small else 8
        notes["runner.decode_concurrency"] = (
            f"This machine: {memory / GIB:.0f} GiB memory ({'under' if small else 'at least'} 16)."
        )
    return values, notes


def render_starter(store_dir: str) -> str:
    values, notes = starter_values(store_dir)
    header = (
        "neuron.toml: written by `neuron init` for this machine; see the README's\n"
        "configuration reference for every key. Keys commented out show their default.\n"
        "Check it with `neuron check -c neuron.toml`; run with `neuron serve -c neuron.toml`."
    )
    tables = {
        "load": "[[load]]            # a model loaded at start\n"
        'model_id = "demo"\nsource = "models/demo"'
    }
    return render(NeuronConfig, values, header=header, notes=notes, tables=tables)


def init_main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    text = render_starter(args.store_dir)
    try:
        write_new(args.output, text, force=args.force)
    except FileExistsError:
        print(f"neuron init: {args.output} exists; --force to overwrite it", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"neuron init: cannot write {args.output}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {args.output}; next: neuron check -c {args.output}", file=out)
    return EXIT_OK


def check_main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        config = NeuronConfig.from_file(args.config)
    except (ConfigError, ValueError) as exc:
        print(f"neuron: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"config ok: {args.config}", file=out)
    print(f"  listen     {config.host}:{config.port}", file=out)
    print(f"  store      {config.store_path}", file=out)
    print(f"  node       {config.node_name or '(hostname)'}", file=out)
    print(f"  fleet      {'token set' if config.fleet_token else 'no fleet token'}", file=out)
    for e in config.load:
        print(f"  load       {e.model_id} from {e.source}", file=out)
    return EXIT_OK
