"""A recycling node stays out of routing until it answers as a new process."""

from __future__ import annotations

import time

from cortex.core.state import Fleet, NodeModel
from cortex.run.inflight import InFlight
from cortex.run.lifecycle import replicas
from shared.wire import NodeHealth


def _health(started_at: float) -> NodeHealth:
    return NodeHealth(
        status="idle",
        node_id="id-a",
        started_at=started_at,
        uptime_s=1.0,
        memory_available_bytes=1 << 30,
        models=(),
    )


def test_recycling_holds_until_a_new_start_then_routes_again() -> None:
    """Polls of the old process (still draining) keep it out; the new one brings it back."""
    fleet = Fleet.of([("a", "http://a")], threshold=3)
    fleet.poll_succeeded("a", _health(100.0), started=time.monotonic())
    assert fleet.node("a").healthy
    assert fleet.snapshot().nodes[0].healthy  # the snapshot's node tuple is now cached
    fleet.begin_recycle("a", timeout_s=600)
    assert not fleet.node("a").healthy and fleet.node("a").recycling
    # What routing and /admin/state read: the mark, not the cached record before it.
    assert not fleet.snapshot().nodes[0].healthy and fleet.snapshot().nodes[0].recycling
    fleet.poll_succeeded("a", _health(100.0), started=time.monotonic())
    assert not fleet.node("a").healthy and fleet.node("a").to_json()["recycling"] is True
    fleet.poll_succeeded("a", _health(200.0), started=time.monotonic())
    assert fleet.node("a").healthy and not fleet.node("a").recycling


def test_recycling_ends_at_its_deadline_even_without_a_restart() -> None:
    """A node that never restarted is not kept out forever."""
    fleet = Fleet.of([("a", "http://a")], threshold=3)
    fleet.poll_succeeded("a", _health(100.0), started=time.monotonic())
    fleet.begin_recycle("a", timeout_s=0)
    fleet.poll_succeeded("a", _health(100.0), started=time.monotonic())
    assert fleet.node("a").healthy and not fleet.node("a").recycling


def test_a_recycling_nodes_copy_still_counts_as_a_replica() -> None:
    """No replacement is loaded elsewhere while a node restarts; a down node's copy is gone."""
    fleet = Fleet.of([("a", "http://a"), ("b", "http://b")], threshold=1)
    for name in ("a", "b"):
        fleet.poll_succeeded(name, _health(100.0), started=time.monotonic())
        fleet.set_model(name, NodeModel(model_id="m", state="ready"))
    assert replicas(fleet.snapshot(), "m") == 2
    fleet.begin_recycle("a", timeout_s=600)
    assert replicas(fleet.snapshot(), "m") == 2
    fleet.poll_failed("b", "down")
    assert replicas(fleet.snapshot(), "m") == 1


def test_a_recycling_node_keeps_its_streams_an_unhealthy_one_does_not() -> None:
    """The drain finishes what the node holds; only a node lost for real ends them."""
    fleet = Fleet.of([("a", "http://a")], threshold=1)
    fleet.poll_succeeded("a", _health(100.0), started=time.monotonic())
    inflight = InFlight()
    with inflight.attempt("a") as attempt:
        inflight.node_changed(fleet.begin_recycle("a", timeout_s=600))
        inflight.node_changed(fleet.poll_failed("a", "connection refused"))
        assert attempt.reason is None
        fleet.end_recycle("a")
        inflight.node_changed(fleet.poll_failed("a", "connection refused"))
        assert attempt.reason == "node a was marked unhealthy (connection refused)"
