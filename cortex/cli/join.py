"""`cortex join-code`: mint a one-time code a new neuron trades for the fleet token."""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys
import time
from typing import Any, TextIO
from urllib.parse import urlsplit

from cortex.cli.remote import (
    CONNECTION_HELP,
    EXIT_OK,
    ApiFailure,
    Target,
    add_connection_args,
    dump_json,
    run,
)

HELP = f"""\
Mint a join code (POST /admin/join-codes): good once, for a short while
(join_code_ttl_s in cortex.toml, 10 minutes unless set; --ttl shortens it).
On the new node, `neuron join CORTEX_URL --code CODE` trades it for the fleet
token and writes it into the neuron's config (a 0600 token file): nobody
copies the token by hand. Cortex keeps only a hash of each code, in memory: a
restart of cortex voids every code not used yet.

Needs admin_token in cortex.toml (a code hands out the key to every neuron)
and a fleet token to hand out (fleet_token_file or fleet_token_env).

{CONNECTION_HELP}

exit status: 0 minted, 1 refused (no fleet token to hand out), 2 usage error,
             a wrong admin token or cortex unreachable

example:
  cortex join-code --ttl 5m
  # then, on the new node:
  neuron join http://10.0.0.10:9400 --code K7QF2-... -c /etc/cortex-neuron/neuron.toml"""

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "join-code",
        help="mint a one-time code a new neuron joins the fleet with",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_connection_args(p)
    p.add_argument(
        "--ttl",
        type=duration,
        metavar="DURATION",
        help="how long the code stays good: 90s, 5m, 1h or seconds (at most cortex's"
        " join_code_ttl_s)",
    )
    p.add_argument("--json", action="store_true", help="print the server's JSON answer")
    p.set_defaults(func=main)


def duration(text: str) -> float:
    """Seconds from `90`, `90s`, `5m` or `1h` (argparse type)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if m is None or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration > 0: {text!r} (e.g. 90s, 5m, 1h)")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    def once(target: Target) -> int:
        body = {} if args.ttl is None else {"ttl_s": args.ttl}
        status, answer = target.call("POST", "/admin/join-codes", body)
        if status != 201:
            raise ApiFailure.of(status, answer)
        print(dump_json(answer) if args.json else render(answer, target.url), file=out)
        return EXIT_OK

    return run(args, "join-code", once)


def render(answer: dict[str, Any], url: str) -> str:
    code, life = answer["code"], float(answer["expires_in_s"])
    until = time.strftime("%H:%M:%S", time.localtime(float(answer["expires_at"])))
    lines = [
        f"join code  {code}",
        f"good once, for {_span(life)} (until {until}); a cortex restart voids it",
        "",
        "on the new node:",
        f"  neuron join {url} --code {code} -c /etc/cortex-neuron/neuron.toml",
    ]
    if _loopback(url):
        lines.append(f"  (with an address of this cortex the node can reach, not {url})")
    return "\n".join(lines)


def _span(seconds: float) -> str:
    if seconds >= 120 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
