"""SIGTERM with a long stream: drained for `drain_s`, then ended with an error frame."""

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

# Long enough for tokens to come during the drain on a starved machine.
DRAIN_S = 3.0
# The runner is frozen during the drain (below): never taken for stalled meanwhile.
NO_STALL = {"stall_timeout_s": 600.0}


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
