"""`cortex load MODEL`: place a model through a running cortex and follow it to ready.

Blocking stdlib HTTP: one request at a time, and a Ctrl-C lands between polls
(the load goes on in cortex; only the following stops).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

from cortex.remote import CONNECTION_HELP, Unreachable, add_connection_args, resolve
from shared.blocking_http import request_json
from shared.progress import StageProgress

POLL_S = 0.5
PLAIN_EVERY_S = 5.0
MAX_POLL_FAILURES = 10
EXIT_READY, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

HELP = f"""\
Ask a running cortex to place MODEL (POST /admin/models/MODEL/load), then follow
it until a copy is ready: each node's state and, while the neuron stages the
model's files, a progress line (bytes done / total, percent, rate, ETA). On a
terminal the line updates in place; otherwise a plain line every few seconds.

Without --nodes the call is idempotent (a loaded model stays as it is); with
--nodes a,b one more copy is placed exactly there. Ctrl-C stops following; the
load goes on in cortex.

{CONNECTION_HELP}

exit status: 0 ready, 1 the load failed or was refused (the reason is printed),
             2 usage error or cortex unreachable, 130 Ctrl-C

example:
  cortex load qwen2.5-7b --url http://10.0.0.10:9400 --nodes studio-2"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "load",
        help="place a model through a running cortex and follow it to ready",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="catalogue id or alias")
    add_connection_args(p)
    p.add_argument("--nodes", help="comma-separated node names: one more copy, exactly there")
    p.add_argument("--timeout", type=float, default=1800.0, help="give up after this many s")
    p.set_defaults(func=main)


def main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    try:
        target = resolve(args)
    except Unreachable as exc:
        print(f"cortex load: {exc}", file=sys.stderr)
        return EXIT_USAGE
    headers, base = target.headers, target.url
    body: dict[str, Any] = {}
    if args.nodes:
        body["nodes"] = [n.strip() for n in args.nodes.split(",") if n.strip()]
    try:
        status, answer, _ = request_json(
            "POST", f"{base}/admin/models/{args.model}/load", body or None, 60.0, headers
        )
    except OSError as exc:
        print(f"cortex load: cannot reach cortex at {base}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if status >= 400:
        print(f"cortex load: {status}: {_message(answer)}", file=sys.stderr)
        return EXIT_USAGE if status in (401, 403, 404) else EXIT_FAILED
    model_id = str(answer.get("model_id", args.model)) if isinstance(answer, dict) else args.model
    nodes = answer.get("nodes") if isinstance(answer, dict) else None
    for line in answer.get("did", []) if isinstance(answer, dict) else []:
        print(f"  {line}", file=out)
    try:
        return _follow(base, headers, model_id, nodes, args.timeout, out)
    except KeyboardInterrupt:
        print("\nstopped following; the load goes on in cortex", file=out)
        return EXIT_INTERRUPTED


def _follow(
    base: str,
    headers: dict[str, str],
    model_id: str,
    nodes: Any,
    timeout_s: float,
    out: TextIO,
) -> int:
    tty = out.isatty()
    started = time.monotonic()
    failures = 0
    last_line, last_print = "", 0.0
    while time.monotonic() - started < timeout_s:
        try:
            status, state, _ = request_json("GET", f"{base}/admin/state", None, 10.0, headers)
            if status != 200:
                raise OSError(f"HTTP {status}")
            failures = 0
        except OSError as exc:
            failures += 1
            if failures >= MAX_POLL_FAILURES:
                print(f"\ncortex load: lost cortex: {exc}", file=sys.stderr)
                return EXIT_USAGE
            time.sleep(POLL_S)
            continue
        entry = next((m for m in state.get("models", []) if m.get("id") == model_id), None)
        if entry is None:
            print(f"cortex load: {model_id!r} is not in cortex's catalogue", file=sys.stderr)
            return EXIT_USAGE
        wanted = set(nodes) if isinstance(nodes, list) and nodes else None
        places = [
            p for p in entry.get("placements", []) if wanted is None or p.get("node") in wanted
        ]
        ready = [p["node"] for p in places if p.get("state") == "ready" and p.get("healthy")]
        if ready:
            _end_line(out, tty, last_line)
            took = time.monotonic() - started
            print(f"{model_id} ready on {', '.join(ready)} ({took:.1f} s)", file=out)
            return EXIT_READY
        failure = (entry.get("life") or {}).get("failure") or {}
        failed = [p for p in places if p.get("state") == "failed"]
        if failed or (failure and not (entry.get("life") or {}).get("job")):
            _end_line(out, tty, last_line)
            reason = failed[0].get("error") if failed else failure.get("reason")
            print(f"{model_id} failed: {reason or entry.get('why', 'no reason given')}", file=out)
            return EXIT_FAILED
        line = _line(model_id, entry, places)
        now = time.monotonic()
        if tty:
            print("\r" + line.ljust(len(last_line)), end="", file=out, flush=True)
        elif line.split("  ")[0] != last_line.split("  ")[0] or now - last_print >= PLAIN_EVERY_S:
            print(line, file=out, flush=True)
            last_print = now
        last_line = line
        time.sleep(POLL_S)
    _end_line(out, tty, last_line)
    print(f"cortex load: {model_id} not ready after {timeout_s:g} s", file=sys.stderr)
    return EXIT_FAILED


def _line(model_id: str, entry: dict[str, Any], places: list[dict[str, Any]]) -> str:
    parts = []
    for p in places:
        text = f"{p.get('node')}: {p.get('state')}"
        stage = StageProgress.from_json(p.get("staging"))
        if stage is not None and stage.active:
            text += f" (staging {stage.summary()})"
        parts.append(text)
    where = "; ".join(parts) if parts else str(entry.get("why", "placing"))
    return f"{model_id}  {where}"


def _end_line(out: TextIO, tty: bool, last_line: str) -> None:
    if tty and last_line:
        print(file=out)


def _message(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", body))
    return str(body)[:500]
