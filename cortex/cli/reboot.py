"""`cortex reboot NODE --confirm NODE`: reboot a node's machine (POST /admin/nodes/NODE/reboot)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from cortex.cli.remote import (
    CONNECTION_HELP,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    ApiFailure,
    Target,
    add_connection_args,
    run,
)

HELP = f"""\
Reboot NODE's machine: what the runbooks mean by "reboot" after jaccl errno 16
or 96, or past a node's jaccl reload budget. RDMA queue pairs leak in the
kernel, so `cortex restart` (the neuron process only) frees none of them.

Opt-in on the node: its neuron.toml needs `allow_reboot = true` and a fleet
token, and its user the right to run `reboot_command` (default `sudo -n
/sbin/shutdown -r +1`: a sudoers rule, or root). Cortex needs an admin token.
--confirm must repeat NODE. Cortex routes around the node at once, until its
neuron answers again as a new process.

Where the node does not allow it, this prints the command to run by hand:
  ssh HOST sudo shutdown -r now

{CONNECTION_HELP}

exit status: 0 the node took the reboot, 1 it refused or its command failed
             (the command to run by hand is printed), 2 usage error, unknown
             node or cortex unreachable

example:
  cortex reboot studio-2 --confirm studio-2"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "reboot",
        help="reboot a node's machine (opt-in on the node: allow_reboot)",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("node", help="node name as in cortex.toml")
    p.add_argument("--confirm", required=True, metavar="NODE", help="NODE again: yes, reboot it")
    add_connection_args(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    if args.confirm != args.node:
        print(f"cortex reboot: --confirm must repeat the name {args.node}", file=sys.stderr)
        return EXIT_USAGE
    return run(args, "reboot", lambda target: _reboot(args, target, out))


def _reboot(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    status, answer = target.call(
        "POST", f"/admin/nodes/{args.node}/reboot", {"confirm": args.confirm}, 60.0
    )
    failure = None if status == 202 else ApiFailure.of(status, answer)
    if failure is not None and failure.code in ("reboot_not_allowed", "reboot_failed"):
        # Not rebooted: the message says why and gives the command to run by hand.
        print(f"{args.node}: not rebooted: {failure.message}", file=out)
        return EXIT_FAILED
    if failure is not None or not isinstance(answer, dict):
        raise failure or ApiFailure(status, "not a JSON object")
    command = " ".join(answer.get("command") or [])
    print(f"{args.node}: rebooting (`{command}` on the node)", file=out)
    if answer.get("output"):
        print(f"  {answer['output']}", file=out)
    print(f"cortex routes around {args.node} until its neuron answers again", file=out)
    return EXIT_OK
