"""The node's sensors (neuron.sensors), hardware faked at the boundary: a hwmon tree in a
temp dir, `nvidia-smi` and `powermetrics` as scripts on PATH; and their way into /health."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from neuron import sensors
from neuron.sensors import Sources, parse_nvidia_smi, parse_powermetrics, read, read_hwmon
from tests.conftest import InProcessFactory
from tests.support.waiting import until

# What `powermetrics --samplers cpu_power,gpu_power,thermal -i 500 -n 1` prints on
# Apple silicon (abridged: the per-cluster lines are left out).
POWERMETRICS_SAMPLE = """\
Machine model: Mac14,14
OS version: 23E224

*** Sampled system activity (Mon Apr  1 10:00:00 2024 +0000) (502.11ms elapsed) ***

**** Processor usage ****

E-Cluster HW active frequency: 1012 MHz
P0-Cluster HW active frequency: 3204 MHz
CPU Power: 1432 mW
GPU Power: 21034 mW
ANE Power: 0 mW
Combined Power (CPU + GPU + ANE): 22466 mW

**** GPU usage ****

GPU HW active frequency: 1398 MHz
GPU HW active residency:  97.12%

**** Thermal pressure ****

Current pressure level: Moderate
"""

NVIDIA_SAMPLE = "0, 67, 215.30, 250.00\n1, [N/A], [N/A], [N/A]\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_hwmon(root: Path) -> Path:
    """A Linux hwmon tree: a CPU, an NVMe drive, a GPU with a power cap, a dead sensor."""
    _write(root / "hwmon0/name", "coretemp\n")
    _write(root / "hwmon0/temp1_input", "45000\n")
    _write(root / "hwmon0/temp1_label", "Package id 0\n")
    _write(root / "hwmon0/temp2_input", "52000\n")
    _write(root / "hwmon0/temp2_label", "Core 0\n")
    _write(root / "hwmon1/name", "nvme\n")
    _write(root / "hwmon1/temp1_input", "38850\n")
    _write(root / "hwmon1/temp1_label", "Composite\n")
    _write(root / "hwmon1/temp2_input", "")  # a sensor that reads nothing
    _write(root / "hwmon2/name", "amdgpu\n")
    _write(root / "hwmon2/power1_average", "35000000\n")  # µW
    _write(root / "hwmon2/power1_cap", "200000000\n")
    _write(root / "hwmon3/name", "acpitz\n")
    _write(root / "hwmon3/temp1_input", "-273000\n")  # disconnected: no figure
    return root


def script(bin_dir: Path, name: str, body: str) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def on_path(monkeypatch: pytest.MonkeyPatch, bin_dir: Path) -> None:
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")


def _figures(figs: Any) -> dict[str, tuple[float, float | None]]:
    return {f.source: (round(f.value, 3), f.limit) for f in figs}


def test_the_hwmon_tree_gives_temperatures_and_capped_power(tmp_path: Path) -> None:
    temps, power = read_hwmon(fake_hwmon(tmp_path / "hwmon"))
    assert _figures(temps) == {
        "coretemp Package id 0": (45.0, None),
        "coretemp Core 0": (52.0, None),
        "nvme Composite": (38.85, None),
    }
    assert _figures(power) == {"amdgpu power1": (35.0, 200.0)}
    assert read_hwmon(tmp_path / "absent") == ([], [])


def test_tool_outputs_parse_and_unknown_fields_are_left_out() -> None:
    temps, power = parse_nvidia_smi(NVIDIA_SAMPLE)
    assert _figures(temps) == {"nvidia gpu0": (67.0, None)}
    assert _figures(power) == {"nvidia gpu0": (215.3, 250.0)}
    temps, power, pressure = parse_powermetrics(POWERMETRICS_SAMPLE)
    assert temps == [] and pressure == "Moderate"
    # The combined figure only: its parts listed too would count twice.
    assert _figures(power) == {"soc (CPU+GPU+ANE)": (22.466, None)}
    _, parts, _ = parse_powermetrics("CPU Power: 900 mW\nGPU Power: 100 mW\n")
    assert _figures(parts) == {"cpu": (0.9, None), "gpu": (0.1, None)}


def test_fake_nvidia_smi_and_powermetrics_on_path_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    script(bin_dir, "nvidia-smi", f"cat <<'EOF'\n{NVIDIA_SAMPLE}EOF\n")
    pm = script(bin_dir, "powermetrics", f"cat <<'EOF'\n{POWERMETRICS_SAMPLE}EOF\n")
    on_path(monkeypatch, bin_dir)
    got = read(Sources(hwmon_dir=fake_hwmon(tmp_path / "hwmon"), powermetrics=(str(pm),)))
    assert got.load is not None and got.cpu_count
    assert max(got.temperatures_c, key=lambda f: f.value).source == "nvidia gpu0"
    assert {"nvidia gpu0", "amdgpu power1", "soc (CPU+GPU+ANE)"} == {f.source for f in got.power_w}
    assert got.thermal_pressure == "Moderate" and got.notes == ()


def test_a_hung_tool_is_killed_at_its_timeout_and_noted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wedged nvidia-smi (its child holding the pipe) costs one timeout, not the reader."""
    on_path(monkeypatch, script(tmp_path / "bin", "nvidia-smi", "sleep 60\n").parent)
    t0 = time.monotonic()
    got = read(Sources(hwmon_dir=tmp_path / "none", timeout_s=0.5))
    took = time.monotonic() - t0
    print(f"read with a hung nvidia-smi took {took:.2f} s (timeout 0.5 s)")
    assert took < 30, took  # bounded by the timeout, far below the script's 60 s
    assert any("gave no answer within 0.5 s" in n for n in got.notes), got.notes
    assert f"hwmon: no temperature or power sensor under {tmp_path / 'none'}" in got.notes
    assert got.temperatures_c == () and got.power_w == ()


def test_powermetrics_needs_root_or_an_allowed_sudo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 501)
    plain = Sources.of(platform="darwin")
    assert plain.powermetrics is None and plain.hwmon_dir is None
    assert plain.powermetrics_note is not None and "needs root" in plain.powermetrics_note
    assert "needs root" in read(plain).notes[0]
    sudo = Sources.of(powermetrics_sudo=True, platform="darwin").powermetrics
    assert sudo is not None and sudo[:2] == ("sudo", "-n")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert Sources.of(platform="darwin").powermetrics is not None
    linux = Sources.of("/x/hwmon", platform="linux")
    assert linux.hwmon_dir == Path("/x/hwmon") and linux.powermetrics is None


async def test_health_serves_the_last_reading_and_status_does_not(
    neuron_app_factory: InProcessFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real neuron reading a fake hwmon tree and a fake nvidia-smi: /health has the
    figures (with the GPU's cap); /status leaves them out (its ETag stays still)."""
    on_path(monkeypatch, script(tmp_path / "bin", "nvidia-smi", f"echo '{NVIDIA_SAMPLE}'\n").parent)
    server = await neuron_app_factory(
        sensors_hwmon_dir=str(fake_hwmon(tmp_path / "hwmon")), sensors_interval_s=0.2
    )
    monitor = server.app[sensors.SENSORS]

    async def get(path: str) -> dict[str, Any]:
        async with aiohttp.ClientSession() as s, s.get(str(server.make_url(path))) as r:
            body: dict[str, Any] = await r.json()
        return body

    async def figures() -> dict[str, Any] | None:
        return (await get("/health")).get("sensors")

    got = await until(figures, timeout=30, what="sensors in /health")
    temps = {f["source"]: f["value"] for f in got["temperatures_c"]}
    assert temps["coretemp Core 0"] == 52.0 and temps["nvidia gpu0"] == 67.0
    power = {f["source"]: (f["value"], f.get("limit")) for f in got["power_w"]}
    assert power == {"nvidia gpu0": (215.3, 250.0), "amdgpu power1": (35.0, 200.0)}
    assert len(got["load"]) == 3 and got["cpu_count"] >= 1 and monitor.latest is not None
    assert "sensors" not in (await get("/status"))["health"]
