"""`cortex trace ID` and `cortex events [--follow]`: a running cortex's journals.

Blocking stdlib HTTP like the other fleet commands; cortex is found by
cortex.cli.remote (flags, environment, config, the local fleet).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import quote, urlencode

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
from shared.rates import NO_RATE

FOLLOW_POLL_S = 1.0

TRACE_HELP = f"""\
Show one request as cortex and the neuron(s) it tried saw it (GET
/admin/traces/ID): arrival, routing and cold load, the node that answered, its
queue wait, first token, tokens and speed, status and error; then each neuron's
own trace under the same id (admission wait, runner, TTFT, tokens). Every
token count says who counted it: the runner (its usage, the true count), the
neuron (an estimate of the prompt made before the runner saw it, to check the
context), or cortex (content frames, when no usage came back).
The id is the X-Request-Id the client sent or cortex returned.

{CONNECTION_HELP}

exit status: 0 found, 1 no such trace, 2 usage error or cortex unreachable

example:
  cortex trace 7f3a9c0e --url http://10.0.0.10:9400"""

EVENTS_HELP = f"""\
Print the fleet's event log (GET /admin/events): every model state a node
reported, loads, unloads, holds, crashes (with the runner's output tail),
prefetches. --follow keeps polling for new events (Ctrl-C exits 130).

{CONNECTION_HELP}

exit status: 0 ok, 2 usage error or cortex unreachable, 130 Ctrl-C

example:
  cortex events --follow --model qwen2.5-7b"""


def _common(p: argparse.ArgumentParser) -> None:
    add_connection_args(p)
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


def trace_main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    return run(args, "trace", lambda target: _trace(args, target, out))


def _trace(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    try:
        answer = target.get_ok(f"/admin/traces/{quote(args.id, safe='')}")
    except ApiFailure as exc:
        if exc.status != 404:
            raise
        # Unknown or aged out: the answer to the question, not a usage error.
        print(f"cortex trace: {exc.message}", file=sys.stderr)
        return EXIT_FAILED
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
    """The joined trace as lines a person reads, in the order things happened; every
    number says whose clock or whose count it is."""
    lines = _cortex_lines(joined.get("id"), joined.get("cortex") or {})
    for node, n in (joined.get("nodes") or {}).items():
        lines += _neuron_lines(node, n)
    return "\n".join(lines) + "\n"


def _cortex_lines(rid: Any, c: dict[str, Any]) -> list[str]:
    kind = "stream" if c.get("stream") else "unary"
    cold = f", cold load {_s(c.get('cold_load_s'))}" if c.get("cold_load_s") is not None else ""
    tried = ", ".join(c.get("nodes") or []) or "none"
    lines = [
        f"request {rid}  model {c.get('model')}  key {c.get('key') or '-'}",
        f"  {_when(c.get('ts'))}  arrived at cortex ({kind})",
        f"  +{_s(c.get('routing_s'))}  routed (tried: {tried}{cold})",
    ]
    if c.get("node"):
        lines.append(
            f"  answered by {c['node']}, queued there {_s(c.get('queue_wait_s'))}"
            " (the neuron's admission wait)"
        )
    # A unary answer reaches cortex in one piece: its "first token" is the whole answer.
    first = "first token at cortex" if c.get("stream") else "answer at cortex (unary: one piece)"
    lines.append(f"  +{_s(c.get('ttft_s'))}  {first}")
    lines.append(
        f"  +{_s(c.get('duration_s'))}  done: status {c.get('status')}; {cortex_tokens(c)}"
        f", {_rate(c.get('tok_s'), 'relay', 'cortex')}"
    )
    if c.get("error"):
        lines.append(f"  error: {c['error']}")
    return lines


def cortex_tokens(c: dict[str, Any]) -> str:
    """Cortex's token counts and where they came from (Trace.tokens_from)."""
    prompt, completion = c.get("prompt_tokens"), c.get("completion_tokens")
    if c.get("tokens_from") == "usage":
        # The neuron relays its runner's usage (a usage frame or its `: usage` comment).
        return (
            f"prompt {_count(prompt)} tokens, completion {_count(completion)} tokens"
            " (the runner's usage, relayed by the neuron)"
        )
    if c.get("tokens_from") == "frames":
        return (
            f"completion {_count(completion)} tokens (cortex counted content frames;"
            " no usage came back), prompt not counted"
        )
    return "no tokens counted (no usage and no content came back)"


def _neuron_lines(node: str, n: Any) -> list[str]:
    lines = [f"neuron {node}:"]
    if not isinstance(n, dict) or ("error" in n and "id" not in n):
        why = n.get("error") if isinstance(n, dict) else n
        return [*lines, f"  (no trace: {why})"]
    lines += [
        f"  {_when(n.get('ts'))}  arrived ({n.get('runner') or 'no runner'})",
        f"  +{_s(n.get('admission_wait_s'))}  admitted",
        f"  ttft {_s(n.get('ttft_s'))} (the neuron's clock, from its call to the runner)",
        f"  +{_s(n.get('duration_s'))}  done: status {n.get('status')}; {neuron_prompt(n)},"
        f" completion {_count(n.get('completion_tokens'))} tokens (runner's count),"
        f" {_rate(n.get('tok_s'), 'decode', 'the neuron')}",
    ]
    if n.get("runner_env"):
        lines.append(f"  runner environment: {n['runner_env']}")
    if n.get("error"):
        lines.append(f"  error: {n['error']}")
    return lines


def neuron_prompt(n: dict[str, Any]) -> str:
    """The prompt's size: the runner's count when it gave one, else the neuron's estimate
    (its tokenizer over the message texts plus a per-message allowance, made before the
    runner applied the chat template, to refuse what cannot fit the context)."""
    runner, estimate = n.get("runner_prompt_tokens"), n.get("prompt_tokens")
    if runner is not None and estimate is not None:
        return f"prompt {runner} tokens (runner's count; the neuron estimated {estimate})"
    if runner is not None:
        return f"prompt {runner} tokens (runner's count)"
    if estimate is not None:
        return f"prompt about {estimate} tokens (the neuron's estimate; the runner gave no count)"
    return "prompt not counted"


def _count(v: Any) -> str:
    return "?" if v is None else str(v)


def _rate(tok_s: Any, what: str, clock: str) -> str:
    """A rate after the first token, and whose clock timed it."""
    if tok_s is None:
        # shared.rates: no rate over under MIN_RATE_TOKENS tokens or MIN_RATE_SPAN_S.
        return f"{what} {NO_RATE} tok/s (too short to time)"
    return f"{what} {tok_s} tok/s after the first token ({clock}'s clock)"


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
    try:
        return run(args, "events", lambda target: _events(args, target, out))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _events(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    query: dict[str, Any] = {"limit": max(1, args.limit)}
    if args.model:
        query["model"] = args.model
    if args.node:
        query["node"] = args.node
    since = 0
    while True:
        answer = target.get_ok(f"/admin/events?{urlencode({**query, 'since': since})}")
        for e in answer.get("events", []):
            print(json.dumps(e) if args.json else event_line(e), file=out, flush=True)
        since = int(answer.get("last_seq", since))
        if not args.follow:
            return EXIT_OK
        query["limit"] = 1000  # following: every new one
        time.sleep(FOLLOW_POLL_S)
