"""Cortex's trace of one request: filled in as the request goes, journaled when it ends.

The proxy fills a `TraceDraft` (the nodes it tried, routing and cold-load time,
the first event, tokens); `_inference` journals it as a frozen `Trace` with the
request's outcome. The neuron keeps its own trace under the same X-Request-Id
(neuron.tracing); `GET /admin/traces/{id}` joins the two.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import attrs

from cortex.config import CortexConfig
from shared.journal import Event, Journal
from shared.journal import journals as shared_journals
from shared.rates import decode_rate

# The neuron's admission wait for this request, in seconds, on its answer.
QUEUE_WAIT_HEADER = "X-Queue-Wait-S"
# The neuron's token counts at a stream's end when the client asked for no usage frame.
USAGE_COMMENT = b": usage "


@attrs.frozen
class Trace:
    id: str
    model: str | None
    key: str | None
    stream: bool
    status: str
    error: str | None
    # Every node tried, in order; `node` is the one whose answer the client got.
    nodes: tuple[str, ...]
    node: str | None
    queue_wait_s: float | None
    routing_s: float | None
    cold_load_s: float | None
    ttft_s: float | None
    duration_s: float
    prompt_tokens: int | None
    completion_tokens: int | None
    # "usage" (the neuron's count) or "frames" (content events counted by cortex).
    tokens_from: str | None
    tok_s: float | None
    seq: int = 0
    ts: float = 0.0  # wall clock at arrival
    # The client API it came in ("chat", "completions", "messages", "responses").
    api: str = "chat"

    def to_json(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d["nodes"] = list(self.nodes)
        return d


@attrs.define
class TraceDraft:
    """What is known of a request so far (monotonic times relative to `t0`)."""

    id: str
    t0: float = attrs.Factory(time.monotonic)
    ts: float = attrs.Factory(time.time)
    # The client API it came in ("chat", "completions", "messages", "responses").
    api: str = "chat"
    model: str | None = None
    key: str | None = None
    stream: bool = False
    nodes: list[str] = attrs.Factory(list)
    node: str | None = None
    queue_wait_s: float | None = None
    routing_s: float = 0.0
    cold_load_s: float | None = None
    first_at: float | None = None
    last_at: float | None = None
    frames: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    _carry: bytes = b""

    def usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(p, int):
            self.prompt_tokens = p
        if isinstance(c, int):
            self.completion_tokens = c

    def scan(self, chunk: bytes) -> None:
        """Count a relayed chunk's content events; take a usage frame's (or the neuron's
        usage comment's) counts."""
        self.frames += chunk.count(b"data: {")
        self.last_at = time.monotonic()
        # The neuron's `: usage {...}` comment, also when split across two reads.
        # At a line's start only (a JSON string holds no raw newline).
        marker = b"\n" + USAGE_COMMENT
        joined = self._carry + chunk
        at = joined.find(marker)
        if at >= 0:
            end = joined.find(b"\n", at + 1)
            if end < 0:
                self._carry = joined[at:][-512:]
            else:
                with contextlib.suppress(ValueError):
                    self.usage(json.loads(joined[at + len(marker) : end]))
                self._carry = b""
        else:
            self._carry = joined[-len(marker) :]
        # Quotes inside JSON strings are escaped: this finds only a usage key.
        if b'"usage":' in chunk:
            for line in chunk.split(b"\n"):
                if line.startswith(b"data: {") and b'"usage":' in line:
                    try:
                        frame = json.loads(line[6:])
                    except ValueError:
                        continue
                    if isinstance(frame, dict) and not frame.get("choices"):
                        self.frames -= 1  # a usage frame is no token
                    self.usage(frame.get("usage") if isinstance(frame, dict) else None)

    def done(self, status: str, error: str | None = None, seq: int = 0) -> Trace:
        now = time.monotonic()
        ttft = None if self.first_at is None else self.first_at - self.t0
        completion, source = self.completion_tokens, "usage"
        if completion is None and self.frames:
            completion, source = self.frames, "frames"
        # Only over a real interval (shared.rates): else None, shown as NO_RATE.
        tok_s = decode_rate(completion, self.first_at, self.last_at)
        return Trace(
            id=self.id,
            model=self.model,
            key=self.key,
            stream=self.stream,
            status=status,
            error=error or self.error,
            nodes=tuple(self.nodes),
            node=self.node,
            queue_wait_s=self.queue_wait_s,
            routing_s=round(self.routing_s, 6),
            cold_load_s=self.cold_load_s,
            ttft_s=None if ttft is None else round(ttft, 6),
            duration_s=round(now - self.t0, 6),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            tokens_from=source if completion is not None else None,
            tok_s=tok_s,
            ts=self.ts,
            api=self.api,
            seq=seq,
        )


def journals(config: CortexConfig) -> tuple[Journal[Event], Journal[Trace]]:
    """The events and traces journals the `journal_*` keys describe."""
    events, traces = shared_journals(config)
    return events, traces


def select(
    traces: Journal[Trace],
    *,
    model: str | None = None,
    since: float | None = None,
    status: str | None = None,
    limit: int = 100,
) -> list[Trace]:
    """Newest first: model, wall-clock `since` and status filter (status "error" = not 200)."""
    out: list[Trace] = []
    for t in reversed(list(traces)):
        if model is not None and t.model != model:
            continue
        if since is not None and t.ts < since:
            continue
        if status is not None:
            if status == "error" and t.status == "200":
                continue
            if status not in ("error", t.status):
                continue
        out.append(t)
        if len(out) >= limit:
            break
    return out
