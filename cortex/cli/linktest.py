"""`cortex linktest`: an all-reduce over fleet nodes (POST /admin/linktest), as a table."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from cortex.cli.remote import (
    CONNECTION_HELP,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    ApiFailure,
    Target,
    add_connection_args,
    run,
)

UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}

HELP = f"""\
Ask a running cortex to run an mx.distributed all-reduce (all_sum of a float32
array of each size) over fleet nodes as one group, formed the way model groups
form (cortex gives each member neuron its rank, hostfile and ports; no SSH).
Each size is warmed up, then timed round by round; a round's time is its
slowest rank's. Reports latency and bandwidth per size and round, jitter, and
every failed round or rank with its reason. The test is bounded by --timeout;
a member that fails stops the others at once.

Bandwidth (nccl-tests convention): algbw = bytes / seconds;
busbw = algbw * 2(n-1)/n, what each link of a ring all-reduce carried.

{CONNECTION_HELP}

exit status: 0 every round passed, 1 a round or rank failed,
             2 usage error or cortex unreachable, 130 Ctrl-C

example:
  cortex linktest --nodes studio-1,studio-2 --backend jaccl --sizes 1K,1M,256M --rounds 20"""


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in UNITS else ""
    try:
        value = float(t[: len(t) - len(unit)] if unit else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (say 1K, 1M, 16M)") from None
    return int(value * UNITS[unit])


def parse_sizes(text: str) -> list[int]:
    return [parse_size(s) for s in text.split(",") if s.strip()]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "linktest",
        help="time an all-reduce over fleet nodes (bandwidth, latency, jitter)",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_connection_args(p)
    p.add_argument("--nodes", help="comma-separated node names (default: every healthy node)")
    p.add_argument("--backend", choices=["ring", "jaccl"], default="ring")
    p.add_argument("--sizes", type=parse_sizes, default=None, help="default 1K,1M,16M")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per size (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds per size (default 1)")
    p.add_argument("--timeout", type=float, default=60.0, help="bound on the test, s")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    try:
        return run(args, "linktest", lambda target: _linktest(args, target, out))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    """POST /admin/linktest's body from the flags (cortex fills in what is left out)."""
    body: dict[str, Any] = {
        "backend": args.backend,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "timeout_s": args.timeout,
    }
    if args.nodes:
        body["nodes"] = [n.strip() for n in args.nodes.split(",") if n.strip()]
    if args.sizes:
        body["sizes"] = args.sizes
    return body


def _linktest(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    # Cortex bounds the test by timeout_s; the extra 30 s covers forming the group.
    status, report = target.call(
        "POST", "/admin/linktest", request_body(args), timeout=args.timeout + 30
    )
    if status != 200 or not isinstance(report, dict):
        raise ApiFailure.of(status, report)
    if args.json:
        print(json.dumps(report, indent=2), file=out)
    else:
        render(report, out)
    return EXIT_OK if report.get("ok") else EXIT_FAILED


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024
    return f"{n:g}"


def rate(bps: float) -> str:
    if bps >= 1e9:
        return f"{bps / 1e9:.2f} GB/s"
    if bps >= 1e6:
        return f"{bps / 1e6:.1f} MB/s"
    return f"{bps / 1e3:.1f} kB/s"


def ms(s: float) -> str:
    return f"{s * 1e3:.3f} ms"


def render(report: dict[str, Any], out: TextIO) -> None:
    nodes = report.get("nodes", [])
    print(
        f"linktest {report.get('backend')} over {', '.join(nodes)} "
        f"({report.get('world_size')} ranks, ports from {report.get('base_port')})",
        file=out,
    )
    print(f"  {report.get('formula')}", file=out)
    for line in report.get("retried", []):
        print(f"  retried: {line}", file=out)
    cols = ("size", "ok", "p50 lat", "p99 lat", "stdev", "p99-p50", "algbw p50", "busbw p50")
    rows = [cols]
    details = []
    for s in report.get("sizes", []):
        n = len(s["rounds"])
        if s.get("latency_s"):
            lat, jit = s["latency_s"], s["jitter_s"]
            rows.append(
                (
                    human_bytes(s["size_bytes"]),
                    f"{s['ok']}/{n}",
                    ms(lat["p50"]),
                    ms(lat["p99"]),
                    ms(jit["stdev"]),
                    ms(jit["p99_minus_p50"]),
                    rate(s["algbw_Bps"]["p50"]),
                    rate(s["busbw_Bps"]["p50"]),
                )
            )
        else:
            rows.append((human_bytes(s["size_bytes"]), f"0/{n}", *("-" * 6)))
        per = []
        for r in s["rounds"]:
            per.append(
                f"{ms(r['seconds'])} {rate(r['algbw_Bps'])}" if r["ok"] else f"FAILED #{r['round']}"
            )
        details.append(f"  {human_bytes(s['size_bytes'])} rounds: " + ", ".join(per))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(cols))]
    for row in rows:
        cells = "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True))
        print("  " + cells.rstrip(), file=out)
    for line in details:
        print(line, file=out)
    failures = report.get("failures", [])
    if failures:
        print("failures:", file=out)
        for f in failures:
            where = (
                f"size {human_bytes(f['size'])} round {f['round']}"
                if "size" in f
                else f"{f.get('node')} (rank {f.get('rank')})"
            )
            print(f"  {where}: {f.get('error')}", file=out)
        for r in report.get("ranks", []):
            if not r.get("ok") and r.get("stderr_tail"):
                print(f"  {r['node']} (rank {r['rank']}) stderr, last lines:", file=out)
                for line in r["stderr_tail"]:
                    print(f"    {line}", file=out)
    print("ok" if report.get("ok") else "FAILED", file=out)
