"""The neuron's trace of one request, under the X-Request-Id cortex (or a client) gave.

The proxy fills a `TraceDraft` as the request goes (admission wait, the runner,
its estimate of the prompt's tokens, first token, the runner's usage); it is journaled as a
frozen `Trace` when the handler ends. GET /traces and /traces/{id} read the ring.
"""

from __future__ import annotations

import json
import time
from typing import Any

import attrs
from aiohttp import web

from neuron.config import NeuronConfig
from shared.journal import Event, Journal
from shared.journal import journals as shared_journals
from shared.request_id import given_or_new

# How long admission held the request, in seconds, on the answer (cortex's trace reads it).
QUEUE_WAIT_HEADER = "X-Queue-Wait-S"


def request_id(request: web.Request) -> str:
    return given_or_new(request.headers.get("X-Request-Id", ""))


def usage_comment(usage: dict[str, Any]) -> bytes:
    """The runner's token counts as an SSE comment, for a stream that did not ask for
    the usage frame: clients skip comments, cortex's trace reads it (USAGE_COMMENT)."""
    counts = {k: v for k, v in usage.items() if k in ("prompt_tokens", "completion_tokens")}
    return b": usage " + json.dumps(counts, separators=(",", ":")).encode() + b"\n\n"


@attrs.frozen
class Trace:
    id: str
    model: str
    status: str
    error: str | None
    admission_wait_s: float | None
    runner: str | None  # "pid N port P"
    # The neuron's estimate for its context check: the messages' text through the
    # tokenizer plus a margin for the template, before the runner; not a count.
    prompt_tokens: int | None
    runner_prompt_tokens: int | None  # the runner's usage
    completion_tokens: int | None
    ttft_s: float | None
    tok_s: float | None
    duration_s: float
    stream: bool
    seq: int = 0
    # The environment the neuron set for the runner (secrets masked): which settings
    # (MLX_METAL_FAST_SYNCH, a catalogue `env`) this request ran with.
    runner_env: str | None = None
    ts: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.define
class TraceDraft:
    id: str
    model: str
    t0: float = attrs.Factory(time.monotonic)
    ts: float = attrs.Factory(time.time)
    status: str | None = None
    error: str | None = None
    admission_wait_s: float | None = None
    runner: str | None = None
    # The environment the neuron set for that runner (MLX_METAL_FAST_SYNCH, a
    # catalogue `env`...), secrets masked.
    runner_env: str | None = None
    prompt_tokens: int | None = None
    runner_prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    tok_s: float | None = None
    stream: bool = False

    def usage(self, usage: dict[str, Any]) -> None:
        p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(p, int):
            self.runner_prompt_tokens = p
        if isinstance(c, int):
            self.completion_tokens = c

    def done(self, status: str, error: str | None, seq: int = 0) -> Trace:
        return Trace(
            id=self.id,
            model=self.model,
            status=self.status or status,
            error=self.error or error,
            admission_wait_s=self.admission_wait_s,
            runner=self.runner,
            runner_env=self.runner_env,
            prompt_tokens=self.prompt_tokens,
            runner_prompt_tokens=self.runner_prompt_tokens,
            completion_tokens=self.completion_tokens,
            ttft_s=self.ttft_s,
            tok_s=self.tok_s,
            duration_s=round(time.monotonic() - self.t0, 6),
            stream=self.stream,
            ts=self.ts,
            seq=seq,
        )


def journals(config: NeuronConfig) -> tuple[Journal[Event], Journal[Trace]]:
    """The events and traces journals the `journal_*` keys describe."""
    events, traces = shared_journals(config)
    return events, traces
