"""What this node is, read from the real machine (Linux and macOS).

Parsers of command and /proc output are pure functions of text, so they are
tested on recorded samples; the I/O around them is thin, bounded by timeouts,
and never fatal: a probe that fails leaves its field at a safe value.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.wire import Discovery, RdmaPort

log = logging.getLogger(__name__)

DISTRIBUTION = "cortex-neuron"
BACKENDS: tuple[str, ...] = ("ring", "jaccl", "mpi", "nccl")
NODE_ID_FILE = "node_id"

# Probes are local commands; anything slower than this is wedged (a hung
# RDMA driver can block ibv_devinfo), and discovery must still answer.
_SYSCTL_TIMEOUT_S = 2.0
_VM_STAT_TIMEOUT_S = 2.0
_IBV_TIMEOUT_S = 5.0

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def discover(
    store_dir: Path,
    ring_host: str,
    version: str | None = None,
    *,
    started_at: float | None = None,
) -> Discovery:
    """Describe this node; `started_at` defaults to now (pass the app's start time)."""
    store_dir = Path(store_dir).expanduser()
    store_dir.mkdir(parents=True, exist_ok=True)
    node_id = load_or_create_node_id(store_dir)
    total, available = _memory()
    mlx_version, mlx_device, working_set, backends = _probe_mlx()
    disk = shutil.disk_usage(store_dir)
    return Discovery(
        node_id=node_id,
        hostname=platform.node() or socket.gethostname(),
        version=version if version is not None else package_version(),
        os=platform.system(),
        kernel=platform.release(),
        arch=platform.machine(),
        chip=_chip(),
        memory_total_bytes=total,
        memory_available_bytes=available,
        unified_memory=_unified_memory(),
        mlx_version=mlx_version,
        mlx_device=mlx_device,
        recommended_working_set_bytes=working_set,
        backends=backends,
        rdma_ports=_rdma_ports(),
        disk_free_bytes=disk.free,
        store_dir=str(store_dir.resolve()),
        ring_host=ring_host,
        started_at=time.time() if started_at is None else started_at,
        mlx_lm_version=_dist_version("mlx-lm"),
        python_version=platform.python_version(),
        disk_total_bytes=disk.total,
    )


def memory_bytes() -> tuple[int, int]:
    """(total, available): the machine's, bounded by its cgroup."""
    return _memory()


def memory_available_bytes() -> int:
    """Memory a new runner could take now; cheap enough for every /health."""
    if sys.platform == "darwin":
        available = _darwin_available()
    else:
        available = _linux_meminfo()[1]
    if available <= 0:
        available = _sysconf_pages("SC_AVPHYS_PAGES")
    return _cgroup_bounded(available, _cgroup_headroom())


def package_version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


# --- node identity -----------------------------------------------------------


def load_or_create_node_id(store_dir: Path) -> str:
    """The node's id, created on first run and kept across restarts.

    The new id is written to a temporary file and hard-linked into place, so
    two neurons racing on a fresh store agree on one id and a crash never
    leaves a half-written file behind.
    """
    path = store_dir / NODE_ID_FILE
    try:
        text: str | None = path.read_text(errors="replace")
    except FileNotFoundError:
        text = None
    if text is not None and (existing := _first_line(text)):
        return existing
    new_id = str(uuid.uuid4())
    fd, tmp = tempfile.mkstemp(prefix=".node_id.", dir=store_dir)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(new_id + "\n")
            f.flush()
            os.fsync(f.fileno())
        if text is not None:
            # Present but blank: replace it rather than run without an identity.
            os.replace(tmp, path)
            return new_id
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process won the race; its id is the node's id
        except OSError:
            os.replace(tmp, path)  # a filesystem without hard links
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return _first_line(path.read_text(errors="replace")) or new_id


def _first_line(text: str) -> str:
    stripped = text.strip()
    return stripped.splitlines()[0].strip() if stripped else ""


# --- pure parsers ------------------------------------------------------------


def parse_meminfo(text: str) -> tuple[int, int]:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo; 0 where absent."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"^(\w+):\s+(\d+)\s*(kB)?", line)
        if m:
            values[m[1]] = int(m[2]) * (1024 if m[3] else 1)
    total = values.get("MemTotal", 0)
    # Kernels before 3.14 have no MemAvailable; this is its usual estimate.
    available = values.get(
        "MemAvailable",
        values.get("MemFree", 0) + values.get("Buffers", 0) + values.get("Cached", 0),
    )
    return total, available


def parse_vm_stat(text: str) -> int:
    """Bytes available from macOS `vm_stat`: free + inactive + speculative pages.

    This is what psutil reports as available: memory the kernel hands out
    without swapping (inactive pages are reclaimed on demand).
    """
    m = re.search(r"page size of (\d+) bytes", text)
    page = int(m[1]) if m else 4096
    counts: dict[str, int] = {}
    for line in text.splitlines():
        kv = re.match(r'^"?([^:"]+)"?:\s+(\d+)\.?\s*$', line)
        if kv:
            counts[kv[1].strip().lower()] = int(kv[2])
    pages = sum(counts.get(k, 0) for k in ("pages free", "pages inactive", "pages speculative"))
    return pages * page


def parse_cpuinfo(text: str) -> str:
    """The CPU's name from /proc/cpuinfo (x86 `model name`, else ARM's fields)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if sep and value and key not in fields:
            fields[key] = value
    for key in ("model name", "hardware", "model", "cpu model", "processor"):
        value = fields.get(key, "")
        # ARM's `processor` is just the core index; skip numbers.
        if value and not value.isdigit():
            return value
    return ""


_HCA_RE = re.compile(r"^\s*hca_id:\s*(\S+)")
_PORT_RE = re.compile(r"^\s*port:\s*(\d+)\s*$")
_STATE_RE = re.compile(r"^\s*state:\s*(\S+)")


def parse_ibv_devinfo(text: str) -> tuple[RdmaPort, ...]:
    """Every (device, port, state) in `ibv_devinfo` output, in output order.

    The state keeps the verbs name (`PORT_ACTIVE`) and drops the numeric
    code that follows it (`PORT_ACTIVE (4)`).
    """
    ports: list[RdmaPort] = []
    device: str | None = None
    port: int | None = None
    for line in text.splitlines():
        if m := _HCA_RE.match(line):
            device, port = m[1], None
        elif (m := _PORT_RE.match(line)) and device is not None:
            port = int(m[1])
        elif (m := _STATE_RE.match(line)) and device is not None and port is not None:
            ports.append(RdmaPort(device=device, port=port, state=m[1]))
            port = None  # one state per port; `-v` output has more state-like lines
    return tuple(ports)


def parse_cgroup_path(text: str) -> str | None:
    """This process's cgroup v2 path from /proc/self/cgroup (`0::/path`)."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


def parse_memory_stat(text: str) -> dict[str, int]:
    """cgroup v2 memory.stat as {name: value}."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if value.strip().isdigit():
            out[name] = int(value)
    return out


def _cgroup_bounded(value: int, headroom: int | None) -> int:
    return value if headroom is None else max(0, min(value, headroom))


# --- probes (I/O) ------------------------------------------------------------


def _tool(name: str, system_path: str) -> str:
    # launchd and systemd may start us with a PATH that lacks /usr/sbin.
    return shutil.which(name) or system_path


def _run(args: list[str], timeout: float) -> str | None:
    """stdout of a short local command, or None if it is absent, fails or hangs."""
    if shutil.which(args[0]) is None:
        return None
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("discovery: %s failed: %s", args[0], exc)
        return None
    if done.returncode != 0:
        log.debug("discovery: %s exited %s: %s", args, done.returncode, done.stderr.strip())
        return None
    return done.stdout


def _sysctl(name: str) -> str | None:
    out = _run([_tool("sysctl", "/usr/sbin/sysctl"), "-n", name], _SYSCTL_TIMEOUT_S)
    return None if out is None else out.strip() or None


def _read_text(path: Path | str) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def _sysconf_pages(name: str) -> int:
    try:
        return int(os.sysconf(name)) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def _linux_meminfo() -> tuple[int, int]:
    text = _read_text("/proc/meminfo")
    return parse_meminfo(text) if text else (0, 0)


def _darwin_available() -> int:
    out = _run([_tool("vm_stat", "/usr/bin/vm_stat")], _VM_STAT_TIMEOUT_S)
    return parse_vm_stat(out) if out else 0


def _memory() -> tuple[int, int]:
    if sys.platform == "darwin":
        raw = _sysctl("hw.memsize")
        total = int(raw) if raw and raw.isdigit() else 0
    else:
        total = _linux_meminfo()[0]
    total = total or _sysconf_pages("SC_PHYS_PAGES")
    # Under a systemd MemoryMax= or a container limit, the cgroup is the machine.
    limit = _cgroup_limit()
    if limit is not None:
        total = min(total, limit)
    return total, memory_available_bytes()


def _cgroup_dirs() -> list[Path]:
    """Our cgroup v2 directory and its ancestors, innermost first.

    The host's root cgroup has no memory.max, but a container's namespaced
    root does, so the root is kept in the list.
    """
    text = _read_text("/proc/self/cgroup") if sys.platform.startswith("linux") else None
    rel = parse_cgroup_path(text) if text else None
    if rel is None:
        return []
    d = _CGROUP_ROOT / rel.lstrip("/")
    return [p for p in (d, *d.parents) if p.is_relative_to(_CGROUP_ROOT)]


def _cgroup_int(path: Path) -> int | None:
    text = _read_text(path)
    if text is None or not text.strip().isdigit():
        return None  # absent, or "max"
    return int(text.strip())


def _cgroup_limit() -> int | None:
    limits = [v for d in _cgroup_dirs() if (v := _cgroup_int(d / "memory.max")) is not None]
    return min(limits) if limits else None


def _cgroup_headroom() -> int | None:
    """The tightest room left under a limited cgroup of ours, if any.

    Reclaimable page cache (`inactive_file`) is not counted as used, or a
    neuron that just read a model's weights would look full.
    """
    room: list[int] = []
    for d in _cgroup_dirs():
        limit = _cgroup_int(d / "memory.max")
        current = _cgroup_int(d / "memory.current")
        if limit is None or current is None:
            continue
        stat = _read_text(d / "memory.stat")
        reclaimable = parse_memory_stat(stat).get("inactive_file", 0) if stat else 0
        room.append(max(0, limit - max(0, current - reclaimable)))
    return min(room) if room else None


def _chip() -> str:
    if sys.platform == "darwin":
        brand = _sysctl("machdep.cpu.brand_string")
        if brand:
            return brand
    else:
        text = _read_text("/proc/cpuinfo")
        name = parse_cpuinfo(text) if text else ""
        if name:
            return name
    return platform.processor() or platform.machine()


def _unified_memory() -> bool:
    """Apple silicon shares one memory between CPU and GPU; others here do not."""
    if sys.platform != "darwin":
        return False
    # A Python under Rosetta reports x86_64; the hardware still is Apple silicon.
    return platform.machine() == "arm64" or _sysctl("hw.optional.arm64") == "1"


def _probe_mlx() -> tuple[str, str, int | None, tuple[str, ...]]:
    """(mlx version, device, recommended working set, distributed backends)."""
    try:
        # Imported here: cortex shares this package's siblings and must not load MLX,
        # and a neuron without MLX still answers /discovery.
        import mlx.core as mx
    except Exception as exc:  # ImportError, or a broken native install
        log.warning("discovery: MLX unavailable: %s", exc)
        return "", "none", None, ()
    version = str(getattr(mx, "__version__", "") or _dist_version("mlx"))
    info = _mlx_device_info(mx)
    raw_ws = info.get("max_recommended_working_set_size")
    working_set = int(raw_ws) if isinstance(raw_ws, int) and raw_ws > 0 else None
    return version, _mlx_device(mx), working_set, _mlx_backends(mx)


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _mlx_device_info(mx: Any) -> Mapping[str, Any]:
    # `mx.device_info` is the current API; older releases had it under `mx.metal`.
    fn = getattr(mx, "device_info", None) or getattr(
        getattr(mx, "metal", None), "device_info", None
    )
    if fn is None:
        return {}
    try:
        info = fn()
    except Exception as exc:
        log.warning("discovery: mx.device_info() failed: %s", exc)
        return {}
    return info if isinstance(info, Mapping) else {}


def _mlx_device(mx: Any) -> str:
    try:
        device = mx.default_device()
    except Exception as exc:
        log.warning("discovery: mx.default_device() failed: %s", exc)
        return "none"
    if device.type != mx.gpu:
        return "cpu"
    for name in ("metal", "cuda"):
        with contextlib.suppress(Exception):
            if getattr(mx, name).is_available():
                return name
    return "gpu"


def _mlx_backends(mx: Any) -> tuple[str, ...]:
    found: list[str] = []
    for backend in BACKENDS:
        try:
            if mx.distributed.is_available(backend):
                found.append(backend)
        except Exception:  # an MLX too old to know this backend's name
            continue
    return tuple(found)


def _rdma_ports() -> tuple[RdmaPort, ...]:
    out = _run([_tool("ibv_devinfo", "/usr/bin/ibv_devinfo")], _IBV_TIMEOUT_S)
    return parse_ibv_devinfo(out) if out else ()
