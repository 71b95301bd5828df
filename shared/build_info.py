"""The labels of the `*_build_info` gauges: which code a scraped process runs.

Versions come from installed distributions' metadata, never by importing them:
cortex must not import MLX (it runs on hosts without it).
"""

from __future__ import annotations

import importlib.metadata
import platform

BUILD_LABELS = ("version", "python", "mlx", "mlx_lm")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        # Not installed (cortex's hosts need no MLX): a label value, not an error.
        return ""


def build_labels() -> tuple[str, ...]:
    """Values for BUILD_LABELS, in order."""
    return (
        _version("cortex-neuron") or "0+unknown",
        platform.python_version(),
        _version("mlx"),
        _version("mlx-lm"),
    )
