"""The status and preview tables: what an operator must see at a glance (restarts, a floor
breached; a model here already, one more copy fitting, or why not)."""

from __future__ import annotations

from typing import Any

from cortex.cli.ops import (
    preview_rc,
    preview_summary,
    render_preview,
    render_status,
    status_rc,
)


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


def _cand(nodes: list[str], *, feasible: bool = False, holding: list[str] | None = None,
          reasons: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    fit = {"node": nodes[0], "ok": feasible, "arithmetic": "need 1 GiB; usable 9 GiB"}
    return {
        "nodes": nodes,
        "feasible": feasible,
        "holding": holding or [],
        "reasons": reasons or [],
        "fits": [fit],
        "backend": None if len(nodes) == 1 else "ring",
        "sharding": None if len(nodes) == 1 else "tensor",
        "headroom_bytes": 8 * 2**30,
    }


def _rows(text: str) -> dict[str, list[str]]:
    lines = text.splitlines()
    start = lines.index(next(x for x in lines if x.startswith("NODES"))) + 1
    rows = {}
    for line in lines[start:]:
        if not line.strip():
            break
        rows[line.split()[0]] = line.split()
    return rows


def test_preview_tells_here_from_fits_from_cannot_fit() -> None:
    """A node holding the model reads 'here' (never 'no'), with no refusal; a free node
    that fits reads 'yes'; the command exits 0."""
    held = ["node a already holds model m"]
    answer = {
        "model_id": "m",
        "facts": {"weights_bytes": 10},
        "candidates": [_cand(["b"], feasible=True), _cand(["a"], holding=["a"], reasons=held)],
        "ever": [_cand(["a"], feasible=True)],
    }
    text = render_preview(answer)
    rows = _rows(text)
    assert rows["a"][1:] == ["here", "-", "-", "-"]
    assert rows["b"][1] == "yes" and rows["b"][3] == "8.0G"
    assert preview_summary(answer) == "on a now; one more copy fits on: b (best first)"
    assert "ok b / b: need 1 GiB" in text and "/ a:" not in text  # no arithmetic for a
    assert preview_rc(answer) == 0


def test_preview_of_a_model_on_every_node_exits_0() -> None:
    held = {n: [f"node {n} already holds model m"] for n in "ab"}
    answer = {
        "model_id": "m",
        "facts": {},
        "candidates": [_cand([n], holding=[n], reasons=held[n]) for n in "ab"],
        "ever": [_cand(["a"], feasible=True)],
    }
    text = render_preview(answer)
    assert {r[1] for r in _rows(text).values()} == {"here"}
    assert "already holds" not in text
    assert preview_summary(answer) == "on a, b now; one more copy has no node set left without one"
    assert "(none shown: every set listed serves the model already)" in text
    assert preview_rc(answer) == 0


def test_preview_of_a_model_that_fits_nowhere_now_exits_1_saying_why() -> None:
    full = ["node a: needs 9 GiB, more than its usable 4 GiB"]
    answer = {
        "model_id": "m",
        "facts": {},
        "candidates": [
            _cand(["a"], reasons=full),
            # A pair with a member holding a copy is no new copy: 'no', with its reason.
            _cand(["a", "b"], holding=["b"], reasons=["node b already holds model m"]),
        ],
        "ever": [_cand(["a"], feasible=True)],
    }
    rows = _rows(render_preview(answer))
    assert rows["a"][1] == "no" and "usable 4 GiB" in " ".join(rows["a"])
    assert rows["a,b"][1:3] == ["no", "ring/tensor"]
    assert preview_summary(answer).startswith("loaded nowhere now; a copy fits on no node set")
    assert preview_rc(answer) == 1
