"""What a fake model hub answers for a repo's metadata, as huggingface_hub reads it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def sibling(p: Path) -> dict[str, Any]:
    """One file of `model_info(files_metadata=True)`: size, git blob id, LFS sha256."""
    data = p.read_bytes()
    s: dict[str, Any] = {
        "rfilename": p.name,
        "size": len(data),
        "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
    }
    if p.suffix == ".safetensors":  # LFS: the hub publishes its sha256
        s["lfs"] = {
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "pointerSize": 130,
        }
    return s


def repo_info(repo: str, files: list[Path]) -> dict[str, Any]:
    """The body of GET /api/models/{repo}/revision/{rev} for `files`."""
    return {"id": repo, "sha": "0" * 40, "siblings": [sibling(p) for p in files]}
