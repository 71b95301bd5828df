"""The `timing` object a client may ask for on its answers: `X-Cortex-Timing: 1`.

An opt-in, never the default: OpenAI's answer has no `timing`, and a strict
client (a schema-checking SDK) must keep seeing exactly OpenAI's shape. A
header, not a body field, so the body a client sends stays OpenAI's too (and
cortex forwards request headers to the neuron unchanged).

Where it goes: a non-streamed answer gets it at the top level, beside `usage`;
a stream gets it on its final usage frame, which exists only when the client
asks for it (`stream_options: {"include_usage": true}`).

What it holds, measured by the neuron that ran the request:
- `queue_s`: the wait for an admission slot on the neuron;
- `ttft_s`: from the request's handing to the runner to its first token
  (so a client's time to first token is about `queue_s + ttft_s`);
- `prompt_tps`: prompt tokens over `ttft_s` (the prefill rate; a prompt-cache
  hit makes it high, since those tokens were not computed again);
- `generation_tps`: completion tokens read after the first over the time from
  the first to the last. Tokens read in one go with the first are left out:
  they were made at some time before it (a neuron starved of CPU for a moment
  reads a burst at once), and counting them over the interval after it made a
  decode rate of ~200 tok/s read as 3,700.
A rate over less than MIN_RATE_SPAN_S is null, never a huge figure: tokens that
arrive in one read share one timestamp, and a near-zero interval says nothing.
10 ms keeps a timestamp's jitter on the event loop (about a millisecond) under a
tenth of the interval, and still times a tiny model's short answer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

TIMING_HEADER = "X-Cortex-Timing"
_YES = frozenset({"1", "true", "yes", "on"})
# The shortest interval a rate is computed over (seconds).
MIN_RATE_SPAN_S = 0.01


def wants_timing(headers: Mapping[str, str]) -> bool:
    """Did the client opt in (`X-Cortex-Timing: 1`, or true/yes/on)?"""
    return headers.get(TIMING_HEADER, "").strip().lower() in _YES


def rate(tokens: Any, span_s: float | None) -> float | None:
    """Tokens per second over a real interval, else None."""
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        return None
    if span_s is None or span_s < MIN_RATE_SPAN_S:
        return None
    return round(tokens / span_s, 2)


def timing(
    usage: Mapping[str, Any] | None,
    *,
    queue_s: float | None,
    sent_at: float | None,
    first_at: float | None,
    last_at: float | None,
    first_read: int = 1,
) -> dict[str, float | None]:
    """The `timing` object from monotonic times: the request sent to the runner, its
    first and last token frames (None where not seen, as in an unstreamed answer);
    `first_read` frames came in the same read as the first."""
    usage = usage or {}
    ttft = first_at - sent_at if first_at is not None and sent_at is not None else None
    span = last_at - first_at if last_at is not None and first_at is not None else None
    completion = usage.get("completion_tokens")
    after_first = completion - max(1, first_read) if isinstance(completion, int) else None
    return {
        "queue_s": None if queue_s is None else round(queue_s, 6),
        "ttft_s": None if ttft is None else round(ttft, 6),
        "prompt_tps": rate(usage.get("prompt_tokens"), ttft),
        "generation_tps": rate(after_first, span),
    }


def timed_event(frame: Mapping[str, Any], t: Mapping[str, Any]) -> bytes:
    """A stream's usage frame (parsed) as an SSE event with `timing` after `usage`.

    json.dumps' default separators, as the runner's: the proxy's model-name
    replacement still finds the runner's `"model": ...` in it.
    """
    return b"data: " + json.dumps({**frame, "timing": t}).encode() + b"\n\n"


def timed_body(raw: bytes, t: Mapping[str, Any]) -> bytes:
    """A one-piece JSON answer with `timing` added (unchanged if it is not an object)."""
    try:
        body = json.loads(raw)
    except ValueError:
        return raw
    if not isinstance(body, dict):
        return raw
    return json.dumps({**body, "timing": t}).encode()
