"""A module's clock, moved forward at will: an expiry or a backoff tested without a wait.

A test that waited out a real TTL depended on how fast the machine got there (a
slow one could miss the window before it, a fast one wait for nothing). Instead,
`monkeypatch.setattr(module, "time", SkewedTime())` and move `skew_s` past the TTL.
"""

from __future__ import annotations

import time
from typing import Any


class SkewedTime:
    """Stands in for the `time` module of one module under test: its monotonic() and
    time() run `skew_s` ahead of the real clocks; everything else is the real module."""

    def __init__(self) -> None:
        self.skew_s = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.skew_s

    def time(self) -> float:
        return time.time() + self.skew_s

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)
