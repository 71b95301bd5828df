"""`neuron discover`: what this node would report to cortex, read locally (no server)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from neuron.config import NeuronConfig
from shared.config import ConfigError

HELP = """\
Run discovery on this machine, as a neuron started with this config would
(GET /discovery), and print it: identity, OS, chip, memory, MLX and its
device, mlx-lm and Python versions, distributed backends, RDMA ports (from
ibv_devinfo) and the disk under the model store. No neuron needs to run.

exit status: 0 ok, 1 MLX is not importable (this node could run no model),
             2 usage or config error

example:
  neuron discover -c /etc/cortex-neuron/neuron.toml --json"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "discover",
        help="what this node would report to cortex (runs discovery locally)",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--config", type=Path, help="neuron.toml (its store_dir and ring_host)")
    p.add_argument("--json", action="store_true", help="the /discovery JSON, as cortex sees it")
    p.set_defaults(func=main)


def main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from neuron.discovery import discover

    try:
        config = NeuronConfig.from_file(args.config) if args.config else NeuronConfig()
    except ConfigError as exc:
        print(f"neuron discover: {exc}", file=sys.stderr)
        return 2
    d = discover(config.store_path, config.ring_host)
    body = d.to_json()
    body["node_name"] = config.node_name or d.hostname
    body["min_free_bytes"] = int(config.min_free_gb * 1e9)
    body["jaccl_reload_budget"] = config.jaccl_reload_budget
    if args.json:
        print(json.dumps(body, indent=2, sort_keys=True), file=out)
    else:
        print(render(body), file=out)
    return 0 if d.mlx_version else 1


def render(b: dict[str, Any]) -> str:
    gib = 2**30
    ws = b.get("recommended_working_set_bytes")
    ports = b.get("rdma_ports") or []
    rows = [
        ("node", f"{b['node_name']}  (id {b['node_id']})"),
        ("host", f"{b['hostname']}  {b['os']} {b['kernel']} {b['arch']}"),
        ("chip", b["chip"]),
        (
            "memory",
            f"{b['memory_available_bytes'] / gib:.1f} GiB free of "
            f"{b['memory_total_bytes'] / gib:.1f} GiB"
            + ("  (unified)" if b["unified_memory"] else ""),
        ),
        (
            "mlx",
            f"{b['mlx_version'] or 'NOT IMPORTABLE'}  device {b['mlx_device']}"
            + (f"  working set {ws / gib:.1f} GiB" if ws else ""),
        ),
        ("mlx-lm", b.get("mlx_lm_version") or "not installed"),
        ("python", b.get("python_version") or "?"),
        ("neuron", b["version"]),
        ("backends", ", ".join(b["backends"]) or "none"),
        (
            "rdma",
            ", ".join(f"{p['device']}/{p['port']} {p['state']}" for p in ports) or "no RDMA ports",
        ),
        (
            "store",
            f"{b['store_dir']}  {b['disk_free_bytes'] / 1e9:.1f} GB free"
            + (f" of {b['disk_total_bytes'] / 1e9:.1f} GB" if b.get("disk_total_bytes") else "")
            + f", floor {b['min_free_bytes'] / 1e9:.1f} GB",
        ),
        ("ring host", b["ring_host"]),
        ("jaccl", f"reboot advised after {b['jaccl_reload_budget']} jaccl loads"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
