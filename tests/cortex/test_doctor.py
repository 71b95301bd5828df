"""cortex doctor against fake neurons (real aiohttp apps): each failure names its check."""

from __future__ import annotations

import argparse
import asyncio
import io
from typing import Any

from aiohttp.test_utils import TestClient

from cortex.cli import ops as ops_cli
from cortex.run import doctor
from cortex.run.doctor import Check, Limits, NodeLive, Probe
from cortex.run.poller import POLLER
from shared.catalogue import GIB
from shared.wire import NodeHealth
from tests.cortex.fakes import FakeNeuron, fleet, gateway, stop_all


async def _report(client: TestClient[Any, Any]) -> dict[str, Any]:
    resp = await client.get("/admin/doctor")
    assert resp.status == 200
    body: dict[str, Any] = await resp.json()
    return body


def _failing(report: dict[str, Any]) -> list[tuple[str, str | None]]:
    return [(c["name"], c["node"]) for c in report["checks"] if c["verdict"] == "fail"]


async def _cli(client: TestClient[Any, Any], *extra: str) -> tuple[int, str]:
    """`cortex doctor` (blocking HTTP) in a thread, against the in-process cortex."""
    url = str(client.make_url("")).rstrip("/")
    args = argparse.Namespace(url=url, token=None, config=None, json="--json" in extra)
    out = io.StringIO()
    rc = await asyncio.to_thread(ops_cli.doctor_main, args, out)
    return rc, out.getvalue()


async def test_a_healthy_fake_fleet_passes_and_exits_0() -> None:
    nodes = await fleet("a", "b")
    nodes[0].add_model("m1")
    try:
        async with gateway(nodes) as client:
            report = await _report(client)
            assert report["verdict"] == "pass", _failing(report)
            names = {c["name"] for c in report["checks"]}
            assert {"node answering", "clock", "disk", "store floor", "model answers"} <= names
            rc, text = await _cli(client)
            assert rc == 0, text
            assert "PASS  model answers" in text and "m1 on a: 2-token probe" in text
    finally:
        await stop_all(nodes)


async def test_a_node_that_is_down_fails_node_answering() -> None:
    nodes = await fleet("a", "b")
    try:
        async with gateway(nodes) as client:
            await nodes[1].stop()
            report = await _report(client)
            assert _failing(report) == [("node answering", "b")]
            fail = next(c for c in report["checks"] if c["verdict"] == "fail")
            assert "does not answer /health" in fail["detail"] and "start the neuron" in fail["fix"]
            rc, text = await _cli(client)
            assert rc == 1
            assert "FAIL  node answering" in text and "fix: start the neuron on b" in text
    finally:
        await stop_all(nodes)


async def test_a_disk_under_the_floor_fails_the_store_floor_check() -> None:
    nodes = await fleet("a", "b")
    nodes[1].disk_free_bytes = 1 * 10**9  # 1 GB free
    nodes[1].min_free_bytes = 2 * 10**9  # 2 GB floor
    nodes[1].disk_total_bytes = 10 * 10**9
    try:
        async with gateway(nodes) as client:
            report = await _report(client)
            # 90% used is the disk check's critical line too.
            assert _failing(report) == [("disk", "b"), ("store floor", "b")]
            floor = next(
                c for c in report["checks"] if c["name"] == "store floor" and c["node"] == "b"
            )
            assert "1.0 GB free under the store, floor 2.0 GB" in floor["detail"]
            rc, _ = await _cli(client)
            assert rc == 1
    finally:
        await stop_all(nodes)


async def test_a_model_that_does_not_answer_its_probe_fails_model_answers() -> None:
    nodes = await fleet("a", "b")
    nodes[0].add_model("m1")
    nodes[1].add_model("m1")
    nodes[1].answer_gate = asyncio.Event()  # b's runner is wedged: never answers
    try:
        async with gateway(nodes, doctor_probe_timeout_s=1.0) as client:
            report = await _report(client)
            assert _failing(report) == [("model answers", "b")]
            fail = next(c for c in report["checks"] if c["verdict"] == "fail")
            assert fail["model"] == "m1" and "within 1 s" in fail["detail"]
            ok = next(
                c for c in report["checks"] if c["name"] == "model answers" and c["node"] == "a"
            )
            assert ok["verdict"] == "pass"
            # The probe was a real 2-token completion.
            assert nodes[0].chat_bodies[-1]["max_tokens"] == 2
            rc, text = await _cli(client, "--json")
            assert rc == 1 and '"verdict": "fail"' in text
    finally:
        nodes[1].answer_gate.set()
        await stop_all(nodes)


async def test_mismatched_versions_fail_alignment_naming_each_node() -> None:
    nodes = await fleet("a", "b", "c")
    nodes[2].mlx_version = "0.30.1"
    nodes[1].mlx_lm_version = "0.29.9"
    try:
        async with gateway(nodes) as client:
            report = await _report(client)
            assert _failing(report) == [
                ("mlx versions aligned", None),
                ("mlx-lm versions aligned", None),
            ]
            mlx = next(c for c in report["checks"] if c["name"] == "mlx versions aligned")
            assert mlx["detail"] == "mlx differs: 0.29.0 on a, b; 0.30.1 on c"
            neuron = next(c for c in report["checks"] if c["name"] == "neuron versions aligned")
            assert neuron["verdict"] == "pass"
            rc, _ = await _cli(client)
            assert rc == 1
    finally:
        await stop_all(nodes)


async def test_unreachable_cortex_is_a_failed_check_and_exit_2() -> None:
    args = argparse.Namespace(url="http://127.0.0.1:9", token=None, config=None, json=False)
    out = io.StringIO()
    rc = await asyncio.to_thread(ops_cli.doctor_main, args, out)
    assert rc == 2
    assert out.getvalue().startswith("FAIL  cortex reachable")


async def test_admin_state_shows_the_jaccl_reboot_advice() -> None:
    """A node past its jaccl reload budget says so in /admin/state (the dashboard's source)."""
    node = FakeNeuron(name="a")
    await node.start()
    try:
        async with gateway([node]) as client:
            app = client.app
            assert app is not None
            state = await (await client.get("/admin/state")).json()
            assert (
                state["nodes"][0]["advice"] == []
                and state["nodes"][0]["disk_free_bytes"] == 500 * GIB
            )
            # Past the budget: the neuron's /health says so.
            node.jaccl_loads = 21
            await app[POLLER].poll_once()
            state = await (await client.get("/admin/state")).json()
            assert state["nodes"][0]["jaccl_loads"] == 21
            assert state["nodes"][0]["advice"][0].startswith("reboot a at a quiet moment")
            report = await _report(client)
            budget = next(c for c in report["checks"] if c["name"] == "jaccl reload budget")
            assert budget["verdict"] == "warn" and "21 jaccl load(s)" in budget["detail"]
    finally:
        await node.stop()


# -- pure checks -------------------------------------------------------------------------


def _health(**kw: Any) -> NodeHealth:
    base: dict[str, Any] = {
        "status": "idle",
        "node_id": "x",
        "started_at": 0.0,
        "uptime_s": 1.0,
        "memory_available_bytes": 10 * GIB,
        "models": (),
    }
    base.update(kw)
    return NodeHealth(**base)


def _verdicts(checks: list[Check], name: str) -> list[str]:
    return [c.verdict for c in checks if c.name == name]


def test_memory_and_disk_thresholds_follow_the_runbook() -> None:
    disc = FakeNeuron(memory_total_bytes=100 * GIB).discovery()
    for avail, want in ((31, "pass"), (29, "warn"), (16, "warn"), (14, "fail")):
        live = NodeLive("a", _health(memory_available_bytes=avail * GIB), disc, skew_s=0.0)
        assert _verdicts(doctor.node_checks(live, None), "memory") == [want], avail
    for free, want in ((21, "pass"), (19, "warn"), (11, "warn"), (9, "fail")):
        h = _health(disk_free_bytes=free * 10**9, disk_total_bytes=100 * 10**9, min_free_bytes=0)
        live = NodeLive("a", h, disc, skew_s=0.0)
        assert _verdicts(doctor.node_checks(live, None), "disk") == [want], free


def test_clock_skew_allows_for_the_round_trip() -> None:
    disc = FakeNeuron().discovery()
    for skew, rtt, want in (
        (1.0, 0.0, "pass"),
        (3.0, 0.0, "warn"),
        (3.0, 4.0, "pass"),
        (40.0, 0.1, "fail"),
    ):
        live = NodeLive("a", _health(), disc, skew_s=skew, rtt_s=rtt)
        assert _verdicts(doctor.node_checks(live, None), "clock") == [want], (skew, rtt)


def test_rdma_ports_down_fail_and_slow_probes_warn() -> None:
    import attrs

    from shared.wire import RdmaPort

    disc = attrs.evolve(
        FakeNeuron().discovery(),
        rdma_ports=(RdmaPort("rdma_en2", 1, "PORT_ACTIVE"), RdmaPort("rdma_en3", 1, "PORT_DOWN")),
    )
    checks = doctor.node_checks(NodeLive("a", _health(), disc, skew_s=0.0), None)
    rdma = next(c for c in checks if c.name == "rdma ports")
    assert rdma.verdict == "fail" and "rdma_en3/1 PORT_DOWN" in rdma.detail
    probes = [Probe("a", "m", 0.5), Probe("b", "m", 3.0), Probe("c", "m", None, "boom")]
    assert [c.verdict for c in doctor.probe_checks(probes, Limits(probe_slow_s=2.0))] == [
        "pass",
        "warn",
        "fail",
    ]


def test_failed_runners_fail_and_recent_restarts_warn() -> None:
    from cortex.core.state import FleetSnapshot, NodeModel, NodeState

    now = 10_000.0
    models = (
        NodeModel("crashed", "failed", error="3 runner failures within 300 s; last: oom\ntail"),
        NodeModel("flaky", "ready", restarts=2, restarted_at=now - 60, error="recovered from: x"),
        NodeModel("old", "ready", restarts=1, restarted_at=now - 7200),
        NodeModel("steady", "ready"),
    )
    snap = FleetSnapshot(nodes=(NodeState(name="a", url="http://a", models=models),))
    checks = doctor.runner_checks(snap, now, Limits(restart_window_s=3600))
    assert [(c.model, c.verdict) for c in checks] == [("crashed", "fail"), ("flaky", "warn")]
    assert checks[0].detail == "crashed on a failed: 3 runner failures within 300 s; last: oom"
    assert checks[1].detail == "flaky on a: 2 restart(s), last 60 s ago: recovered from: x"
