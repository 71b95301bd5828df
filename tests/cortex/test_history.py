"""The dashboard's history (cortex.run.history): what one point holds, per node and per
model, from real polls of fake neurons and real trace records; and GET /admin/history."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from cortex.config import ApiKey, CortexConfig
from cortex.core.tracing import Trace
from cortex.http.dashboard import HISTORY
from cortex.http.traces import TRACES
from cortex.run.history import FIELDS, History
from cortex.run.poller import FLEET, POLLER
from shared.catalogue import GIB
from tests.cortex.fakes import FakeNeuron, fleet, gateway, stop_all
from tests.cortex.test_dashboard import HOSTILE_MODEL, HOSTILE_NODE
from tests.support import chromium
from tests.support.chromium import Browser
from tests.support.clients import CHAT, chat

ADMIN = {"Authorization": "Bearer admin-secret"}


@pytest.fixture
async def two() -> AsyncIterator[list[FakeNeuron]]:
    """n1 serves m1; n2 serves m1 and m2 (busy: 2 in flight, 1 queued)."""
    nodes = await fleet("n1", "n2")
    n1, n2 = nodes
    n1.add_model("m1", memory_bytes=2 * GIB, completion_tokens=1000)
    n2.add_model("m1", memory_bytes=2 * GIB, completion_tokens=40)
    n2.add_model("m2", memory_bytes=1 * GIB, in_flight=2, queue_depth=1)
    yield nodes
    await stop_all(nodes)


def _trace(n: int, model: str, node: str, ttft_s: float | None) -> Trace:
    return Trace(
        id=f"r{n}",
        model=model,
        key=None,
        stream=True,
        status="200" if ttft_s is not None else "503",
        error=None,
        nodes=(node,),
        node=node,
        queue_wait_s=None,
        routing_s=0.0,
        cold_load_s=None,
        ttft_s=ttft_s,
        duration_s=1.0,
        prompt_tokens=5,
        completion_tokens=10,
        tokens_from="usage",
        tok_s=9.0,
    )


def _last_ok(app: Any, name: str) -> float:
    t = app[FLEET].node(name).last_ok
    assert t is not None
    return float(t)


async def test_a_point_per_node_and_model_from_counters_traces_and_memory(
    two: list[FakeNeuron],
) -> None:
    n1, n2 = two
    async with gateway(two, admin_token="admin-secret") as client:
        app = client.app
        h = History(step_s=5, span_s=60, ttft_window_s=30)
        traces = app[TRACES]

        # The first sight of a node only sets its counters' baseline.
        first = h.sample(app[FLEET].snapshot(), traces, wall=1000.0, now=0.0)
        assert first.nodes["n1"].tok_s is None and first.models["m1"].tok_s is None
        assert (first.nodes["n2"].in_flight, first.nodes["n2"].queued) == (2, 1)
        assert (first.models["m2"].in_flight, first.models["m2"].queued) == (2, 1)
        # Used memory is the node's total less what it has available (the fake: its
        # 48 GiB less m1's 2 GiB, of 64 GiB).
        assert first.nodes["n1"].memory_bytes == 18 * GIB
        assert first.nodes["n1"].memory_total_bytes == 64 * GIB
        assert first.models["m1"].memory_bytes == 4 * GIB  # both replicas
        assert first.models["m1"].memory_total_bytes is None

        t1, t2 = _last_ok(app, "n1"), _last_ok(app, "n2")
        n1.models["m1"].completion_tokens += 300
        n2.models["m1"].completion_tokens += 120
        n2.models["m2"].completion_tokens = 30
        for i, (model, node, ttft) in enumerate(
            [
                ("m1", "n1", 0.1),
                ("m1", "n1", 0.2),
                ("m1", "n2", 0.4),
                ("m2", "n2", 0.8),
                ("m1", "n1", None),  # no first token: counts for no TTFT
            ]
        ):
            traces.append(_trace(i, model, node, ttft))
        await app[POLLER].poll_once()
        dt1, dt2 = _last_ok(app, "n1") - t1, _last_ok(app, "n2") - t2
        p = h.sample(app[FLEET].snapshot(), traces, wall=1005.0, now=5.0)
        assert p.nodes["n1"].tok_s == pytest.approx(300 / dt1, rel=1e-3)
        assert p.nodes["n2"].tok_s == pytest.approx((120 + 30) / dt2, rel=1e-3)
        assert p.models["m1"].tok_s == pytest.approx(300 / dt1 + 120 / dt2, rel=1e-3)
        assert p.models["m2"].tok_s == pytest.approx(30 / dt2, rel=1e-3)
        # Nearest-rank percentiles over the requests with a first token.
        assert (p.models["m1"].ttft_p50_s, p.models["m1"].ttft_p95_s) == (0.2, 0.4)
        assert (p.nodes["n1"].ttft_p50_s, p.nodes["n1"].ttft_p95_s) == (0.1, 0.2)
        assert (p.nodes["n2"].ttft_p50_s, p.nodes["n2"].ttft_p95_s) == (0.4, 0.8)
        print(f"\nrates over polls {dt1:.4f} s and {dt2:.4f} s apart: {p.nodes}")

        # A runner that restarted counts from zero; a model new on a node counts from
        # zero too (it was loaded since the last point); the TTFTs age out of the window.
        t1 = _last_ok(app, "n1")
        n1.models["m1"].completion_tokens = 25
        n1.add_model("m3", completion_tokens=7)
        await app[POLLER].poll_once()
        dt1 = _last_ok(app, "n1") - t1
        p = h.sample(app[FLEET].snapshot(), traces, wall=1040.0, now=40.0)
        assert p.nodes["n1"].tok_s == pytest.approx((25 + 7) / dt1, rel=1e-3)
        assert p.models["m3"].tok_s == pytest.approx(7 / dt1, rel=1e-3)
        assert p.models["m1"].ttft_p50_s is None and p.nodes["n1"].ttft_p95_s is None

        # A node that went down has no figures: a gap in its lines, not zeros.
        await n2.stop()
        for _ in range(3):
            await app[POLLER].poll_once()
        p = h.sample(app[FLEET].snapshot(), traces, wall=1045.0, now=45.0)
        assert set(p.nodes) == {"n1"} and "m2" not in p.models

        body = h.to_json()
        assert body["fields"] == list(FIELDS) and body["ts"] == [1000, 1005, 1040, 1045]
        assert body["nodes"]["n2"]["in_flight"] == [2, 2, 2, None]
        assert body["nodes"]["n1"]["tok_s"][0] is None
        assert h.to_json(since=1040)["ts"] == [1045]


async def test_the_ring_keeps_span_over_step_points() -> None:
    async with gateway([]) as client:
        h = History(step_s=1, span_s=3)
        for i in range(5):
            h.sample(client.app[FLEET].snapshot(), (), wall=float(i), now=float(i))
        assert [p.ts for p in h.points] == [2.0, 3.0, 4.0]


async def test_admin_history_is_behind_the_admin_token_and_filters_by_since(
    two: list[FakeNeuron],
) -> None:
    async with gateway(two, admin_token="admin-secret") as client:
        app = client.app
        assert app[HISTORY].step_s == 5.0 and app[HISTORY].span_s == 600.0  # the defaults
        traces = app[TRACES]
        for wall in (10.0, 15.0):
            app[HISTORY].sample(app[FLEET].snapshot(), traces, wall=wall)
        assert (await client.get("/admin/history")).status == 401
        r = await client.get("/admin/history", headers=ADMIN)
        assert r.status == 200
        body = await r.json()
        assert body["ts"] == [10.0, 15.0] and sorted(body["nodes"]) == ["n1", "n2"]
        assert sorted(body["models"]) == ["m1", "m2"] and body["step_s"] == 5.0
        newer = await (await client.get("/admin/history?since=10", headers=ADMIN)).json()
        assert newer["ts"] == [15.0] and newer["nodes"]["n1"]["memory_bytes"] == [18 * GIB]
        bad = await client.get("/admin/history?since=soon", headers=ADMIN)
        assert bad.status == 400 and (await bad.json())["error"]["param"] == "since"


def test_history_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="history_step_s"):
        CortexConfig(history_step_s=0)
    with pytest.raises(ValueError, match="10000 points"):
        CortexConfig(history_step_s=0.01, history_span_s=3600)
    assert CortexConfig(history_step_s=1, history_span_s=120).history_span_s == 120


async def test_the_admin_token_stands_in_for_an_api_key_on_v1(two: list[FakeNeuron]) -> None:
    """What the playground needs on a cortex with API keys: the admin token is taken on
    /v1 for every model; a wrong one is still 401, and a key keeps to its models."""
    keys = (ApiKey(key="sk-only-m2-key", models=("m2",)),)
    async with gateway(two, api_keys=keys, admin_token="admin-secret") as client:
        body = {**chat(), "model": "m1"}
        assert (await client.post(CHAT, json=body, headers=ADMIN)).status == 200
        listed = await (await client.get("/v1/models", headers=ADMIN)).json()
        assert {"m1", "m2"} <= {m["id"] for m in listed["data"]}
        wrong = await client.post(CHAT, json=body, headers={"Authorization": "Bearer nope-nope"})
        assert wrong.status == 401
        key = {"Authorization": "Bearer sk-only-m2-key"}
        assert (await client.post(CHAT, json=body, headers=key)).status == 403
        only = await (await client.get("/v1/models", headers=key)).json()
        assert [m["id"] for m in only["data"]] == ["m2"]


@pytest.mark.skipif(chromium.missing() is not None, reason=str(chromium.missing()))
async def test_hostile_names_in_the_charts_are_text() -> None:
    """A node and a model named as markup reach the charts' legends and line titles as
    text, per node and per model; the page runs no script of theirs and logs no error."""
    nodes = await fleet("n-ok", HOSTILE_NODE)
    nodes[0].add_model(HOSTILE_MODEL, completion_tokens=5)
    nodes[1].add_model("m1", completion_tokens=5)
    try:
        async with gateway(nodes) as client, Browser.open() as b:
            app = client.app
            traces = app[TRACES]
            for wall in (1.0, 2.0, 3.0):
                nodes[0].models[HOSTILE_MODEL].completion_tokens += 50
                await app[POLLER].poll_once()
                app[HISTORY].sample(app[FLEET].snapshot(), traces, wall=wall)
            await b.goto(str(client.make_url("/dashboard")))
            await b.wait_js("document.body.dataset.live === 'yes'", what="the first update")
            legend = "[...document.querySelectorAll('#charts [data-chart=tok_s] .legend .item')]"
            names = await b.js(f"{legend}.map((i) => i.dataset.name)")
            assert sorted(names) == sorted(["n-ok", HOSTILE_NODE])
            titles = await b.js(
                "[...document.querySelectorAll('#charts [data-chart=tok_s] title')]"
                ".map((t) => t.textContent)"
            )
            assert f"{HOSTILE_NODE} · tok_s" in titles
            await b.click("#by-models")
            await b.wait_js("document.querySelector('#charts').dataset.by === 'models'")
            names = await b.js(f"{legend}.map((i) => i.dataset.name)")
            assert sorted(names) == sorted(["m1", HOSTILE_MODEL])
            assert await b.js("document.querySelectorAll('img').length") == 0
            assert await b.js("window.__pwned === undefined")
            problems = list(b.problems)
    finally:
        await stop_all(nodes)
    assert problems == [], problems
