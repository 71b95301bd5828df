"""SIGTERM with a long stream: drained for `drain_s` (listening, saying so), then ended
with an error frame; a second SIGTERM ends it at once."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from shared.sse import DONE
from tests.conftest import (
    LONG_STREAM,
    NeuronProcess,
    kill_pid,
    read_until,
    runner_pids,
    wait_until,
)
from tests.e2e.conftest import CortexProcess
from tests.support.waiting import until

# Long enough for tokens to come during the drain on a starved machine.
DRAIN_S = 3.0
# The runner is frozen during the drain (below): never taken for stalled meanwhile
# (no heartbeat looks at it within the test, and none would kill it).
NO_STALL = {"stall_timeout_s": 600.0, "health_check_interval_s": 600.0}


async def _cut_by_sigterm(
    url: str, model: str, runner: int, stop: Callable[[], None]
) -> tuple[bytes, float]:
    """Stream from `url`, SIGTERM the server after the first token; (tail, seconds to end).

    Once two more tokens came during the drain, the runner is frozen (SIGSTOP): the
    stream can then end only by the drain, never by itself (a live one ends after its
    context's worth of tokens, sooner on a faster machine)."""
    body = {"model": model, "prompt": "once upon", "stream": True, **LONG_STREAM}
    async with (
        aiohttp.ClientSession() as s,
        s.post(url + "/v1/completions", json=body) as resp,
    ):
        assert resp.status == 200
        await read_until(resp, b'"text"')
        t0 = time.monotonic()
        stop()
        tail = b""
        try:
            while tail.count(b'"text"') < 2 and (chunk := await resp.content.readany()):
                tail += chunk
            kill_pid(runner, signal.SIGSTOP)
            while chunk := await resp.content.readany():
                tail += chunk
        finally:
            kill_pid(runner, signal.SIGCONT)
        return tail, time.monotonic() - t0


def _error_frame(tail: bytes) -> dict[str, Any]:
    assert tail.endswith(DONE), tail[-300:]
    frames = [
        json.loads(line[len(b"data: ") :])
        for line in tail.split(b"\n")
        if line.startswith(b"data: {")
    ]
    errors = [f["error"] for f in frames if "error" in f]
    assert len(errors) == 1, tail[-500:]
    return dict(errors[0])


async def test_neuron_sigterm_drains_then_ends_streams_cleanly(
    neuron_factory: Callable[..., NeuronProcess], demo_model: Path
) -> None:
    """A neuron's SIGTERM lets a stream run `drain_s`, then sends an error frame and [DONE]."""
    n = neuron_factory(
        {
            "drain_s": DRAIN_S,
            "runner": NO_STALL,
            "load": [{"model_id": "d", "source": str(demo_model)}],
        }
    )
    n.wait_state("d", "ready")
    (runner,) = runner_pids("d", parent=n.process.pid)

    def sigterm() -> None:
        n.process.send_signal(signal.SIGTERM)

    tail, took = await _cut_by_sigterm(n.url, "d", runner, sigterm)
    err = _error_frame(tail)
    assert (err["code"], err["status"]) == ("shutting_down", 503)
    # Tokens kept coming during the drain: the stream was not cut at once.
    assert tail.count(b'"text"') > 1
    assert took >= DRAIN_S * 0.9
    assert n.process.wait(30) == 0, n.log()


async def test_cortex_sigterm_drains_then_ends_streams_cleanly(
    neuron_factory: Callable[..., NeuronProcess],
    cortex_factory: Callable[..., CortexProcess],
    demo_model: Path,
) -> None:
    """Cortex's SIGTERM does the same for a stream it proxies; the neuron is unharmed."""
    n = neuron_factory({"runner": NO_STALL, "load": [{"model_id": "d", "source": str(demo_model)}]})
    n.wait_state("d", "ready")
    (runner,) = runner_pids("d", parent=n.process.pid)
    c = cortex_factory([("a", n)], [{"id": "d", "source": str(demo_model)}], drain_s=DRAIN_S)
    wait_until(
        lambda: any(loc["state"] == "ready" for loc in c.model("d")["locations"]),
        what="cortex to see d ready",
    )

    def sigterm() -> None:
        assert c.process is not None
        c.process.send_signal(signal.SIGTERM)

    tail, took = await _cut_by_sigterm(c.url, "d", runner, sigterm)
    err = _error_frame(tail)
    assert (err["code"], err["status"]) == ("shutting_down", 503)
    assert took >= DRAIN_S * 0.9
    assert c.process is not None and c.process.wait(30) == 0, c.log()
    assert n.model("d") is not None and n.model("d")["state"] == "ready"  # type: ignore[index]


async def test_neuron_drains_listening_and_a_second_sigterm_waits_no_longer(
    neuron_factory: Callable[..., NeuronProcess], demo_model: Path
) -> None:
    """After SIGTERM the neuron still answers: /health says `draining`, a new request gets
    503 shutting_down with Retry-After. A second SIGTERM ends the stream at once (error
    frame, [DONE]) rather than after `drain_s`, and the neuron exits cleanly."""
    n = neuron_factory(
        {
            "drain_s": 120.0,
            "runner": NO_STALL,
            "load": [{"model_id": "d", "source": str(demo_model)}],
        }
    )
    n.wait_state("d", "ready")
    (runner,) = runner_pids("d", parent=n.process.pid)
    body = {"model": "d", "prompt": "once upon", "stream": True, **LONG_STREAM}
    async with (
        aiohttp.ClientSession() as s,
        s.post(n.url + "/v1/completions", json=body) as resp,
    ):
        await read_until(resp, b'"text"')
        kill_pid(runner, signal.SIGSTOP)  # the stream cannot end by itself meanwhile
        try:
            n.process.send_signal(signal.SIGTERM)
            await _says_draining(s, n.url)
            t0 = time.monotonic()
            n.process.send_signal(signal.SIGTERM)
            tail = b""
            while chunk := await resp.content.readany():
                tail += chunk
            took = time.monotonic() - t0
        finally:
            kill_pid(runner, signal.SIGCONT)
    err = _error_frame(tail)
    assert (err["code"], err["status"]) == ("shutting_down", 503)
    print(f"\nsecond SIGTERM: the stream ended {took:.2f} s later (drain_s 120)")
    assert took < 60, "the second SIGTERM waited for the drain"
    assert n.process.wait(30) == 0, n.log()


async def _says_draining(s: aiohttp.ClientSession, url: str) -> None:
    """The draining neuron still answers: /health `draining`, new work 503 shutting_down."""

    async def draining() -> bool:
        async with s.get(url + "/health") as r:
            return r.status == 200 and (await r.json())["status"] == "draining"

    await until(draining, timeout=30, what="the neuron's /health to say draining")
    ask = {"model": "d", "prompt": "x", "max_tokens": 2}
    async with s.post(url + "/v1/completions", json=ask) as r:
        assert r.status == 503 and r.headers["Retry-After"] == "2"
        assert (await r.json())["error"]["code"] == "shutting_down"
