"""What cortex tells each member of a multi-rank group: ranks, peers, backend, layers."""

from __future__ import annotations

from cortex.core.placement import NodeInfo, best
from cortex.run.loader import group_specs
from shared.catalogue import GIB, ModelFacts, ModelSpec
from shared.wire import Discovery
from tests.cortex.records import node


def _discoveries(nodes: list[NodeInfo], order: tuple[str, ...]) -> list[Discovery]:
    by_name = {n.name: n.discovery for n in nodes}
    return [d for d in (by_name[m] for m in order) if d is not None]


def test_ring_group_names_every_rank_and_peer() -> None:
    """Tensor over ring: one spec per rank, same group id, hosts in rank order."""
    spec = ModelSpec(id="big", source="x/big", min_nodes=2, backend="ring", heads=4, kv_heads=2)
    facts = ModelFacts(weights_bytes=60 * GIB, kv_bytes=GIB, layers=8, heads=4, kv_heads=2)
    nodes = [node("a", ring_host="10.1.0.1"), node("b", ring_host="10.1.0.2")]
    cand = best(spec, facts, nodes)
    assert cand is not None and cand.feasible
    discs = _discoveries(nodes, cand.nodes)
    specs = group_specs(spec, cand, discs, base_port=47000)
    assert [g.rank for g in specs] == [0, 1]
    assert len({g.group_id for g in specs}) == 1
    assert all(g.world_size == 2 and g.backend == "ring" for g in specs)
    hosts = specs[0].hosts
    assert [h.split(":")[0] for h in hosts] == [d.ring_host for d in discs]
    assert specs[0].hosts == specs[1].hosts
    assert specs[0].layer_split == ()


def test_pipeline_group_carries_the_proportional_split() -> None:
    """Pipeline: each member learns the layer counts placement computed from memory."""
    spec = ModelSpec(
        id="deep", source="x/deep", min_nodes=2, sharding="pipeline", backend="ring", layers=30
    )
    facts = ModelFacts(weights_bytes=80 * GIB, kv_bytes=GIB, layers=30)
    nodes = [node("big", 128), node("small", 48)]
    cand = best(spec, facts, nodes)
    assert cand is not None and cand.layer_split is not None
    specs = group_specs(spec, cand, _discoveries(nodes, cand.nodes), base_port=47000)
    assert all(g.layer_split == cand.layer_split for g in specs)
    assert sum(cand.layer_split) == 30
    big = cand.layer_split[cand.nodes.index("big")]
    assert big > 30 - big, "the node with more memory runs more layers"
