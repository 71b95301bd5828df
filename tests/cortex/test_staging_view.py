"""A stage under way on a node, as cortex shows it in /admin/state (the dashboard page
draws it from there: tests/cortex/test_dashboard.py drives it in Chromium)."""

from __future__ import annotations

from typing import Any

from tests.cortex.fakes import fleet, gateway, stop_all

HOSTILE_ERROR = "<script>alert('stage')</script> sha256 mismatch in big.safetensors"


def _job(**kw: Any) -> dict[str, Any]:
    """A stage job as neuron.store.staging's StageJob.to_json writes it."""
    job: dict[str, Any] = {
        "model_id": "m1",
        "name": "org--m1",
        "source": "org/m1",
        "peers": ["http://peer:9410"],
        "state": "fetching",
        "bytes_done": 750_000_000,
        "bytes_total": 2_000_000_000,
        "files_done": 1,
        "files_total": 3,
        "rate_bytes_per_s": 125_000_000.0,
        "eta_s": 10.0,
        "error": None,
        "manifest_from": "http://peer:9410",
        "started_at": 1.0,
        "finished_at": None,
        "path": None,
    }
    job.update(kw)
    return job


async def test_admin_state_shows_a_stage_in_progress() -> None:
    nodes = await fleet("n1", "n2")
    try:
        nodes[0].add_model("m1", state="loading", staging=_job())
        nodes[1].add_model("m1", state="ready")
        async with gateway(nodes) as client:
            state = await (await client.get("/admin/state")).json()
    finally:
        await stop_all(nodes)

    (m1,) = [m for m in state["models"] if m["id"] == "m1"]
    by_node = {p["node"]: p for p in m1["placements"]}
    staging = by_node["n1"]["staging"]
    assert staging["state"] == "fetching"
    assert (staging["bytes_done"], staging["bytes_total"]) == (750_000_000, 2_000_000_000)
    assert staging["rate_bytes_per_s"] == 125_000_000.0 and staging["eta_s"] == 10.0
    assert by_node["n2"]["staging"] is None
    (n1,) = [n for n in state["nodes"] if n["name"] == "n1"]
    assert n1["models"][0]["staging"]["state"] == "fetching"


async def test_a_failed_stage_keeps_its_error() -> None:
    nodes = await fleet("n1")
    try:
        job = _job(state="failed", error=HOSTILE_ERROR, eta_s=None, rate_bytes_per_s=None)
        nodes[0].add_model("m1", state="failed", staging=job)
        async with gateway(nodes) as client:
            state = await (await client.get("/admin/state")).json()
    finally:
        await stop_all(nodes)

    (m1,) = [m for m in state["models"] if m["id"] == "m1"]
    assert m1["placements"][0]["staging"]["error"] == HOSTILE_ERROR
    assert m1["placements"][0]["staging"]["state"] == "failed"


async def test_a_malformed_staging_field_is_dropped_not_fatal() -> None:
    nodes = await fleet("n1")
    try:
        nodes[0].add_model("m1", state="loading", staging={"bytes_done": "lots"})
        async with gateway(nodes) as client:
            state = await (await client.get("/admin/state")).json()
    finally:
        await stop_all(nodes)
    (m1,) = [m for m in state["models"] if m["id"] == "m1"]
    assert m1["placements"][0]["state"] == "loading"
    assert m1["placements"][0]["staging"] is None
