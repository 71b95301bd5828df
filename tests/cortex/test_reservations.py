"""Memory promised to cold loads: taken before any await, held until the model is ready."""

from __future__ import annotations

import asyncio

from cortex.run.lifecycle import LIFECYCLE
from cortex.run.poller import POLLER
from shared.catalogue import GIB, ModelSpec
from tests.cortex.fakes import catalogue, fleet, gateway, stop_all
from tests.support.clients import CHAT, chat

# need = 5 GiB x 1.3 + 0.25 GiB = 6.75 GiB each: only one fits in 10 GiB.
TWO = (
    ModelSpec(id="a", source="org/a", memory_gb=5.0),
    ModelSpec(id="b", source="org/b", memory_gb=5.0),
)


async def test_two_concurrent_cold_loads_never_overcommit_a_node() -> None:
    """Two models that fit one at a time, asked at once: one load, the other waits (503)."""
    (n1,) = await fleet("n1")
    n1.memory_available_bytes = 10 * GIB
    n1.load_gate = asyncio.Event()
    async with gateway([n1], catalogue(*TWO)) as client:
        r1, r2 = await asyncio.gather(
            client.post(CHAT, json=chat("a")), client.post(CHAT, json=chat("b"))
        )
        assert {r1.status, r2.status} == {503}
        assert [b["model_id"] for b in n1.load_requests] in (["a"], ["b"])
        n1.load_gate.set()
    await stop_all([n1])


async def test_reservation_held_while_the_model_loads() -> None:
    """A poll during the load (the OS has not seen the weights yet) keeps the memory promised."""
    (n1,) = await fleet("n1")
    n1.memory_available_bytes = 10 * GIB
    n1.memory_per_model = 0  # like a real neuron: memory shows up only as weights load
    n1.load_gate = asyncio.Event()
    async with gateway([n1], catalogue(*TWO)) as client:
        assert client.app is not None
        r = await client.post(CHAT, json=chat("a"))
        assert (await r.json())["error"]["code"] == "model_loading"
        await client.app[POLLER].poll_once()
        node = client.app[LIFECYCLE].snapshot().node("n1")
        assert node is not None
        assert node.model("a") is not None and node.model("a").state == "loading"  # type: ignore[union-attr]
        assert node.reserved_bytes >= int(6.5 * GIB)
        r = await client.post(CHAT, json=chat("b"))
        assert r.status == 503
        assert [b["model_id"] for b in n1.load_requests] == ["a"]
        n1.load_gate.set()
    await stop_all([n1])


async def test_failed_load_gives_its_memory_back() -> None:
    """A refused load releases what it reserved: the other model can load."""
    (n1,) = await fleet("n1")
    n1.memory_available_bytes = 10 * GIB
    n1.load_error = (500, "boom", "runner could not start")
    async with gateway([n1], catalogue(*TWO)) as client:
        assert client.app is not None
        r = await client.post(CHAT, json=chat("a"))
        assert (await r.json())["error"]["code"] == "cold_load_failed"
        assert client.app[LIFECYCLE].snapshot().node("n1").reserved_bytes == 0  # type: ignore[union-attr]
    await stop_all([n1])
