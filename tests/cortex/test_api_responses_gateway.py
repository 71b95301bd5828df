"""POST /v1/responses through a real cortex in front of fake neurons (aiohttp apps).

The translation is unit-tested in test_api_responses.py; here, its seam onto the
chat path: the neuron gets the chat body, a whole answer and a stream come back in
the Responses shape, a runner lost mid-stream (the neuron's error frame, or the
connection dropped, which cortex itself cuts) ends in `response.failed`, errors
keep the OpenAI envelope, and the chat path counts the request with api="responses".
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from shared.errors import sse_error_frame
from tests.cortex.fakes import FakeNeuron, fleet, gateway, sse_frames, stop_all

Client = TestClient[web.Request, web.Application]
PATH = "/v1/responses"


@pytest.fixture
async def node() -> AsyncIterator[FakeNeuron]:
    (n,) = await fleet("n1")
    n.add_model("m1")
    yield n
    await stop_all([n])


def _events(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for block in raw.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                out.append(json.loads(line[6:]))
    return out


def _count(text: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"cortex_requests_total{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_whole_answer(node: FakeNeuron) -> None:
    async with gateway([node]) as client:
        resp = await client.post(
            PATH, json={"model": "one", "input": "Hi", "instructions": "Be kind."}
        )
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        metrics = await (await client.get("/metrics")).text()
    assert body["object"] == "response" and body["status"] == "completed"
    assert body["model"] == "one"  # the alias the client asked for
    assert body["output"][0]["content"][0]["text"] == "hi"
    sent = node.chat_bodies[-1]
    assert sent["messages"] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
    ]
    assert _count(metrics, api="responses", model="m1", code="200") == 1


async def test_a_stream(node: FakeNeuron) -> None:
    async with gateway([node]) as client:
        resp = await client.post(PATH, json={"model": "m1", "input": "Hi", "stream": True})
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = _events(await resp.read())
    assert node.chat_bodies[-1]["stream_options"] == {"include_usage": True}
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "tok0 tok1 tok2 "
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


async def test_the_neurons_error_frame_fails_the_response(node: FakeNeuron) -> None:
    node.stream_chunks = [
        sse_frames(1)[0],
        sse_error_frame("runner of 'm1' lost: exit -9"),
    ]
    async with gateway([node]) as client:
        resp = await client.post(PATH, json={"model": "m1", "input": "Hi", "stream": True})
        events = _events(await resp.read())
        metrics = await (await client.get("/metrics")).text()
    assert [e["type"] for e in events][-1] == "response.failed"
    assert "completed" not in json.dumps([e["type"] for e in events])
    assert "lost" in events[-1]["response"]["error"]["message"]
    assert _count(metrics, api="responses", model="m1", code="stream_error") == 1


async def test_a_connection_lost_mid_stream_fails_the_response(node: FakeNeuron) -> None:
    node.die_after_first_byte = True
    async with gateway([node]) as client:
        resp = await client.post(PATH, json={"model": "m1", "input": "Hi", "stream": True})
        events = _events(await resp.read())
    kinds = [e["type"] for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.failed", kinds
    assert "n1" in events[-1]["response"]["error"]["message"]


async def test_errors_keep_the_openai_envelope(node: FakeNeuron) -> None:
    async with gateway([node]) as client:
        refused = await client.post(
            PATH, json={"model": "m1", "input": "Hi", "previous_response_id": "resp_1"}
        )
        unknown = await client.post(PATH, json={"model": "nope", "input": "Hi"})
        assert refused.status == 400
        assert (await refused.json())["error"]["param"] == "previous_response_id"
        assert unknown.status == 404
        assert (await unknown.json())["error"]["code"] == "model_not_found"
