"""Reconciler decisions: which groups are broken, how many replicas a model has."""

from __future__ import annotations

import asyncio

import attrs

from cortex.core.state import FleetSnapshot, NodeModel, NodeState
from cortex.run.lifecycle import LIFECYCLE
from cortex.run.loader import LOADER
from cortex.run.poller import POLLER
from cortex.run.reconciler import Reconciler, broken_groups, replicas, wanted_replicas
from shared.catalogue import GIB, ModelSpec
from shared.retry import LOAD_RETRY_WAIT, backoff_s
from shared.wire import GroupSpec, ModelState
from tests.cortex.fakes import catalogue, fleet, gateway, stop_all
from tests.support.waiting import until


def _member(rank: int, state: ModelState = "ready", gid: str = "g1") -> NodeModel:
    group = GroupSpec(gid, rank, 2, "ring", "tensor", ("a:1", "b:2"))
    return NodeModel(model_id="big", state=state, group=group)


def _node(name: str, *models: NodeModel, healthy: bool = True) -> NodeState:
    return NodeState(name=name, url=f"http://{name}", healthy=healthy, seen=True, models=models)


def test_whole_group_is_not_broken() -> None:
    """Both ranks present, ready, on healthy nodes: nothing to do."""
    snap = FleetSnapshot(nodes=(_node("a", _member(0)), _node("b", _member(1))))
    assert broken_groups(snap) == []
    assert replicas(snap, "big") == 1


def test_failed_rank_breaks_group_on_every_member() -> None:
    """One failed rank names the group broken, with both members to tear down."""
    snap = FleetSnapshot(nodes=(_node("a", _member(0)), _node("b", _member(1, "failed"))))
    [broken] = broken_groups(snap)
    assert broken.members == ("a", "b")
    assert "rank 1 on b failed" in broken.reason


def test_missing_rank_breaks_group() -> None:
    """A member that restarted and lost its rank breaks the group."""
    snap = FleetSnapshot(nodes=(_node("a", _member(0)), _node("b")))
    [broken] = broken_groups(snap)
    assert broken.members == ("a",)
    assert "[1]" in broken.reason


def test_missing_rank_on_a_node_not_heard_from_is_not_evidence() -> None:
    """After a cortex restart rank 1's node may just not have answered yet; once given up on
    (threshold failed polls), its rank counts as gone."""
    unheard = NodeState(name="b", url="http://b", failures=1)
    snap = FleetSnapshot(nodes=(_node("a", _member(0)), unheard), threshold=3)
    assert broken_groups(snap) == []
    given_up = FleetSnapshot(nodes=(_node("a", _member(0)), attrs.evolve(unheard, failures=3)))
    [broken] = broken_groups(given_up)
    assert "[1]" in broken.reason


async def test_step_waits_until_every_node_was_heard_from() -> None:
    """A cortex restart where one node's first poll fails: no extra copy of a keep_loaded
    model it holds is loaded elsewhere while any node is unheard and not given up on."""
    nodes = await fleet("n1", "n2", "n3")
    n1, n2, n3 = nodes
    n2.add_model("m1", memory_bytes=GIB)
    n2.health_ok = False  # slow on its first poll
    await n3.stop()  # never answers: given up on after `threshold` (3) polls
    spec = ModelSpec(id="m1", source="org/m1", memory_gb=1.0, keep_loaded=True, replicas=2)
    try:
        async with gateway(nodes, catalogue(spec)) as client:
            app = client.app
            rec = Reconciler(life=app[LIFECYCLE], loader=app[LOADER])
            await rec.step()
            assert app[LIFECYCLE].job("m1") is None
            n2.health_ok = True
            await app[POLLER].poll_once()
            await rec.step()  # n3 still unheard (2 failed polls)
            assert app[LIFECYCLE].job("m1") is None
            await app[POLLER].poll_once()
            await rec.step()  # n3 given up on: the second copy goes to n1
            job = app[LIFECYCLE].job("m1")
            assert job is not None and job.nodes == ("n1",)
            # The job's POST may still be on its way (a new connection): let it land.
            await until(lambda: n1.calls["load"], what="the load request")
    finally:
        await stop_all(nodes)
    assert n1.calls["load"] == 1 and n2.calls["load"] == 0


def test_unhealthy_member_breaks_group() -> None:
    """A member node turned unhealthy breaks the group; it no longer counts as a replica."""
    snap = FleetSnapshot(nodes=(_node("a", _member(0)), _node("b", _member(1), healthy=False)))
    [broken] = broken_groups(snap)
    assert "b unhealthy" in broken.reason


def test_group_being_loaded_is_left_alone() -> None:
    """Members appear one at a time during a load: not broken yet."""
    snap = FleetSnapshot(nodes=(_node("a", _member(0, "loading")),), loading=frozenset({"big"}))
    assert broken_groups(snap) == []


def test_replicas_count_single_node_copies() -> None:
    """Loading and ready copies count; failed ones and unhealthy nodes do not."""
    snap = FleetSnapshot(
        nodes=(
            _node("a", NodeModel(model_id="m", state="ready")),
            _node("b", NodeModel(model_id="m", state="warming")),
            _node("c", NodeModel(model_id="m", state="failed")),
            _node("d", NodeModel(model_id="m", state="ready"), healthy=False),
        )
    )
    assert replicas(snap, "m") == 2


def test_wanted_replicas() -> None:
    """Only keep_loaded or pinned models are loaded without a request."""
    assert wanted_replicas(ModelSpec(id="m", source="x/m")) == 0
    assert wanted_replicas(ModelSpec(id="m", source="x/m", keep_loaded=True, replicas=2)) == 2
    assert wanted_replicas(ModelSpec(id="m", source="x/m", pinned_on=("a",))) == 1


def test_reconcile_backoff_grows_and_caps() -> None:
    """Each failed load waits longer, up to the cap (in units of load_backoff_s)."""
    waits = [backoff_s(LOAD_RETRY_WAIT, n) for n in (1, 2, 3, 20)]
    assert waits[0] < waits[1] < waits[2]
    assert waits[-1] == 60


async def test_one_pass_never_double_books_a_node() -> None:
    """Two wished models that each fit the node but not together: one pass starts one
    load, because each decision sees the memory the one before it reserved."""
    [n1] = nodes = await fleet("n1")
    specs = [
        ModelSpec(id=m, source=f"org/{m}", memory_gb=20.0, kv_gb=1.0, keep_loaded=True)
        for m in ("m1", "m2")
    ]
    n1.load_gate = asyncio.Event()  # loads stay under way during the pass
    try:
        async with gateway(nodes, catalogue(*specs)) as client:
            app = client.app
            rec = Reconciler(life=app[LIFECYCLE], loader=app[LOADER])
            await rec.step()
            jobs = [app[LIFECYCLE].job(s.id) for s in specs]
            assert sum(j is not None for j in jobs) == 1, jobs
            n1.load_gate.set()
    finally:
        await stop_all(nodes)


async def test_prefetch_stages_on_every_node_that_could_hold_it_once() -> None:
    """`prefetch = true`: each feasible node without a copy is asked to stage it, naming the
    node that holds one as a peer; the next pass asks nobody again."""
    nodes = await fleet("n1", "n2", "n3")
    n1, n2, n3 = nodes
    n1.staged = ["org/m1"]
    n3.memory_total_bytes = n3.memory_available_bytes = 2 * GIB  # too small for m1
    spec = ModelSpec(id="m1", source="org/m1", memory_gb=4.0, kv_gb=0.5, prefetch=True)
    try:
        async with gateway(nodes, catalogue(spec)) as client:
            app = client.app
            rec = Reconciler(life=app[LIFECYCLE], loader=app[LOADER])
            await rec.step()
            # The stage request is posted in the background.
            await until(lambda: n2.stage_requests, timeout=120, what="the stage request")
            await rec.step()
            # Asking again would be journalled at once (a "prefetch" event per ask).
            events = [e.kind for e in app[LIFECYCLE].events("m1")]
            await app[LIFECYCLE].close()
    finally:
        await stop_all(nodes)
    assert n1.stage_requests == [] and n3.stage_requests == []
    assert n2.stage_requests == [{"model_id": "m1", "source": "org/m1", "peers": [n1.url]}]
    assert events == ["prefetch"]
    assert all(n.calls["load"] == 0 for n in nodes)


async def test_default_model_loads_into_free_memory_but_never_evicts_for_it() -> None:
    """`default = true`: loaded when memory is free; with the room taken by an idle
    model, it waits rather than evicting (a request for it still could)."""
    [n1] = nodes = await fleet("n1")
    spec = ModelSpec(id="m1", source="org/m1", memory_gb=20.0, kv_gb=1.0, default=True)
    other = ModelSpec(id="m2", source="org/m2", memory_gb=20.0, kv_gb=1.0)
    try:
        n1.add_model("m2", memory_bytes=30 * GIB)  # idle: evictable, but not for a default
        async with gateway(nodes, catalogue(spec, other)) as client:
            app = client.app
            rec = Reconciler(life=app[LIFECYCLE], loader=app[LOADER])
            await rec.step()
            assert app[LIFECYCLE].job("m1") is None
            n1.models.clear()  # memory frees up
            await app[POLLER].poll_once()
            await rec.step()
            job = app[LIFECYCLE].job("m1")
            assert job is not None and job.nodes == ("n1",)
            await app[LIFECYCLE].close()
    finally:
        await stop_all(nodes)
    assert n1.unload_requests == []
