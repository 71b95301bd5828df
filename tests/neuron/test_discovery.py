"""Discovery on the real machine, and its parsers on recorded command output."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

from neuron import discovery
from neuron.discovery import (
    discover,
    load_or_create_node_id,
    memory_available_bytes,
    parse_cgroup_path,
    parse_cpuinfo,
    parse_ibv_devinfo,
    parse_meminfo,
    parse_memory_stat,
    parse_vm_stat,
)
from shared.wire import Discovery, RdmaPort

# rdma-core's ibv_devinfo: a two-port ConnectX card (port 1 up, port 2
# unplugged) and a second device, as printed on a Linux RoCE host.
IBV_DEVINFO = """\
hca_id:\tmlx5_0
\ttransport:\t\t\tInfiniBand (0)
\tfw_ver:\t\t\t\t16.35.2000
\tnode_guid:\t\t\tb859:9f03:00d6:4f2a
\tsys_image_guid:\t\t\tb859:9f03:00d6:4f2a
\tvendor_id:\t\t\t0x02c9
\tvendor_part_id:\t\t\t4119
\thw_ver:\t\t\t\t0x0
\tboard_id:\t\t\tMT_0000000012
\tphys_port_cnt:\t\t\t2
\t\tport:\t1
\t\t\tstate:\t\t\tPORT_ACTIVE (4)
\t\t\tmax_mtu:\t\t4096 (5)
\t\t\tactive_mtu:\t\t1024 (3)
\t\t\tsm_lid:\t\t\t0
\t\t\tport_lid:\t\t0
\t\t\tport_lmc:\t\t0x00
\t\t\tlink_layer:\t\tEthernet

\t\tport:\t2
\t\t\tstate:\t\t\tPORT_DOWN (1)
\t\t\tmax_mtu:\t\t4096 (5)
\t\t\tactive_mtu:\t\t1024 (3)
\t\t\tsm_lid:\t\t\t0
\t\t\tport_lid:\t\t0
\t\t\tport_lmc:\t\t0x00
\t\t\tlink_layer:\t\tEthernet

hca_id:\trdma_en3
\ttransport:\t\t\tInfiniBand (0)
\tfw_ver:\t\t\t\t0.0.0
\tnode_guid:\t\t\t0000:0000:0000:0000
\tsys_image_guid:\t\t\t0000:0000:0000:0000
\tvendor_id:\t\t\t0x0000
\tvendor_part_id:\t\t\t0
\thw_ver:\t\t\t\t0x0
\tphys_port_cnt:\t\t\t1
\t\tport:\t1
\t\t\tstate:\t\t\tPORT_INIT (2)
\t\t\tmax_mtu:\t\t4096 (5)
\t\t\tactive_mtu:\t\t4096 (5)
\t\t\tsm_lid:\t\t\t0
\t\t\tport_lid:\t\t0
\t\t\tport_lmc:\t\t0x00
\t\t\tlink_layer:\t\tEthernet

"""

# `ibv_devinfo -v` adds phys_state and GID lines that must not read as ports.
IBV_DEVINFO_VERBOSE = """\
hca_id:\tmlx5_1
\ttransport:\t\t\tInfiniBand (0)
\tmax_qp:\t\t\t\t131072
\tphys_port_cnt:\t\t\t1
\t\tport:\t1
\t\t\tstate:\t\t\tPORT_ACTIVE (4)
\t\t\tmax_mtu:\t\t4096 (5)
\t\t\tphys_state:\t\tLINK_UP (5)
\t\t\tGID[  0]:\t\tfe80:0000:0000:0000:ba59:9fff:fed6:4f2a, RoCE v1
\t\t\tGID[  1]:\t\tfe80::ba59:9fff:fed6:4f2a, RoCE v2
"""

MEMINFO = """\
MemTotal:       24684084 kB
MemFree:        24098220 kB
MemAvailable:   24273684 kB
Buffers:            2048 kB
Cached:           131072 kB
HugePages_Total:       0
"""

VM_STAT = """\
Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                               30000.
Pages active:                            500000.
Pages inactive:                          400000.
Pages speculative:                        10000.
Pages throttled:                              0.
Pages wired down:                        200000.
Pages purgeable:                           5000.
"Translation faults":                 123456789.
Pages copy-on-write:                    1234567.
Pages stored in compressor:               80000.
Pages occupied by compressor:             20000.
"""


def test_parse_ibv_devinfo_active_and_down_ports() -> None:
    """Every port of every device, with its state name and no numeric code."""
    ports = parse_ibv_devinfo(IBV_DEVINFO)

    assert ports == (
        RdmaPort(device="mlx5_0", port=1, state="PORT_ACTIVE"),
        RdmaPort(device="mlx5_0", port=2, state="PORT_DOWN"),
        RdmaPort(device="rdma_en3", port=1, state="PORT_INIT"),
    )
    assert [p.active for p in ports] == [True, False, False]


def test_parse_ibv_devinfo_verbose() -> None:
    """phys_state and GID lines of `-v` output add no ports."""
    assert parse_ibv_devinfo(IBV_DEVINFO_VERBOSE) == (
        RdmaPort(device="mlx5_1", port=1, state="PORT_ACTIVE"),
    )


@pytest.mark.parametrize(
    "text", ["", "No IB devices found\n", "\tport:\t1\n\tstate: PORT_ACTIVE\n"]
)
def test_parse_ibv_devinfo_nothing(text: str) -> None:
    """No devices, or ports outside any device, give no ports."""
    assert parse_ibv_devinfo(text) == ()


def test_parse_meminfo() -> None:
    """MemTotal and MemAvailable in bytes."""
    assert parse_meminfo(MEMINFO) == (24684084 * 1024, 24273684 * 1024)


def test_parse_meminfo_old_kernel() -> None:
    """Without MemAvailable, free + buffers + cached stands in."""
    text = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 10 kB\nCached: 200 kB\n"

    assert parse_meminfo(text) == (1000 * 1024, 310 * 1024)


def test_parse_vm_stat() -> None:
    """Free, inactive and speculative pages times the reported page size."""
    assert parse_vm_stat(VM_STAT) == (30000 + 400000 + 10000) * 16384


def test_parse_cpuinfo() -> None:
    """x86 model name, else an ARM board's name, never a bare core index."""
    x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7763 64-Core\n"
    arm = "processor\t: 0\nBogoMIPS\t: 108.00\nCPU implementer\t: 0x41\nModel\t: Raspberry Pi 5\n"

    assert parse_cpuinfo(x86) == "AMD EPYC 7763 64-Core"
    assert parse_cpuinfo(arm) == "Raspberry Pi 5"
    assert parse_cpuinfo("processor\t: 0\n") == ""


def test_parse_cgroup() -> None:
    """The v2 path from /proc/self/cgroup, and memory.stat counters."""
    assert parse_cgroup_path("0::/system.slice/neuron.service\n") == (
        "/system.slice/neuron.service"
    )
    assert parse_cgroup_path("4:memory:/x\n") is None
    assert parse_memory_stat("anon 100\ninactive_file 42\n") == {
        "anon": 100,
        "inactive_file": 42,
    }


def test_discover_fields(tmp_path: Path) -> None:
    """Discovery of this machine has the right types and plausible values."""
    d = discover(tmp_path / "store", ring_host="127.0.0.1", started_at=123.0)

    assert isinstance(d, Discovery)
    assert isinstance(d.node_id, str) and d.node_id
    assert isinstance(d.hostname, str) and d.hostname
    assert isinstance(d.version, str) and d.version
    assert d.os in ("Linux", "Darwin")
    assert isinstance(d.kernel, str) and d.kernel
    assert isinstance(d.arch, str) and d.arch
    assert isinstance(d.chip, str) and d.chip
    assert isinstance(d.memory_total_bytes, int) and d.memory_total_bytes > 0
    assert isinstance(d.memory_available_bytes, int)
    assert 0 < d.memory_available_bytes <= d.memory_total_bytes
    assert d.unified_memory is (sys.platform == "darwin" and d.arch == "arm64")
    assert isinstance(d.mlx_version, str) and d.mlx_version
    assert d.mlx_device in ("metal", "cuda", "cpu")
    ws = d.recommended_working_set_bytes
    assert ws is None or (isinstance(ws, int) and ws > 0)
    assert isinstance(d.backends, tuple) and "ring" in d.backends
    assert set(d.backends) <= {"ring", "jaccl", "mpi", "nccl"}
    assert isinstance(d.rdma_ports, tuple)
    assert all(isinstance(p, RdmaPort) for p in d.rdma_ports)
    assert isinstance(d.disk_free_bytes, int) and d.disk_free_bytes > 0
    assert d.store_dir == str((tmp_path / "store").resolve())
    assert d.ring_host == "127.0.0.1"
    assert d.started_at == 123.0


def test_discover_round_trips_json(tmp_path: Path) -> None:
    """What /discovery sends is what cortex reads back."""
    d = discover(tmp_path, ring_host="10.0.0.5", version="9.9.9")

    assert d.version == "9.9.9"
    assert Discovery.from_json(json.loads(json.dumps(d.to_json()))) == d


def test_discover_without_mlx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node without MLX still answers, with an empty version and no device."""
    monkeypatch.setitem(sys.modules, "mlx", None)
    monkeypatch.setitem(sys.modules, "mlx.core", None)

    d = discover(tmp_path, ring_host="127.0.0.1")

    assert (d.mlx_version, d.mlx_device) == ("", "none")
    assert d.recommended_working_set_bytes is None
    assert d.backends == ()


def test_version_from_distribution(tmp_path: Path) -> None:
    """Without an explicit version, the installed distribution's is reported."""
    assert discover(tmp_path, ring_host="h").version == discovery.package_version()
    assert discovery.package_version() != "0+unknown"


def test_node_id_stable(tmp_path: Path) -> None:
    """The same store gives the same id across restarts; another store another."""
    a1 = discover(tmp_path / "a", ring_host="127.0.0.1")
    a2 = discover(tmp_path / "a", ring_host="127.0.0.1")
    b = discover(tmp_path / "b", ring_host="127.0.0.1")

    assert a1.node_id == a2.node_id
    assert a1.node_id != b.node_id
    assert (tmp_path / "a" / "node_id").read_text().strip() == a1.node_id


def test_node_id_race(tmp_path: Path) -> None:
    """Concurrent first runs on one store agree on one id and leave no temp files."""
    ids: list[str] = []
    barrier = threading.Barrier(8)

    def first_run() -> None:
        barrier.wait()
        ids.append(load_or_create_node_id(tmp_path))

    threads = [threading.Thread(target=first_run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(set(ids)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node_id"]


def test_node_id_blank_file_replaced(tmp_path: Path) -> None:
    """A blank node_id file is replaced by a fresh id that then sticks."""
    (tmp_path / "node_id").write_text("\n")

    first = load_or_create_node_id(tmp_path)

    assert first
    assert load_or_create_node_id(tmp_path) == first


def test_node_id_operator_choice_kept(tmp_path: Path) -> None:
    """An id an operator wrote by hand is used as is."""
    (tmp_path / "node_id").write_text("rack2-studio-3\n")

    assert load_or_create_node_id(tmp_path) == "rack2-studio-3"


def test_memory_available_bytes() -> None:
    """The cheap /health figure is a positive int no larger than the machine."""
    available = memory_available_bytes()

    assert isinstance(available, int)
    assert 0 < available <= discovery._memory()[0]
