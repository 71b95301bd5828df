"""A node's CPU load, temperatures and power, as its neuron reports them in /health.

Read on the node by neuron.sensors, judged by cortex's doctor (cortex.run.doctor).
Every figure is optional: a platform that does not tell leaves it out, and `notes`
say why (no sensor found, a tool that needs root), so doctor can print "not
reported" with the reason instead of a guess.
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class Figure:
    """One temperature (°C) or power (W) reading, where it came from, and the
    device's own limit when the platform gives one (a power cap)."""

    source: str
    value: float
    limit: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "value": self.value}
        if self.limit is not None:
            out["limit"] = self.limit
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Figure:
        limit = d.get("limit")
        return cls(
            source=str(d.get("source", "")),
            value=float(d["value"]),
            limit=None if limit is None else float(limit),
        )


@attrs.frozen
class Sensors:
    """What the node's platform told at `read_at` (its clock, seconds since the epoch)."""

    read_at: float
    # 1, 5 and 15 minute load averages, and the cores they compare to.
    load: tuple[float, float, float] | None = None
    cpu_count: int | None = None
    temperatures_c: tuple[Figure, ...] = ()
    power_w: tuple[Figure, ...] = ()
    # macOS `powermetrics`: Nominal, Moderate, Heavy, Trapping or Sleeping. Apple
    # silicon reports no die temperature there; this is its thermal figure.
    thermal_pressure: str | None = None
    # Why a figure is missing ("powermetrics needs root ..."), for doctor's detail.
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "read_at": self.read_at,
            "load": None if self.load is None else list(self.load),
            "cpu_count": self.cpu_count,
            "temperatures_c": [f.to_json() for f in self.temperatures_c],
            "power_w": [f.to_json() for f in self.power_w],
            "thermal_pressure": self.thermal_pressure,
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Sensors:
        load = d.get("load")
        cores = d.get("cpu_count")
        pressure = d.get("thermal_pressure")
        return cls(
            read_at=float(d.get("read_at", 0.0)),
            load=None if not load else (float(load[0]), float(load[1]), float(load[2])),
            cpu_count=None if cores is None else int(cores),
            temperatures_c=tuple(Figure.from_json(f) for f in d.get("temperatures_c", ())),
            power_w=tuple(Figure.from_json(f) for f in d.get("power_w", ())),
            thermal_pressure=None if pressure is None else str(pressure),
            notes=tuple(str(n) for n in d.get("notes", ())),
        )
