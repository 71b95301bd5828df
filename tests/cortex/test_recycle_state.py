"""A recycling node stays out of routing until it answers as a new process."""

from __future__ import annotations

import time

from cortex.state import Fleet
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
    fleet.begin_recycle("a", timeout_s=600)
    assert not fleet.node("a").healthy and fleet.node("a").recycling
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
