"""Reading one series out of a Prometheus text exposition (a service's /metrics)."""

from __future__ import annotations


def metric(text: str, name: str, **labels: str) -> float:
    """The value of `name{labels}` in `text` (labels in sorted order, as exposed)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{want}}} not in /metrics")
