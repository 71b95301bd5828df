"""cortex.tracing: what the relay learns from the bytes it passes on."""

from __future__ import annotations

import json

from cortex.tracing import TraceDraft
from neuron.tracing import usage_comment

STREAM = (
    b'data: {"choices":[{"delta":{"content":"a: usage {\\"x\\":1}"}}]}\n\n'
    b'data: {"choices":[{"delta":{"content":"b"}}]}\n\n'
    + usage_comment({"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13})
    + b"data: [DONE]\n\n"
)


def test_usage_comment_is_read_wherever_the_reads_cut_it() -> None:
    """The neuron's `: usage` comment is found even split across two reads, and a
    content string that looks like one is not taken for it."""
    for cut in range(1, len(STREAM)):
        t = TraceDraft("r")
        t.first_at = 1.0
        t.scan(STREAM[:cut])
        t.scan(STREAM[cut:])
        assert (t.prompt_tokens, t.completion_tokens) == (11, 2), cut
        done = t.done("200")
        assert done.tokens_from == "usage" and done.completion_tokens == 2


def test_without_usage_cortex_counts_content_events() -> None:
    t = TraceDraft("r")
    t.scan(STREAM.split(b"\n: usage")[0])
    assert t.done("200").completion_tokens == 2
    assert t.done("200").tokens_from == "frames"


def test_a_usage_frame_gives_the_counts_and_is_no_token() -> None:
    frame = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    t = TraceDraft("r")
    t.scan(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')
    t.scan(b"data: " + json.dumps(frame).encode() + b"\n\ndata: [DONE]\n\n")
    assert (t.prompt_tokens, t.completion_tokens, t.frames) == (3, 1, 1)
