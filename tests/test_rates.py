"""Rates only over a real interval (issue 22): >= 0.1 s and >= 2 tokens, else none,
shown as an en dash (NO_RATE) in `cortex bench` and `cortex trace`."""

from __future__ import annotations

import io

from cortex.cli.bench import StreamResult, render
from cortex.cli.trace import _rate
from shared.rates import NO_RATE, decode_rate, rate


def test_rate_needs_a_real_interval() -> None:
    assert rate(10, 0.5) == 20.0
    assert rate(10, 0.099) is None  # the 27,925.8 tok/s of a near-zero time
    assert rate(1, 1.0) is None and rate(5, 0.0) is None and rate(5, -1.0) is None
    assert decode_rate(11, 1.0, 1.5) == 20.0  # 10 tokens after the first over 0.5 s
    assert decode_rate(11, 1.0, 1.0004) is None
    assert decode_rate(2, 1.0, 9.0) is None  # one token after the first: no rate


def test_bench_shows_a_dash_for_a_stream_too_short_to_time() -> None:
    # The case the issue saw: 16 tokens, their last 15 in half a millisecond.
    fast = StreamResult(ok=True, tokens=16, ttft_s=0.0500, total_s=0.0505)
    assert fast.decode_tps is None
    assert StreamResult(ok=True, tokens=16, ttft_s=0.05, total_s=0.35).decode_tps == 50.0
    row = {"node": "a", "streams": 1, "ok": 1, "tokens": 16, "wall_s": 0.05}
    row |= {"tok_s": None, "decode_tok_s_per_stream_p50": None}
    row |= {"ttft_s_p50": 0.05, "ttft_s_max": 0.05, "errors": []}
    out = io.StringIO()
    render({"model": "m", "streams": 1, "max_tokens": 16, "replicas": [row]}, out)
    print(out.getvalue())
    cells = out.getvalue().splitlines()[2].split()
    assert cells[3] == cells[4] == NO_RATE


def test_trace_shows_a_dash_without_a_rate() -> None:
    assert NO_RATE in _rate(None, "decode", "the neuron")
    assert "12.5 tok/s" in _rate(12.5, "decode", "the neuron")
