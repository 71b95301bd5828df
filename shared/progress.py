"""A stage job's progress as cortex and the CLIs show it (neuron.store.staging's job JSON, read).

The neuron's job record is the source; this keeps the fields an operator reads
(state, bytes, rate, ETA, error) and formats them one way for the dashboard and
the `neuron stage` progress line.
"""

from __future__ import annotations

from typing import Any

import attrs

ACTIVE_STATES: frozenset[str] = frozenset({"queued", "fetching", "verifying"})


@attrs.frozen
class StageProgress:
    state: str
    bytes_done: int = 0
    bytes_total: int | None = None
    files_done: int = 0
    files_total: int | None = None
    rate_bytes_per_s: float | None = None
    eta_s: float | None = None
    error: str | None = None
    source: str | None = None

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def fraction(self) -> float | None:
        """Done over total in [0, 1]; None before the total is known."""
        if not self.bytes_total:
            return None
        return max(0.0, min(1.0, self.bytes_done / self.bytes_total))

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "files_done": self.files_done,
            "files_total": self.files_total,
            "rate_bytes_per_s": self.rate_bytes_per_s,
            "eta_s": self.eta_s,
            "error": self.error,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, d: Any) -> StageProgress | None:
        """Leniently: a node's odd field becomes None rather than losing the whole record."""
        if not isinstance(d, dict) or not isinstance(d.get("state"), str):
            return None
        return cls(
            state=d["state"],
            bytes_done=_int(d.get("bytes_done")) or 0,
            bytes_total=_int(d.get("bytes_total")),
            files_done=_int(d.get("files_done")) or 0,
            files_total=_int(d.get("files_total")),
            rate_bytes_per_s=_float(d.get("rate_bytes_per_s")),
            eta_s=_float(d.get("eta_s")),
            error=d["error"] if isinstance(d.get("error"), str) else None,
            source=d["source"] if isinstance(d.get("source"), str) else None,
        )

    def summary(self) -> str:
        """`412.3 MB / 1.20 GB  34%  85.1 MB/s  ETA 9s` (the parts known so far)."""
        total = "?" if self.bytes_total is None else size(self.bytes_total)
        parts = [f"{size(self.bytes_done)} / {total}"]
        frac = self.fraction
        if frac is not None:
            parts.append(f"{frac * 100:.0f}%")
        if self.rate_bytes_per_s is not None:
            parts.append(f"{size(int(self.rate_bytes_per_s))}/s")
        if self.eta_s is not None and self.active:
            parts.append(f"ETA {duration(self.eta_s)}")
        return "  ".join(parts)


def size(n: int) -> str:
    """Decimal units, as disks and download tools count them."""
    if n >= 1_000_000_000:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB"


def duration(seconds: float) -> str:
    s = max(0, round(seconds))
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{s:02d}s"
    return f"{s}s"


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _float(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        return None
    return float(v)
