"""The status table: what an operator must see at a glance (restarts, a floor breached)."""

from __future__ import annotations

from typing import Any

from cortex.ops_cli import render_status, status_rc


def test_status_shows_restarts_the_floor_and_exits_1_on_a_failed_copy() -> None:
    node: dict[str, Any] = {
        "name": "a",
        "healthy": True,
        "seen": True,
        "status": "degraded",
        "memory_total_bytes": 8 * 2**30,
        "memory_available_bytes": 2 * 2**30,
        "disk_free_bytes": 10**9,
        "disk_total_bytes": 10**10,
        "min_free_bytes": 2 * 10**9,
        "models": [{}],
        "advice": ["reboot a at a quiet moment"],
    }
    place = {"node": "a", "state": "recovering", "healthy": True, "restarts": 2}
    model = {"id": "m", "placements": [place], "life": {"wish": {"replicas": 1}, "present": 0}}
    state = {"nodes": [node], "models": [model]}
    lines = render_status(state).splitlines()
    assert "6.0G/8.0G 75%" in lines[1] and "1.0GB (90% used) UNDER FLOOR" in lines[1]
    assert lines[1].endswith("reboot a at a quiet moment")
    assert "recovering  0/1" in lines[4] and "a:recovering (2 restarts)" in lines[4]
    assert status_rc(state) == 0
    place["state"] = "failed"
    assert status_rc(state) == 1
