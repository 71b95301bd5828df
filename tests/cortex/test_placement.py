"""Placement arithmetic: node sets, refusals with numbers, ever versus now."""

from __future__ import annotations

from typing import Any

import pytest

from cortex.core.placement import (
    MAX_SETS,
    RESERVE_BYTES,
    Candidate,
    NodeInfo,
    PlacementPending,
    best,
    candidates,
    explain,
    split_layers,
)
from shared.catalogue import GIB, ModelFacts, ModelSpec
from shared.errors import PlacementInfoPending
from tests.cortex.records import disc, node


def model(**kw: Any) -> ModelSpec:
    return ModelSpec(id=kw.pop("id", "m"), source="org/m", **kw)


def facts(
    weights_gib: float,
    kv_gib: float = 0,
    *,
    layers: int | None = 32,
    heads: int | None = 32,
    kv_heads: int | None = 8,
) -> ModelFacts:
    return ModelFacts(
        weights_bytes=int(weights_gib * GIB),
        kv_bytes=int(kv_gib * GIB),
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
    )


def feasible(cands: list[Candidate]) -> list[tuple[str, ...]]:
    return [c.nodes for c in cands if c.feasible]


def test_need_formula_and_unified_cap() -> None:
    """need = share * 1.3 + kv + 256 MiB against min(available, 0.75 * total)."""
    (c,) = candidates(model(), facts(10, 2), [node("a", 64, 60)])
    (fit,) = c.fits
    assert fit.need_bytes == int(10 * GIB * 1.3) + 2 * GIB + RESERVE_BYTES
    assert fit.usable_bytes == 48 * GIB
    assert c.feasible and c.backend is None and c.sharding is None


def test_exact_equal_refused() -> None:
    """A need exactly equal to usable memory is refused; one byte more usable fits."""
    f = facts(10, 1)
    need = int(10 * GIB * 1.3) + GIB + RESERVE_BYTES
    exact = NodeInfo("a", True, disc("a", 64), memory_available_bytes=need)
    (c,) = candidates(model(), f, [exact])
    assert not c.feasible
    assert "exactly its usable memory" in c.reasons[0]
    roomy = NodeInfo("a", True, disc("a", 64), memory_available_bytes=need + 1)
    assert candidates(model(), f, [roomy])[0].feasible


def test_weights_equal_to_free_memory_refused() -> None:
    """A model the size of a node's free memory cannot fit (overhead and reserve)."""
    (c,) = candidates(model(), facts(20), [node("a", 64, 20)])
    assert not c.feasible


def test_refusal_names_node_and_numbers() -> None:
    """The refusal names the node and shows need, usable and their parts in GiB."""
    (c,) = candidates(model(), facts(40, 2), [node("studio-1", 64, 30, reclaim_gib=4)])
    (reason,) = c.reasons
    assert reason.startswith("node studio-1: needs 54.25 GiB, more than its usable 34.00 GiB")
    assert "share 40.00 GiB x 1.3 + kv 2.00 GiB + reserve 0.25 GiB" in reason
    assert "available 30.00 GiB + reclaimable 4.00 GiB, 0.75 x total 64.00 GiB" in reason
    assert c.fits[0].reason == reason
    assert "studio-1" in explain(model(), [c])


def test_reclaimable_memory_counts() -> None:
    """Idle models the loader could evict count towards usable memory now."""
    spec, f = model(), facts(10)
    assert not candidates(spec, f, [node("a", 64, 8)])[0].feasible
    c = candidates(spec, f, [node("a", 64, 8, reclaim_gib=10)])[0]
    assert c.feasible
    assert c.fits[0].usable_bytes == 18 * GIB


def test_reclaimable_still_capped() -> None:
    """Available plus reclaimable never exceeds 0.75 of total on unified memory."""
    c = candidates(model(), facts(1), [node("a", 16, 10, reclaim_gib=10)])[0]
    assert c.fits[0].usable_bytes == 12 * GIB


def test_non_unified_memory_capped_by_total() -> None:
    """Without unified memory the cap is the total, not three quarters of it."""
    c = candidates(model(), facts(1), [node("a", 16, 10, reclaim_gib=10, unified=False)])[0]
    assert c.fits[0].usable_bytes == 16 * GIB
    ever = candidates(model(), facts(1), [node("a", 16, 0, unified=False)], now=False)[0]
    assert ever.fits[0].usable_bytes == 16 * GIB
    assert "usable 16.00 GiB = 1 x total 16.00 GiB" in ever.fits[0].arithmetic()
    empty = candidates(model(), facts(1), [node("a", 16, 0)])[0]
    assert "usable 0.00 GiB = min(available 0.00 GiB" in empty.reasons[0]


@pytest.mark.parametrize(("n", "ok"), [(2, True), (3, False)])
def test_tensor_head_divisibility(n: int, ok: bool) -> None:
    """4 heads and 2 KV heads split over 2 nodes, not over 3; the refusal names the counts."""
    nodes = [node(x, 16) for x in "abc"[:n]]
    spec = model(min_nodes=n, backend="ring")
    f = facts(6, heads=4, kv_heads=2)
    (c,) = candidates(spec, f, nodes)
    assert c.feasible is ok
    if not ok:
        assert c.reasons == (
            "tensor sharding over 3 nodes needs head counts divisible by 3:"
            " model has 4 attention heads and 2 KV heads",
        )


def test_tensor_share_is_equal() -> None:
    """Tensor sharding gives every member weights / n and kv / n."""
    (c,) = candidates(
        model(min_nodes=2), facts(20, 4, heads=4, kv_heads=2), [node("a"), node("b", 32)]
    )
    assert c.sharding == "tensor" and c.backend == "ring"
    assert {f.share_bytes for f in c.fits} == {10 * GIB}
    assert {f.kv_bytes for f in c.fits} == {2 * GIB}


def test_pipeline_proportional_split() -> None:
    """Unequal memory gives unequal whole-layer counts summing to the total."""
    spec = model(min_nodes=2, sharding="pipeline")
    f = facts(30, 3, layers=30)
    (c,) = candidates(spec, f, [node("big", 128, 96), node("small", 64, 32)])
    split = dict(zip(c.nodes, c.layer_split or (), strict=True))
    assert split == {"big": 23, "small": 7}  # 96 : 32 => 22.5 : 7.5, tie to the larger
    assert sum(split.values()) == 30
    by = {fit.node: fit for fit in c.fits}
    assert by["big"].share_bytes == -(-30 * GIB * 23 // 30)
    assert by["small"].kv_bytes == -(-3 * GIB * 7 // 30)
    assert c.feasible


def test_split_layers_largest_remainder() -> None:
    """Largest remainder keeps the sum exact and gives every rank a layer."""
    assert split_layers(10, [1, 1, 1]) == (4, 3, 3)
    assert split_layers(7, [5, 3]) == (4, 3)
    assert split_layers(3, [1000, 1, 1]) == (1, 1, 1)
    assert split_layers(4, [0, 0]) == (2, 2)
    with pytest.raises(ValueError):
        split_layers(1, [1, 1])


def test_pipeline_needs_layers() -> None:
    """Pipeline sharding without a layer count is refused, saying what to set."""
    spec = model(min_nodes=2, sharding="pipeline")
    (c,) = candidates(spec, facts(2, layers=None), [node("a"), node("b")])
    assert not c.feasible
    assert "needs the model's layer count" in c.reasons[0]


def _mesh(active: dict[str, int]) -> list[NodeInfo]:
    return [
        node(n, 64, backends=("ring", "jaccl"), rdma_active=k, rdma_down=2 - k)
        for n, k in active.items()
    ]


def test_jaccl_full_mesh() -> None:
    """Three nodes with two active RDMA ports each form a jaccl mesh."""
    spec = model(min_nodes=3, backend="jaccl")
    (c,) = candidates(spec, facts(30, heads=48, kv_heads=6), _mesh({"a": 2, "b": 2, "c": 2}))
    assert c.feasible and c.backend == "jaccl"


def test_jaccl_missing_link() -> None:
    """A member with a cable down is refused by name, with its peers and port counts."""
    spec = model(min_nodes=3, backend="jaccl")
    (c,) = candidates(spec, facts(30, heads=48, kv_heads=6), _mesh({"a": 2, "b": 2, "c": 1}))
    assert not c.feasible
    assert c.reasons == (
        "jaccl needs a full RDMA mesh: node c has 1 active RDMA port(s) (rdma_en0),"
        " needs 2 to reach a, b",
    )


def test_auto_backend_falls_back_to_ring() -> None:
    """auto uses jaccl when the whole set has it, ring otherwise."""
    spec = model(min_nodes=2)
    f = facts(30, heads=48, kv_heads=6)
    (c,) = candidates(spec, f, _mesh({"a": 1, "b": 1}))
    assert c.backend == "jaccl"
    (c,) = candidates(spec, f, [*_mesh({"a": 1}), node("b")])
    assert c.backend == "ring" and c.feasible


def test_ring_needs_backend_and_reachable_host() -> None:
    """ring refuses a member without it, and a loopback host seen from another machine."""
    spec = model(min_nodes=2, backend="ring")
    f = facts(4, heads=4, kv_heads=2)
    (c,) = candidates(spec, f, [node("a"), node("b", backends=("jaccl",))])
    assert c.reasons == ("node b does not offer the ring backend (has: jaccl)",)
    (c,) = candidates(spec, f, [node("a", ring_host="127.0.0.1"), node("b")])
    assert not c.feasible and "loopback" in c.reasons[0]
    same = [node(x, ring_host="127.0.0.1", hostname="box") for x in "ab"]
    assert candidates(spec, f, same)[0].feasible


def test_no_discovery_is_pending() -> None:
    """A healthy node that has not reported discovery makes best() raise a 503."""
    nodes = [node("a"), NodeInfo("b", True, None, memory_available_bytes=0)]
    with pytest.raises(PlacementPending) as exc:
        best(model(), facts(1), nodes)
    assert exc.value.nodes == ("b",)
    assert isinstance(exc.value, PlacementInfoPending)
    assert exc.value.status == 503 and exc.value.retry_after
    cands = candidates(model(), facts(1), nodes)
    (pend,) = [c for c in cands if c.pending]
    assert pend.reasons == ("node b has not reported discovery yet",) and not pend.feasible


def test_unseen_unhealthy_node_does_not_block_now() -> None:
    """A never-seen node that is down does not hold up a placement that fits elsewhere."""
    nodes = [node("a"), NodeInfo("b", False, None, memory_available_bytes=0)]
    c = best(model(), facts(1), nodes)
    assert c is not None and c.nodes == ("a",)


def test_ever_pending_only_when_nothing_known_fits() -> None:
    """Ever: an unseen node forbids concluding 'never fits', but not a known fit."""
    unseen = NodeInfo("b", False, None, memory_available_bytes=0)
    assert best(model(), facts(1), [node("a"), unseen], now=False) is not None
    with pytest.raises(PlacementPending):
        best(model(), facts(100), [node("a"), unseen], now=False)


def test_ever_versus_now() -> None:
    """A busy or unhealthy node fails now but could ever hold the model; too big never."""
    spec, f = model(), facts(20)
    busy = [node("a", 64, 4)]
    assert best(spec, f, busy) is None
    assert best(spec, f, busy, now=False) is not None
    down = [node("a", healthy=False)]
    (c,) = candidates(spec, f, down)
    assert c.reasons == ("node a is unhealthy",)
    assert best(spec, f, down, now=False) is not None
    huge = facts(40)  # 52.25 GiB > 0.75 * 64
    assert best(spec, huge, [node("a")], now=False) is None


def test_single_node_sets_first() -> None:
    """A model that fits one node is offered on single nodes only."""
    cands = candidates(model(), facts(10, heads=4, kv_heads=2), [node("a"), node("b")])
    assert [c.nodes for c in cands] == [("a",), ("b",)]


def test_escalates_to_multi_node_when_no_single_fits() -> None:
    """When no single node could ever hold it, two-node sets are tried."""
    f = facts(40, heads=4, kv_heads=2)
    cands = candidates(model(), f, [node("a"), node("b")])
    assert [c.nodes for c in cands] == [("a", "b"), ("a",), ("b",)]
    assert cands[0].feasible and cands[0].sharding == "tensor"


def test_busy_single_node_does_not_escalate() -> None:
    """A model that fits one node is not sharded because nodes are busy right now."""
    f = facts(20, heads=4, kv_heads=2)
    cands = candidates(model(), f, [node("a", 64, 16), node("b", 64, 16)])
    assert all(len(c.nodes) == 1 for c in cands)
    assert feasible(cands) == []


def test_loaded_nodes_excluded_from_new_replica() -> None:
    """A node already holding the model is refused for a new replica, with the reason."""
    nodes = [node("a", loaded=("m",)), node("b")]
    cands = candidates(model(), facts(10), nodes)
    assert feasible(cands) == [("b",)]
    (a,) = [c for c in cands if c.nodes == ("a",)]
    assert a.reasons == ("node a already holds model m",)


def test_second_replica_of_big_model_may_go_multi_node() -> None:
    """If the only node that fits alone holds a replica, a set of smaller ones is offered."""
    f = facts(30, heads=4, kv_heads=2)
    nodes = [node("big", 128, loaded=("m",)), node("s1", 48), node("s2", 48)]
    c = best(model(), f, nodes)
    assert c is not None and c.nodes == ("s1", "s2")


def test_a_model_on_every_node_gets_no_multi_node_sets() -> None:
    """Served on both nodes of two: no bigger set is listed (every one would only say no),
    and each single-node set says which members hold the copy."""
    f = facts(1, heads=4, kv_heads=2)
    nodes = [node("a", loaded=("m",)), node("b", loaded=("m",))]
    cands = candidates(model(), f, nodes)
    assert sorted(c.nodes for c in cands) == [("a",), ("b",)]
    assert all(c.holding == c.nodes and not c.feasible for c in cands)
    assert cands[0].to_json()["holding"] == list(cands[0].nodes)
    # min_nodes = 2 asks for pairs: the pair serving it is listed, holding on both.
    (pair,) = candidates(model(min_nodes=2, sharding="tensor"), f, nodes)
    assert pair.nodes == ("a", "b") and pair.holding == ("a", "b")


def test_holding_is_a_now_fact() -> None:
    """The "ever" view takes every node as empty: nothing is held there."""
    nodes = [node("a", loaded=("m",)), node("b")]
    assert all(c.holding == () for c in candidates(model(), facts(1), nodes, now=False))
    assert [c.holding for c in candidates(model(), facts(1), nodes)] == [(), ("a",)]


def test_ordering_staged_then_headroom() -> None:
    """Among single nodes, those holding the files come first, then the most headroom."""
    nodes = [node("small", 32), node("big", 128), node("staged", 32, staged=("m",))]
    cands = candidates(model(), facts(4), nodes)
    assert [c.nodes for c in cands] == [("staged",), ("big",), ("small",)]
    assert [c.nodes for c in candidates(model(), facts(4), nodes[:2])] == [("big",), ("small",)]


def test_ordering_feasible_then_fewer_nodes() -> None:
    """Feasible sets come before infeasible ones, smaller sets before larger."""
    f = facts(40, heads=4, kv_heads=2)
    nodes = [node("a"), node("b"), node("c"), node("tiny", 8)]
    cands = candidates(model(min_nodes=2), f, nodes)
    flags = [c.feasible for c in cands]
    assert flags == sorted(flags, reverse=True)
    assert all(len(c.nodes) == 2 for c in cands)  # size 2 fits, so no size 3 sets
    assert all(("tiny" in c.nodes) is not c.feasible for c in cands)


def test_pinned_restricts_and_best_respects_exclude() -> None:
    """pinned_on limits candidates to the pinned nodes; exclude removes nodes from best()."""
    nodes = [node("a", 128), node("b"), node("c")]
    spec = model(pinned_on=("b", "c"))
    assert {c.nodes for c in candidates(spec, facts(4), nodes)} == {("b",), ("c",)}
    c = best(spec, facts(4), nodes, exclude=("b",))
    assert c is not None and c.nodes == ("c",)
    assert best(spec, facts(4), nodes, exclude=("b", "c")) is None


def test_min_nodes_over_pool_explained() -> None:
    """Asking for more nodes than exist gives one refusal saying so."""
    (c,) = candidates(model(min_nodes=3), facts(1), [node("a"), node("b")])
    assert c.reasons == ("model m needs at least 3 node(s); 2 nodes known (a, b)",)


def test_enumeration_is_capped() -> None:
    """A large fleet does not enumerate every subset."""
    nodes = [node(f"n{i:02d}", 8) for i in range(20)]
    cands = candidates(model(min_nodes=10), facts(1000, heads=None), nodes)
    assert len(cands) == MAX_SETS


def test_to_json_carries_the_arithmetic() -> None:
    """The JSON view has the per-node numbers and a readable arithmetic line."""
    spec = model(min_nodes=2, sharding="pipeline")
    (c,) = candidates(spec, facts(30, 3, layers=30), [node("a"), node("b")])
    d = c.to_json()
    assert d["nodes"] == ["a", "b"] and d["feasible"] and d["layer_split"] == [15, 15]
    fit = d["fits"][0]
    assert fit["need_bytes"] > fit["share_bytes"]
    assert fit["arithmetic"].startswith("need ") and "(15 layers)" in fit["arithmetic"]
