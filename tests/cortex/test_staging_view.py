"""A stage under way on a node, as cortex shows it: /admin/state and the dashboard."""

from __future__ import annotations

import re
from typing import Any

from tests.cortex.fakes import fleet, gateway, stop_all

HOSTILE_ERROR = "<script>alert('stage')</script> sha256 mismatch in big.safetensors"


def _job(**kw: Any) -> dict[str, Any]:
    """A stage job as neuron.staging's StageJob.to_json writes it."""
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


async def test_admin_state_and_dashboard_show_a_stage_in_progress() -> None:
    nodes = await fleet("n1", "n2")
    try:
        nodes[0].add_model("m1", state="loading", staging=_job())
        nodes[1].add_model("m1", state="ready")
        async with gateway(nodes) as client:
            state = await (await client.get("/admin/state")).json()
            page = await (await client.get("/dashboard")).text()
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

    # One bar, on n1's row: 750 MB of 2 GB is 38 %.
    assert page.count("<progress") == 1
    bar = re.search(r'<progress max="100" value="(\d+)">', page)
    assert bar is not None and bar.group(1) == "38"
    assert "750.0 MB / 2.00 GB" in page and "125.0 MB/s" in page and "ETA 10s" in page
    assert 'data-stage-state="fetching"' in page


async def test_a_failed_stage_shows_its_error_escaped_and_no_bar() -> None:
    nodes = await fleet("n1")
    try:
        job = _job(state="failed", error=HOSTILE_ERROR, eta_s=None, rate_bytes_per_s=None)
        nodes[0].add_model("m1", state="failed", staging=job)
        async with gateway(nodes) as client:
            state = await (await client.get("/admin/state")).json()
            page = await (await client.get("/dashboard")).text()
    finally:
        await stop_all(nodes)

    (m1,) = [m for m in state["models"] if m["id"] == "m1"]
    assert m1["placements"][0]["staging"]["error"] == HOSTILE_ERROR
    assert "<progress" not in page
    assert "<script" not in page.lower()
    assert "&lt;script&gt;" in page and "big.safetensors" in page
    assert 'data-stage-state="failed"' in page


async def test_a_malformed_staging_field_is_dropped_not_fatal() -> None:
    nodes = await fleet("n1")
    try:
        nodes[0].add_model("m1", state="loading", staging={"bytes_done": "lots"})
        async with gateway(nodes) as client:
            state = await (await client.get("/admin/state")).json()
            resp = await client.get("/dashboard")
            assert resp.status == 200
    finally:
        await stop_all(nodes)
    (m1,) = [m for m in state["models"] if m["id"] == "m1"]
    assert m1["placements"][0]["state"] == "loading"
    assert m1["placements"][0]["staging"] is None
