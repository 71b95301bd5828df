"""`--version` text for both commands: read from package metadata, never by importing
MLX (cortex must not load it, and importing it takes seconds)."""

from __future__ import annotations

import importlib.metadata
import platform

DISTRIBUTION = "cortex-neuron"


def dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_text(prog: str) -> str:
    """`cortex 0.1.0 (mlx 0.29.3, mlx-lm 0.28.2, python 3.11.2)`; absent packages say so."""
    parts = [
        f"{name} {dist_version(name) or 'not installed'}" for name in ("mlx", "mlx-lm", "aiohttp")
    ]
    parts.append(f"python {platform.python_version()}")
    return f"{prog} {dist_version(DISTRIBUTION) or '0+unknown'} ({', '.join(parts)})"
