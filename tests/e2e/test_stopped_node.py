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

from tests.conftest import (
    LONG_STREAM,
    NeuronProcess,
    kill_pid,
    read_until,
    runner_pids,
    wait_until,
)
from tests.e2e.conftest import CortexProcess
from tests.support.clients import chat

# Polls mark a stopped node down after ~3 rounds of poll_timeout_s (1.5 s); a stream's
# idle timeout is 5 s: ~5 s on a quiet machine. Before: 75 s unstreamed, 60 s streamed.
# The bound sits between the two, generous for a starved machine, still well under
# what it guards against.
BOUND_S = 40.0
# A stream that ends by itself (on the node that keeps running).
STREAM = {"max_tokens": 200, "logit_bias": {"1": -100}, "stream": True}


@pytest.fixture
def fleet(
    neuron_factory: Any, cortex_factory: Any, demo_model: Path, model_id: str
) -> Iterator[tuple[CortexProcess, NeuronProcess, NeuronProcess]]:
    # A runner a test freezes (SIGSTOP) is stalled (not routed to), never killed meanwhile.
    settings = {"runner": {"stall_timeout_s": 600.0}}
    a, b = neuron_factory(settings, name="a"), neuron_factory(settings, name="b")
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
    return chat(model_id, text=text, **extra)


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


def _streaming(n: NeuronProcess, model_id: str) -> bool:
    _, health = n.get("/health")
    return any(m["model_id"] == model_id and m["in_flight"] for m in health["models"])


async def test_a_stream_on_a_node_that_stops_ends_with_an_error_frame(
    fleet: tuple[CortexProcess, NeuronProcess, NeuronProcess], model_id: str
) -> None:
    """Mid-stream, the node stops: the client gets an error frame and [DONE] within the
    bound, the stream on the other node runs on, and the broken one is counted."""
    c, a, b = fleet
    url = c.url + "/v1/chat/completions"
    runners = {n.process.pid: runner_pids(model_id, parent=n.process.pid) for n in (a, b)}
    frozen: list[int] = []

    def freeze(pids: list[int]) -> None:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
            frozen.append(pid)

    def thaw(pids: list[int]) -> None:
        for pid in pids:
            kill_pid(pid, signal.SIGCONT)
            frozen.remove(pid)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        r1 = await s.post(url, json=_body(model_id, "first", **LONG_STREAM, stream=True))
        r2: aiohttp.ClientResponse | None = None
        try:
            assert r1.status == 200
            await read_until(r1, b"data: {")
            # Both runners frozen at once: the first stream, begun, can never end by
            # itself (a live one would, after its context, sooner on a faster machine).
            freeze([pid for pids in runners.values() for pid in pids])
            (held,) = [n for n in (a, b) if _streaming(n, model_id)]
            other = b if held is a else a
            thaw(runners[other.process.pid])
            # Frozen, both runners were stalled (out of routing): the thawed one first
            # answers its heartbeat again.
            name = "a" if other is a else "b"
            wait_until(lambda: _state_on(c, model_id, name) == "ready", 30, f"{name} ready")
            # The second stream goes to the other node (the least loaded), and runs there.
            r2 = await s.post(url, json=_body(model_id, "second", **STREAM))
            assert r2.status == 200, await r2.text()
            async with asyncio.timeout(60):
                await read_until(r2, b"data: {")
            os.kill(held.process.pid, signal.SIGSTOP)
            stopped = time.monotonic()

            async def rest(r: aiohttp.ClientResponse) -> tuple[bytes, float]:
                raw = await r.read()
                return raw, time.monotonic() - stopped

            (raw1, took), (raw2, _) = await asyncio.gather(rest(r1), rest(r2))
        finally:
            thaw(list(frozen))
            r1.close()
            if r2 is not None:
                r2.close()
    print(f"mid-stream stop, time to error frame: {took:.2f} s")
    # Exactly the stream on the stopped node breaks; the other one ends as it should.
    assert b'"error"' in raw1 and raw1.rstrip().endswith(b"data: [DONE]"), raw1[-500:]
    assert b'"error"' not in raw2 and raw2.rstrip().endswith(b"data: [DONE]"), raw2[-500:]
    assert took < BOUND_S, f"error frame after {took:.1f} s"
    wait_until(
        lambda: _metric(
            c, f'cortex_requests_total{{api="chat",code="stream_error",model="{model_id}"}}'
        ),
        60,
        "the broken stream counted",
    )
    assert _metric(c, "cortex_stream_errors_total{") == 1


def _neuron_requests(n: NeuronProcess, model_id: str) -> float:
    text = urllib.request.urlopen(n.url + "/metrics", timeout=5).read().decode()
    prefix = f'neuron_requests_total{{model="{model_id}"'
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


def _state_on(c: CortexProcess, model_id: str, node: str) -> str | None:
    locs = c.model(model_id)["locations"]
    return next((str(loc["state"]) for loc in locs if loc["node"] == node), None)


async def test_a_frozen_idle_runner_is_out_of_routing_and_sent_nothing(
    fleet: tuple[CortexProcess, NeuronProcess, NeuronProcess], model_id: str
) -> None:
    """A runner frozen while idle is stalled within seconds, in cortex's view too; no
    request is sent to it meanwhile, and it is ready again once it answers."""
    c, a, _ = fleet
    [pid] = runner_pids(model_id, parent=a.process.pid)
    os.kill(pid, signal.SIGSTOP)
    frozen = time.monotonic()
    try:
        wait_until(lambda: _state_on(c, model_id, "a") == "stalled", 30, "a stalled in cortex")
        took = time.monotonic() - frozen
        before = _neuron_requests(a, model_id)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            url = c.url + "/v1/chat/completions"
            answers = await asyncio.gather(
                *(_timed(s, url, _body(model_id, f"ask {i}", max_tokens=2)) for i in range(6))
            )
        assert [status for status, _, _ in answers] == [200] * 6, answers
        assert _neuron_requests(a, model_id) == before
    finally:
        kill_pid(pid, signal.SIGCONT)
    wait_until(lambda: _state_on(c, model_id, "a") == "ready", 30, "a ready again")
    print(f"frozen idle runner: out of routing in cortex {took:.1f} s after SIGSTOP")
