"""Doctor's runbook ranges (issue 22): CPU load, temperature and power from each node's
/health, the probe's 2 s / 5 s lines, and the reboot advice that names the machine."""

from __future__ import annotations

import argparse
import asyncio
import io
from typing import Any

import attrs

from cortex.cli import ops as ops_cli
from cortex.cli.restart import reboot_note
from cortex.config import CortexConfig
from cortex.core.state import FleetSnapshot, NodeModel, NodeState
from cortex.run import doctor
from cortex.run.doctor import Check, Limits, NodeLive, Probe
from neuron.runner.rdma_quirk import classify
from shared.catalogue import GIB
from shared.sensors import Figure, Sensors
from shared.wire import NodeHealth
from tests.cortex.fakes import FakeNeuron, gateway, stop_all


def _health(sensors: Sensors | None, **kw: Any) -> NodeHealth:
    return NodeHealth(
        status="idle",
        node_id="x",
        started_at=1000.0,
        uptime_s=10.0,
        memory_available_bytes=10 * GIB,
        models=(),
        sensors=sensors,
        **kw,
    )


def _checks(sensors: Sensors | None, limits: Limits | None = None) -> dict[str, Check]:
    live = NodeLive("a", _health(sensors), FakeNeuron().discovery(), skew_s=0.0)
    names = ("cpu load", "temperature", "power")
    return {c.name: c for c in doctor.node_checks(live, None, limits) if c.name in names}


def _reading(**kw: Any) -> Sensors:
    return Sensors(read_at=1009.0, **kw)


def test_cpu_load_is_judged_per_core_over_five_minutes() -> None:
    for five, want in ((3.9, "pass"), (4.0, "warn"), (12.0, "warn")):
        got = _checks(_reading(load=(9.0, five, 1.0), cpu_count=4))["cpu load"]
        assert got.verdict == want, (five, got)
    assert (
        "load 9.00 4.00 1.00 on 4 cores (1.00 a core"
        in _checks(_reading(load=(9.0, 4.0, 1.0), cpu_count=4))["cpu load"].detail
    )
    # An operator's critical line, when set, fails past it.
    strict = Limits(load_fail=2.0)
    assert _checks(_reading(load=(0, 8.0, 0), cpu_count=4), strict)["cpu load"].verdict == "fail"


def test_temperature_ranges_and_the_macos_pressure_level() -> None:
    for hot, want in ((79.0, "pass"), (80.0, "warn"), (90.0, "fail")):
        s = _reading(temperatures_c=(Figure("coretemp Core 0", hot), Figure("nvme", 40.0)))
        got = _checks(s)["temperature"]
        assert got.verdict == want, (hot, got)
        assert f"hottest {hot:.0f} °C (coretemp Core 0) of 2 sensor(s)" in got.detail
    for level, want in (("Nominal", "pass"), ("Moderate", "warn"), ("Heavy", "fail")):
        got = _checks(_reading(thermal_pressure=level))["temperature"]
        assert got.verdict == want and f"thermal pressure {level}" in got.detail
        assert (got.fix == "") == (want == "pass")


def test_power_warns_at_a_devices_own_cap_and_is_shown_otherwise() -> None:
    s = _reading(power_w=(Figure("nvidia gpu0", 240.0, 250.0), Figure("soc", 22.5)))
    got = _checks(s)["power"]
    assert got.verdict == "warn" and "nvidia gpu0 240.0 W of 250 W cap" in got.detail
    calm = _checks(_reading(power_w=(Figure("nvidia gpu0", 80.0, 250.0),)))["power"]
    assert calm.verdict == "pass" and calm.detail == "a: nvidia gpu0 80.0 W of 250 W cap"


def test_what_the_platform_does_not_tell_is_not_reported_with_the_reason() -> None:
    none = _checks(None)
    assert {c.verdict for c in none.values()} == {"pass"}
    assert "power not reported: the neuron sends no sensors" in none["power"].detail
    note = "powermetrics needs root: run the neuron as root, or allow ..."
    mac = _checks(_reading(load=(1.0, 1.0, 1.0), cpu_count=8, notes=(note,)))
    assert mac["cpu load"].verdict == "pass"
    assert mac["power"].detail == f"a: power not reported: {note}"
    assert mac["temperature"].detail == f"a: temperature not reported: {note}"
    # A reading the node took long ago says its age (the reader may be stuck).
    old = attrs.evolve(_reading(load=(0, 0, 0), cpu_count=1), read_at=900.0)
    assert _checks(old)["cpu load"].detail.endswith("(read 110 s ago)")


def test_probe_latency_warns_past_2_s_and_fails_past_5_s() -> None:
    limits = Limits.of(CortexConfig())
    assert (limits.probe_slow_s, limits.probe_critical_s) == (2.0, 5.0)
    probes = [Probe("a", "m", 1.9), Probe("a", "m", 2.1), Probe("a", "m", 5.1)]
    checks = doctor.probe_checks(probes, limits)
    assert [c.verdict for c in checks] == ["pass", "warn", "fail"]
    assert checks[2].detail == "m on a: 2-token probe in 5.10 s (critical: over 5 s)"


def test_reboot_advice_names_the_machine_and_the_command() -> None:
    h = _health(None, jaccl_loads=21, jaccl_reload_budget=20)
    state = NodeState(name="studio-2", url="http://10.0.0.12:9410", health=h)
    (advice,) = doctor.node_advice(state)
    assert "`ssh 10.0.0.12 sudo shutdown -r now`" in advice
    assert "`cortex restart studio-2` recycles the neuron process only" in advice
    # A rank that died of the quirk: the fix is the reboot, not an unload and load.
    error = classify("jaccl", 0, "RDMA: errno 16 (EBUSY)") or ""
    assert "`cortex restart` recycles the neuron process only" in error
    snap = FleetSnapshot(
        nodes=(attrs.evolve(state, models=(NodeModel("big", "failed", error=error),)),)
    )
    (failed,) = doctor.runner_checks(snap, 0.0, Limits())
    assert "ssh 10.0.0.12 sudo shutdown -r now" in failed.fix
    assert failed.fix.endswith("then `cortex load big`")


def test_cortex_restart_prints_the_reboot_command_for_a_jaccl_node() -> None:
    state = {
        "nodes": [
            {"name": "a", "url": "http://10.0.0.11:9410", "jaccl_loads": 3, "advice": []},
            {"name": "b", "url": "http://10.0.0.12:9410", "jaccl_loads": 0, "advice": []},
        ]
    }
    note = reboot_note(state, "a")
    assert note is not None and note.endswith(
        "until it reboots: ssh 10.0.0.11 sudo shutdown -r now"
    )
    assert "recycles the neuron process on a only" in note
    assert reboot_note(state, "b") is None and reboot_note(None, "a") is None


@attrs.define
class SensingNeuron(FakeNeuron):
    """A fake neuron whose /health carries a sensors reading."""

    sensors: dict[str, Any] | None = None

    def _health_json(self) -> dict[str, Any]:
        body = super()._health_json()
        if self.sensors is not None:
            body["sensors"] = self.sensors
        return body


async def test_doctor_reads_each_nodes_sensors_from_its_health() -> None:
    import time

    hot = Sensors(
        read_at=time.time(),
        load=(0.5, 0.4, 0.3),
        cpu_count=2,
        temperatures_c=(Figure("coretemp Package id 0", 93.0),),
        power_w=(Figure("nvidia gpu0", 120.0, 250.0),),
    )
    a = await SensingNeuron(name="a", sensors=hot.to_json()).start()
    b = await FakeNeuron(name="b").start()  # an older neuron: no sensors
    try:
        async with gateway([a, b]) as client:
            resp = await client.get("/admin/doctor")
            report = await resp.json()
            by = {(c["name"], c["node"]): c for c in report["checks"]}
            assert by[("temperature", "a")]["verdict"] == "fail"
            assert by[("cpu load", "a")]["verdict"] == "pass"
            assert by[("power", "a")]["detail"] == "a: nvidia gpu0 120.0 W of 250 W cap"
            assert "not reported" in by[("temperature", "b")]["detail"]
            url = str(client.make_url("")).rstrip("/")
            args = argparse.Namespace(url=url, token=None, config=None, json=False)
            out = io.StringIO()
            rc = await asyncio.to_thread(ops_cli.doctor_main, args, out)
            print(out.getvalue())
            assert rc == 1
            assert "FAIL  temperature" in out.getvalue()
            assert "a: hottest 93 °C (coretemp Package id 0)" in out.getvalue()
    finally:
        await stop_all([a, b])
