"""Reconciler decisions: which groups are broken, how many replicas a model has."""

from __future__ import annotations

from cortex.reconciler import broken_groups, replicas, wanted_replicas
from cortex.state import FleetSnapshot, NodeModel, NodeState
from shared.catalogue import ModelSpec
from shared.retry import RECONCILE_WAIT, backoff_s
from shared.wire import GroupSpec, ModelState


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
    """Each failed load waits longer, up to the cap."""
    waits = [backoff_s(RECONCILE_WAIT, n) for n in (1, 2, 3, 20)]
    assert waits[0] < waits[1] < waits[2]
    assert waits[-1] == 300
