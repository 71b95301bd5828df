"""End to end: real clients -> real cortex -> real neurons -> real mlx_lm runners."""

from __future__ import annotations

import asyncio
import re
import signal
import urllib.request
from typing import Any

import aiohttp
from openai import AsyncOpenAI

from tests.conftest import NeuronProcess, wait_until
from tests.e2e.conftest import CortexProcess


def _ready_on(c: CortexProcess, model_id: str) -> list[str]:
    return sorted(
        loc["node"]
        for loc in c.model(model_id)["locations"]
        if loc["state"] == "ready" and loc["healthy"]
    )


def _healthy(c: CortexProcess, count: int) -> bool:
    _, body = c.get("/health")
    return bool(body["nodes"]["healthy"] == count)


def _served(n: NeuronProcess, model_id: str) -> float:
    """Requests this neuron proxied for the model, from its own /metrics."""
    text = urllib.request.urlopen(n.url + "/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("neuron_requests_total{") and f'model="{model_id}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def _cold_loads(c: CortexProcess, result: str) -> float:
    text = urllib.request.urlopen(c.url + "/metrics", timeout=5).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("cortex_cold_loads_total{") and f'result="{result}"' in line
    )


def _client(c: CortexProcess, retries: int = 0) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=c.url + "/v1", api_key="unused", max_retries=retries)


async def test_openai_sdk_chats_and_streams_with_load_on_demand(
    neuron_factory: Any, cortex_factory: Any, demo_model: Any, model_id: str
) -> None:
    """An unloaded catalogued model is loaded by the first request; SDK chat and stream work."""
    a, b = neuron_factory(name="a"), neuron_factory(name="b")
    c = cortex_factory([("a", a), ("b", b)], [{"id": model_id, "source": str(demo_model)}])
    wait_until(lambda: _healthy(c, 2), 30, "both nodes healthy")
    assert _ready_on(c, model_id) == []

    # The SDK honours Retry-After on 503 model_loading, so retries carry it over a load.
    client = _client(c, retries=10)
    resp = await client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=8,
        temperature=0,
    )
    assert resp.choices[0].message.content
    assert len(_ready_on(c, model_id)) == 1, "one request loads one replica"
    assert _cold_loads(c, "ok") == 1
    assert _cold_loads(c, "failed") == 0

    stream = await client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    pieces = [ch.choices[0].delta.content or "" async for ch in stream if ch.choices]
    assert "".join(pieces) == resp.choices[0].message.content

    completion = await client.completions.create(model=model_id, prompt="Once", max_tokens=4)
    assert completion.choices[0].text is not None
    await client.close()  # not left for the GC on a closed loop (an ERROR in a later test)


async def test_two_replicas_share_load(
    neuron_factory: Any, cortex_factory: Any, demo_model: Any, model_id: str
) -> None:
    """keep_loaded with replicas=2 loads both with no request; concurrent work reaches both."""
    a, b = neuron_factory(name="a"), neuron_factory(name="b")
    spec = {"id": model_id, "source": str(demo_model), "replicas": 2, "keep_loaded": True}
    c = cortex_factory([("a", a), ("b", b)], [spec])
    wait_until(lambda: _ready_on(c, model_id) == ["a", "b"], 120, "two replicas ready")

    client = _client(c)

    async def ask(i: int) -> str:
        stream = await client.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": f"conversation {i}"}],
            max_tokens=48,
            stream=True,
        )
        return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

    assert _cold_loads(c, "failed") == 0
    answers = await asyncio.gather(*(ask(i) for i in range(12)))
    await client.close()
    assert all(answers)
    # A neuron counts a stream as its handler ends, which may be just after the client
    # has read [DONE]: waited for.
    wait_until(
        lambda: _served(a, model_id) > 0 and _served(b, model_id) > 0,
        60,
        "both replicas to have served some of the work",
    )


async def test_replica_killed_before_first_byte_costs_nothing(
    neuron_factory: Any, cortex_factory: Any, demo_model: Any, model_id: str
) -> None:
    """A SIGKILLed node still in cortex's routing: requests retry on the other replica."""
    a, b = neuron_factory(name="a"), neuron_factory(name="b")
    spec = {"id": model_id, "source": str(demo_model), "replicas": 2, "keep_loaded": True}
    # A slow poll (3 misses = 15 s), so only passive health can notice the dead node.
    c = cortex_factory([("a", a), ("b", b)], [spec], poll_interval_s=5.0)
    wait_until(lambda: _ready_on(c, model_id) == ["a", "b"], 120, "two replicas ready")

    a.stop(signal.SIGKILL)
    client = _client(c)  # no client-side retries: cortex must absorb the failure
    for i in range(6):
        resp = await client.chat.completions.create(
            model=model_id,
            messages=[{"role": "user", "content": f"after the kill {i}"}],
            max_tokens=4,
        )
        assert resp.choices[0].message.content is not None
    await client.close()
    state = c.get("/admin/state")[1]
    node_a = next(n for n in state["nodes"] if n["name"] == "a")
    assert node_a["healthy"] is False


async def test_keep_loaded_restored_after_cortex_and_neuron_restart(
    neuron_factory: Any, cortex_factory: Any, demo_model: Any, model_id: str, tmp_path: Any
) -> None:
    """A keep_loaded model comes back by itself after a cortex restart and a neuron restart."""
    a = neuron_factory(name="a")
    spec = {"id": model_id, "source": str(demo_model), "keep_loaded": True}
    c1 = cortex_factory([("a", a)], [spec])
    wait_until(lambda: _ready_on(c1, model_id) == ["a"], 120, "loaded with no request")
    c1.stop()

    # The neuron restarts (same port, same store): its runners are gone with it.
    port = a.port
    a.stop(signal.SIGTERM)
    a2 = neuron_factory({"port": port}, name="a")
    assert a2.model(model_id) is None

    c2 = cortex_factory([("a", a2)], [spec])
    wait_until(lambda: _ready_on(c2, model_id) == ["a"], 120, "restored after both restarts")
    assert a2.model(model_id) is not None


async def test_stream_bytes_pass_through_and_errors_are_enveloped(
    neuron_factory: Any, cortex_factory: Any, demo_model: Any, model_id: str
) -> None:
    """Cortex's stream is the neuron's stream; unknown models get a 404 envelope."""
    a = neuron_factory(name="a")
    spec = {"id": model_id, "source": str(demo_model), "keep_loaded": True}
    c = cortex_factory([("a", a)], [spec])
    wait_until(lambda: _ready_on(c, model_id) == ["a"], 120, "loaded")
    body = {
        "model": model_id,
        "messages": [{"role": "user", "content": "same"}],
        "max_tokens": 12,
        "temperature": 0,
        "stream": True,
    }
    async with aiohttp.ClientSession() as s:
        async with s.post(c.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            via_cortex = await r.read()
        async with s.post(a.url + "/v1/chat/completions", json=body) as r:
            direct = await r.read()
        async with s.post(c.url + "/v1/chat/completions", json={**body, "model": "nope"}) as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "model_not_found"

    def frames(raw: bytes) -> list[str]:
        # ids and timestamps differ per request; everything else must match
        text = re.sub(r'"(id|created|system_fingerprint)": ?("[^"]*"|\d+)', "", raw.decode())
        return [f for f in text.split("\n\n") if f and not f.startswith(":")]

    assert frames(via_cortex) == frames(direct)
    assert via_cortex.rstrip().endswith(b"data: [DONE]")


async def test_burst_for_a_cold_model_makes_one_load_and_every_answer(
    neuron_factory: Any, cortex_factory: Any, demo_model: Any, model_id: str
) -> None:
    """50 requests at once for a catalogued, unloaded model: one load, 50 answers, no error."""
    # Room for all 50 in the neuron's queue, for as long as a starved machine takes to
    # answer them: this is about the load wait, not capacity.
    a = neuron_factory({"admission": {"max_queue": 64, "queue_timeout_s": 600.0}}, name="a")
    c = cortex_factory([("a", a)], [{"id": model_id, "source": str(demo_model)}])
    wait_until(lambda: _healthy(c, 1), 30, "the node healthy")
    client = _client(c)  # no retries: every answer must come on the first try
    try:
        answers = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=model_id,
                    messages=[{"role": "user", "content": f"hello {i}"}],
                    max_tokens=4,
                )
                for i in range(50)
            )
        )
    finally:
        await client.close()
    assert len(answers) == 50 and all(r.choices for r in answers)
    assert _cold_loads(c, "ok") == 1
    assert _cold_loads(c, "failed") == 0
    async with aiohttp.ClientSession() as s, s.get(a.url + "/metrics") as r:
        text = await r.text()
    loads = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("neuron_runner_load_seconds_count{") and model_id in line
    ]
    assert loads == [1.0]
