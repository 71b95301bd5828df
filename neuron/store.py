"""The model store: where sources resolve to local directories.

A local source is used in place and must be a model directory (config.json)
inside the store or a configured model root, after symlinks and `..` are
resolved: a caller may not make the neuron open paths of its choosing.
A hub source (`org/name`) is downloaded with huggingface_hub into a staged
copy under `<store>/models/`, which `/store/storage` lists and
`/store/purge-staging` may remove when no runner uses it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs

from shared.errors import InvalidModelPath

# org/name; a name of only dots would be a path step, not a repo.
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/(?!\.{1,2}$)[\w.-]+$")
LAST_USE = ".neuron-last-use"


def is_local_source(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or not HUB_NAME.match(source)


def check_model_dir(source: str) -> Path:
    """The directory of a local source, or InvalidModelPath naming it."""
    path = Path(source).expanduser()
    if not path.exists():
        raise InvalidModelPath(f"model path {str(path)!r} does not exist", param="source")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise InvalidModelPath(
            f"model path {str(path)!r} is not a model directory (no config.json)",
            param="source",
        )
    return path.resolve()


@attrs.frozen
class StagedCopy:
    name: str
    path: str
    size_bytes: int
    last_use: float
    in_use: bool

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


# Hub downloads at once; more wait their turn.
DOWNLOAD_WORKERS = 2


@attrs.define
class Store:
    root: Path
    # Directories besides the store that local sources may live in.
    model_roots: tuple[Path, ...] = ()
    # Downloads get their own bounded pool: stalled ones must never starve the
    # default pool, which /health and the other endpoints use for their files.
    _downloads: concurrent.futures.ThreadPoolExecutor = attrs.Factory(
        lambda: concurrent.futures.ThreadPoolExecutor(
            DOWNLOAD_WORKERS, thread_name_prefix="hub-download"
        )
    )

    def local_model_dir(self, source: str) -> Path:
        """The resolved model directory of a local source, or InvalidModelPath.

        Checked after resolving symlinks and `..`, before looking inside, so a
        refused path tells the caller nothing about what exists there.
        """
        try:
            resolved = Path(source).expanduser().resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte
            raise InvalidModelPath(
                f"model path {source!r} cannot be resolved: {exc}", param="source"
            ) from exc
        roots = [r.expanduser().resolve() for r in (self.root, *self.model_roots)]
        if not any(resolved.is_relative_to(r) for r in roots):
            raise InvalidModelPath(
                f"model path {source!r} is outside the store and every configured model_roots"
                f" directory ({', '.join(str(r) for r in roots)})",
                param="source",
            )
        try:
            return check_model_dir(str(resolved))
        except OSError as exc:  # no permission, a name too long
            raise InvalidModelPath(
                f"model path {source!r} cannot be read: {exc.strerror or exc}", param="source"
            ) from exc

    def check_source(self, source: str) -> None:
        """InvalidModelPath now for a local source a load could never use."""
        if is_local_source(source):
            self.local_model_dir(source)

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def ensure(self) -> None:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)

    async def resolve(self, source: str) -> Path:
        """A local model directory for `source`, downloading hub models first."""
        if is_local_source(source):
            path = self.local_model_dir(source)
        else:
            loop = asyncio.get_running_loop()
            path = await loop.run_in_executor(self._downloads, self._download, source)
        self.touch(path)
        return path

    def _download(self, repo_id: str) -> Path:
        from huggingface_hub import snapshot_download

        target = self.models_dir / repo_id.replace("/", "--")
        snapshot_download(
            repo_id=repo_id,
            local_dir=str(target),
            allow_patterns=[
                "*.json",
                "*.safetensors",
                "*.py",
                "*.model",
                "*.tiktoken",
                "*.txt",
                "*.jinja",
            ],
        )
        return check_model_dir(str(target))

    def close(self) -> None:
        # Queued downloads are dropped; a running one ends with its process.
        self._downloads.shutdown(wait=False, cancel_futures=True)

    def touch(self, path: Path) -> None:
        # Only staged copies carry a last-use mark; a local source is not ours to write.
        if path.parent.resolve() == self.models_dir.resolve():
            (path / LAST_USE).touch()

    def staged(self, in_use: Iterable[Path]) -> list[StagedCopy]:
        used = {p.resolve() for p in in_use}
        out: list[StagedCopy] = []
        if not self.models_dir.is_dir():
            return out
        for d in sorted(self.models_dir.iterdir()):
            if not d.is_dir():
                continue
            mark = d / LAST_USE
            last = mark.stat().st_mtime if mark.exists() else d.stat().st_mtime
            out.append(
                StagedCopy(
                    name=d.name,
                    path=str(d),
                    size_bytes=_tree_size(d),
                    last_use=last,
                    in_use=d.resolve() in used,
                )
            )
        return out

    def purge(self, in_use: Iterable[Path]) -> list[StagedCopy]:
        removed = []
        for copy in self.staged(in_use):
            if not copy.in_use:
                shutil.rmtree(copy.path, ignore_errors=True)
                removed.append(copy)
        return removed


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                continue
    return total
