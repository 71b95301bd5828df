"""CPU load, temperatures and power of this node, for /health and cortex's doctor.

Where each figure comes from:
- load: `os.getloadavg()` (Linux reads /proc/loadavg; macOS the kernel's own).
- Linux: the hwmon tree (`/sys/class/hwmon/*/temp*_input` in m°C, `power*_input` or
  `power*_average` in µW, `power*_cap` the device's cap); its root is a setting, so
  tests point it at a fake tree.
- NVIDIA: `nvidia-smi --query-gpu=...` when it is on PATH (any OS).
- macOS: `powermetrics` (CPU/GPU/ANE power and the thermal pressure level; Apple
  silicon gives no die temperature there). It needs root: it is run only when the
  neuron runs as root, or through `sudo -n` when `sensors_powermetrics_sudo` says a
  sudoers rule allows it; otherwise a note says why power is not reported.

A `Monitor` reads them on its own daemon thread every `interval_s`, so neither the
event loop nor shutdown ever waits on a slow sensor or a hung command (each command
is killed past its timeout). /health serves the last reading. The parsers are pure
functions of text, tested on samples; a source that fails only adds a note.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
from aiohttp import web

from neuron.config import NeuronConfig
from shared.sensors import Figure, Sensors

log = logging.getLogger(__name__)

HWMON_DIR = "/sys/class/hwmon"
COMMAND_TIMEOUT_S = 3.0
# Figures of one kind kept (hottest / largest first): a many-core server lists a
# sensor per core, and /health stays small.
MAX_FIGURES = 32
NVIDIA_ARGS = (
    "--query-gpu=index,temperature.gpu,power.draw,power.limit",
    "--format=csv,noheader,nounits",
)
# One 500 ms sample: long enough to mean something, short next to the interval.
POWERMETRICS_ARGS = ("--samplers", "cpu_power,gpu_power,thermal", "-i", "500", "-n", "1")
POWERMETRICS_NEEDS_ROOT = (
    "powermetrics needs root: run the neuron as root, or allow `sudo -n "
    "/usr/bin/powermetrics` for its user and set sensors_powermetrics_sudo = true"
)
# A reading outside this range is a disconnected or misreporting sensor, not heat.
_PLAUSIBLE_C = (-40.0, 200.0)


@attrs.frozen
class Sources:
    """Where this node's figures are read; built from the config by `Sources.of`."""

    # The hwmon root (None: not Linux).
    hwmon_dir: Path | None = None
    # Ask nvidia-smi when it is on PATH.
    nvidia: bool = True
    # powermetrics' argv before its arguments (None: not read; `powermetrics_note` why).
    powermetrics: tuple[str, ...] | None = None
    powermetrics_note: str | None = None
    timeout_s: float = COMMAND_TIMEOUT_S

    @classmethod
    def of(
        cls, hwmon_dir: str = HWMON_DIR, powermetrics_sudo: bool = False, platform: str = ""
    ) -> Sources:
        platform = platform or sys.platform
        if platform != "darwin":
            return cls(hwmon_dir=Path(hwmon_dir) if platform.startswith("linux") else None)
        tool = shutil.which("powermetrics") or "/usr/bin/powermetrics"
        if os.geteuid() == 0:
            return cls(powermetrics=(tool,))
        if powermetrics_sudo:
            return cls(powermetrics=("sudo", "-n", tool))
        return cls(powermetrics_note=POWERMETRICS_NEEDS_ROOT)


# --- pure parsers ------------------------------------------------------------------


def _number(text: str) -> float | None:
    """A figure from a tool's field: None for `[N/A]`, `[Not Supported]`, blanks."""
    try:
        return float(text.strip())
    except ValueError:
        return None


def parse_nvidia_smi(text: str) -> tuple[list[Figure], list[Figure]]:
    """(temperatures, power) from `nvidia-smi --query-gpu=index,temperature.gpu,
    power.draw,power.limit --format=csv,noheader,nounits`: one line per GPU."""
    temps: list[Figure] = []
    power: list[Figure] = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 3 or not fields[0].isdigit():
            continue
        source = f"nvidia gpu{fields[0]}"
        if (t := _number(fields[1])) is not None:
            temps.append(Figure(source, t))
        if (w := _number(fields[2])) is not None:
            cap = _number(fields[3]) if len(fields) > 3 else None
            power.append(Figure(source, w, cap if cap else None))
    return temps, power


_PM_POWER = re.compile(r"^(CPU|GPU|ANE) Power:\s*([\d.]+)\s*mW", re.MULTILINE)
_PM_COMBINED = re.compile(r"^Combined Power \(([^)]*)\):\s*([\d.]+)\s*mW", re.MULTILINE)
_PM_PRESSURE = re.compile(r"^Current pressure level:\s*(\w+)", re.MULTILINE)
_PM_DIE = re.compile(r"^(CPU|GPU) die temperature:\s*([\d.]+)\s*C", re.MULTILINE)


def parse_powermetrics(text: str) -> tuple[list[Figure], list[Figure], str | None]:
    """(temperatures, power, thermal pressure) from `powermetrics` text output.

    Power is the combined SoC figure where it is printed (CPU + GPU + ANE), else each
    part: listing both would count the parts twice. Die temperatures appear only on
    Intel Macs (the smc sampler); Apple silicon's thermal figure is the pressure level.
    """
    power: list[Figure] = []
    if m := _PM_COMBINED.search(text):
        power.append(Figure(f"soc ({m[1].replace(' ', '')})", float(m[2]) / 1000))
    else:
        power = [Figure(f"{m[1].lower()}", float(m[2]) / 1000) for m in _PM_POWER.finditer(text)]
    temps = [Figure(f"{m[1].lower()} die", float(m[2])) for m in _PM_DIE.finditer(text)]
    pressure = _PM_PRESSURE.search(text)
    return temps, power, pressure[1] if pressure else None


# --- readers (I/O) -----------------------------------------------------------------


def _read_number(path: Path) -> float | None:
    try:
        return _number(path.read_text(errors="replace"))
    except OSError:  # a sensor that is absent or not answering (EIO, ENODATA)
        return None


def _label(path: Path, name: str, stem: str) -> str:
    try:
        label = path.read_text(errors="replace").strip()
    except OSError:
        label = ""
    return f"{name} {label or stem}".strip()


def _hwmon_devices(root: Path) -> Iterator[tuple[Path, str]]:
    try:
        devices = sorted(root.iterdir())
    except OSError:
        return
    for dev in devices:
        try:
            name = (dev / "name").read_text(errors="replace").strip()
        except OSError:
            name = dev.name
        yield dev, name


def read_hwmon(root: Path) -> tuple[list[Figure], list[Figure]]:
    """(temperatures °C, power W) under a hwmon tree: `temp*_input` (m°C) and
    `power*_input` or `power*_average` (µW, with `power*_cap` as its limit)."""
    temps: list[Figure] = []
    power: list[Figure] = []
    for dev, name in _hwmon_devices(root):
        for f in sorted(dev.glob("temp*_input")):
            stem = f.name.removesuffix("_input")
            raw = _read_number(f)
            if raw is not None and _PLAUSIBLE_C[0] < raw / 1000 < _PLAUSIBLE_C[1]:
                temps.append(Figure(_label(dev / f"{stem}_label", name, stem), raw / 1000))
        power += _hwmon_power(dev, name)
    return temps, power


def _hwmon_power(dev: Path, name: str) -> list[Figure]:
    out: list[Figure] = []
    seen: set[str] = set()
    # _input sorts before _average: a channel with both is read once, from _input.
    for f in sorted([*dev.glob("power*_input"), *dev.glob("power*_average")], key=_channel):
        stem = f.name.rsplit("_", 1)[0]
        raw = _read_number(f)
        if raw is None or stem in seen:
            continue
        seen.add(stem)
        cap = _read_number(dev / f"{stem}_cap")
        label = _label(dev / f"{stem}_label", name, stem)
        out.append(Figure(label, raw / 1e6, cap / 1e6 if cap else None))
    return out


def _channel(f: Path) -> tuple[str, int]:
    stem, kind = f.name.rsplit("_", 1)
    return stem, 0 if kind == "input" else 1


def _run(argv: list[str], timeout_s: float) -> tuple[str | None, str]:
    """(stdout, why not): a short command's output. Past its timeout its whole process
    group is killed, so a child it started cannot hold the pipe (and us) open."""
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except OSError as exc:
        return None, f"{argv[0]}: {exc.strerror or exc}"
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None, f"{argv[0]} gave no answer within {timeout_s:g} s"
    if proc.returncode != 0:
        lines = (err or out).strip().splitlines()
        return None, f"{argv[0]} exited {proc.returncode}: {lines[0][:200] if lines else ''}"
    return out, ""


def _top(figures: list[Figure]) -> tuple[Figure, ...]:
    return tuple(sorted(figures, key=lambda f: -f.value)[:MAX_FIGURES])


def read(sources: Sources) -> Sensors:
    """Every figure the platform tells now; blocking (run it off the event loop)."""
    temps: list[Figure] = []
    power: list[Figure] = []
    notes: list[str] = []
    pressure = None
    load = None
    with contextlib.suppress(OSError):  # no load average on this platform
        one, five, fifteen = os.getloadavg()
        load = (round(one, 2), round(five, 2), round(fifteen, 2))
    if sources.hwmon_dir is not None:
        t, p = read_hwmon(sources.hwmon_dir)
        temps += t
        power += p
        if not t and not p:
            notes.append(f"hwmon: no temperature or power sensor under {sources.hwmon_dir}")
    smi = shutil.which("nvidia-smi") if sources.nvidia else None
    if smi is not None:
        out, why = _run([smi, *NVIDIA_ARGS], sources.timeout_s)
        if out is None:
            notes.append(why)
        else:
            t, p = parse_nvidia_smi(out)
            temps += t
            power += p
    if sources.powermetrics is not None:
        out, why = _run([*sources.powermetrics, *POWERMETRICS_ARGS], sources.timeout_s)
        if out is None:
            notes.append(why)
        else:
            t, p, pressure = parse_powermetrics(out)
            temps += t
            power += p
    elif sources.powermetrics_note:
        notes.append(sources.powermetrics_note)
    return Sensors(
        read_at=time.time(),
        load=load,
        cpu_count=os.cpu_count(),
        temperatures_c=_top(temps),
        power_w=_top(power),
        thermal_pressure=pressure,
        notes=tuple(notes),
    )


class Monitor:
    """The last reading, refreshed every `interval_s` on a daemon thread of its own."""

    def __init__(self, sources: Sources, interval_s: float) -> None:
        self.sources = sources
        self.interval_s = interval_s
        self.latest: Sensors | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None and self.interval_s > 0:
            self._thread = threading.Thread(target=self._loop, name="sensors", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        # Not joined: a command is killed by its own timeout, and a daemon thread
        # never holds the process open.
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.latest = read(self.sources)  # one reference swap: readers see old or new
            except Exception:  # a sensor driver's surprise must not end the readings
                log.exception("reading sensors failed")
            self._stop.wait(self.interval_s)


SENSORS = web.AppKey("sensors", Monitor)


def setup(app: web.Application, config: NeuronConfig) -> None:
    """Read this node's sensors while the app runs; GET /health serves `app[SENSORS]`."""
    sources = Sources.of(config.sensors_hwmon_dir, config.sensors_powermetrics_sudo)
    monitor = app[SENSORS] = Monitor(sources, config.sensors_interval_s)

    async def running(app: web.Application) -> AsyncIterator[None]:
        monitor.start()
        yield
        monitor.stop()

    app.cleanup_ctx.append(running)
