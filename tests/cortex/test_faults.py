"""Faults through cortex against fake neurons: poison never spreads, lost nodes end their
attempts at once, and /metrics counts what was sent."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from cortex.run.poller import FLEET, POLLER
from shared.catalogue import ModelSpec
from shared.errors import sse_error_frame
from tests.cortex.fakes import FakeNeuron, catalogue, fleet, gateway, sse_frames, stop_all
from tests.support.clients import CHAT, chat
from tests.support.metrics import metric
from tests.support.waiting import until

Client = TestClient[web.Request, web.Application]
KEEPALIVE = b": keepalive\n\n"
# What a neuron sends when its runner fails a stream before any token.
RUNNER_FRAME = sse_error_frame("runner answered 404: generation thread died")


@pytest.fixture
async def three() -> AsyncIterator[list[FakeNeuron]]:
    nodes = await fleet("n1", "n2", "n3")
    for n in nodes:
        n.add_model("m1")
    yield nodes
    await stop_all(nodes)


async def _metrics(client: Client) -> str:
    return await (await client.get("/metrics")).text()


def _chats(nodes: list[FakeNeuron]) -> int:
    return sum(n.calls["chat"] for n in nodes)


# -- poison never spreads ------------------------------------------------------------------


async def test_runner_fault_is_retried_once_then_502(three: list[FakeNeuron]) -> None:
    """A request every runner fails (502 upstream_error) reaches two replicas, not three,
    and is answered 502 upstream_error naming both failures."""
    for n in three:
        n.chat_error = (502, "upstream_error")
    async with gateway(three) as client:
        resp = await client.post(CHAT, json=chat())
        body = await resp.json()
        assert resp.status == 502 and body["error"]["code"] == "upstream_error"
        assert body["error"]["message"].count("upstream_error") == 2
        text = await _metrics(client)
    assert _chats(three) == 2
    assert metric(text, "cortex_upstream_retries_total", reason="runner_fault") == 1
    assert metric(text, "cortex_requests_total", api="chat", model="m1", code="502") == 1


async def test_one_runner_fault_is_served_by_another_replica(three: list[FakeNeuron]) -> None:
    """One broken runner costs the client nothing: the next replica answers."""
    three[0].chat_error = (502, "upstream_error")
    three[1].add_model("m1", in_flight=1)
    three[2].add_model("m1", in_flight=1)
    async with gateway(three) as client:
        resp = await client.post(CHAT, json=chat())
        assert resp.status == 200
    assert three[0].calls["chat"] == 1 and _chats(three) == 2


async def test_error_frame_before_any_data_is_a_runner_fault(three: list[FakeNeuron]) -> None:
    """A stream whose first event is the neuron's error frame (after keepalives) is not
    committed: it is retried once, and a second such frame is 502 upstream_error."""
    for n in three:
        n.stream_chunks = [KEEPALIVE, RUNNER_FRAME]
    async with gateway(three) as client:
        resp = await client.post(CHAT, json=chat(stream=True))
        body = await resp.json()
        assert resp.status == 502 and body["error"]["code"] == "upstream_error"
        assert body["error"]["message"].count("generation thread died") == 2
    assert _chats(three) == 2


async def test_error_frame_before_data_then_a_good_replica(three: list[FakeNeuron]) -> None:
    """The client sees only the good replica's stream, not the failed one's frame."""
    three[0].stream_chunks = [KEEPALIVE, RUNNER_FRAME]
    three[1].add_model("m1", in_flight=1)
    three[2].add_model("m1", in_flight=1)
    async with gateway(three) as client:
        resp = await client.post(CHAT, json=chat(stream=True))
        assert resp.status == 200
        assert await resp.read() == b"".join(sse_frames())


async def test_a_4xx_frame_before_data_is_the_clients_error(three: list[FakeNeuron]) -> None:
    """A neuron that refused the request after its first keepalive: 400, never retried."""
    frame = sse_error_frame("bad `stop`", 400, "invalid_request")
    for n in three:
        n.stream_chunks = [KEEPALIVE, frame]
    async with gateway(three) as client:
        resp = await client.post(CHAT, json=chat(stream=True))
        body = await resp.json()
        assert (resp.status, body["error"]["code"]) == (400, "invalid_request")
    assert _chats(three) == 1


async def test_connect_failures_are_still_retried_on_every_replica(
    three: list[FakeNeuron],
) -> None:
    """Not runner faults: two refused connections, then the third replica answers."""
    three[2].add_model("m1", in_flight=1)  # the last choice
    async with gateway(three) as client:
        await three[0].stop()
        await three[1].stop()
        resp = await client.post(CHAT, json=chat())
        assert resp.status == 200 and (await resp.json())["served_by"] == "n3"


# -- /health names models without a working replica --------------------------------------


async def test_health_names_models_without_a_working_replica() -> None:
    """Every replica failed, or on an unhealthy node: degraded, with the model and why."""
    nodes = await fleet("n1", "n2")
    try:
        nodes[0].add_model("m1", "failed", error="generation thread died")
        nodes[1].add_model("m1", "ready")
        nodes[1].add_model("m2", "recovering")
        async with gateway(nodes) as client:
            assert client.app is not None
            body = await (await client.get("/health")).json()
            assert body["status"] == "degraded"
            assert [m["model"] for m in body["models_without_replica"]] == ["m2"]
            nodes[1].health_ok = False
            for _ in range(3):
                await client.app[POLLER].poll_once()
            body = await (await client.get("/health")).json()
            broken = {m["model"]: m["reason"] for m in body["models_without_replica"]}
            assert set(broken) == {"m1", "m2"}
            assert "generation thread died" in broken["m1"]
            assert "n2: node unhealthy" in broken["m1"]
    finally:
        await stop_all(nodes)


async def test_health_ok_when_every_wanted_model_is_served() -> None:
    """A keep_loaded model ready somewhere, all nodes healthy: ok, nothing listed."""
    nodes = await fleet("n1")
    try:
        nodes[0].add_model("m1")
        cat = catalogue(ModelSpec(id="m1", source="org/m1", memory_gb=1.0, keep_loaded=True))
        async with gateway(nodes, cat) as client:
            body = await (await client.get("/health")).json()
        assert body["status"] == "ok" and body["models_without_replica"] == []
    finally:
        await stop_all(nodes)


# -- a node marked unhealthy ends its attempts at once --------------------------------------


async def test_non_stream_on_a_silent_node_is_retried_when_polls_mark_it_down(
    three: list[FakeNeuron],
) -> None:
    """A one-piece answer waiting on a node that went silent is not left to its 600 s
    timeout: the poll that marks the node down ends the attempt and another replica answers."""
    silent, good, _ = three
    silent.answer_gate = asyncio.Event()  # never set
    good.add_model("m1", in_flight=1)
    three[2].add_model("m1", in_flight=2)
    async with gateway(three) as client:
        assert client.app is not None
        pending = asyncio.ensure_future(client.post(CHAT, json=chat()))
        await until(lambda: silent.calls["chat"], what="the request at the silent node")
        assert silent.calls["chat"] == 1 and not pending.done()
        silent.health_ok = False
        for _ in range(3):
            await client.app[POLLER].poll_once()
        resp = await asyncio.wait_for(pending, 10)
        assert resp.status == 200 and (await resp.json())["served_by"] == "n2"
        text = await _metrics(client)
    assert metric(text, "cortex_upstream_retries_total", reason="node_down") == 1


async def test_stream_on_a_node_marked_down_ends_with_error_frame(
    three: list[FakeNeuron],
) -> None:
    """After its first byte a stream cannot move: it ends with an error frame and [DONE],
    counted as a stream error of its own reason."""
    n1 = three[0]
    n1.stream_gate = asyncio.Event()  # one token, then silence (under the idle timeout)
    for n in three[1:]:
        n.add_model("m1", in_flight=1)
    async with gateway(three, idle_read_timeout_s=300) as client:
        assert client.app is not None
        resp = await client.post(CHAT, json=chat(stream=True))
        assert resp.status == 200
        assert await resp.content.readany()
        n1.health_ok = False
        for _ in range(3):
            await client.app[POLLER].poll_once()
        rest = await asyncio.wait_for(resp.read(), 10)
        assert b"marked unhealthy" in rest and rest.endswith(b"data: [DONE]\n\n")
        text = await _metrics(client)
    assert metric(text, "cortex_stream_errors_total", model="m1", reason="node_down") == 1
    assert metric(text, "cortex_requests_total", api="chat", model="m1", code="stream_error") == 1
    assert metric(text, "cortex_requests_total", api="chat", model="m1", code="200") == 0


async def test_attempts_on_healthy_nodes_are_left_alone(three: list[FakeNeuron]) -> None:
    """Only the lost node's attempts end: a stream on another node runs to its end."""
    n1 = three[0]
    n1.stream_gate = asyncio.Event()
    async with gateway(three, idle_read_timeout_s=300) as client:
        assert client.app is not None
        resp = await client.post(CHAT, json=chat(stream=True))
        assert await resp.content.readany()
        three[1].health_ok = False
        for _ in range(3):
            await client.app[POLLER].poll_once()
        assert not client.app[FLEET].node("n2").healthy
        n1.stream_gate.set()
        assert (await resp.read()).endswith(b"data: [DONE]\n\n")


# -- metrics tell the truth ---------------------------------------------------------------


async def test_relayed_neuron_error_frame_is_a_stream_error(three: list[FakeNeuron]) -> None:
    """A neuron's own error frame mid-stream (its runner died) passes through unchanged
    and counts as a stream error, not as a 200."""
    frames = sse_frames(2)
    three[0].stream_chunks = [frames[0], sse_error_frame("runner of 'm1' lost: exit -9")]
    for n in three[1:]:
        n.add_model("m1", in_flight=1)
    async with gateway(three) as client:
        resp = await client.post(CHAT, json=chat(stream=True))
        assert resp.status == 200
        assert await resp.read() == b"".join(three[0].stream_chunks)
        text = await _metrics(client)
    assert metric(text, "cortex_stream_errors_total", model="m1", reason="upstream_error") == 1
    assert metric(text, "cortex_requests_total", api="chat", model="m1", code="stream_error") == 1
    assert metric(text, "cortex_requests_total", api="chat", model="m1", code="200") == 0


async def test_every_labelled_series_exists_before_its_first_event(
    three: list[FakeNeuron],
) -> None:
    """A fresh cortex exports each series at 0 (so increase() sees a first burst), and no
    `_created` series."""
    async with gateway(three) as client:
        text = await _metrics(client)
    for model in ("m1", "m2", "other"):
        for code in ("200", "429", "503", "stream_error", "client_closed"):
            assert metric(text, "cortex_requests_total", api="chat", model=model, code=code) == 0
        assert metric(text, "cortex_stream_errors_total", model=model, reason="lost") == 0
        assert metric(text, "cortex_cold_loads_total", model=model, result="failed") == 0
        assert metric(text, "cortex_evictions_total", model=model) == 0
    for reason in ("connect", "queue_full", "runner_fault", "node_down"):
        assert metric(text, "cortex_upstream_retries_total", reason=reason) == 0
    for node in ("n1", "n2", "n3"):
        assert metric(text, "cortex_passive_failures_total", node=node) == 0
    assert "_created" not in text


async def _stream_then_slam(host: str, port: int, body: bytes) -> None:
    """A client that reads up to [DONE] and drops the connection at once (RST)."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: cortex\r\n"
        b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    got = b""
    while b"data: [DONE]" not in got:
        chunk = await reader.read(65536)
        assert chunk, got
        got += chunk
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def test_streams_closed_right_after_done_count_as_200(three: list[FakeNeuron]) -> None:
    """200 complete streams whose client slams the connection right after [DONE]: every
    one is code="200" (before: some were counted 500)."""
    body = json.dumps(chat(stream=True)).encode()
    for n in three:
        n.linger_after_last_s = 0.02  # the client leaves before the body's end
    async with gateway(three) as client:
        server = client.server
        for _ in range(200):
            await _stream_then_slam(str(server.host), int(server.port or 0), body)

        async def all_counted() -> bool:
            text = await _metrics(client)
            counted = sum(
                float(v)
                for v in re.findall(
                    r'cortex_requests_total\{api="chat",code="[^"]+",model="m1"\} (\S+)', text
                )
            )
            return counted >= 200

        await until(all_counted, what="200 requests counted")
        text = await _metrics(client)
    codes = {
        code: float(v)
        for code, v in re.findall(
            r'cortex_requests_total\{api="chat",code="([^"]+)",model="m1"\} (\S+)', text
        )
        if float(v)
    }
    assert codes == {"200": 200.0}


# -- review findings ------------------------------------------------------------------------


async def test_nothing_after_done_counts_or_reaches_the_client(three: list[FakeNeuron]) -> None:
    """A link that stalls after [DONE] (the neuron winding down) is no stream error: the
    client gets [DONE] once and the request counts as 200."""
    three[0].linger_after_last_s = 1.0
    for n in three[1:]:
        n.models.clear()
    async with gateway(three, idle_read_timeout_s=0.2) as client:
        resp = await client.post(CHAT, json=chat(stream=True))
        body = await resp.read()
        text = await _metrics(client)
    assert body == b"".join(sse_frames()) and body.count(b"[DONE]") == 1
    assert metric(text, "cortex_requests_total", api="chat", model="m1", code="200") == 1
    assert metric(text, "cortex_stream_errors_total", model="m1", reason="stalled") == 0


async def test_a_draining_neurons_503_frame_is_no_runner_fault(three: list[FakeNeuron]) -> None:
    """Neurons shutting down (a rolling restart) send 503 shutting_down after keepalives:
    the request moves on to the next replica, it is never blamed as poison."""
    drained = KEEPALIVE + sse_error_frame("server shutting down", 503, "shutting_down")
    for n in three[:2]:
        n.stream_chunks = [drained]
    async with gateway(three) as client:
        resp = await client.post(CHAT, json=chat(stream=True))
        body = await resp.read()
        text = await _metrics(client)
    assert resp.status == 200 and body == b"".join(sse_frames())
    assert metric(text, "cortex_upstream_retries_total", reason="runner_fault") == 0


@pytest.mark.parametrize(
    "body",
    [
        {"model": "\ud800", "messages": [{"role": "user", "content": "hi"}]},
        {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "keep_alive": 10**400},
    ],
)
async def test_odd_model_and_keep_alive_are_4xx(three: list[FakeNeuron], body: Any) -> None:
    async with gateway(three) as client:
        resp = await client.post(
            CHAT, data=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        assert 400 <= resp.status < 500, await resp.text()
        assert (await resp.json())["error"]["code"]
