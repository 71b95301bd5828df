"""A neuron SIGSTOPped behind a real cortex: clients learn within seconds, not minutes.

Real neurons and runners on the demo model, a real `cortex serve`. A stopped neuron
accepts connections (the kernel does) but answers nothing: only cortex's polls
marking it down (or a stream's idle timeout) can end what waits on it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import NeuronProcess, read_until, wait_until
from tests.e2e.conftest import CortexProcess

# Generous: polls mark a stopped node down after ~3 rounds of poll_timeout_s (1.5 s);
# a stream's idle timeout is 5 s. Before: 75 s unstreamed, 60 s streamed.
BOUND_S = 20.0
# Long enough to be mid-stream when the node stops; within the demo model's context.
STREAM = {"max_tokens": 1500, "logit_bias": {"1": -100}, "stream": True}


@pytest.fixture
def fleet(
    neuron_factory: Any, cortex_factory: Any, demo_model: Path, model_id: str
) -> Iterator[tuple[CortexProcess, NeuronProcess, NeuronProcess]]:
    a, b = neuron_factory(name="a"), neuron_factory(name="b")
    for n in (a, b):
        n.load(model_id, demo_model)
    for n in (a, b):
        n.wait_state(model_id, "ready")
    c = cortex_factory([("a", a), ("b", b)], [{"id": model_id, "source": str(demo_model)}])

    def both_ready() -> bool:
        locs = c.model(model_id)["locations"]
        return sum(bool(loc["state"] == "ready" and loc["healthy"]) for loc in locs) == 2

    wait_until(both_ready, 60, "both replicas ready in cortex")
    try:
        yield c, a, b
    finally:
        for n in (a, b):
            if n.process.poll() is None:
                os.kill(n.process.pid, signal.SIGCONT)


def _body(model_id: str, text: str = "Hello", **extra: Any) -> dict[str, Any]:
    # Distinct texts: prefix affinity would send a repeated prompt to the same replica.
    return {"model": model_id, "messages": [{"role": "user", "content": text}], **extra}


def _metric(c: CortexProcess, prefix: str) -> float:
    text = urllib.request.urlopen(c.url + "/metrics", timeout=5).read().decode()
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


async def _timed(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    started = time.monotonic()
    async with session.post(url, json=body) as resp:
        raw = await resp.read()
        return resp.status, raw, time.monotonic() - started


async def test_requests_sent_to_a_stopped_node_are_answered_by_the_other(
    fleet: tuple[CortexProcess, NeuronProcess, NeuronProcess], model_id: str
) -> None:
    """Two unstreamed and two streamed requests right after one neuron stops: those routed
    to it are retried on the other replica once polls mark it down; all four are answered
    in full, each well within the bound."""
    c, a, _ = fleet
    url = c.url + "/v1/chat/completions"
    os.kill(a.process.pid, signal.SIGSTOP)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        results = await asyncio.gather(
            _timed(s, url, _body(model_id, "one", max_tokens=8)),
            _timed(s, url, _body(model_id, "two", max_tokens=8)),
            _timed(s, url, _body(model_id, "three", max_tokens=8, stream=True)),
            _timed(s, url, _body(model_id, "four", max_tokens=8, stream=True)),
        )
    print("stopped node, time to answer (s):", [round(t, 2) for _, _, t in results])
    for status, raw, took in results:
        assert status == 200, raw
        assert took < BOUND_S, f"answered after {took:.1f} s"
    for _, raw, _ in results[2:]:
        assert raw.rstrip().endswith(b"data: [DONE]") and b'"error"' not in raw
    # The stopped node had work routed to it, and it was ended, not waited out.
    assert _metric(c, 'cortex_upstream_retries_total{reason="node_down"}') >= 1


async def test_a_stream_on_a_node_that_stops_ends_with_an_error_frame(
    fleet: tuple[CortexProcess, NeuronProcess, NeuronProcess], model_id: str
) -> None:
    """Mid-stream, the node stops: the client gets an error frame and [DONE] within the
    bound, the stream on the other node runs on, and the broken one is counted."""
    c, a, _ = fleet
    url = c.url + "/v1/chat/completions"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        r1 = await s.post(url, json=_body(model_id, "first", **STREAM))
        r2 = await s.post(url, json=_body(model_id, "second", **STREAM))
        try:
            assert (r1.status, r2.status) == (200, 200)
            for r in (r1, r2):
                await read_until(r, b"data: {")
            os.kill(a.process.pid, signal.SIGSTOP)
            stopped = time.monotonic()

            async def rest(r: aiohttp.ClientResponse) -> tuple[bytes, float]:
                raw = await r.read()
                return raw, time.monotonic() - stopped

            (raw1, t1), (raw2, t2) = await asyncio.gather(rest(r1), rest(r2))
        finally:
            r1.close()
            r2.close()
    broken = [(raw, t) for raw, t in ((raw1, t1), (raw2, t2)) if b'"error"' in raw]
    print("mid-stream stop, time to error frame (s):", [round(t, 2) for _, t in broken])
    assert len(broken) == 1, "exactly the stream on the stopped node breaks"
    raw, took = broken[0]
    assert raw.rstrip().endswith(b"data: [DONE]")
    assert took < BOUND_S, f"error frame after {took:.1f} s"
    wait_until(
        lambda: _metric(c, f'cortex_requests_total{{code="stream_error",model="{model_id}"}}'),
        10,
        "the broken stream counted",
    )
    assert _metric(c, "cortex_stream_errors_total{") == 1
