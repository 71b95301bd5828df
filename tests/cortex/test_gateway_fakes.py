"""Cortex end to end against fake neurons (real aiohttp apps on port 0)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from cortex.cli import main as cli
from cortex.config import ApiKey, CortexConfig
from cortex.run.lifecycle import LIFECYCLE
from cortex.run.poller import FLEET, POLLER
from cortex.run.reconciler import RECONCILER
from shared.catalogue import GIB, ModelSpec
from shared.config import ConfigError
from shared.errors import sse_error_frame
from shared.wire import GroupSpec
from tests.cortex.fakes import FakeNeuron, catalogue, fleet, gateway, sse_frames, stop_all
from tests.support.clients import CHAT, chat
from tests.support.waiting import until

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def two() -> AsyncIterator[list[FakeNeuron]]:
    nodes = await fleet("n1", "n2")
    yield nodes
    await stop_all(nodes)


async def _error(resp: Any) -> tuple[int, str, str | None]:
    body = await resp.json()
    return resp.status, body["error"]["code"], resp.headers.get("Retry-After")


# -- streaming proxy ---------------------------------------------------------------------


async def test_stream_passes_bytes_through_unchanged(two: list[FakeNeuron]) -> None:
    """An SSE answer arrives byte for byte as the neuron sent it."""
    n1, n2 = two
    n1.add_model("m1")
    async with gateway(two) as client:
        resp = await client.post(CHAT, json=chat(stream=True))
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert await resp.read() == b"".join(sse_frames())
    assert n1.calls["chat"] == 1 and n2.calls["chat"] == 0


async def test_non_stream_answer_passes_through(two: list[FakeNeuron]) -> None:
    """A one-piece JSON answer comes back as the neuron wrote it; an alias reaches it as the id."""
    two[1].add_model("m1")
    async with gateway(two) as client:
        resp = await client.post(CHAT, json=chat("one"))
        assert resp.status == 200
        assert (await resp.json())["served_by"] == "n2"
    assert two[1].chat_bodies[-1]["model"] == "m1"


async def test_identity_headers_stripped_and_restamped(two: list[FakeNeuron]) -> None:
    """Credentials and cookies never reach a neuron; X-Request-Id and X-Forwarded-For are ours."""
    two[0].add_model("m1")
    async with gateway(two) as client:
        resp = await client.post(
            CHAT,
            json=chat(),
            headers={
                "Authorization": "Bearer sk-client-secret",
                "X-Api-Key": "sk-client-secret",
                "Cookie": "session=1",
                "X-Forwarded-For": "6.6.6.6",
                "X-Request-Id": "req-123",
                "X-Custom": "kept",
            },
        )
        assert resp.status == 200
        assert resp.headers["X-Request-Id"] == "req-123"
    seen = {k.lower(): v for k, v in two[0].chat_headers[-1].items()}
    assert "authorization" not in seen and "cookie" not in seen and "x-api-key" not in seen
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-request-id"] == "req-123"
    assert seen["x-custom"] == "kept"


async def test_death_after_first_byte_ends_with_error_frame_and_done(
    two: list[FakeNeuron],
) -> None:
    """A replica lost mid-stream: the client gets what came, an error frame, then [DONE]."""
    two[0].add_model("m1")
    two[0].die_after_first_byte = True
    async with gateway(two) as client:
        resp = await client.post(CHAT, json=chat(stream=True))
        assert resp.status == 200
        body = await resp.read()
    first = sse_frames()[0]
    assert body.startswith(first)
    rest = body[len(first) :]
    assert rest.endswith(b"data: [DONE]\n\n")
    frame = json.loads(rest.split(b"\n\n")[0].removeprefix(b"data: "))
    assert (frame["error"]["code"], frame["error"]["status"]) == ("upstream_error", 502)
    assert rest == sse_error_frame(frame["error"]["message"])


async def test_client_disconnect_cancels_upstream(two: list[FakeNeuron]) -> None:
    """A client that leaves mid-stream makes cortex drop the neuron's stream too."""
    two[0].add_model("m1")
    two[0].stream_gate = asyncio.Event()
    async with gateway(two) as client:
        resp = await client.post(CHAT, json=chat(stream=True))
        assert await resp.content.readany()
        resp.close()

        async def cancelled() -> bool:
            return two[0].cancelled == 1

        await until(cancelled)


async def test_passive_health_marks_at_once_and_retries_elsewhere(
    two: list[FakeNeuron],
) -> None:
    """A refused connection takes the node out now and the request is served by another."""
    n1, n2 = two
    n1.add_model("m1")
    n2.add_model("m1", in_flight=1)  # n1 would be the least-loaded choice
    async with gateway(two) as client:
        assert client.app is not None
        fleet_ = client.app[FLEET]
        assert fleet_.node("n1").healthy
        await n1.stop()
        resp = await client.post(CHAT, json=chat())
        assert resp.status == 200
        assert (await resp.json())["served_by"] == "n2"
        assert not fleet_.node("n1").healthy
        state = await (await client.get("/admin/state")).json()
        by_name = {n["name"]: n for n in state["nodes"]}
        assert by_name["n1"]["healthy"] is False and by_name["n2"]["healthy"] is True
        metrics = await (await client.get("/metrics")).text()
        assert 'cortex_upstream_retries_total{reason="connect"} 1.0' in metrics
        assert 'cortex_node_healthy{node="n1"} 0.0' in metrics


async def test_neuron_503_is_retried_on_another_replica(two: list[FakeNeuron]) -> None:
    """A replica answering 503 before any byte costs the client nothing."""
    two[0].add_model("m1")
    two[1].add_model("m1", in_flight=1)
    two[0].chat_error = (503, "model_loading")
    async with gateway(two) as client:
        resp = await client.post(CHAT, json=chat())
        assert resp.status == 200
        assert (await resp.json())["served_by"] == "n2"


@pytest.mark.parametrize(
    ("status", "code", "retry_after"), [(503, "model_failed", "10"), (429, "queue_full", "7")]
)
async def test_last_replicas_own_error_reaches_the_client(
    two: list[FakeNeuron], status: int, code: str, retry_after: str
) -> None:
    """No other replica to try: the client gets the neuron's code and Retry-After, not the
    router's generic upstream_unavailable or queue_full."""
    two[0].add_model("m1")
    two[0].chat_error = (status, code)
    two[0].retry_after = retry_after
    async with gateway(two) as client:
        resp = await client.post(CHAT, json=chat())
        assert await _error(resp) == (status, code, retry_after)
    assert two[0].calls["chat"] == 1


async def test_keepalive_before_a_lost_runner_is_retried_elsewhere(
    two: list[FakeNeuron],
) -> None:
    """A keepalive comment is not an answer: a replica lost after one is retried, unseen."""
    n1, n2 = two
    n1.add_model("m1")
    n2.add_model("m1", in_flight=1)
    n1.stream_chunks = [b": keepalive\n\n", *sse_frames()]
    n1.die_after_first_byte = True  # the runner dies during prefill
    async with gateway(two) as client:
        resp = await client.post(CHAT, json=chat(stream=True))
        assert resp.status == 200
        assert await resp.read() == b"".join(sse_frames())
    assert n1.calls["chat"] == 1 and n2.calls["chat"] == 1


async def test_keepalives_then_tokens_pass_through_unchanged(two: list[FakeNeuron]) -> None:
    """Keepalives held back until the first event still reach the client, byte for byte."""
    two[0].add_model("m1")
    two[0].stream_chunks = [b": keepalive\n\n", b": keepalive\n\n", *sse_frames()]
    async with gateway(two) as client:
        resp = await client.post(CHAT, json=chat(stream=True))
        assert resp.status == 200
        assert await resp.read() == b"".join(two[0].stream_chunks)


async def test_every_replica_unreachable_is_503_upstream_unavailable(
    two: list[FakeNeuron],
) -> None:
    """No replica reachable before the first byte: 503 upstream_unavailable, Retry-After."""
    for n in two:
        n.add_model("m1")
    async with gateway(two) as client:
        await stop_all(two)
        resp = await client.post(CHAT, json=chat())
        assert await _error(resp) == (503, "upstream_unavailable", "2")


async def test_every_queue_full_is_429(two: list[FakeNeuron]) -> None:
    """Both replicas answer queue_full: the client gets 429 queue_full with Retry-After."""
    for n in two:
        n.add_model("m1")
        n.chat_error = (429, "queue_full")
    async with gateway(two) as client:
        resp = await client.post(CHAT, json=chat())
        status, code, retry = await _error(resp)
        assert (status, code) == (429, "queue_full") and retry is not None
    assert two[0].calls["chat"] == 1 and two[1].calls["chat"] == 1


# -- cold loads --------------------------------------------------------------------------


async def test_burst_for_unloaded_model_makes_one_load(two: list[FakeNeuron]) -> None:
    """50 concurrent requests for an unloaded model: one /models/load, all 503 model_loading."""
    gate = asyncio.Event()
    for n in two:
        n.load_gate = gate
    async with gateway(two) as client:
        resps = await asyncio.gather(*(client.post(CHAT, json=chat()) for _ in range(50)))
        answers = [await _error(r) for r in resps]
        assert answers == [(503, "model_loading", "2")] * 50
        assert sum(n.calls["load"] for n in two) == 1
        gate.set()

        async def served() -> bool:
            return (await client.post(CHAT, json=chat())).status == 200

        await until(served)
        assert sum(n.calls["load"] for n in two) == 1


async def test_unloaded_model_is_loaded_on_demand(two: list[FakeNeuron]) -> None:
    """The request that starts a load is served once it is ready (within load_wait_s)."""
    async with gateway(two, load_wait_s=30.0) as client:
        resp = await client.post(CHAT, json=chat(stream=True))
        assert resp.status == 200
        assert await resp.read() == b"".join(sse_frames())
        assert client.app is not None
        loaded = [n.name for n in two if "m1" in n.models]
        assert len(loaded) == 1
        # Recorded at once: routable before any poll.
        node = client.app[FLEET].node(loaded[0]).model("m1")
        assert node is not None and node.state == "ready"
        assert two[0].load_requests[-1:] + two[1].load_requests[-1:] == [
            {
                "model_id": "m1",
                "source": "org/m1",
                "group": None,
                "warmup_deadline_s": None,
                "context_limit": 4096,
            }
        ]


async def test_load_refused_is_503_cold_load_failed(two: list[FakeNeuron]) -> None:
    """A neuron refusing the load: 503 cold_load_failed, and no new load during the cooldown."""
    for n in two:
        n.load_error = (500, "internal_error", "disk full")
    async with gateway(two, load_wait_s=30.0) as client:
        resp = await client.post(CHAT, json=chat())
        status, code, retry = await _error(resp)
        assert (status, code, retry) == (503, "cold_load_failed", "5")
        resp = await client.post(CHAT, json=chat())
        assert (await _error(resp))[1] == "cold_load_failed"
    assert sum(n.calls["load"] for n in two) == 1


async def test_runner_failing_during_load_is_cold_load_failed(two: list[FakeNeuron]) -> None:
    """A model that fails while warming answers 503 cold_load_failed with the reason."""
    for n in two:
        n.load_fails_with = "runner exited with code 1: out of memory"
    async with gateway(two, load_wait_s=30.0) as client:
        resp = await client.post(CHAT, json=chat())
        body = await resp.json()
        assert resp.status == 503 and body["error"]["code"] == "cold_load_failed"
        assert "out of memory" in body["error"]["message"]
        metrics = await (await client.get("/metrics")).text()
        assert 'cortex_cold_loads_total{model="m1",result="failed"} 1.0' in metrics


async def test_cold_load_evicts_idle_lru_model(two: list[FakeNeuron]) -> None:
    """Room is made by unloading the least recently used idle model, not a busy one."""
    n1, n2 = two
    await n2.stop()
    n1.memory_available_bytes = 12 * GIB
    n1.add_model("old", last_used=1.0, memory_bytes=5 * GIB)
    n1.add_model("newer", last_used=2.0, memory_bytes=5 * GIB)
    n1.add_model("busy", last_used=0.5, memory_bytes=5 * GIB, in_flight=1)
    cat = catalogue(
        ModelSpec(id="m1", source="org/m1", memory_gb=1.0, kv_gb=0.1),
        *(ModelSpec(id=i, source=f"org/{i}", memory_gb=3.0) for i in ("old", "newer", "busy")),
    )
    async with gateway([n1], cat, load_wait_s=30.0) as client:
        resp = await client.post(CHAT, json=chat())
        assert resp.status == 200
        # The event log says which copy went, where, and why.
        events = (await (await client.get("/admin/events?model=old")).json())["events"]
        assert [e["node"] for e in events if e["kind"] == "evicted"] == [n1.name]
        (trace,) = (await (await client.get("/admin/traces")).json())["traces"]
        assert trace["cold_load_s"] is not None and trace["node"] == n1.name
    assert n1.unload_requests == ["old"]
    assert set(n1.models) == {"newer", "busy", "m1"}


# -- request checks and auth ---------------------------------------------------------------


async def test_unknown_model_is_404(two: list[FakeNeuron]) -> None:
    """A model in no catalogue and on no node: 404 model_not_found."""
    async with gateway(two) as client:
        resp = await client.post(CHAT, json=chat("nope"))
        assert await _error(resp) == (404, "model_not_found", None)


@pytest.mark.parametrize(
    ("data", "param"),
    [(b"{not json", None), (b'{"messages": []}', "model"), (b'{"model": "m1"}', "messages")],
)
async def test_bad_body_is_400(two: list[FakeNeuron], data: bytes, param: str | None) -> None:
    """Not JSON, no model, no messages: 400 invalid_request naming the field."""
    async with gateway(two) as client:
        resp = await client.post(CHAT, data=data, headers={"Content-Type": "application/json"})
        body = await resp.json()
        assert resp.status == 400 and body["error"]["code"] == "invalid_request"
        assert body["error"]["param"] == param


async def test_oversize_body_is_413(two: list[FakeNeuron]) -> None:
    """A body over max_body_bytes: 413 request_too_large, never forwarded."""
    two[0].add_model("m1")
    async with gateway(two, max_body_bytes=4096) as client:
        resp = await client.post(CHAT, json=chat(text="x" * 10_000))
        assert await _error(resp) == (413, "request_too_large", None)
    assert two[0].calls["chat"] == 0


KEYS = (
    ApiKey(key="sk-all-models", models=("*",)),
    ApiKey(key="sk-only-m2-key", models=("m2",)),
)


async def test_auth_401_403_and_open_health(two: list[FakeNeuron]) -> None:
    """Missing or unknown key 401; a key not allowed the model 403; /health needs none."""
    two[0].add_model("m1")
    async with gateway(two, api_keys=KEYS, admin_token="admin-secret") as client:
        assert await _error(await client.post(CHAT, json=chat())) == (401, "invalid_api_key", None)
        bad = {"Authorization": "Bearer sk-wrong-key"}
        assert (await _error(await client.post(CHAT, json=chat(), headers=bad)))[0] == 401
        m2 = {"Authorization": "Bearer sk-only-m2-key"}
        assert await _error(await client.post(CHAT, json=chat("one"), headers=m2)) == (
            403,
            "model_not_allowed",
            None,
        )
        ok = {"Authorization": "Bearer sk-all-models"}
        assert (await client.post(CHAT, json=chat(), headers=ok)).status == 200
        health = await client.get("/health")
        assert health.status == 200
        assert (await health.json())["nodes"] == {"healthy": 2, "total": 2}
        assert (await client.get("/admin/state", headers=ok)).status == 401
        admin = {"Authorization": "Bearer admin-secret"}
        assert (await client.get("/admin/state", headers=admin)).status == 200
        listed = await (await client.get("/v1/models", headers=m2)).json()
        assert [m["id"] for m in listed["data"]] == ["m2"]
    assert "authorization" not in {k.lower() for k in two[0].chat_headers[-1]}


# -- models, health, admin -----------------------------------------------------------------


async def test_models_lists_catalogue_with_live_state(two: list[FakeNeuron]) -> None:
    """/v1/models: OpenAI fields plus loaded, locations and feasible_on."""
    two[1].add_model("m1")
    two[1].add_model("adhoc")
    async with gateway(two) as client:
        body = await (await client.get("/v1/models")).json()
    by_id = {m["id"]: m for m in body["data"]}
    assert body["object"] == "list"
    m1 = by_id["m1"]
    assert m1["object"] == "model" and m1["loaded"] is True
    assert m1["locations"] == [
        {"node": "n2", "state": "ready", "healthy": True, "expires_at": None}
    ]
    assert ["n1"] in m1["feasible_on"] or ["n2"] in m1["feasible_on"]
    assert by_id["m2"]["loaded"] is False
    assert by_id["adhoc"]["owned_by"] == "neuron"
    assert m1["context_length"] == 4096 and "context_length" in by_id["adhoc"]


async def test_models_lists_only_rank_0_of_an_uncatalogued_group(two: list[FakeNeuron]) -> None:
    """Like a catalogued one, an uncatalogued group is listed where it takes requests."""
    for rank, n in enumerate(two):
        group = GroupSpec("g1", rank, 2, "ring", "tensor", ("a:1", "b:2"))
        n.add_model("adhoc", group=group.to_json())
    async with gateway(two) as client:
        body = await (await client.get("/v1/models")).json()
    [adhoc] = [m for m in body["data"] if m["id"] == "adhoc"]
    assert adhoc["locations"] == [
        {"node": "n1", "state": "ready", "healthy": True, "expires_at": None}
    ]


async def test_health_degraded_when_a_node_is_down(two: list[FakeNeuron]) -> None:
    """/health says degraded (still 200) when not every node is healthy."""
    async with gateway(two) as client:
        assert (await (await client.get("/health")).json())["status"] == "ok"
        await two[1].stop()
        assert client.app is not None
        for _ in range(3):
            await client.app[POLLER].poll_once()
        body = await (await client.get("/health")).json()
        assert body.pop("version")
        assert body == {
            "status": "degraded",
            "nodes": {"healthy": 1, "total": 2},
            "models_without_replica": [],
            "journal": "memory only",
            "journal_files": {"events": "memory only", "traces": "memory only"},
        }


async def test_metrics_use_cortex_names(two: list[FakeNeuron]) -> None:
    """/metrics is Prometheus text with cortex_* names and per-request counts."""
    two[0].add_model("m1")
    async with gateway(two) as client:
        await client.post(CHAT, json=chat())
        await client.post(CHAT, json=chat("nope"))
        text = await (await client.get("/metrics")).text()
    assert 'cortex_requests_total{api="chat",code="200",model="m1"} 1.0' in text
    assert 'cortex_requests_total{api="chat",code="404",model="other"} 1.0' in text
    assert "cortex_request_duration_seconds_bucket" in text


async def test_admin_placements_show_arithmetic(two: list[FakeNeuron]) -> None:
    """/admin/placements lists every candidate with its per-node arithmetic."""
    async with gateway(two) as client:
        resp = await client.get("/admin/placements", params={"model_id": "one"})
        body = await resp.json()
        assert resp.status == 200 and body["model_id"] == "m1"
        assert {tuple(c["nodes"]) for c in body["candidates"]} == {("n1",), ("n2",)}
        assert "need" in body["candidates"][0]["fits"][0]["arithmetic"]
        missing = await client.get("/admin/placements")
        assert missing.status == 400


async def test_admin_load_refused_with_arithmetic(two: list[FakeNeuron]) -> None:
    """An explicit load that fits nowhere now: 400 placement_refused with the numbers."""
    for n in two:
        n.memory_available_bytes = GIB // 2
    async with gateway(two) as client:
        resp = await client.post("/admin/models/m1/load")
        body = await resp.json()
        assert resp.status == 400 and body["error"]["code"] == "placement_refused"
        assert "GiB" in body["error"]["message"]
        assert body["error"]["details"]["candidates"]


async def test_admin_load_then_unload(two: list[FakeNeuron]) -> None:
    """Explicit load answers 202 with the placement, then unload removes it everywhere."""
    async with gateway(two) as client:
        resp = await client.post("/admin/models/m1/load")
        body = await resp.json()
        assert resp.status == 202 and body["state"] == "loading"
        node = body["nodes"][0]

        async def ready() -> bool:
            r = await client.post("/admin/models/m1/load")
            return bool((await r.json())["state"] == "ready")

        await until(ready)
        resp = await client.post("/admin/models/m1/unload")
        assert resp.status == 200 and (await resp.json())["unloaded"] == [node]
        assert client.app is not None
        assert client.app[FLEET].node(node).model("m1") is None


async def test_admin_unload_of_a_kept_model_needs_force_and_then_sticks(
    two: list[FakeNeuron],
) -> None:
    """Unloading a keep_loaded model is 409 (the reconciler would undo it) unless forced;
    forced, the reconciler leaves it unloaded until the next admin load."""
    two[0].add_model("m1")
    cat = catalogue(ModelSpec(id="m1", source="org/m1", memory_gb=1.0, keep_loaded=True))
    async with gateway(two, cat) as client:
        assert client.app is not None
        resp = await client.post("/admin/models/m1/unload")
        status, code, _ = await _error(resp)
        assert (status, code) == (409, "model_kept_loaded")
        assert two[0].unload_requests == []
        resp = await client.post("/admin/models/m1/unload", json={"force": True})
        assert resp.status == 200 and two[0].unload_requests == ["m1"]
        await client.app[RECONCILER].step()
        assert client.app[LIFECYCLE].job("m1") is None
        resp = await client.post("/admin/models/m1/load")
        assert resp.status == 202
        await client.app[RECONCILER].step()  # released: nothing new, the admin load is under way
        assert sum(n.calls["load"] for n in two) == 1


async def test_an_admin_unload_ends_a_load_under_way(two: list[FakeNeuron]) -> None:
    """The operator's unload wins over a load in flight: the load job ends, the node is
    told to unload, and a request that waited on the load gets an answer, not a hang."""
    gate = asyncio.Event()
    two[0].load_gate = gate  # the load stays 'loading' on n1 until the test says
    async with gateway(two) as client:
        assert client.app is not None
        life = client.app[LIFECYCLE]
        resp = await client.post("/admin/models/m1/load", json={"nodes": ["n1"]})
        assert resp.status == 202
        job = life.job("m1")
        assert job is not None and job.kind == "load"
        hi = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
        chat = asyncio.create_task(client.post("/v1/chat/completions", json=hi))
        await until(lambda: life.waiting("m1") == 1)
        resp = await client.post("/admin/models/m1/unload", json={"nodes": ["n1"]})
        assert resp.status == 200, await resp.text()
        assert two[0].unload_requests == ["m1"]
        gate.set()
        answer = await asyncio.wait_for(chat, 60)
        assert answer.status in (200, 503), await answer.text()


async def test_admin_load_on_a_named_node_and_with_exclusions(two: list[FakeNeuron]) -> None:
    """An operator picks the node, or keeps one out; a second copy goes elsewhere."""
    async with gateway(two) as client:
        resp = await client.post("/admin/models/m1/load", json={"nodes": ["n2"]})
        body = await resp.json()
        assert resp.status == 202 and body["nodes"] == ["n2"]
        assert [r["model_id"] for r in two[1].load_requests] == ["m1"]
        assert two[0].load_requests == []

        async def loaded_on_n2() -> bool:
            r = await client.post("/admin/models/m1/load")
            return bool((await r.json())["state"] == "ready")

        await until(loaded_on_n2)
        # A body asks for one more copy: n2 holds it, so exclusions leave only n1.
        resp = await client.post("/admin/models/m1/load", json={"exclude": []})
        assert resp.status == 202 and (await resp.json())["nodes"] == ["n1"]


async def test_admin_load_bad_node_sets(two: list[FakeNeuron]) -> None:
    """Unknown nodes, a wrong-sized set or a bad field are 400 naming the problem."""
    async with gateway(two) as client:
        resp = await client.post("/admin/models/m1/load", json={"nodes": ["n9"]})
        body = await resp.json()
        assert resp.status == 400 and "n9" in body["error"]["message"]
        resp = await client.post("/admin/models/m1/load", json={"nodes": ["n1", "n2"]})
        body = await resp.json()
        assert resp.status == 400 and body["error"]["code"] == "placement_refused"
        assert "exactly [n1, n2]" in body["error"]["message"]
        resp = await client.post("/admin/models/m1/load", json={"node": ["n1"]})
        assert resp.status == 400 and "node" in (await resp.json())["error"]["message"]
        resp = await client.post("/admin/models/m1/load", json={"exclude": "n1"})
        assert resp.status == 400


async def test_admin_load_waits_for_discovery_then_503(two: list[FakeNeuron]) -> None:
    """A healthy node without discovery: 503 placement_info_pending with Retry-After."""
    two[0].discovery_ok = False
    async with gateway(two, discovery_wait_s=0.05) as client:
        resp = await client.post("/admin/models/m1/load")
        status, code, retry = await _error(resp)
        assert (status, code) == (503, "placement_info_pending") and retry is not None


# -- config and command line ------------------------------------------------------------------


def test_config_file_is_strict_and_resolves_catalogue(tmp_path: Path) -> None:
    """cortex.toml: the catalogue path is taken from the file's folder; typos are errors."""
    (tmp_path / "models.toml").write_text('[[models]]\nid = "m1"\nsource = "org/m1"\n')
    good = tmp_path / "cortex.toml"
    good.write_text(
        'catalogue = "models.toml"\nfailure_threshold = 3\n'
        '[[neurons]]\nname = "a"\nurl = "http://127.0.0.1:9410"\n'
        '[[api_keys]]\nkey = "sk-12345678"\nmodels = ["m1"]\n'
    )
    cfg = CortexConfig.from_file(good)
    assert cfg.catalogue == str(tmp_path / "models.toml")
    assert cfg.neurons[0].name == "a" and cfg.api_keys[0].models == ("m1",)
    assert cli.main(["check", "-c", str(good)]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[[neurons]]\nname = "a"\nurl = "http://x"\nweight = 2\n')
    with pytest.raises(ConfigError, match="neurons"):
        CortexConfig.from_file(bad)
    assert cli.main(["check", "-c", str(bad)]) == 2


def test_ring_base_port_leaves_room_for_every_group() -> None:
    """Groups take ports up to base + ring_port_span - 1: a range past 65535 is refused."""
    assert CortexConfig(ring_base_port=65536 - 4000).ring_base_port == 61536
    with pytest.raises(ValueError, match="ring_base_port"):
        CortexConfig(ring_base_port=63000)


async def test_stalled_stream_ends_with_error_frame(two: list[FakeNeuron]) -> None:
    """A stream silent past idle_read_timeout_s ends with an error frame and [DONE]."""
    two[0].add_model("m1")
    two[0].stream_gate = asyncio.Event()  # never set: the replica goes quiet
    async with gateway(two, idle_read_timeout_s=0.2) as client:
        resp = await client.post(CHAT, json=chat(stream=True))
        body = await resp.read()
    assert body.startswith(sse_frames()[0])
    assert b"stalled" in body and body.endswith(b"data: [DONE]\n\n")


async def test_completions_endpoint_is_proxied(two: list[FakeNeuron]) -> None:
    """/v1/completions routes like chat and reaches the neuron's /v1/completions."""
    two[0].add_model("m1")
    async with gateway(two) as client:
        resp = await client.post("/v1/completions", json={"model": "m1", "prompt": "hi"})
        assert resp.status == 200
        bad = await client.post("/v1/completions", json={"model": "m1"})
        assert (await _error(bad))[:2] == (400, "invalid_request")
    assert two[0].chat_bodies[-1]["prompt"] == "hi"


def test_routing_key_selects_the_policy(tmp_path: Path) -> None:
    """`routing` defaults to affinity, takes least_loaded and round_robin, refuses others."""
    base = 'catalogue = "models.toml"\n'
    (tmp_path / "models.toml").write_text("")
    path = tmp_path / "cortex.toml"
    path.write_text(base)
    assert CortexConfig.from_file(path).routing == "affinity"
    for policy in ("least_loaded", "round_robin", "affinity"):
        path.write_text(base + f'routing = "{policy}"\n')
        assert CortexConfig.from_file(path).routing == policy
    path.write_text(base + 'routing = "random"\n')
    with pytest.raises(ConfigError, match="routing"):
        CortexConfig.from_file(path)


async def test_round_robin_routing_alternates_through_cortex() -> None:
    """A cortex with routing = "round_robin" sends a conversation's turns to each
    replica in turn, where the default keeps them on one."""
    nodes = await fleet("n1", "n2")
    for n in nodes:
        n.add_model("m1")
    body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
    try:
        for policy, spread in (("round_robin", True), ("affinity", False)):
            for n in nodes:
                n.calls.clear()
            async with gateway(nodes, routing=policy) as client:
                for _ in range(4):
                    async with client.post("/v1/chat/completions", json=body) as r:
                        assert r.status == 200
            counts = sorted(n.calls["chat"] for n in nodes)
            assert counts == ([2, 2] if spread else [0, 4]), policy
    finally:
        await stop_all(nodes)
