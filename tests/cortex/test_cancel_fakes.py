"""Cancel by id against fake neurons (real aiohttp apps): the cases a real runner
cannot hold still for (tests/e2e/test_cancel.py has the real fleet).

- a stream in the Anthropic Messages API ends with that API's own `error` event,
  and the node sees cortex leave;
- a request still waiting for a cold load (no node yet) gets the 499 itself, and
  is counted `cancelled`, not as a client that left;
- with auth off anyone may cancel; an unknown or malformed id is 404 / 400.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.cortex.fakes import FakeNeuron, fleet, gateway, stop_all
from tests.support.metrics import metric
from tests.support.waiting import until


@pytest.fixture
async def one() -> AsyncIterator[FakeNeuron]:
    (n,) = await fleet("n1")
    yield n
    await stop_all([n])


async def test_an_anthropic_stream_ends_with_its_own_error_event(one: FakeNeuron) -> None:
    one.add_model("m1")
    one.stream_gate = asyncio.Event()  # one token, then nothing until the cancel
    body: dict[str, Any] = {
        "model": "m1",
        "max_tokens": 16,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    async with gateway([one]) as client:
        resp = await client.post("/v1/messages", json=body, headers={"X-Request-Id": "msg-1"})
        assert resp.status == 200
        assert b"content_block_delta" in await resp.content.readuntil(b"content_block_delta")
        cancel = await client.delete("/v1/requests/msg-1")
        assert cancel.status == 200, await cancel.text()
        assert await cancel.json() == {
            "cancelled": "msg-1",
            "node": "n1",
            "model": "m1",
            "count": 1,
            "ended": True,
        }
        rest = await asyncio.wait_for(resp.read(), 10)
    assert b"event: error" in rest and b"request msg-1 was cancelled" in rest, rest
    assert b"message_stop" not in rest  # never a clean finish
    await until(lambda: one.cancelled == 1, timeout=10, what="the node to see cortex leave")


async def test_a_request_waiting_for_a_cold_load_gets_the_499(one: FakeNeuron) -> None:
    one.load_gate = asyncio.Event()  # the load never finishes within the test
    async with gateway([one], load_wait_s=60) as client:
        body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
        sent = asyncio.ensure_future(
            client.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "cold-1"})
        )

        async def listed() -> list[dict[str, Any]]:
            answer = await (await client.get("/admin/requests")).json()
            return [r for r in answer["requests"] if r["id"] == "cold-1"]

        (entry,) = await until(listed, timeout=10, what="cold-1 in flight")
        assert entry["node"] is None and entry["model"] == "m1", entry
        cancel = await client.delete("/v1/requests/cold-1")
        assert (await cancel.json())["node"] is None
        resp = await asyncio.wait_for(sent, 10)
        assert (resp.status, resp.reason) == (499, "Request Cancelled")
        err = (await resp.json())["error"]
        assert err["code"] == "request_cancelled" and "cold-1" in err["message"], err
        assert (await client.delete("/v1/requests/cold-1")).status == 404  # over
        text = await (await client.get("/metrics")).text()
        trace = await (await client.get("/admin/traces/cold-1")).json()
    assert metric(text, "cortex_requests_total", api="chat", model="m1", code="cancelled") == 1
    assert trace["cortex"]["status"] == "cancelled", trace


async def test_unknown_and_malformed_ids(one: FakeNeuron) -> None:
    async with gateway([one]) as client:
        resp = await client.delete("/v1/requests/nobody")
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "not_found"
        resp = await client.delete("/v1/requests/" + "x" * 200)
        assert resp.status == 400
