"""The router, a pure function of a snapshot: one test per error-table row, choice, eviction."""

from __future__ import annotations

import hashlib
import string
import time
import types
from collections.abc import Iterable
from typing import Any

import attrs
import pytest

from cortex.core import router as router_module
from cortex.core.router import (
    ColdLoad,
    Loading,
    Route,
    eviction_order,
    plan_evictions,
    prefix_keys,
    route,
)
from cortex.core.state import FleetSnapshot, LoadFailure, NodeModel, NodeState
from shared import errors
from shared.catalogue import GIB, Catalogue, ModelSpec
from shared.wire import ModelState, NodeHealth
from tests.cortex.records import disc

CAT = Catalogue(
    models=(
        ModelSpec(id="m1", source="org/m1", aliases=("one",), memory_gb=1.0, kv_gb=0.1),
        ModelSpec(id="big", source="org/big", memory_gb=100.0, kv_gb=1.0),
        ModelSpec(id="pinned", source="org/pinned", memory_gb=1.0, pinned_on=("b",)),
        ModelSpec(id="keep", source="org/keep", memory_gb=1.0, keep_loaded=True),
        ModelSpec(id="x", source="org/x", memory_gb=4.0),
        ModelSpec(id="y", source="org/y", memory_gb=4.0),
        ModelSpec(id="z", source="org/z", memory_gb=4.0),
        ModelSpec(id="p", source="org/p", memory_gb=4.0, pinned_on=("a",)),
        ModelSpec(id="need20", source="org/need20", memory_gb=14.0),
        ModelSpec(id="m4", source="org/m4", memory_gb=4.0),
    )
)


def rm(
    model_id: str,
    state: ModelState = "ready",
    *,
    in_flight: int = 0,
    queue: int = 0,
    last_used: float = 0.0,
    mem_gb: float = 1.0,
    error: str | None = None,
) -> NodeModel:
    return NodeModel(
        model_id=model_id,
        state=state,
        in_flight=in_flight,
        queue_depth=queue,
        last_used=last_used,
        memory_bytes=int(mem_gb * GIB),
        error=error,
    )


def node(
    name: str,
    *models: NodeModel,
    healthy: bool = True,
    avail_gb: float = 40,
    total_gb: float = 64,
    seen: bool = True,
) -> NodeState:
    health = NodeHealth(
        status="idle",
        node_id=name,
        started_at=0.0,
        uptime_s=1.0,
        memory_available_bytes=int(avail_gb * GIB),
        models=(),
    )
    return NodeState(
        name=name,
        url=f"http://{name}:9410",
        healthy=healthy,
        seen=seen,
        discovery=disc(name, total_gb, ring_host="127.0.0.1", hostname=f"{name}.local")
        if seen
        else None,
        health=health if seen else None,
        models=models,
    )


def snap(
    *nodes: NodeState,
    loading: Iterable[str] = (),
    failures: dict[str, LoadFailure] | None = None,
    outstanding: dict[tuple[str, str], int] | None = None,
) -> FleetSnapshot:
    return FleetSnapshot(
        nodes=nodes,
        outstanding=outstanding or {},
        loading=frozenset(loading),
        load_failures=failures or {},
        taken_at=100.0,
    )


def go(s: FleetSnapshot, model: str, **kw: Any) -> Route | ColdLoad:
    """The router's decision; a Loading one as the 503 a caller that cannot wait answers."""
    d = route(s, CAT, model, **kw)
    if isinstance(d, Loading):
        raise d.error()
    return d


# -- one test per row of the error table ------------------------------------------------


def test_unknown_model_is_404_model_not_found() -> None:
    """A model in no catalogue and loaded nowhere is 404 model_not_found."""
    with pytest.raises(errors.ModelNotFound) as exc:
        go(snap(node("a")), "nope")
    assert exc.value.status == 404 and exc.value.retry_after is None


def test_unknown_model_with_nothing_seen_is_not_a_404() -> None:
    """Before any node answered we cannot know what is loaded: 503, never 404."""
    with pytest.raises(errors.NoHealthyNodes):
        go(snap(node("a", healthy=False, seen=False)), "nope")


def test_unknown_model_while_a_node_is_unheard_is_503() -> None:
    """One node healthy, another not heard from yet (it may serve it): 503, not 404; once
    that node is given up on (threshold failed polls), a real 404."""
    unheard = attrs.evolve(node("b", healthy=False, seen=False), failures=2)
    with pytest.raises(errors.FeasibleNodeUnhealthy) as exc:
        go(snap(node("a"), unheard), "nope")
    assert exc.value.retry_after is not None and "b" in exc.value.message
    with pytest.raises(errors.ModelNotFound):
        go(snap(node("a"), attrs.evolve(unheard, failures=3)), "nope")


def test_no_cold_load_while_a_node_that_may_hold_it_is_unheard() -> None:
    """A catalogued model loaded nowhere known: no cold load (perhaps a duplicate) while a
    node is unheard; 503 with Retry-After instead, then the load once it is given up on."""
    unheard = attrs.evolve(node("b", healthy=False, seen=False), failures=1)
    with pytest.raises(errors.FeasibleNodeUnhealthy) as exc:
        go(snap(node("a"), unheard), "m1")
    assert exc.value.retry_after is not None
    assert isinstance(go(snap(node("a"), attrs.evolve(unheard, failures=3)), "m1"), ColdLoad)


def test_uncatalogued_model_loaded_on_a_node_is_routed() -> None:
    """A model a neuron serves is routable even if the catalogue does not name it."""
    r = go(snap(node("a", rm("adhoc"))), "adhoc")
    assert isinstance(r, Route) and r.node == "a"


def test_model_no_node_could_ever_hold_is_404_no_feasible_node() -> None:
    """Catalogued but too big for every node even empty: 404 no_feasible_node, with numbers."""
    with pytest.raises(errors.NoFeasibleNode) as exc:
        go(snap(node("a"), node("b")), "big")
    assert exc.value.status == 404
    assert "GiB" in exc.value.message


def test_feasible_node_unhealthy_is_503_retry_3() -> None:
    """The only node that could hold it is down now: 503 feasible_node_unhealthy, Retry-After 3."""
    with pytest.raises(errors.FeasibleNodeUnhealthy) as exc:
        go(snap(node("a"), node("b", healthy=False)), "pinned")
    assert (exc.value.status, exc.value.retry_after) == (503, 3)


def test_unseen_node_blocks_a_404() -> None:
    """Nothing known fits but an unseen node might: 503, not 404."""
    with pytest.raises(errors.ServiceUnavailable):
        go(snap(node("a", total_gb=8), node("b", healthy=False, seen=False)), "need20")


def test_no_healthy_nodes_is_503_retry_5() -> None:
    """Every node down: 503 no_healthy_nodes, Retry-After 5."""
    with pytest.raises(errors.NoHealthyNodes) as exc:
        go(snap(node("a", healthy=False), node("b", healthy=False)), "m1")
    assert (exc.value.status, exc.value.retry_after) == (503, 5)


@pytest.mark.parametrize("state", ["loading", "warming", "recovering"])
def test_model_loading_on_a_node_is_503_retry_2(state: ModelState) -> None:
    """A replica loading, warming or recovering: 503 model_loading, Retry-After 2."""
    with pytest.raises(errors.ModelLoading) as exc:
        go(snap(node("a", rm("m1", state))), "m1")
    assert (exc.value.status, exc.value.retry_after) == (503, 2)


def test_cold_load_under_way_is_model_loading() -> None:
    """A load cortex started (not yet visible on any node) also answers model_loading."""
    with pytest.raises(errors.ModelLoading):
        go(snap(node("a"), loading={"m1"}), "m1")


def test_recent_cold_load_failure_is_503_cold_load_failed() -> None:
    """A failed load answers 503 cold_load_failed until its backoff ends, Retry-After the
    time left (capped at 60), the reason said once and what kind of reason it is."""
    fail = LoadFailure("runner crashed", until=104.2)
    with pytest.raises(errors.ColdLoadFailed) as exc:
        go(snap(node("a"), failures={"m1": fail}), "m1")
    assert (exc.value.status, exc.value.retry_after) == (503, 5)
    assert exc.value.message.count("failed") == 1 and "runner crashed" in exc.value.message
    assert "operator" not in exc.value.message
    long = LoadFailure("model path '/x' does not exist", until=400.0, needs_operator=True)
    with pytest.raises(errors.ColdLoadFailed) as exc:
        go(snap(node("a"), failures={"m1": long}), "m1")
    assert exc.value.retry_after == 60 and "needs an operator" in exc.value.message
    expired = LoadFailure("old", until=50.0)
    assert isinstance(go(snap(node("a"), failures={"m1": expired}), "m1"), ColdLoad)


def test_failed_replica_is_cold_load_failed() -> None:
    """A replica whose runner failed reports its reason as cold_load_failed."""
    with pytest.raises(errors.ColdLoadFailed) as exc:
        go(snap(node("a", rm("m1", "failed", error="OOM"))), "m1")
    assert "OOM" in exc.value.message


def test_every_queue_full_is_429_retry_1() -> None:
    """Every ready replica answered queue_full: 429 queue_full, Retry-After 1."""
    s = snap(node("a", rm("m1")), node("b", rm("m1")))
    with pytest.raises(errors.QueueFull) as exc:
        go(s, "m1", full={"a", "b"})
    assert (exc.value.status, exc.value.retry_after) == (429, 1)


def test_every_replica_lost_before_first_byte_is_503_upstream_unavailable() -> None:
    """Every replica failed before answering: 503 upstream_unavailable, Retry-After 2."""
    s = snap(node("a", rm("m1")), node("b", rm("m1")))
    with pytest.raises(errors.UpstreamUnavailable) as exc:
        go(s, "m1", exclude={"a", "b"})
    assert (exc.value.status, exc.value.retry_after) == (503, 2)


def test_no_room_now_is_retryable_not_404() -> None:
    """Feasible on an empty node but memory is held by busy models: 503 with the arithmetic."""
    s = snap(node("a", rm("x", in_flight=1, mem_gb=40), avail_gb=1))
    with pytest.raises(errors.ColdLoadFailed) as exc:
        go(s, "m1")
    assert exc.value.retry_after is not None
    assert "GiB" in exc.value.message


# -- decisions ----------------------------------------------------------------------------


def test_unloaded_catalogued_model_asks_for_a_cold_load() -> None:
    """Catalogued, placeable, loaded nowhere: a ColdLoad on a healthy node."""
    d = go(snap(node("a", healthy=False), node("b")), "one")
    assert isinstance(d, ColdLoad)
    assert d.spec.id == "m1" and d.candidate.nodes == ("b",)


def test_replica_on_unhealthy_node_is_not_routed() -> None:
    """A ready replica on a node that is down is ignored; the model is loaded elsewhere."""
    d = go(snap(node("a", rm("m1"), healthy=False), node("b")), "m1")
    assert isinstance(d, ColdLoad) and d.candidate.nodes == ("b",)


def test_alias_resolves_to_id() -> None:
    """A request by alias routes the catalogue id."""
    r = go(snap(node("a", rm("m1"))), "one")
    assert isinstance(r, Route) and r.model_id == "m1"


def test_least_loaded_replica_wins() -> None:
    """Among ready replicas the one with the least in_flight + queue_depth is chosen."""
    s = snap(
        node("a", rm("m1", in_flight=2, queue=1)),
        node("b", rm("m1", in_flight=1)),
        node("c", rm("m1", in_flight=1, queue=2)),
    )
    r = go(s, "m1")
    assert isinstance(r, Route)
    assert (r.node, r.reason, r.load) == ("b", "least_loaded", 1)


def test_cortex_own_count_beats_a_stale_poll() -> None:
    """Requests cortex has in flight count even before the next poll shows them."""
    s = snap(node("a", rm("m1")), node("b", rm("m1")), outstanding={("a", "m1"): 3})
    r = go(s, "m1")
    assert isinstance(r, Route) and r.node == "b"


def test_loading_replicas_are_skipped_when_one_is_ready() -> None:
    """Only ready replicas take requests."""
    s = snap(node("a", rm("m1", "warming")), node("b", rm("m1", in_flight=5)))
    r = go(s, "m1")
    assert isinstance(r, Route) and r.node == "b"


def test_excluded_replica_is_skipped() -> None:
    """A replica that failed this request before its first byte is not tried again."""
    s = snap(node("a", rm("m1")), node("b", rm("m1", in_flight=3)))
    r = go(s, "m1", exclude={"a"})
    assert isinstance(r, Route) and r.node == "b"


def test_ties_are_spread_not_broken_by_name() -> None:
    """Equally idle replicas take turns as the rotation changes; none is always first."""
    s = snap(node("a", rm("m1")), node("b", rm("m1")), node("c", rm("m1")))
    picked = []
    for rotation in range(6):
        r = go(s, "m1", rotation=rotation)
        assert isinstance(r, Route)
        picked.append(r.node)
    assert sorted(picked) == ["a", "a", "b", "b", "c", "c"]
    # The same rotation gives the same answer: the router stays a pure function.
    assert go(s, "m1", rotation=4) == go(s, "m1", rotation=4)


def test_a_node_busy_with_abandoned_work_is_not_preferred() -> None:
    """A node still working on a request its client left (polled in_flight) loses every tie."""
    s = snap(
        node("a", rm("m1", in_flight=1)),  # the abandoned prompt still runs here
        node("b", rm("m1")),
    )
    for rotation in range(4):
        r = go(s, "m1", rotation=rotation)
        assert isinstance(r, Route) and r.node == "b"


def test_work_cortex_sent_but_not_finished_counts_across_models() -> None:
    """Cortex's own count of requests outstanding on a node, for any model, breaks a tie."""
    s = snap(
        node("a", rm("m1"), rm("x")),
        node("b", rm("m1"), rm("x")),
        outstanding={("a", "x"): 2},
    )
    for rotation in range(4):
        r = go(s, "m1", rotation=rotation)
        assert isinstance(r, Route) and r.node == "b"


def _conversation(turns: int) -> dict[str, Any]:
    msgs: list[dict[str, str]] = [{"role": "system", "content": "be brief"}]
    for i in range(turns):
        msgs.append({"role": "user", "content": f"q{i}"})
        if i < turns - 1:
            msgs.append({"role": "assistant", "content": f"a{i}"})
    return {"model": "m1", "messages": msgs}


def test_affinity_sticks_to_the_replica_holding_the_prefix() -> None:
    """Turn two of a conversation goes back to turn one's replica though it is busier."""
    turn1 = prefix_keys(_conversation(1))
    turn2 = prefix_keys(_conversation(2))
    affinity = dict.fromkeys(turn1, "a")
    s = snap(node("a", rm("m1", in_flight=3)), node("b", rm("m1")))
    r = go(s, "m1", prefix=turn2, affinity=affinity, margin=4)
    assert isinstance(r, Route) and (r.node, r.reason) == ("a", "affinity")


def test_affinity_leaves_a_much_busier_replica() -> None:
    """When the remembered replica's load exceeds the least-loaded's by the margin, leave it."""
    keys = prefix_keys(_conversation(2))
    s = snap(node("a", rm("m1", in_flight=9)), node("b", rm("m1", in_flight=1)))
    r = go(s, "m1", prefix=keys, affinity=dict.fromkeys(keys, "a"), margin=4)
    assert isinstance(r, Route) and (r.node, r.reason) == ("b", "least_loaded")


def test_affinity_to_a_gone_replica_falls_back() -> None:
    """A remembered node that no longer serves the model is ignored."""
    keys = prefix_keys(_conversation(2))
    s = snap(node("a", rm("m1"), healthy=False), node("b", rm("m1", in_flight=2)))
    r = go(s, "m1", prefix=keys, affinity=dict.fromkeys(keys, "a"))
    assert isinstance(r, Route) and r.node == "b"


def test_prefix_keys_differ_between_conversations() -> None:
    """Different first questions share no key (the system prompt alone is not a key)."""
    a = prefix_keys(
        {
            "model": "m1",
            "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}],
        }
    )
    b = prefix_keys(
        {
            "model": "m1",
            "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "y"}],
        }
    )
    assert a and b and not set(a) & set(b)


def test_prefix_keys_for_completions_share_leading_blocks() -> None:
    """Two prompts with a long common start share the keys of its blocks."""
    base = "p" * 600
    a = prefix_keys({"model": "m1", "prompt": base + "one"})
    b = prefix_keys({"model": "m1", "prompt": base + "two"})
    assert set(a) & set(b)
    assert a[0] != b[0]


def _prefix_key(model: str, text: str) -> str:
    """The key of one prefix, hashed from scratch (what the affinity table remembers)."""
    return hashlib.sha256(f"{model}\x1e{text}".encode()).hexdigest()[:32]


def test_prefix_keys_for_completions_are_the_prefix_hashes() -> None:
    """Each key is the hash of the prompt up to a block end (longest first), as before."""
    prompt = "".join(chr(0x61 + i % 26) for i in range(256 * 5 + 17)) + "é✓"
    keys = prefix_keys({"model": "m1", "prompt": prompt})
    ends = [len(prompt), 256 * 5, 256 * 4, 256 * 3, 256 * 2, 256]
    assert keys == tuple(_prefix_key("m1", prompt[:e]) for e in ends)


class _CountingSha256:
    """hashlib.sha256 that adds every byte it is fed (copies included) to `fed[0]`."""

    def __init__(self, h: Any, fed: list[int]) -> None:
        self._h, self._fed = h, fed

    def update(self, data: bytes) -> None:
        self._fed[0] += len(data)
        self._h.update(data)

    def copy(self) -> _CountingSha256:
        return _CountingSha256(self._h.copy(), self._fed)

    def hexdigest(self) -> str:
        return str(self._h.hexdigest())


def test_prefix_keys_of_an_8_mib_prompt_hash_it_once_and_keep_the_shared_prefix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Linear, not quadratic: an 8 MiB prompt is fed to the hash once (bytes counted, not
    seconds timed: hashing every prefix from scratch fed it ~16 GiB), and a prompt
    sharing its first 8 MiB with another finds that prefix's key (affinity kept)."""
    base = (string.ascii_lowercase * (8 * 1024 * 1024 // 26 + 1))[: 8 * 1024 * 1024]
    fed = [0]

    def sha256(data: bytes = b"") -> _CountingSha256:
        h = _CountingSha256(hashlib.sha256(), fed)
        h.update(data)
        return h

    monkeypatch.setattr(router_module, "hashlib", types.SimpleNamespace(sha256=sha256))
    started = time.monotonic()
    keys = prefix_keys({"model": "m1", "prompt": base})
    # Printed, not asserted: a timing belongs in bench/ (bench.router_micro).
    print(f"\nprefix_keys of 8 MiB: {time.monotonic() - started:.3f} s")
    assert len(base) <= fed[0] <= len(base) + 64, f"{fed[0]} bytes hashed for {len(base)}"
    monkeypatch.undo()
    assert len(keys) == 32 and keys[0] == _prefix_key("m1", base)
    longer = prefix_keys({"model": "m1", "prompt": base + "and a new question"})
    assert keys[0] in longer
    assert prefix_keys({"model": "m1", "prompt": "\ud800 lone"})


# -- eviction ---------------------------------------------------------------------------


def _busy_node(avail_gb: float = 2) -> NodeState:
    return node(
        "a",
        rm("x", last_used=5.0, mem_gb=4),
        rm("y", last_used=1.0, mem_gb=4),
        rm("z", in_flight=1, last_used=0.0, mem_gb=4),
        rm("p", last_used=0.0, mem_gb=4),
        rm("keep", last_used=0.0, mem_gb=4),
        rm("need20", "loading", last_used=0.0, mem_gb=4),
        rm("adhoc", queue=1, last_used=0.0, mem_gb=4),
        avail_gb=avail_gb,
    )


def test_eviction_order_is_lru_idle_unpinned() -> None:
    """Only idle, unpinned, not keep_loaded, not loading models; least recently used first."""
    n = _busy_node()
    order = [m.model_id for m in eviction_order(n, CAT, snap(n))]
    assert order == ["y", "x"]


def test_eviction_never_takes_a_model_cortex_has_in_flight() -> None:
    """A model idle at the last poll but with a request cortex is proxying now is kept."""
    n = _busy_node()
    s = snap(n, outstanding={("a", "y"): 1})
    assert [m.model_id for m in eviction_order(n, CAT, s)] == ["x"]


def test_eviction_never_takes_a_model_with_a_job_of_its_own() -> None:
    """One job per model: a model being unloaded, torn down or loaded elsewhere is not
    evicted by another model's load (the two jobs would cross)."""
    n = _busy_node()
    s = attrs.evolve(snap(n), busy=frozenset({"y"}))
    assert [m.model_id for m in eviction_order(n, CAT, s)] == ["x"]


def test_plan_evicts_only_as_much_as_needed() -> None:
    """Room for a model is made by evicting LRU first and stopping once it fits."""
    s = snap(_busy_node(avail_gb=2))
    d = route(s, CAT, "m1")  # needs 1.65 GiB: fits without evicting
    assert isinstance(d, ColdLoad)
    assert plan_evictions(d.candidate, s, CAT, keep="m1") == []
    s = snap(_busy_node(avail_gb=1))
    d = route(s, CAT, "m1")
    assert isinstance(d, ColdLoad)
    assert plan_evictions(d.candidate, s, CAT, keep="m1") == [("a", "y")]
    d = route(s, CAT, "m4")  # needs 5.45 GiB: 1 free + y's 4 is not enough
    assert isinstance(d, ColdLoad)
    assert plan_evictions(d.candidate, s, CAT, keep="m4") == [("a", "y"), ("a", "x")]


def test_nothing_evictable_means_no_room() -> None:
    """When only busy or pinned models hold the memory, no load is planned."""
    n = node("a", rm("z", in_flight=1, mem_gb=30), rm("p", mem_gb=30), avail_gb=1)
    with pytest.raises(errors.ColdLoadFailed):
        go(snap(n), "m4")


def test_node_without_discovery_does_not_block_a_load_elsewhere() -> None:
    """A healthy node that has not reported discovery yet is skipped, not waited for."""
    pending = attrs.evolve(node("a"), discovery=None)
    d = go(snap(pending, node("b")), "m1")
    assert isinstance(d, ColdLoad) and d.candidate.nodes == ("b",)


def test_only_node_without_discovery_is_placement_info_pending() -> None:
    """When the only healthy node has not reported discovery: 503 placement_info_pending."""
    pending = attrs.evolve(node("a"), discovery=None)
    with pytest.raises(errors.PlacementInfoPending):
        go(snap(pending, node("b", healthy=False)), "m1")


# -- X-Cortex-Node: a request pinned to one replica ------------------------------------


def test_pinned_request_goes_to_that_replica_even_when_busier() -> None:
    s = snap(node("a", rm("m1", in_flight=5)), node("b", rm("m1")))
    r = go(s, "m1", node="a")
    assert isinstance(r, Route) and r.node == "a" and r.reason == "pinned" and r.load == 5
    assert isinstance(go(s, "one", node="b"), Route)


def test_pinned_request_never_cold_loads_nor_goes_elsewhere() -> None:
    """Not on the node: 503 naming it (not a load, not another replica)."""
    s = snap(node("a", rm("m1")), node("b"))
    with pytest.raises(errors.ServiceUnavailable, match="not loaded on node b"):
        go(s, "m1", node="b")
    with pytest.raises(errors.InvalidRequest, match="no node 'c'"):
        go(s, "m1", node="c")


def test_pinned_request_to_an_unhealthy_loading_or_failed_replica_says_so() -> None:
    unhealthy = snap(node("a", rm("m1"), healthy=False), node("b", rm("m1")))
    with pytest.raises(errors.ServiceUnavailable, match="node a is not healthy"):
        go(unhealthy, "m1", node="a")
    with pytest.raises(errors.ModelLoading, match="warming on node a"):
        go(snap(node("a", rm("m1", "warming")), node("b", rm("m1"))), "m1", node="a")
    with pytest.raises(errors.ServiceUnavailable, match="failed on node a"):
        go(snap(node("a", rm("m1", "failed"))), "m1", node="a")


def test_pinned_request_that_failed_there_is_not_retried_elsewhere() -> None:
    s = snap(node("a", rm("m1")), node("b", rm("m1")))
    with pytest.raises(errors.UpstreamUnavailable, match="node a failed"):
        go(s, "m1", node="a", exclude={"a"})
    with pytest.raises(errors.QueueFull):
        go(s, "m1", node="a", full={"a"})


# -- routing policies (config `routing`) -------------------------------------------------


def test_least_loaded_policy_ignores_affinity() -> None:
    """routing = "least_loaded": a remembered prefix does not pull to a busier replica."""
    keys = prefix_keys(_conversation(2))
    s = snap(node("a", rm("m1", in_flight=3)), node("b", rm("m1")))
    sticky = go(s, "m1", prefix=keys, affinity=dict.fromkeys(keys, "a"))
    assert isinstance(sticky, Route) and sticky.node == "a"
    r = go(s, "m1", prefix=keys, affinity=dict.fromkeys(keys, "a"), policy="least_loaded")
    assert isinstance(r, Route) and (r.node, r.reason) == ("b", "least_loaded")


def test_round_robin_policy_takes_turns_whatever_the_load() -> None:
    """routing = "round_robin": replicas in turn by the rotation, a busy one included."""
    s = snap(node("a", rm("m1", in_flight=7)), node("b", rm("m1")), node("c", rm("x")))
    picks = [go(s, "m1", rotation=i, policy="round_robin") for i in range(4)]
    assert all(isinstance(p, Route) and p.reason == "round_robin" for p in picks)
    assert [p.node for p in picks if isinstance(p, Route)] == ["a", "b", "a", "b"]


def test_round_robin_still_skips_replicas_this_request_failed_on() -> None:
    """A replica excluded (failed before its first byte) is not taken in its turn."""
    s = snap(node("a", rm("m1")), node("b", rm("m1")))
    r = go(s, "m1", rotation=0, policy="round_robin", exclude={"a"})
    assert isinstance(r, Route) and r.node == "b"


def test_fleet_index_follows_every_write() -> None:
    """Snapshots' model index matches a scan of the nodes after loads, drops, failures,
    and an earlier snapshot keeps the index it was given (copy on write)."""
    from cortex.core.state import Fleet

    fleet = Fleet.of([("a", "http://a"), ("b", "http://b")], threshold=1)
    fleet.set_model("a", rm("m1"))
    fleet.set_model("b", rm("m1"))
    fleet.set_model("b", rm("x"))
    before = fleet.snapshot()
    fleet.drop_model("a", "m1")
    fleet.poll_failed("b", "down")
    after = fleet.snapshot()
    for s in (before, after):
        scanned = attrs.evolve(s, by_model=None)
        for mid in ("m1", "x", "none"):
            assert s.locations(mid) == scanned.locations(mid), mid
    assert [n.name for n, _ in before.locations("m1")] == ["a", "b"]
    assert [(n.name, n.healthy) for n, _ in after.locations("m1")] == [("b", False)]


def test_a_model_a_reload_removed_is_404_though_still_loaded() -> None:
    """Its copy finishes the requests it has; a new one is refused, permanently."""
    s = attrs.evolve(snap(node("a", rm("gone"))), retired=frozenset({"gone"}))
    with pytest.raises(errors.ModelNotFound, match="removed from the catalogue"):
        go(s, "gone")
    assert isinstance(go(snap(node("a", rm("gone"))), "gone"), Route)  # not removed: served
