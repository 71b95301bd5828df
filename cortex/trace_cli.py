"""`cortex trace ID` and `cortex events [--follow]`: a running cortex's journals.

Blocking stdlib HTTP like the other fleet commands. URL from --url, else
$CORTEX_URL, else the local fleet; admin token from --token, else
$CORTEX_ADMIN_TOKEN. (A minimal resolver of our own; the shared one replaces it.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import quote, urlencode

from shared.blocking_http import request_json

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_URL = "http://127.0.0.1:9400"
FOLLOW_POLL_S = 1.0

TRACE_HELP = """\
Show one request as cortex and the neuron(s) it tried saw it (GET
/admin/traces/ID): arrival, routing and cold load, the node that answered, its
queue wait, first token, tokens and speed, status and error; then each neuron's
own trace under the same id (admission wait, runner, prompt tokens by its
tokenizer, TTFT, tokens). The id is the X-Request-Id the client sent or cortex
returned.

exit status: 0 found, 1 no such trace, 2 usage error or cortex unreachable

example:
  cortex trace 7f3a9c0e --url http://10.0.0.10:9400"""

EVENTS_HELP = """\
Print the fleet's event log (GET /admin/events): every model state a node
reported, loads, unloads, holds, crashes (with the runner's output tail),
prefetches. --follow keeps polling for new events (Ctrl-C exits 130).

exit status: 0 ok, 2 usage error or cortex unreachable, 130 Ctrl-C

example:
  cortex events --follow --model qwen2.5-7b"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help=f"cortex base URL (default $CORTEX_URL, else {DEFAULT_URL})")
    p.add_argument("--token", help="admin token (default: $CORTEX_ADMIN_TOKEN)")
    p.add_argument("--json", action="store_true", help="the raw JSON answer")


def add_trace_parser(sub: Any) -> None:
    t = sub.add_parser(
        "trace",
        help="one request as cortex and its neuron saw it",
        description=TRACE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("id", help="the request id (X-Request-Id)")
    _common(t)
    t.set_defaults(func=trace_main)


def add_events_parser(sub: Any) -> None:
    e = sub.add_parser(
        "events",
        help="the fleet's event log (--follow for new ones)",
        description=EVENTS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    e.add_argument("--model", help="only this model's events")
    e.add_argument("--node", help="only this node's events")
    e.add_argument("--limit", type=int, default=50, help="at most this many at first")
    _common(e)
    e.set_defaults(func=events_main)


def _target(args: argparse.Namespace) -> tuple[str, dict[str, str]]:
    base = (args.url or os.environ.get("CORTEX_URL") or DEFAULT_URL).rstrip("/")
    token = args.token or os.environ.get("CORTEX_ADMIN_TOKEN")
    return base, ({"Authorization": f"Bearer {token}"} if token else {})


def _message(answer: Any) -> str:
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        return str(answer["error"].get("message", answer))
    return str(answer)[:500]


def _get(base: str, path: str, headers: dict[str, str], what: str) -> tuple[int, Any] | None:
    try:
        status, answer, _ = request_json("GET", base + path, None, 30.0, headers)
    except OSError as exc:
        print(f"cortex {what}: cannot reach cortex at {base}: {exc}", file=sys.stderr)
        return None
    return status, answer


def trace_main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    base, headers = _target(args)
    got = _get(base, f"/admin/traces/{quote(args.id, safe='')}", headers, "trace")
    if got is None:
        return EXIT_USAGE
    status, answer = got
    if status == 404:
        print(f"cortex trace: {_message(answer)}", file=sys.stderr)
        return EXIT_FAILED
    if status != 200 or not isinstance(answer, dict):
        print(f"cortex trace: {status}: {_message(answer)}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(answer, indent=2), file=out)
    else:
        out.write(timeline(answer))
    return EXIT_OK


def _s(v: Any) -> str:
    return "-" if v is None else f"{float(v) * 1000:.1f} ms"


def _when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "?"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def timeline(joined: dict[str, Any]) -> str:
    """The joined trace as lines a person reads, in the order things happened."""
    c = joined.get("cortex") or {}
    lines = [f"request {joined.get('id')}  model {c.get('model')}  key {c.get('key') or '-'}"]
    lines.append(
        f"  {_when(c.get('ts'))}  arrived at cortex ({'stream' if c.get('stream') else 'unary'})"
    )
    cold = f", cold load {_s(c.get('cold_load_s'))}" if c.get("cold_load_s") is not None else ""
    tried = ", ".join(c.get("nodes") or []) or "none"
    lines.append(f"  +{_s(c.get('routing_s'))}  routed (tried: {tried}{cold})")
    if c.get("node"):
        lines.append(f"  answered by {c['node']}, queued there {_s(c.get('queue_wait_s'))}")
    lines.append(f"  +{_s(c.get('ttft_s'))}  first token at cortex")
    tokens = f"{c.get('prompt_tokens') if c.get('prompt_tokens') is not None else '?'} prompt"
    tokens += f", {c.get('completion_tokens') if c.get('completion_tokens') is not None else '?'}"
    tokens += f" completion ({c.get('tokens_from') or '-'}), {c.get('tok_s') or '-'} tok/s"
    lines.append(f"  +{_s(c.get('duration_s'))}  done: status {c.get('status')}; {tokens}")
    if c.get("error"):
        lines.append(f"  error: {c['error']}")
    for node, n in (joined.get("nodes") or {}).items():
        lines.append(f"neuron {node}:")
        if not isinstance(n, dict) or ("error" in n and "id" not in n):
            lines.append(f"  (no trace: {n.get('error') if isinstance(n, dict) else n})")
            continue
        lines.append(f"  {_when(n.get('ts'))}  arrived ({n.get('runner') or 'no runner'})")
        lines.append(f"  +{_s(n.get('admission_wait_s'))}  admitted")
        lines.append(f"  ttft {_s(n.get('ttft_s'))} (from the runner call)")
        lines.append(
            f"  +{_s(n.get('duration_s'))}  done: status {n.get('status')}; prompt"
            f" {n.get('prompt_tokens')} (tokenizer) / {n.get('runner_prompt_tokens')} (runner),"
            f" {n.get('completion_tokens')} completion, {n.get('tok_s') or '-'} tok/s"
        )
        if n.get("error"):
            lines.append(f"  error: {n['error']}")
    return "\n".join(lines) + "\n"


def event_line(e: dict[str, Any]) -> str:
    where = " ".join(
        x for x in (e.get("model") or "", f"@{e['node']}" if e.get("node") else "") if x
    )
    detail = str(e.get("detail") or "")
    if "\n" in detail:  # a crash's output tail: indented under its line
        first, rest = detail.split("\n", 1)
        detail = first + "\n" + "\n".join("      " + x for x in rest.split("\n"))
    return f"{e.get('seq'):>6} {_when(e.get('ts'))} {e.get('kind')}  {where}  {detail}".rstrip()


def events_main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    base, headers = _target(args)
    query: dict[str, Any] = {"limit": max(1, args.limit)}
    if args.model:
        query["model"] = args.model
    if args.node:
        query["node"] = args.node
    since = 0
    try:
        while True:
            got = _get(
                base, f"/admin/events?{urlencode({**query, 'since': since})}", headers, "events"
            )
            if got is None:
                return EXIT_USAGE
            status, answer = got
            if status != 200 or not isinstance(answer, dict):
                print(f"cortex events: {status}: {_message(answer)}", file=sys.stderr)
                return EXIT_USAGE
            for e in answer.get("events", []):
                print(json.dumps(e) if args.json else event_line(e), file=out, flush=True)
            since = int(answer.get("last_seq", since))
            if not args.follow:
                return EXIT_OK
            query["limit"] = 1000  # following: every new one
            time.sleep(FOLLOW_POLL_S)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
