"""The poller against fake neurons: debounce, never-seen nodes, restarts, passive health."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import attrs
import pytest

from cortex.core.state import Fleet, NodeState
from cortex.run.poller import Poller
from tests.cortex.fakes import FakeNeuron
from tests.support.waiting import until


@pytest.fixture(params=["status", "legacy"])
async def node(request: pytest.FixtureRequest) -> AsyncIterator[FakeNeuron]:
    """Every test twice: a neuron with GET /status, and an older one polled the old way."""
    n = await FakeNeuron(name="n1", serves_status=request.param == "status").start()
    n.add_model("m1", memory_bytes=123)
    yield n
    await n.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def _poller(session: aiohttp.ClientSession, *nodes: tuple[str, str]) -> Poller:
    return Poller(fleet=Fleet.of(nodes, threshold=3), session=session, timeout_s=2.0)


async def test_never_seen_node_starts_unhealthy(
    node: FakeNeuron, session: aiohttp.ClientSession
) -> None:
    """A node nobody has heard from is not routed to; its first good poll makes it healthy."""
    poller = _poller(session, ("n1", node.url))
    before = poller.fleet.node("n1")
    assert (before.healthy, before.seen) == (False, False)
    await poller.poll_once()
    after = poller.fleet.node("n1")
    assert after.healthy and after.seen
    assert after.discovery is not None and after.discovery.node_id == node.node_id
    assert [(m.model_id, m.state, m.memory_bytes) for m in after.models] == [("m1", "ready", 123)]


async def test_never_seen_unreachable_node_stays_unhealthy(
    session: aiohttp.ClientSession,
) -> None:
    """A node that never answered stays out of routing however often it is polled."""
    dead = await FakeNeuron(name="dead").start()
    await dead.stop()
    poller = _poller(session, ("dead", dead.url))
    await poller.poll_once()
    state = poller.fleet.node("dead")
    assert not state.healthy and state.failures == 1 and state.last_error


async def test_debounce_two_misses_keep_three_evict_one_success_restores(
    node: FakeNeuron, session: aiohttp.ClientSession
) -> None:
    """1 and 2 failed polls keep a node; the 3rd takes it out; one success restores it."""
    poller = _poller(session, ("n1", node.url))
    await poller.poll_once()
    assert poller.fleet.node("n1").healthy
    node.health_ok = False
    await poller.poll_once()
    assert poller.fleet.node("n1").healthy, "one miss must not flip health"
    await poller.poll_once()
    assert poller.fleet.node("n1").healthy, "two misses must not flip health"
    await poller.poll_once()
    state = poller.fleet.node("n1")
    assert not state.healthy and state.failures == 3
    node.health_ok = True
    await poller.poll_once()
    state = poller.fleet.node("n1")
    assert state.healthy and state.failures == 0


async def test_a_success_between_misses_resets_the_count(
    node: FakeNeuron, session: aiohttp.ClientSession
) -> None:
    """Misses must be consecutive: miss, miss, success, miss, miss keeps the node."""
    poller = _poller(session, ("n1", node.url))
    await poller.poll_once()
    for ok in (False, False, True, False, False):
        node.health_ok = ok
        await poller.poll_once()
    assert poller.fleet.node("n1").healthy
    assert poller.fleet.node("n1").failures == 2


async def test_unreachable_node_is_evicted_after_threshold(
    node: FakeNeuron, session: aiohttp.ClientSession
) -> None:
    """Refused connections count as failed polls the same way."""
    poller = _poller(session, ("n1", node.url))
    await poller.poll_once()
    await node.stop()
    healthy = []
    for _ in range(3):
        await poller.poll_once()
        healthy.append(poller.fleet.node("n1").healthy)
    assert healthy == [True, True, False]


async def test_one_slow_node_does_not_fail_another(
    node: FakeNeuron, session: aiohttp.ClientSession
) -> None:
    """Nodes are polled concurrently, each with its own verdict."""
    dead = await FakeNeuron(name="dead").start()
    await dead.stop()
    poller = _poller(session, ("n1", node.url), ("dead", dead.url))
    await poller.poll_once()
    assert poller.fleet.node("n1").healthy
    assert not poller.fleet.node("dead").healthy


async def test_discovery_reread_only_on_restart(
    node: FakeNeuron, session: aiohttp.ClientSession
) -> None:
    """Discovery is read once, then again only when node_id or started_at change."""
    poller = _poller(session, ("n1", node.url))
    await poller.poll_once()
    await poller.poll_once()
    assert node.calls["discovery"] == 1
    await node.restart()
    await poller.poll_once()
    assert node.calls["discovery"] == 2
    state = poller.fleet.node("n1")
    assert state.discovery is not None
    assert state.discovery.started_at == node.started_at
    assert state.models == ()


async def test_failed_discovery_reread_after_restart_drops_the_stale_one(
    node: FakeNeuron, session: aiohttp.ClientSession
) -> None:
    """A restarted node whose discovery cannot be read has none, not the old process's."""
    poller = _poller(session, ("n1", node.url))
    await poller.poll_once()
    node.discovery_ok = False
    await node.restart()
    await poller.poll_once()
    state = poller.fleet.node("n1")
    assert state.healthy and state.discovery is None


async def test_malformed_models_entry_keeps_the_node_and_the_poller(
    node: FakeNeuron, session: aiohttp.ClientSession
) -> None:
    """A /models entry of the wrong shape is unreadable /models, not a dead poller."""
    node.models_extra = [{"model_id": "bad", "state": "ready", "group": "not-an-object"}]
    poller = _poller(session, ("n1", node.url))
    poller.interval_s = 0.01
    task = asyncio.create_task(poller.run())
    try:
        await until(lambda: node.calls["health"] + node.calls["status"] >= 3 or task.done())
        assert not task.done()
        state = poller.fleet.node("n1")
        assert state.healthy and [m.model_id for m in state.models] == ["m1"]
    finally:
        task.cancel()


async def test_poller_survives_an_exception_in_a_round(
    node: FakeNeuron, session: aiohttp.ClientSession
) -> None:
    """Whatever goes wrong in one round, the next round still runs."""
    poller = _poller(session, ("n1", node.url))
    poller.interval_s = 0.01

    def broken(state: NodeState) -> None:
        raise RuntimeError("listener bug")

    poller.listeners.append(broken)
    task = asyncio.create_task(poller.run())
    try:
        await until(lambda: node.calls["health"] + node.calls["status"] >= 3 or task.done())
        assert not task.done()
        assert node.calls["health"] + node.calls["status"] >= 3
    finally:
        task.cancel()


async def test_missing_discovery_is_retried(
    node: FakeNeuron, session: aiohttp.ClientSession
) -> None:
    """A node whose discovery failed is healthy, and discovery is asked again next poll."""
    node.discovery_ok = False
    poller = _poller(session, ("n1", node.url))
    await poller.poll_once()
    assert poller.fleet.node("n1").healthy
    assert poller.fleet.node("n1").discovery is None
    node.discovery_ok = True
    await poller.poll_once()
    assert poller.fleet.node("n1").discovery is not None


async def test_passive_failure_takes_node_out_at_once(
    node: FakeNeuron, session: aiohttp.ClientSession
) -> None:
    """A refused connection seen by the proxy removes the node now; the next poll restores it."""
    poller = _poller(session, ("n1", node.url))
    await poller.poll_once()
    poller.record_failure("n1", "connect refused", fatal=True)
    assert not poller.fleet.node("n1").healthy
    await poller.poll_once()
    assert poller.fleet.node("n1").healthy


async def test_non_fatal_passive_failure_counts_as_one_miss(
    node: FakeNeuron, session: aiohttp.ClientSession
) -> None:
    """A timeout seen by the proxy is one failed poll, debounced like the others."""
    poller = _poller(session, ("n1", node.url))
    await poller.poll_once()
    poller.record_failure("n1", "read timeout", fatal=False)
    state = poller.fleet.node("n1")
    assert state.healthy and state.failures == 1


# -- GET /status: one call per node, 304 when unchanged, the old calls for older neurons --


async def test_unchanged_node_answers_304_and_stays_healthy(
    session: aiohttp.ClientSession,
) -> None:
    """One /status per poll; from the second on an unchanged node costs a 304, never
    the three old calls, and the node stays healthy with its models."""
    n = await FakeNeuron(name="n1", serves_status=True).start()
    try:
        n.add_model("m1", memory_bytes=123)
        poller = _poller(session, ("n1", n.url))
        for _ in range(3):
            await poller.poll_once()
        assert (n.calls["status"], n.calls["status_304"]) == (3, 2)
        assert n.calls["health"] == n.calls["models"] == 0
        state = poller.fleet.node("n1")
        assert state.healthy and [(m.model_id, m.memory_bytes) for m in state.models] == [
            ("m1", 123)
        ]
        n.add_model("m2")
        await poller.poll_once()
        assert n.calls["status_304"] == 2, "a changed node answers 200"
        assert [m.model_id for m in poller.fleet.node("n1").models] == ["m1", "m2"]
    finally:
        await n.stop()


async def test_a_304_after_cortex_wrote_models_restores_what_the_node_said(
    session: aiohttp.ClientSession,
) -> None:
    """A 304 means "as before": a model record cortex wrote since that answer is
    replaced by the node's, as a full answer would (no shortcut skips it)."""
    n = await FakeNeuron(name="n1", serves_status=True).start()
    try:
        n.add_model("m1")
        poller = _poller(session, ("n1", n.url))
        await poller.poll_once()
        m1 = poller.fleet.node("n1").models[0]
        poller.fleet.set_model("n1", attrs.evolve(m1, model_id="m2", state="loading"))
        await poller.poll_once()
        assert n.calls["status_304"] == 1
        assert [m.model_id for m in poller.fleet.node("n1").models] == ["m1"]
    finally:
        await n.stop()


async def test_node_without_status_is_polled_the_old_way(
    node: FakeNeuron, session: aiohttp.ClientSession
) -> None:
    """A neuron that answers 404 on /status is asked once, then polled with the old
    calls; the ones that answer /status beside it keep using it (mixed fleet)."""
    current = await FakeNeuron(name="n2", serves_status=True).start()
    try:
        poller = _poller(session, ("n1", node.url), ("n2", current.url))
        for _ in range(3):
            await poller.poll_once()
        assert all(poller.fleet.node(x).healthy for x in ("n1", "n2"))
        assert poller.uses_status("n2") and current.calls["health"] == 0
        if node.serves_status:
            assert node.calls["health"] == 0 and poller.uses_status("n1")
        else:
            assert node.calls["status_404"] == 1 and node.calls["health"] == 3
            assert not poller.uses_status("n1")
            assert [m.model_id for m in poller.fleet.node("n1").models] == ["m1"]
    finally:
        await current.stop()


async def test_an_older_neuron_is_asked_for_status_again_after_a_restart(
    session: aiohttp.ClientSession,
) -> None:
    """A restart may be an upgrade: the poller tries /status again and uses it."""
    n = await FakeNeuron(name="n1").start()
    try:
        poller = _poller(session, ("n1", n.url))
        await poller.poll_once()
        assert not poller.uses_status("n1")
        n.serves_status = True
        await n.restart()
        await poller.poll_once()
        await poller.poll_once()
        assert poller.uses_status("n1") and n.calls["status"] == 1
    finally:
        await n.stop()


async def test_a_status_node_that_fails_is_debounced_and_comes_back(
    session: aiohttp.ClientSession,
) -> None:
    """/status answering 500 (then refusing) counts failed polls like /health did;
    the node's first good answer after that (a 304) restores it."""
    n = await FakeNeuron(name="n1", serves_status=True).start()
    try:
        n.add_model("m1")
        poller = _poller(session, ("n1", n.url))
        await poller.poll_once()
        n.health_ok = False
        seen = []
        for _ in range(3):
            await poller.poll_once()
            seen.append(poller.fleet.node("n1").healthy)
        assert seen == [True, True, False]
        assert poller.uses_status("n1"), "a 500 is not an older neuron"
        n.health_ok = True
        before = n.calls["status_304"]
        await poller.poll_once()
        state = poller.fleet.node("n1")
        assert state.healthy and state.failures == 0 and n.calls["status_304"] == before + 1
        assert [m.model_id for m in state.models] == ["m1"]
    finally:
        await n.stop()
