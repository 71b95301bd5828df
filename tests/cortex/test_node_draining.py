"""A node that says `draining` is out of routing but not lost: its streams go on until it
is gone (its polls fail) or answers as a new process; views show it draining."""

from __future__ import annotations

import time
from typing import Any

from cortex.cli.ops import render_status
from cortex.core.state import DRAINING, Fleet
from cortex.run.inflight import InFlight
from shared.wire import NodeHealth, NodeStatus


def _health(status: NodeStatus, started_at: float = 100.0) -> NodeHealth:
    return NodeHealth(
        status=status,
        node_id="id-a",
        started_at=started_at,
        uptime_s=1.0,
        memory_available_bytes=1 << 30,
        models=(),
    )


def _fleet() -> Fleet:
    fleet = Fleet.of([("a", "http://a")], threshold=3)
    fleet.poll_succeeded("a", _health("busy"), started=time.monotonic())
    assert fleet.node("a").healthy
    return fleet


def test_a_draining_node_keeps_its_streams_until_it_is_gone() -> None:
    """Draining: not routed to, attempts kept through failed polls below the threshold;
    the threshold's poll makes it lost, and its attempts end."""
    fleet = _fleet()
    inflight = InFlight()
    with inflight.attempt("a") as attempt:
        inflight.node_changed(fleet.poll_succeeded("a", _health("draining"), started=0.0))
        node = fleet.node("a")
        assert not node.healthy and node.draining and node.last_error == DRAINING
        assert not fleet.snapshot().healthy  # what routing reads
        for _ in range(2):  # its drain over, its listener closed: refused polls
            inflight.node_changed(fleet.poll_failed("a", "connection refused"))
        assert fleet.node("a").draining and attempt.reason is None
        inflight.node_changed(fleet.poll_failed("a", "connection refused"))
        assert not fleet.node("a").draining
        assert attempt.reason == "node a was marked unhealthy (connection refused)"


def test_a_draining_node_that_cannot_be_reached_is_gone_at_once() -> None:
    """Passive health: a refused connection ends the drain's benefit of the doubt."""
    fleet = _fleet()
    fleet.poll_succeeded("a", _health("draining"), started=0.0)
    node = fleet.passive_failure("a", "connect: refused", fatal=True)
    assert not node.draining and not node.healthy


def test_a_drained_node_back_as_a_new_process_is_routed_to() -> None:
    """systemd restarted it: a new start that says idle is healthy again."""
    fleet = _fleet()
    fleet.poll_succeeded("a", _health("draining"), started=0.0)
    fleet.poll_failed("a", "connection refused")
    node = fleet.poll_succeeded("a", _health("idle", started_at=200.0), started=time.monotonic())
    assert node.healthy and not node.draining and node.last_error is None


def test_a_recycling_node_shows_its_drain_then_comes_back() -> None:
    """The restart's old process says draining (read, not guessed); the new one is back."""
    fleet = _fleet()
    fleet.begin_recycle("a", timeout_s=600)
    node = fleet.poll_succeeded("a", _health("draining"), started=time.monotonic())
    assert node.recycling and node.draining and not node.healthy
    assert node.to_json()["draining"] is True and node.to_json()["status"] == "draining"
    fleet.poll_failed("a", "connection refused")
    node = fleet.poll_succeeded("a", _health("idle", started_at=200.0), started=time.monotonic())
    assert node.healthy and not node.recycling and not node.draining


def test_cortex_status_shows_a_draining_node_as_draining() -> None:
    """`cortex status`: draining in the HEALTH column, not DOWN."""
    fleet = _fleet()
    fleet.poll_succeeded("a", _health("draining"), started=0.0)
    state: dict[str, Any] = {"nodes": [fleet.node("a").to_json()], "models": []}
    row = render_status(state).splitlines()[1].split()
    assert row[:3] == ["a", "draining", "draining"], row
