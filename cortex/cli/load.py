"""`cortex load MODEL`: place a model through a running cortex and follow it to ready.

Blocking stdlib HTTP: one request at a time, and a Ctrl-C lands between polls
(the load goes on in cortex; only the following stops).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

import attrs

from cortex.cli.remote import (
    CONNECTION_HELP,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    ApiFailure,
    Target,
    Unreachable,
    add_connection_args,
    follow,
    run,
)
from shared.progress import StageProgress

POLL_S = 0.5
PLAIN_EVERY_S = 5.0
MAX_POLL_FAILURES = 10
EXIT_READY = 0

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
    return run(args, "load", lambda target: _load(args, target, out))


def _load(args: argparse.Namespace, target: Target, out: TextIO) -> int:
    body: dict[str, Any] = {}
    if args.nodes:
        body["nodes"] = [n.strip() for n in args.nodes.split(",") if n.strip()]
    status, answer = target.call(
        "POST", f"/admin/models/{args.model}/load", body or None, timeout=60.0
    )
    if status >= 400 or not isinstance(answer, dict):
        raise ApiFailure.of(status, answer)
    model_id = str(answer.get("model_id", args.model))
    for line in answer.get("did", []):
        print(f"  {line}", file=out)
    try:
        return _follow(target, model_id, answer.get("nodes"), args.timeout, out)
    except KeyboardInterrupt:
        print("\nstopped following; the load goes on in cortex", file=out)
        return EXIT_INTERRUPTED


@attrs.define
class _Progress:
    """The line a follower shows: in place on a terminal, else a plain line on change
    or every few seconds (a log file must not get one line per poll)."""

    out: TextIO
    tty: bool
    last_line: str = ""
    last_print: float = 0.0

    def show(self, line: str) -> None:
        now = time.monotonic()
        if self.tty:
            print("\r" + line.ljust(len(self.last_line)), end="", file=self.out, flush=True)
        elif (
            line.split("  ")[0] != self.last_line.split("  ")[0]
            or now - self.last_print >= PLAIN_EVERY_S
        ):
            print(line, file=self.out, flush=True)
            self.last_print = now
        self.last_line = line

    def end(self) -> None:
        """Finish an in-place line (once), so what follows starts on its own."""
        if self.tty and self.last_line:
            print(file=self.out)
        self.last_line = ""

    def say(self, text: str) -> None:
        self.end()
        print(text, file=self.out)


def _poll_state(target: Target, failures: int) -> tuple[dict[str, Any] | None, int]:
    """(state, consecutive failures): a few failed polls are waited out, not fatal."""
    try:
        status, state = target.call("GET", "/admin/state", timeout=10.0)
    except Unreachable:
        if failures + 1 >= MAX_POLL_FAILURES:
            raise
        return None, failures + 1
    if status != 200 or not isinstance(state, dict):
        if failures + 1 >= MAX_POLL_FAILURES:
            raise ApiFailure.of(status, state)
        return None, failures + 1
    return state, 0


def _follow(target: Target, model_id: str, nodes: Any, timeout_s: float, out: TextIO) -> int:
    started = time.monotonic()
    progress = _Progress(out, out.isatty())
    failures = 0
    wanted = set(nodes) if isinstance(nodes, list) and nodes else None

    def poll() -> dict[str, Any] | None:
        nonlocal failures
        state, failures = _poll_state(target, failures)
        return state

    try:
        rc = follow(
            poll,
            lambda state: _step(state, model_id, wanted, started, progress),
            started=started,
            timeout_s=timeout_s,
            interval_s=POLL_S,
        )
    finally:
        progress.end()
    if rc is not None:
        return rc
    print(f"cortex load: {model_id} not ready after {timeout_s:g} s", file=sys.stderr)
    return EXIT_FAILED


def _step(
    state: dict[str, Any],
    model_id: str,
    wanted: set[str] | None,
    started: float,
    progress: _Progress,
) -> int | None:
    """One poll: an exit code once ready, failed or gone, else None (shown as progress)."""
    entry = next((m for m in state.get("models", []) if m.get("id") == model_id), None)
    if entry is None:
        print(f"cortex load: {model_id!r} is not in cortex's catalogue", file=sys.stderr)
        return EXIT_USAGE
    places = [p for p in entry.get("placements", []) if wanted is None or p.get("node") in wanted]
    ready = [p["node"] for p in places if p.get("state") == "ready" and p.get("healthy")]
    if ready:
        took = time.monotonic() - started
        progress.say(f"{model_id} ready on {', '.join(ready)} ({took:.1f} s)")
        return EXIT_READY
    reason = _failure(entry, places)
    if reason is not None:
        progress.say(f"{model_id} failed: {reason}")
        return EXIT_FAILED
    progress.show(_line(model_id, entry, places))
    return None


def _failure(entry: dict[str, Any], places: list[dict[str, Any]]) -> str | None:
    """Why the load failed, or None while it may still succeed."""
    life = entry.get("life") or {}
    failure = life.get("failure") or {}
    failed = [p for p in places if p.get("state") == "failed"]
    if not failed and not (failure and not life.get("job")):
        return None
    reason = failed[0].get("error") if failed else failure.get("reason")
    return str(reason or entry.get("why", "no reason given"))


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
