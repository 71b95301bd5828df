"""The CPU a translated API adds per streamed frame, against the chat path's relay.

`python -m bench.api_frames [--tokens N] [--streams S] [--rounds R]`

A chat stream as a neuron sends it for smollm2-135m (mlx_lm.server's chunk shape,
prefill keepalives, one content frame per token, the finish frame, the usage frame,
`[DONE]`), one SSE event per read as the relay gets them, goes through what cortex's
relay does per read:

  chat        the chat path: the error-frame and [DONE] marker checks and the trace's
              scan (cortex.http.proxy `_relay`, less the socket write)
  <api>       the same, plus that API's transcoder turning the read into its events
              (every arm in ARMS: one per translated API)

Arms run interleaved, `--rounds` times, each over `--streams` whole streams; the
figure is this thread's CPU time (not wall time: other processes share the box),
per read, median over rounds. It prints each arm's µs per frame and the difference
from chat; issue 18's goal is within 30 µs.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable

from cortex.core.tracing import TraceDraft
from cortex.http.anthropic import MessageStream
from cortex.http.dialect import Transcoder
from cortex.http.proxy import _DONE, _ERROR_FRAME, _TAIL, _holds
from cortex.http.responses import Head, ResponseStream

# One transcoder per stream, per translated API. Another API's module adds its arm here.
ARMS: dict[str, Callable[[], Transcoder]] = {
    "responses": lambda: ResponseStream(
        Head.of({"model": "smollm2-135m", "input": "Tell me about Paris.", "max_output_tokens": 64})
    ),
    "messages": lambda: MessageStream("smollm2-135m"),
}


def _frame(obj: object) -> bytes:
    # mlx_lm.server writes `json.dumps` with its default separators.
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def recorded_stream(tokens: int) -> list[bytes]:
    """A streamed chat answer as the relay reads it (one event per read); its shape is
    the one smollm2-135m's runner sends through the neuron (recorded, then regenerated
    here so that the bench needs no model)."""
    head = {
        "id": "chatcmpl-2745f6e9-d062-4426-bb8b-a651fecc922f",
        "system_fingerprint": "mlx_lm-0.32.2",
        "object": "chat.completion.chunk",
        "model": "smollm2-135m",
        "created": 1796591315,
    }
    words = ["Paris", " is", " the", " capital", " of", " France", ",", " a", " city", " of"]
    reads = [b": keepalive\n\n", b": keepalive 10/11\n\n", b": keepalive 11/11\n\n"]
    for i in range(tokens):
        delta = {"role": "assistant", "content": words[i % len(words)]}
        choice = {"index": 0, "finish_reason": None, "delta": delta}
        reads.append(_frame({**head, "choices": [choice]}))
    last = {"index": 0, "finish_reason": "length", "delta": {"role": "assistant"}}
    reads.append(_frame({**head, "choices": [last]}))
    usage = {"prompt_tokens": 35, "completion_tokens": tokens, "total_tokens": 35 + tokens}
    reads.append(_frame({**head, "object": "chat.completion", "choices": [], "usage": usage}))
    reads.append(b"data: [DONE]\n\n")
    return reads


def relay(reads: list[bytes], transcoder: Transcoder | None) -> int:
    """The relay's per-read work for one stream; the bytes the client would get."""
    trace = TraceDraft("bench")
    tail, sent = b"", 0
    for chunk in reads:
        _holds(_ERROR_FRAME, tail, chunk)
        sent += len(chunk if transcoder is None else transcoder.feed(chunk))
        trace.scan(chunk)
        if _holds(_DONE, tail, chunk):
            break
        tail = chunk[-_TAIL:]
    return sent


def run_arm(reads: list[bytes], make: Callable[[], Transcoder] | None, streams: int) -> float:
    """This thread's CPU µs per read over `streams` whole streams."""
    gc.collect()
    gc.disable()
    try:
        t0 = time.thread_time_ns()
        for _ in range(streams):
            relay(reads, None if make is None else make())
        spent = time.thread_time_ns() - t0
    finally:
        gc.enable()
    return spent / 1000 / (streams * len(reads))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64, help="content frames per stream")
    ap.add_argument("--streams", type=int, default=200, help="streams per arm per round")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    reads = recorded_stream(args.tokens)
    arms: dict[str, Callable[[], Transcoder] | None] = {"chat": None, **ARMS}
    per: dict[str, list[float]] = {name: [] for name in arms}
    for make in arms.values():  # warm-up: imports, caches
        run_arm(reads, make, 5)
    for _ in range(args.rounds):
        for name, make in arms.items():
            per[name].append(run_arm(reads, make, args.streams))
    sizes = {name: relay(reads, None if make is None else make()) for name, make in arms.items()}
    print(
        f"{len(reads)} reads per stream ({args.tokens} tokens), {args.streams} streams x"
        f" {args.rounds} rounds per arm; this thread's CPU time"
    )
    print(
        f"{'arm':<12}{'µs/frame p50':>14}{'min':>9}{'max':>9}{'+µs vs chat':>13}{'bytes out':>11}"
    )
    base = statistics.median(per["chat"])
    for name, values in per.items():
        mid = statistics.median(values)
        extra = "" if name == "chat" else f"{mid - base:+.1f}"
        print(
            f"{name:<12}{mid:>14.1f}{min(values):>9.1f}{max(values):>9.1f}{extra:>13}"
            f"{sizes[name]:>11}"
        )


if __name__ == "__main__":
    main()
