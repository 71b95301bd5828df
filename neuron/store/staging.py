"""Staging: a hub source's files fetched into the store as a job with progress.

    queued -> fetching -> verifying -> staged
         \\-------------\\-----------> failed  (a source error, a digest mismatch,
                                               the free-space floor, a cancel)

The file list comes from the first peer whose manifest answers (peers are
other neurons serving their copies), else from the hub's metadata API (the
sha256 it publishes for LFS files, the git blob id for the others). Files are
fetched a few at a time, each from the peers in turn (rotated so several peers
share the work), then the hub; a source that fails mid-file is followed by the
next, which resumes with an HTTP Range from the bytes already on disk. Bytes
land in `<file>.part`, hashed as they are written; a file is renamed to its
name only once its digest matches, and the copy's directory only once every
file did (Store owns that layout). A cancel, a crash or a restart leaves the
partial files, so the next stage of the same source resumes where it stopped;
each accepted stage is also kept in the store's stage wishes (neuron.store.wishes)
until it ends, so a neuron killed or restarted mid-stage resumes it by itself at
startup. A disk that fills mid-stage ends the job as `insufficient_storage` with
the arithmetic, its partial files kept for that resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import hashlib
import io
import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import aiohttp
import attrs

from neuron.config import NeuronConfig
from neuron.store.sources import (
    LAST_USE,
    MANIFEST,
    PART,
    FileEntry,
    Store,
    copy_name,
    is_local_source,
    read_manifest,
    safe_relpath,
)
from neuron.store.wishes import WISHES_FILE, StageWish, StageWishes
from shared.errors import InsufficientStorage
from shared.journal import Event, Journal

log = logging.getLogger(__name__)

StageState = Literal["queued", "fetching", "verifying", "staged", "failed"]
# The hub files a runner needs (weights, configs, tokenizer, chat template).
HUB_PATTERNS = ("*.json", "*.safetensors", "*.py", "*.model", "*.tiktoken", "*.txt", "*.jinja")
# Files fetched at once per stage; each from its own peer when there are several.
FILE_CONCURRENCY = 2
# Bytes gathered before one write (and hash) in the staging pool.
WRITE_CHUNK = 4 * 1024 * 1024
# POST /store/stage waits this long for the plan (file list, floor check) before
# answering 202, so a refusal by the floor is the answer itself when it can be.
PLAN_WAIT_S = 5.0
GB = 1_000_000_000
# What a write into the store fails with when the disk (or the user's quota) is full.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class StageFailed(Exception):
    """A stage that cannot complete; the message names the file and the sources tried."""


class _SourceError(Exception):
    """One source failed for one file: try the next."""


@attrs.frozen
class Origin:
    """Where files may come from: a peer neuron's store, or the hub."""

    label: str
    base: str  # a file's URL is base + quoted path
    headers: dict[str, str] = attrs.field(factory=dict, repr=False)

    def url(self, path: str) -> str:
        return self.base + quote(path)


@attrs.define(eq=False)
class StageJob:
    model_id: str
    name: str
    source: str
    peers: tuple[str, ...]
    state: StageState = "queued"
    bytes_done: int = 0
    bytes_total: int | None = None
    files_done: int = 0
    files_total: int | None = None
    error: str | None = None
    # The error's code (`cancelled`, `insufficient_storage`, `stage_failed`, ...), and
    # its figures when it has some (the disk arithmetic).
    error_code: str | None = None
    error_details: dict[str, Any] | None = None
    # Where the file list came from (a peer's URL, or "hub").
    manifest_from: str | None = None
    started_at: float = attrs.Factory(time.time)
    finished_at: float | None = None
    path: Path | None = None
    # The plan (file list, floor check) is known, or the job already ended.
    planned: asyncio.Event = attrs.Factory(asyncio.Event)
    finished: asyncio.Event = attrs.Factory(asyncio.Event)
    refusal: InsufficientStorage | None = None
    task: asyncio.Task[None] | None = None
    _fetched: int = 0  # bytes fetched over the network by this run (the rate)
    _fetch_t0: float | None = None

    @property
    def active(self) -> bool:
        return self.state in ("queued", "fetching", "verifying")

    @property
    def rate_bps(self) -> float | None:
        if self._fetch_t0 is None:
            return None
        elapsed = (self.finished_at or time.time()) - self._fetch_t0
        return self._fetched / elapsed if elapsed > 0 else None

    @property
    def eta_s(self) -> float | None:
        rate = self.rate_bps
        if not self.active or self.bytes_total is None or not rate:
            return None
        return max(0.0, (self.bytes_total - self.bytes_done) / rate)

    def to_json(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "name": self.name,
            "source": self.source,
            "peers": list(self.peers),
            "state": self.state,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "files_done": self.files_done,
            "files_total": self.files_total,
            "rate_bytes_per_s": self.rate_bps,
            "eta_s": self.eta_s,
            "error": self.error,
            "error_code": self.error_code,
            "error_details": self.error_details,
            "manifest_from": self.manifest_from,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "path": None if self.path is None else str(self.path),
        }

    def _end(self, state: StageState, error: str | None = None, code: str | None = None) -> None:
        self.state = state
        self.error = error
        self.error_code = code
        self.finished_at = time.time()
        self.planned.set()
        self.finished.set()


@attrs.define
class _PartFile:
    """A `.part` file being appended to, hashed as it grows (a resumed one from its start)."""

    entry: FileEntry
    path: Path
    f: io.FileIO  # unbuffered: a write that fails leaves nothing pending in a buffer
    sha256: Any
    git: Any | None
    size: int = 0

    @classmethod
    def open(cls, entry: FileEntry, path: Path) -> _PartFile:
        """Open for append; hash what is there already (a resume), or start empty."""
        f = path.open("ab+", buffering=0)
        pf = cls(entry=entry, path=path, f=f, sha256=hashlib.sha256(), git=None)
        pf._reset_hashers()
        f.seek(0)
        size = 0
        if os.fstat(f.fileno()).st_size > entry.size:  # not a prefix of this file
            f.truncate(0)
        while chunk := f.read(WRITE_CHUNK):
            pf._hash(chunk)
            size += len(chunk)
        pf.size = size
        return pf

    def _reset_hashers(self) -> None:
        self.sha256 = hashlib.sha256()
        # A git blob id hashes a header with the full size, then the bytes.
        self.git = None
        if self.entry.git_sha1 is not None and self.entry.sha256 is None:
            self.git = hashlib.sha1(b"blob %d\0" % self.entry.size, usedforsecurity=False)

    def _hash(self, data: bytes | memoryview) -> None:
        self.sha256.update(data)
        if self.git is not None:
            self.git.update(data)

    def restart(self) -> None:
        """The source ignored our Range: start this file over."""
        self.f.truncate(0)
        self.f.seek(0)
        self.size = 0
        self._reset_hashers()

    def write(self, data: bytes) -> None:
        """Append `data`; a disk that fills midway raises, with what landed counted."""
        view = memoryview(data)
        while view:
            n = self.f.write(view)  # a raw write may take only a part
            if not n:  # never for a regular file; a loop without progress must not spin
                raise OSError(errno.EIO, f"a write to {self.path} took no bytes")
            self._hash(view[:n])
            self.size += n
            view = view[n:]

    def close(self) -> None:
        self.f.close()

    def mismatch(self) -> str | None:
        """Why the complete file is not the one the manifest names, or None."""
        e = self.entry
        if self.size != e.size:
            return f"{self.size} bytes, the manifest says {e.size}"
        if e.sha256 is not None and self.sha256.hexdigest() != e.sha256:
            return f"sha256 {self.sha256.hexdigest()}, the manifest says {e.sha256}"
        if self.git is not None and self.git.hexdigest() != e.git_sha1:
            return f"git blob id {self.git.hexdigest()}, the hub says {e.git_sha1}"
        return None


@attrs.define
class Stager:
    """Every stage of this neuron, one job per copy name."""

    store: Store
    config: NeuronConfig
    # The hub's base URL; None: huggingface_hub's setting (HF_ENDPOINT).
    hub_endpoint: str | None = None
    jobs: dict[str, StageJob] = attrs.Factory(dict)
    _session: aiohttp.ClientSession | None = None
    _background: set[asyncio.Task[Any]] = attrs.Factory(set)
    # The node's event log: each stage's start and end (a load's or POST /store/stage's).
    journal: Journal[Event] = attrs.Factory(Journal[Event])
    # The stages accepted and not finished, on disk: what a restart resumes.
    wishes: StageWishes = attrs.Factory(
        lambda self: StageWishes(self.store.root / WISHES_FILE), takes_self=True
    )
    # The neuron is stopping: stages cancelled now stay wished, for the next start.
    _stopping: bool = False

    async def open(self) -> None:
        """The HTTP session, then the stages an earlier run left unfinished, resumed."""
        read_s = self.config.stage_read_timeout_s
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=read_s),
            auto_decompress=False,
        )
        await self.resume()

    def stopping(self) -> None:
        """The neuron shuts down: the stages it cancels (its own, its loads') resume next start."""
        self._stopping = True

    async def close(self) -> None:
        self.stopping()
        for job in list(self.jobs.values()):
            self.cancel_job(job)
        tasks = [j.task for j in self.jobs.values() if j.task is not None]
        tasks += list(self._background)
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.wishes.flush()
        if self._session is not None:
            await self._session.close()

    async def resume(self) -> list[StageJob]:
        """Start again every stage an earlier run accepted and did not finish."""
        resumed = []
        for wish in await asyncio.to_thread(self.wishes.load):
            if self.store.has_copy(wish.name):  # completed just before a kill
                self.wishes.drop(wish.name)
                continue
            here = await asyncio.to_thread(_tree_bytes, self.store.staging_dir(wish.name))
            log.info(
                "resuming the stage of %s for %s, accepted at %s (%d bytes already here; "
                "peers: %s)",
                wish.source,
                wish.model_id,
                time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(wish.accepted_at)),
                here,
                ", ".join(wish.peers) or "none",
            )
            resumed.append(self.stage(wish.model_id, wish.source, wish.peers, resumed=True))
        return resumed

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Stager.open() first"
        return self._session

    # --- the API ------------------------------------------------------------

    def stage(
        self, model_id: str, source: str, peers: Iterable[str] = (), *, resumed: bool = False
    ) -> StageJob:
        """The stage of `source` under way, or a new one (one job per copy), wished on disk."""
        name = copy_name(source)
        job = self.jobs.get(name)
        if job is not None and job.active:
            return job
        if self.store.has_copy(name):
            done = StageJob(model_id=model_id, name=name, source=source, peers=tuple(peers))
            done.path = self.store.copy_dir(name)
            done._end("staged")
            return done
        job = StageJob(model_id=model_id, name=name, source=source, peers=tuple(peers))
        self.jobs[name] = job
        wish = self.wishes.get(name)
        if not resumed or wish is None:
            self.wishes.put(StageWish(model_id=model_id, source=source, peers=job.peers))
        job.task = asyncio.create_task(self._run(job), name=f"stage {name}")
        kind = "stage resume" if resumed else "stage start"
        self._event(job, kind, f"{source} (peers: {', '.join(job.peers) or 'none'})")
        job.task.add_done_callback(lambda _: self._ended(job))
        return job

    def _event(self, job: StageJob, kind: str, detail: str) -> None:
        node = self.config.node_name
        self.journal.append(Event(kind=kind, model=job.model_id, node=node, detail=detail))

    def _ended(self, job: StageJob) -> None:
        if job.state == "staged":
            self._event(job, "stage done", str(job.path))
        else:
            self._event(job, "stage failed", job.error or f"ended {job.state}")
        if not self._still_wished(job) and self.jobs.get(job.name) in (job, None):
            self.wishes.drop(job.name)

    def _still_wished(self, job: StageJob) -> bool:
        """Whether a restart should resume `job`: cut by the neuron's own stop, or by a
        full disk mid-fetch (space may be freed); never one completed, cancelled by a
        caller, refused by the floor, or failed in a way a retry would repeat."""
        if job.error_code == "cancelled":
            return self._stopping
        return job.error_code == "insufficient_storage" and job.refusal is None

    async def wait(self, job: StageJob) -> Path:
        """The staged directory once `job` ends, or StageFailed with its error."""
        await job.finished.wait()
        if job.state != "staged" or job.path is None:
            raise StageFailed(f"staging {job.source!r} failed: {job.error}")
        return job.path

    def for_model(self, model_id: str) -> StageJob | None:
        for job in self.jobs.values():
            if job.model_id == model_id and job.active:
                return job
        return None

    def cancel_job(self, job: StageJob) -> bool:
        if not job.active or job.task is None:
            return False
        job.task.cancel()
        return True

    def cancel(self, model_id: str) -> StageJob | None:
        job = self.for_model(model_id)
        if job is not None:
            self.cancel_job(job)
        return job

    def active_names(self) -> set[str]:
        return {name for name, job in self.jobs.items() if job.active}

    def listing(self) -> list[dict[str, Any]]:
        """Stages under way and the last failure of each copy (a staged one is a copy)."""
        return [j.to_json() for j in self.jobs.values() if j.state != "staged"]

    # --- the disk budget ----------------------------------------------------

    async def evict(self, protected: Iterable[str], in_use: Iterable[Path]) -> list[Any]:
        """Delete unused copies beyond `staging_keep_recent_gb`, least recently used first."""
        keep = int(self.config.staging_keep_recent_gb * GB)
        names = self.active_names() | set(protected)
        removed = await asyncio.to_thread(self.store.purge, list(in_use), names, keep_bytes=keep)
        for c in removed:
            log.info(
                "store budget: removed %s (%d bytes, last used %.0f)",
                c.name,
                c.size_bytes,
                c.last_use,
            )
        return removed

    def evict_soon(self, protected: Iterable[str], in_use: Iterable[Path]) -> None:
        task = asyncio.create_task(self.evict(list(protected), list(in_use)))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- one stage ----------------------------------------------------------

    async def _run(self, job: StageJob) -> None:
        try:
            await self._steps(job)
            log.info("staged %s (%d bytes) from %s", job.name, job.bytes_done, job.manifest_from)
        except asyncio.CancelledError:
            job._end("failed", "cancelled", "cancelled")
            log.info("stage of %s cancelled at %d bytes", job.name, job.bytes_done)
        except InsufficientStorage as exc:  # the floor refused it before any byte
            job.refusal = exc
            job.error_details = exc.details
            job._end("failed", exc.message, exc.code)
        except StageFailed as exc:
            job._end("failed", str(exc), "stage_failed")
            log.warning("stage of %s failed: %s", job.name, exc)
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                self._unforeseen(job, exc)
                return
            full = await self._disk_full(job, exc)
            job.error_details = full.details
            job._end("failed", full.message, full.code)
            # Expected on a full disk: one line, no traceback.
            log.warning("stage of %s stopped: %s", job.name, full.message)
        except Exception as exc:  # anything unforeseen ends the job, never the neuron
            self._unforeseen(job, exc)

    async def _steps(self, job: StageJob) -> None:
        entries, origins = await self._plan(job)
        await self._check_floor(job, entries)
        job.planned.set()
        job.state = "fetching"
        job._fetch_t0 = time.time()
        await self._fetch_all(job, entries, origins)
        job.state = "verifying"
        job.path = await self.store.run_blocking(self._complete, job, entries)
        job._end("staged")

    def _unforeseen(self, job: StageJob, exc: BaseException) -> None:
        log.error("stage of %s failed", job.name, exc_info=exc)
        job._end("failed", f"{type(exc).__name__}: {exc}", "internal_error")

    async def _disk_full(self, job: StageJob, exc: OSError) -> InsufficientStorage:
        """The disk filled mid-stage: the arithmetic now, the partial files kept."""
        where = self.store.models_dir
        free = (await asyncio.to_thread(shutil.disk_usage, where)).free
        total, done = job.bytes_total or 0, job.bytes_done
        need = total - done
        return InsufficientStorage(
            f"staging {job.source!r} ran out of disk ({exc.strerror or exc}) at {done} of "
            f"{total} bytes: it needs {need} more bytes ({need / GB:.2f} GB), and {free} "
            f"bytes ({free / GB:.2f} GB) are free under {where}; the partial files are kept, "
            "so once space is freed a stage of it (or this neuron's next start) resumes",
            details={
                "need_bytes": need,
                "free_bytes": free,
                "done_bytes": done,
                "total_bytes": total,
                "store": str(where),
            },
        )

    async def _plan(self, job: StageJob) -> tuple[tuple[FileEntry, ...], list[Origin]]:
        """The file list and the origins to fetch from, peers first."""
        token = self.config.fleet_token
        peer_headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        errors: list[str] = []
        answered: list[tuple[str, tuple[FileEntry, ...] | None]] = []
        manifests = await asyncio.gather(
            *(self._peer_manifest(p, job.name, peer_headers) for p in job.peers),
            return_exceptions=True,
        )
        for peer, got in zip(job.peers, manifests, strict=True):
            if isinstance(got, BaseException):
                errors.append(f"peer {peer}: {describe(got)}")
            else:
                answered.append((peer, got))
        origins = [
            Origin(
                label=f"peer {p}",
                base=f"{p.rstrip('/')}/store/models/{quote(job.name, safe='')}/files/",
                headers=peer_headers,
            )
            for p, _ in answered
        ]
        entries: tuple[FileEntry, ...] | None = None
        if answered:
            job.manifest_from, entries = answered[0][0], answered[0][1]
        hub = None if is_local_source(job.source) else self._hub_endpoint()
        if entries is None and hub is not None:
            try:
                entries, revision = await self.store.run_blocking(
                    _hub_files, hub, job.source, self.config.stage_read_timeout_s
                )
                job.manifest_from = "hub"
            except Exception as exc:  # huggingface_hub raises many kinds
                errors.append(f"hub {hub}: {describe(exc)}")
                revision = "main"
        else:
            revision = "main"
        if hub is not None:
            from huggingface_hub.utils._headers import build_hf_headers

            origins.append(
                Origin(
                    label=f"hub {hub}",
                    base=f"{hub}/{job.source}/resolve/{quote(revision, safe='')}/",
                    headers=build_hf_headers(),
                )
            )
        if entries is None:
            raise StageFailed(f"no source answered with a file list ({'; '.join(errors)})")
        job.files_total = len(entries)
        job.bytes_total = sum(e.size for e in entries)
        return entries, origins

    async def _peer_manifest(
        self, peer: str, name: str, headers: dict[str, str]
    ) -> tuple[FileEntry, ...]:
        url = f"{peer.rstrip('/')}/store/models/{quote(name, safe='')}/manifest"
        timeout = aiohttp.ClientTimeout(total=self.config.stage_read_timeout_s)
        async with self.session.get(url, headers=headers, timeout=timeout) as r:
            if r.status != 200:
                raise _SourceError(f"manifest answered {r.status}")
            return read_manifest(await r.json(content_type=None))

    def _hub_endpoint(self) -> str:
        if self.hub_endpoint is not None:
            return self.hub_endpoint.rstrip("/")
        from huggingface_hub import constants

        return constants.ENDPOINT.rstrip("/")

    async def _check_floor(self, job: StageJob, entries: tuple[FileEntry, ...]) -> None:
        """InsufficientStorage, with the arithmetic, for a stage that would cross min_free_gb."""
        have = await asyncio.to_thread(self._present_bytes, job.name, entries)
        job.bytes_done = have
        need = (job.bytes_total or 0) - have
        free = shutil.disk_usage(self.store.models_dir).free
        floor = int(self.config.min_free_gb * GB)
        if free - need < floor:
            raise InsufficientStorage(
                f"staging {job.source!r} needs {need} more bytes ({need / GB:.2f} GB: "
                f"{job.bytes_total} in {len(entries)} files, {have} already here); "
                f"{free} bytes ({free / GB:.2f} GB) are free under {self.store.models_dir}, "
                f"and min_free_gb = {self.config.min_free_gb:g} keeps {floor} bytes free: "
                f"{free} - {need} = {free - need} < {floor}",
                details={"need_bytes": need, "free_bytes": free, "floor_bytes": floor},
            )

    def _present_bytes(self, name: str, entries: tuple[FileEntry, ...]) -> int:
        root = self.store.staging_dir(name)
        total = 0
        for e in entries:
            for p in (root / e.path, root / (e.path + PART)):
                with contextlib.suppress(OSError):
                    total += min(p.stat().st_size, e.size)
                    break
        return total

    async def _fetch_all(
        self, job: StageJob, entries: tuple[FileEntry, ...], origins: list[Origin]
    ) -> None:
        root = self.store.staging_dir(job.name)
        await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
        (root / LAST_USE).touch()
        peers = [o for o in origins if o.label.startswith("peer ")]
        rest = [o for o in origins if not o.label.startswith("peer ")]
        slots = asyncio.Semaphore(FILE_CONCURRENCY)

        async def one(i: int, entry: FileEntry) -> None:
            # Rotate the peers so files at once come from different ones.
            k = i % len(peers) if peers else 0
            order = peers[k:] + peers[:k] + rest
            async with slots:
                await self._fetch_file(job, entry, order, root)
                job.files_done += 1

        # One file failing stops the others: the stage has failed.
        try:
            async with asyncio.TaskGroup() as files:
                for i, e in enumerate(entries):
                    files.create_task(one(i, e))
        except BaseExceptionGroup as group:
            # The first failure itself (StageFailed...), which _run reports; its own
            # __cause__ kept, so no `from`.
            raise group.exceptions[0]  # noqa: B904

    async def _fetch_file(
        self, job: StageJob, entry: FileEntry, origins: list[Origin], root: Path
    ) -> None:
        final = root / entry.path
        if not safe_relpath(entry.path) or not await asyncio.to_thread(_inside, final, root):
            raise StageFailed(f"file {entry.path!r}: not a path inside the copy")
        # A file under its own name was verified before its rename.
        with contextlib.suppress(OSError):
            if final.stat().st_size == entry.size:
                return
        await asyncio.to_thread(final.parent.mkdir, parents=True, exist_ok=True)
        part_path = root / (entry.path + PART)
        before = await asyncio.to_thread(_size_or_zero, part_path)
        pf = await self.store.run_blocking(_PartFile.open, entry, part_path)
        # The floor check counted what was there; the hash read of a resume may differ.
        job.bytes_done += pf.size - min(before, entry.size)
        errors: list[str] = []
        used: Origin | None = None
        try:
            for origin in origins:
                if pf.size == entry.size:
                    break
                try:
                    await self._fetch_from(job, pf, origin)
                    used = origin
                    break
                except (aiohttp.ClientError, TimeoutError, _SourceError) as exc:
                    errors.append(f"{origin.label}: {describe(exc)}")
                    log.info(
                        "stage %s: %s from %s: %s",
                        job.name,
                        entry.path,
                        origin.label,
                        describe(exc),
                    )
            else:
                if pf.size != entry.size:
                    raise StageFailed(
                        f"file {entry.path!r}: no source could serve it ({'; '.join(errors)})"
                    )
            why = pf.mismatch()
        finally:
            await self.store.run_blocking(pf.close)
        if why is not None:
            job.bytes_done -= pf.size
            await asyncio.to_thread(part_path.unlink, missing_ok=True)
            where = "" if used is None else f" from {used.label}"
            raise StageFailed(f"file {entry.path!r} failed verification{where}: {why}")
        await asyncio.to_thread(os.replace, part_path, final)

    async def _fetch_from(self, job: StageJob, pf: _PartFile, origin: Origin) -> None:
        """Append the rest of `pf`'s file from `origin` (a Range from its current size)."""
        headers = dict(origin.headers)
        if pf.size:
            headers["Range"] = f"bytes={pf.size}-"
        async with self.session.get(origin.url(pf.entry.path), headers=headers) as r:
            if r.status == 200 and pf.size:
                job.bytes_done -= pf.size
                await self.store.run_blocking(pf.restart)
            elif r.status not in (200, 206):
                raise _SourceError(f"answered {r.status}")
            buf = bytearray()
            try:
                async for chunk in r.content.iter_chunked(1024 * 1024):
                    if pf.size + len(buf) + len(chunk) > pf.entry.size:
                        raise _SourceError(f"sends more than the {pf.entry.size} bytes listed")
                    buf += chunk
                    if len(buf) >= WRITE_CHUNK:
                        # Taken out first: a write that fails (a full disk) must not
                        # be written again below.
                        data, buf = bytes(buf), bytearray()
                        await self._write(job, pf, data)
            finally:
                # What arrived is kept even when the source fails or the stage is
                # cancelled: the next source resumes after it (the hash checks it all).
                if buf:
                    await self._write(job, pf, bytes(buf))
        if pf.size != pf.entry.size:
            raise _SourceError(f"ended at {pf.size} of {pf.entry.size} bytes")

    async def _write(self, job: StageJob, pf: _PartFile, data: bytes) -> None:
        before = pf.size
        try:
            await self.store.run_blocking(pf.write, data)
        finally:
            # What landed counts, a write the disk cut short included (the .part holds it).
            grown = pf.size - before
            job.bytes_done += grown
            job._fetched += grown

    def _complete(self, job: StageJob, entries: tuple[FileEntry, ...]) -> Path:
        """Rename the verified staging directory into place (blocking; the pool)."""
        root = self.store.staging_dir(job.name)
        listed = {e.path for e in entries}
        for dirpath, _dirs, files in os.walk(root):
            for f in files:
                rel = (Path(dirpath) / f).relative_to(root).as_posix()
                if rel not in listed and not rel.startswith(".neuron-"):
                    os.unlink(Path(dirpath) / f)  # a leftover of an older file list
        hashed = [attrs.evolve(e, sha256=e.sha256 or _sha256_of(root / e.path)) for e in entries]
        self.store.write_manifest(root, hashed)
        (root / LAST_USE).touch()
        target = self.store.copy_dir(job.name)
        if not (root / "config.json").is_file():
            raise StageFailed(f"{job.source!r} has no config.json: not a model")
        os.replace(root, target)
        return target


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def _tree_bytes(root: Path) -> int:
    return sum(_size_or_zero(p) for p in root.rglob("*")) if root.is_dir() else 0


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _sha256_of(path: Path) -> str:
    from neuron.store.sources import file_sha256

    return file_sha256(path)


def _hub_files(endpoint: str, repo_id: str, timeout: float) -> tuple[tuple[FileEntry, ...], str]:
    """The hub's file list with sizes and hashes (blocking: the staging pool)."""
    from huggingface_hub import HfApi

    info = HfApi(endpoint=endpoint).model_info(repo_id, files_metadata=True, timeout=timeout)
    entries = []
    for s in info.siblings or ():
        name = s.rfilename
        if not any(fnmatch.fnmatch(name, p) for p in HUB_PATTERNS) or not safe_relpath(name):
            continue
        if s.size is None:
            raise StageFailed(f"the hub lists {name!r} without a size")
        lfs = s.lfs
        sha = lfs.sha256 if lfs is not None else None
        entries.append(FileEntry(path=name, size=s.size, sha256=sha, git_sha1=s.blob_id))
    return tuple(entries), info.sha or "main"


def describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


__all__ = ["MANIFEST", "StageFailed", "StageJob", "Stager"]
