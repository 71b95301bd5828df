"""The model store: where sources resolve to local directories.

A local source is used in place and must be a model directory (config.json)
inside the store or a configured model root, after symlinks and `..` are
resolved: a caller may not make the neuron open paths of its choosing.
A hub source (`org/name`) is staged (neuron.store.staging: from peers or the hub)
into `<store>/models/<org--name>/`; while it is being fetched its files live
under `<store>/models/.staging/<org--name>/` (partial ones as `<file>.part`),
and the directory is renamed into place only once every file is verified.
`/store/storage` lists the copies; the budget (`evict`) and
`/store/purge-staging` remove those no runner uses and no stage is writing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import os
import re
import shutil
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import attrs

from shared.errors import InvalidModelPath

# org/name; a name of only dots would be a path step, not a repo.
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/(?!\.{1,2}$)[\w.-]+$")
LAST_USE = ".neuron-last-use"
# The files, sizes and sha256 of a copy, computed once and kept inside it.
MANIFEST = ".neuron-manifest.json"
# Our own marks inside a copy: never part of what a peer may fetch.
OWN_MARK = ".neuron-"
STAGING = ".staging"
PART = ".part"
# A copy's name: one path step, never hidden, never `..`.
COPY_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")
HASH_CHUNK = 4 * 1024 * 1024


def is_local_source(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or not HUB_NAME.match(source)


def copy_name(source: str) -> str:
    """The staged copy's directory name of a hub source: `org/name` -> `org--name`."""
    return source.replace("/", "--", 1)


def safe_relpath(path: str) -> bool:
    """A file path inside a copy: relative, no `..`, no empty or hidden-mark step."""
    if not path or "\\" in path or "\x00" in path or path.startswith("/"):
        return False
    parts = path.split("/")
    return all(p not in ("", ".", "..") for p in parts) and not parts[-1].startswith(OWN_MARK)


@attrs.frozen
class FileEntry:
    """One file of a copy: what a peer serves and a stage verifies."""

    path: str
    size: int
    sha256: str | None = None
    # The hub's git blob id, for files it does not keep in LFS (no sha256 published).
    git_sha1: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


def read_manifest(body: Any) -> tuple[FileEntry, ...]:
    """A peer's manifest, strictly: every path safe, every size and digest well formed."""
    files = body.get("files") if isinstance(body, dict) else None
    if not isinstance(files, list):
        raise ValueError("manifest has no `files` array")
    out = []
    for f in files:
        if not isinstance(f, dict):
            raise ValueError("manifest entry is not an object")
        path, size, sha = f.get("path"), f.get("size"), f.get("sha256")
        if not isinstance(path, str) or not safe_relpath(path):
            raise ValueError(f"manifest names an unsafe path {str(path)[:200]!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"manifest size of {path!r} is not a size")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise ValueError(f"manifest sha256 of {path!r} is not a sha256")
        out.append(FileEntry(path=path, size=size, sha256=sha))
    if len({f.path for f in out}) != len(out):
        raise ValueError("manifest names a file twice")
    return tuple(out)


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
    # A partial copy under .staging (a stage under way, cancelled, or cut by a crash).
    partial: bool = False

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


# Threads for staging's blocking work (hub metadata calls, writing and hashing
# chunks); more wait their turn.
DOWNLOAD_WORKERS = 4


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
        resolved = self.inside_roots(source)
        try:
            return check_model_dir(str(resolved))
        except OSError as exc:  # no permission, a name too long
            raise InvalidModelPath(
                f"model path {source!r} cannot be read: {exc.strerror or exc}", param="source"
            ) from exc

    def inside_roots(self, source: str, param: str = "source") -> Path:
        """`source` resolved (symlinks, `..`), or InvalidModelPath unless it lies in the
        store or a configured model root (a draft model and adapters are held to it too)."""
        try:
            resolved = Path(source).expanduser().resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a NUL byte
            raise InvalidModelPath(
                f"model path {source!r} cannot be resolved: {exc}", param=param
            ) from exc
        roots = [r.expanduser().resolve() for r in (self.root, *self.model_roots)]
        if not any(resolved.is_relative_to(r) for r in roots):
            raise InvalidModelPath(
                f"model path {source!r} is outside the store and every configured model_roots"
                f" directory ({', '.join(str(r) for r in roots)})",
                param=param,
            )
        return resolved

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

    @property
    def staging_root(self) -> Path:
        return self.models_dir / STAGING

    def ensure(self) -> None:
        self.models_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.staging_root.mkdir(parents=True, exist_ok=True)

    def copy_dir(self, name: str) -> Path:
        return self.models_dir / name

    def staging_dir(self, name: str) -> Path:
        return self.staging_root / name

    def has_copy(self, name: str) -> bool:
        return COPY_NAME.match(name) is not None and (self.copy_dir(name) / "config.json").is_file()

    async def run_blocking(self, fn: Any, *args: Any) -> Any:
        """`fn(*args)` in the staging pool (never the default one /health relies on)."""
        return await asyncio.get_running_loop().run_in_executor(self._downloads, fn, *args)

    def manifest(self, name: str) -> tuple[FileEntry, ...]:
        """The files of copy `name` with sha256: read from its cache, else computed once."""
        root = self.copy_dir(name)
        cached = root / MANIFEST
        try:
            return read_manifest(json.loads(cached.read_text()))
        except (OSError, ValueError):
            pass
        entries = []
        for dirpath, dirs, files in os.walk(root):
            dirs.sort()
            for f in sorted(files):
                full = Path(dirpath) / f
                rel = full.relative_to(root).as_posix()
                if not safe_relpath(rel) or full.is_symlink():
                    continue
                entries.append(
                    FileEntry(path=rel, size=full.stat().st_size, sha256=file_sha256(full))
                )
        self.write_manifest(root, entries)
        return tuple(entries)

    def write_manifest(self, root: Path, entries: Iterable[FileEntry]) -> None:
        tmp = root / (MANIFEST + PART)
        tmp.write_text(json.dumps({"files": [e.to_json() for e in entries]}))
        tmp.replace(root / MANIFEST)

    def copy_file(self, name: str, path: str) -> Path | None:
        """The file `path` of copy `name` if the copy's manifest lists it, else None."""
        if not self.has_copy(name) or not safe_relpath(path):
            return None
        if path not in {e.path for e in self.manifest(name)}:
            return None
        full = (self.copy_dir(name) / path).resolve()
        root = self.copy_dir(name).resolve()
        return full if full.is_relative_to(root) and full.is_file() else None

    def close(self) -> None:
        # Queued work is dropped. What runs is short (one chunk hashed and written, a
        # hub metadata call under its timeout); the interpreter waits for it at exit.
        self._downloads.shutdown(wait=False, cancel_futures=True)

    def touch(self, path: Path) -> None:
        # Only staged copies carry a last-use mark; a local source is not ours to write.
        if path.parent.resolve() == self.models_dir.resolve():
            (path / LAST_USE).touch()

    def staged(self, in_use: Iterable[Path], *, partial: bool = False) -> list[StagedCopy]:
        """Complete copies (and with `partial`, the staging directories too)."""
        used = {p.resolve() for p in in_use}
        out: list[StagedCopy] = []
        dirs = [(d, False) for d in _subdirs(self.models_dir)]
        if partial:
            dirs += [(d, True) for d in _subdirs(self.staging_root)]
        for d, part in dirs:
            mark = d / LAST_USE
            try:
                last = mark.stat().st_mtime if mark.exists() else d.stat().st_mtime
            except OSError:  # deleted meanwhile
                continue
            out.append(
                StagedCopy(
                    name=d.name,
                    path=str(d),
                    size_bytes=_tree_size(d),
                    last_use=last,
                    in_use=d.resolve() in used,
                    partial=part,
                )
            )
        return out

    def purge(
        self,
        in_use: Iterable[Path],
        staging: Collection[str] = (),
        *,
        keep_bytes: int = 0,
        only: str | None = None,
    ) -> list[StagedCopy]:
        """Delete copies beyond the `keep_bytes` most recently used; the deleted ones.

        Never a copy in use, nor one (complete or partial) named in `staging`
        (a stage is writing it). `only` narrows to copies of that name.
        """
        candidates = [
            c
            for c in self.staged(in_use, partial=True)
            if not c.in_use and c.name not in staging and (only is None or c.name == only)
        ]
        candidates.sort(key=lambda c: c.last_use, reverse=True)
        removed, kept, full = [], 0, False
        for copy in candidates:
            # Most recent first; once one does not fit, every older one goes too.
            full = full or keep_bytes == 0 or kept + copy.size_bytes > keep_bytes
            if not full:
                kept += copy.size_bytes
                continue
            shutil.rmtree(copy.path, ignore_errors=True)
            removed.append(copy)
        return removed


def _subdirs(path: Path) -> list[Path]:
    if not path.is_dir():
        return []
    return [d for d in sorted(path.iterdir()) if d.is_dir() and not d.name.startswith(".")]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                continue
    return total
