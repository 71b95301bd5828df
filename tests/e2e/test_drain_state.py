"""Drain as a state both sides know (issue 19 item 2): real neurons, runners and cortex.

A neuron given SIGTERM keeps listening and says `draining` in /status: cortex routes
new requests elsewhere, lets the stream it holds there finish, and takes the node
out once it is gone. Cortex's own drain answers new requests and /health with 503
`shutting_down` while a stream it proxies finishes.

The stream's runner is frozen (SIGSTOP) from its first token until the checks are
done, so that the stream cannot end by itself before them on any machine; then it
resumes and ends by itself.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from shared.sse import DONE
from tests.conftest import NeuronProcess, kill_pid, read_until, runner_pids
from tests.e2e.conftest import CortexProcess
from tests.e2e.test_shutdown import NO_STALL
from tests.support.waiting import until

# Ends by itself soon after its runner resumes. The demo model's end-of-text token is
# banned (random weights may pick it at any step).
STREAM_TOKENS = 200
STREAM = {"max_tokens": STREAM_TOKENS, "logit_bias": {"1": -100}, "stream": True}
# Far above what the test takes: a drain ends because its stream did.
DRAIN_S = 120.0
# Polls of the draining node that must succeed while its stream is open (the old
# code cut the stream after 3 refused ones).
POLLS = 4


async def _json(
    s: aiohttp.ClientSession, url: str, body: dict[str, Any] | None = None
) -> tuple[int, Any, dict[str, str]]:
    method = "GET" if body is None else "POST"
    async with s.request(method, url, json=body, timeout=aiohttp.ClientTimeout(60)) as r:
        return r.status, json.loads(await r.read() or b"null"), dict(r.headers)


async def _node(s: aiohttp.ClientSession, c: CortexProcess, name: str) -> dict[str, Any]:
    _, state, _ = await _json(s, c.url + "/admin/state")
    return next(n for n in state["nodes"] if n["name"] == name)


def _stream_body(model: str) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "go on"}],
        "stream_options": {"include_usage": True},
        **STREAM,
    }


async def _read_rest(resp: aiohttp.ClientResponse, got: bytes) -> tuple[bytes, float]:
    """The stream's remaining bytes, and the monotonic time it ended."""
    while chunk := await resp.content.readany():
        got += chunk
    return got, time.monotonic()


def _frames(text: bytes) -> list[dict[str, Any]]:
    return [
        json.loads(line[len(b"data: ") :])
        for line in text.split(b"\n")
        if line.startswith(b"data: {")
    ]


def _assert_complete(text: bytes) -> None:
    """Ended by itself: no error frame, its usage says every token came, then [DONE]."""
    assert text.rstrip().endswith(DONE.rstrip()), text[-300:]
    frames = _frames(text)
    assert not [f for f in frames if "error" in f], text[-500:]
    usage = [f["usage"] for f in frames if f.get("usage")]
    assert usage and usage[-1]["completion_tokens"] == STREAM_TOKENS, text[-500:]


async def test_a_draining_neuron_keeps_its_stream_through_cortex(
    neuron_factory: Callable[..., NeuronProcess],
    cortex_factory: Callable[..., CortexProcess],
    demo_model: Path,
    model_id: str,
) -> None:
    """SIGTERM to a neuron with a stream through cortex: cortex shows it draining and
    sends new requests to the other node; the stream ends by itself, complete; the
    node is taken out once its drain is over and it exits."""
    load = [{"model_id": model_id, "source": str(demo_model)}]
    a = neuron_factory({"drain_s": DRAIN_S, "runner": NO_STALL, "load": load}, name="a")
    b = neuron_factory({"load": load}, name="b")
    c = cortex_factory([("a", a), ("b", b)], [{"id": model_id, "source": str(demo_model)}])
    async with aiohttp.ClientSession() as s:

        async def both_ready() -> bool:
            _, m, _ = await _json(s, c.url + f"/v1/models/{model_id}")
            return [loc["state"] for loc in m["locations"]] == ["ready", "ready"]

        await until(both_ready, timeout=120, what="both replicas ready in cortex")
        (runner,) = runner_pids(model_id, parent=a.process.pid)
        async with s.post(
            c.url + "/v1/chat/completions",
            json=_stream_body(model_id),
            headers={"X-Cortex-Node": "a"},
        ) as resp:
            assert resp.status == 200
            got = await read_until(resp, b'"content"')
            kill_pid(runner, signal.SIGSTOP)
            try:
                reader = asyncio.ensure_future(_read_rest(resp, got))
                t0 = time.monotonic()
                a.process.send_signal(signal.SIGTERM)
                seen_draining, polls = await _while_a_drains(s, c, model_id)
                assert not reader.done(), "the stream ended while a drained"
                checked = time.monotonic() - t0
            finally:
                kill_pid(runner, signal.SIGCONT)
            text, ended = await asyncio.wait_for(reader, DRAIN_S)
        lived = ended - t0
        _assert_complete(text)
        print(
            f"\nneuron drain through cortex: stream lived {lived:.2f} s after SIGTERM and "
            f"ended complete ({STREAM_TOKENS} tokens); cortex showed a draining after "
            f"{seen_draining:.2f} s and read {polls} answers of a while it drained "
            f"(checks done at {checked:.2f} s, then the runner resumed)"
        )
        code = await asyncio.to_thread(a.process.wait, 60)
        exited = time.monotonic() - ended
        assert code == 0, a.log()
        print(f"a exited {exited:.2f} s after its stream ended (its drain over)")
        assert "draining 1 request(s)" in a.log()

        async def gone() -> dict[str, Any] | None:
            n = await _node(s, c, "a")
            return n if not n["healthy"] and not n["draining"] else None

        # Its polls refused now: lost, no longer draining (an attempt there would end).
        node = await until(gone, timeout=60, what="cortex to take a out once it is gone")
        assert node["failures"] >= 3, node


async def _while_a_drains(
    s: aiohttp.ClientSession, c: CortexProcess, model_id: str
) -> tuple[float, int]:
    """Cortex shows a draining, sends a new request to b, and polls a (answering) again
    and again; (seconds until it showed draining, answers read meanwhile)."""
    t0 = time.monotonic()
    node = await until(lambda: _draining(s, c, "a"), timeout=60, what="cortex to show a draining")
    seen = time.monotonic() - t0
    assert node["healthy"] is False and node["recycling"] is False, node
    rid = f"drain-{uuid.uuid4().hex[:8]}"
    ask = {"model": model_id, "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}
    async with s.post(c.url + "/v1/chat/completions", json=ask, headers={"X-Request-Id": rid}) as r:
        assert r.status == 200, await r.text()
    trace = await until(lambda: _trace(s, c, rid), timeout=30, what="the new request's trace")
    assert trace["nodes"] == ["b"], trace
    return seen, await _polls_while_draining(s, c, "a", POLLS)


async def _draining(s: aiohttp.ClientSession, c: CortexProcess, name: str) -> Any:
    n = await _node(s, c, name)
    return n if n["draining"] and n["status"] == "draining" else None


async def _trace(s: aiohttp.ClientSession, c: CortexProcess, rid: str) -> Any:
    _, body, _ = await _json(s, c.url + "/admin/traces?limit=50")
    return next((t for t in body["traces"] if t["id"] == rid), None)


async def _polls_while_draining(
    s: aiohttp.ClientSession, c: CortexProcess, name: str, count: int
) -> int:
    """Wait until cortex has read `count` more answers of the draining node."""
    seen: set[float] = set()

    async def enough() -> bool:
        n = await _node(s, c, name)
        assert n["draining"] and n["failures"] == 0, n
        seen.add(n["last_ok"])
        return len(seen) > count

    await until(enough, timeout=60, what=f"{count} polls of {name} while it drains")
    return len(seen) - 1


async def test_cortex_drain_answers_503_while_its_stream_finishes(
    neuron_factory: Callable[..., NeuronProcess],
    cortex_factory: Callable[..., CortexProcess],
    demo_model: Path,
    model_id: str,
) -> None:
    """SIGTERM to cortex with a stream open: a new request gets 503 shutting_down with
    Retry-After, /health 503 shutting_down; the stream ends by itself, complete, and
    cortex exits then (not at drain_s)."""
    load = [{"model_id": model_id, "source": str(demo_model)}]
    n = neuron_factory({"runner": NO_STALL, "load": load})
    c = cortex_factory([("a", n)], [{"id": model_id, "source": str(demo_model)}], drain_s=DRAIN_S)
    assert c.process is not None
    async with aiohttp.ClientSession() as s:

        async def ready() -> bool:
            _, m, _ = await _json(s, c.url + f"/v1/models/{model_id}")
            return any(loc["state"] == "ready" for loc in m["locations"])

        await until(ready, timeout=120, what="the replica ready in cortex")
        (runner,) = runner_pids(model_id, parent=n.process.pid)
        async with s.post(c.url + "/v1/chat/completions", json=_stream_body(model_id)) as resp:
            assert resp.status == 200
            got = await read_until(resp, b'"content"')
            kill_pid(runner, signal.SIGSTOP)
            try:
                reader = asyncio.ensure_future(_read_rest(resp, got))
                t0 = time.monotonic()
                c.process.send_signal(signal.SIGTERM)
                await _while_cortex_drains(s, c, model_id)
                assert not reader.done(), "the stream ended while cortex drained"
            finally:
                kill_pid(runner, signal.SIGCONT)
            text, ended = await asyncio.wait_for(reader, DRAIN_S)
        _assert_complete(text)
        code = await asyncio.to_thread(c.process.wait, 60)
        exited = time.monotonic() - ended
        assert code == 0, c.log()
        print(
            f"\ncortex drain: stream lived {ended - t0:.2f} s after SIGTERM and ended complete;"
            f" cortex exited {exited:.2f} s after it (drain_s {DRAIN_S:g})"
        )
        assert exited < DRAIN_S / 2, "cortex waited for drain_s with nothing in flight"


async def _while_cortex_drains(s: aiohttp.ClientSession, c: CortexProcess, model_id: str) -> None:
    """/health and a new request answer 503 shutting_down with Retry-After; the admin
    API still answers (an operator may look)."""

    async def health_503() -> Any:
        status, body, headers = await _json(s, c.url + "/health")
        return (body, headers) if status == 503 else None

    body, headers = await until(health_503, timeout=30, what="/health to answer 503")
    assert body["error"]["code"] == "shutting_down" and headers["Retry-After"] == "2"
    ask = {"model": model_id, "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}
    status, body, headers = await _json(s, c.url + "/v1/chat/completions", ask)
    assert (status, body["error"]["code"]) == (503, "shutting_down"), body
    assert headers["Retry-After"] == "2"
    status, _, _ = await _json(s, c.url + "/admin/state")
    assert status == 200
