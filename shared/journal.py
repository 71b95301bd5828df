"""A journal: a bounded in-memory ring of records, optionally also a JSONL file.

Both services keep two (events and traces). The ring answers the HTTP views and
never waits on a disk. The file, when configured, is written by one writer
thread fed through a bounded queue: `append` only enqueues the (frozen) record,
which the thread serializes, so a slow or full disk (write, rename, statvfs)
never stalls the event loop. A queue that fills up (a disk far slower than the
records) drops lines and counts them rather than make the loop wait.

The file rotates by size (`events.jsonl` -> `events.jsonl.1` ... `.keep`, the
oldest deleted), and below a free-space floor it only counts: lines are
dropped, `dropped` rises, the ring keeps working and `status()` says so.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import attrs

log = logging.getLogger(__name__)

# Lines waiting for the writer thread; beyond this the disk is too slow and lines drop.
QUEUE_LINES = 10_000
MB = 1024 * 1024


class _Record(Protocol):
    @property
    def seq(self) -> int: ...

    @property
    def ts(self) -> float: ...

    def to_json(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=_Record)


@attrs.frozen
class Event:
    """One lifecycle fact about a model and/or node: a transition, a crash, a hold..."""

    kind: str
    model: str | None = None
    node: str | None = None
    detail: str = ""
    seq: int = 0  # set by the journal
    ts: float = attrs.Factory(time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "ts": self.ts,
            "kind": self.kind,
            "model": self.model,
            "node": self.node,
            "detail": self.detail,
        }


@attrs.frozen
class FileSettings:
    """Where and how a journal writes its file (the `journal_*` config keys)."""

    path: Path
    max_bytes: int
    keep: int
    min_free_bytes: int

    def __attrs_post_init__(self) -> None:
        if self.max_bytes < 1 or self.keep < 1 or self.min_free_bytes < 0:
            raise ValueError("journal: max size and keep must be >= 1, min free >= 0")

    @classmethod
    def of(
        cls, directory: str | None, name: str, *, max_mb: float, keep: int, min_free_mb: float
    ) -> FileSettings | None:
        if directory is None:
            return None
        return cls(
            path=Path(directory).expanduser() / name,
            max_bytes=max(1, int(max_mb * MB)),
            keep=keep,
            min_free_bytes=int(min_free_mb * MB),
        )


class JournalFile:
    """The writer thread of one JSONL file; its counters are read from any thread."""

    def __init__(self, settings: FileSettings) -> None:
        self.settings = settings
        self.dropped = 0  # lines not written: under the floor, queue full, or OSError
        self.written = 0
        self.counting_only = False
        self.free_bytes: int | None = None
        self.error: str | None = None
        # Records, not lines: they are frozen, so the thread serializes them, not the loop.
        self._queue: queue.Queue[_Record | None] = queue.Queue(QUEUE_LINES)
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self._run, name=f"journal {settings.path.name}", daemon=True
        )
        self._thread.start()

    def put(self, record: _Record) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def flush(self) -> None:
        """Block until every line queued so far is written or dropped (tests, close)."""
        self._queue.join()

    def close(self) -> None:
        """Write what is queued, then stop the thread (blocking: call off the loop)."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        path = self.settings.path
        file = None
        try:
            while True:
                lines = [self._queue.get()]
                # Take whatever else is queued: one floor check and write per batch.
                with contextlib.suppress(queue.Empty):
                    while len(lines) < 1000:
                        lines.append(self._queue.get_nowait())
                stop = None in lines
                batch = [_line(x) for x in lines if x is not None]
                try:
                    if batch:
                        file = self._write(file, batch)
                except OSError as exc:
                    self._drop(len(batch), f"{path}: {exc}")
                    if file is not None:
                        with contextlib.suppress(OSError):
                            file.close()
                    file = None
                for _ in lines:
                    self._queue.task_done()
                if stop:
                    return
        finally:
            if file is not None:
                with contextlib.suppress(OSError):
                    file.close()

    def _write(self, file: Any, batch: list[str]) -> Any:
        s = self.settings
        s.path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(s.path.parent).free
        self.free_bytes = free
        if free < s.min_free_bytes:
            if not self.counting_only:
                log.warning(
                    "journal %s: %d MB free, under the %d MB floor: counting only",
                    s.path,
                    free // MB,
                    s.min_free_bytes // MB,
                )
            self.counting_only = True
            self._drop(len(batch), None)
            return file
        if self.counting_only:
            log.warning("journal %s: free space back above the floor: writing again", s.path)
            self.counting_only = False
        if file is None:
            file = s.path.open("ab")
        size = file.tell()
        pending: list[bytes] = []
        for line in batch:
            data = (line + "\n").encode()
            # Rotate before a line that would pass the size (an empty file takes any line).
            if size and size + len(data) > s.max_bytes:
                file.write(b"".join(pending))
                file.close()
                rotate(s.path, s.keep)
                file = s.path.open("ab")
                size, pending = 0, []
            pending.append(data)
            size += len(data)
        file.write(b"".join(pending))
        file.flush()
        with self._lock:
            self.written += len(batch)
            self.error = None
        return file

    def _drop(self, n: int, error: str | None) -> None:
        with self._lock:
            self.dropped += n
            if error is not None:
                if self.error is None:
                    log.warning("journal: %s; lines dropped", error)
                self.error = error


def _line(record: _Record) -> str:
    return json.dumps(record.to_json(), separators=(",", ":"), default=str)


def rotate(path: Path, keep: int) -> None:
    """`path` becomes `path.1`, `.1` becomes `.2` ..., beyond `.keep` is deleted.

    Shared with the runners' log files (neuron.runner.runner_log)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"{path}.{keep}")
    for i in range(keep - 1, 0, -1):
        with contextlib.suppress(FileNotFoundError):
            os.rename(f"{path}.{i}", f"{path}.{i + 1}")
    os.rename(path, f"{path}.1")


class Journal(Generic[R]):
    """The ring (newest last) with a monotonic seq; the file if `settings` names one."""

    def __init__(self, ring: int = 1000, settings: FileSettings | None = None) -> None:
        self._ring: collections.deque[R] = collections.deque(maxlen=max(1, ring))
        self._seq = 0
        self.file = JournalFile(settings) if settings is not None else None

    @property
    def last_seq(self) -> int:
        return self._seq

    def append(self, record: R) -> R:
        """Stamp `record` with the next seq, keep it, queue its line; returns it stamped."""
        self._seq += 1
        rec: R = attrs.evolve(record, seq=self._seq)  # type: ignore[misc]
        return self._keep(rec)

    def append_made(self, make: Callable[[int], R]) -> R:
        """`append(make(0))` without building the record twice: `make` gets the seq
        (a record per request: attrs.evolve of one costs more than its making)."""
        self._seq += 1
        return self._keep(make(self._seq))

    def _keep(self, rec: R) -> R:
        self._ring.append(rec)
        if self.file is not None:
            self.file.put(rec)
        return rec

    def __iter__(self) -> Iterator[R]:
        return iter(self._ring)

    def __len__(self) -> int:
        return len(self._ring)

    def since(self, seq: int) -> Iterable[R]:
        return (r for r in self._ring if r.seq > seq)

    def status(self) -> str:
        """ "memory only", "writing PATH", or "counting-only, N dropped (...)"."""
        f = self.file
        if f is None:
            return "memory only"
        if f.counting_only:
            free = "?" if f.free_bytes is None else str(f.free_bytes // MB)
            return (
                f"counting-only, {f.dropped} dropped ({free} MB free, floor"
                f" {f.settings.min_free_bytes // MB} MB)"
            )
        if f.error is not None:
            return f"failing, {f.dropped} dropped ({f.error})"
        return f"writing {f.settings.path}" + (f", {f.dropped} dropped" if f.dropped else "")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class _Identified(Protocol):
    @property
    def id(self) -> str: ...


Rid = TypeVar("Rid", bound=_Identified)


def find(records: Iterable[Rid], rid: str) -> Rid | None:
    """The newest record with id `rid` (a trace looked up by its request id), or None."""
    return next((r for r in reversed(list(records)) if r.id == rid), None)


def journal_health(journals: dict[str, Journal[Any]]) -> dict[str, Any]:
    """/health's `journal` (one line: "counting-only, N dropped" when it is) and
    `journal_files` (each journal's own status). Never part of the ok/degraded
    verdict: a journal that only counts still serves every request."""
    each = {name: j.status() for name, j in journals.items()}
    counting = [j for j in journals.values() if j.file is not None and j.file.counting_only]
    if counting:
        dropped = sum(j.file.dropped for j in counting if j.file is not None)
        summary = f"counting-only, {dropped} dropped"
    elif all(j.file is None for j in journals.values()):
        summary = "memory only"
    else:
        summary = "writing"
    return {"journal": summary, "journal_files": each}


class JournalConfig(Protocol):
    """The `journal_*` keys cortex.toml and neuron.toml share."""

    @property
    def journal_dir(self) -> str | None: ...
    @property
    def journal_max_mb(self) -> float: ...
    @property
    def journal_keep(self) -> int: ...
    @property
    def journal_min_free_mb(self) -> float: ...
    @property
    def journal_events_kept(self) -> int: ...
    @property
    def journal_traces_kept(self) -> int: ...


def journals(config: JournalConfig) -> tuple[Journal[Event], Journal[Any]]:
    """A service's events and traces journals, as its `journal_*` keys describe them
    (the caller types the traces journal with its own record)."""

    def settings(name: str) -> FileSettings | None:
        return FileSettings.of(
            config.journal_dir,
            name,
            max_mb=config.journal_max_mb,
            keep=config.journal_keep,
            min_free_mb=config.journal_min_free_mb,
        )

    return (
        Journal[Event](config.journal_events_kept, settings("events.jsonl")),
        Journal[Any](config.journal_traces_kept, settings("traces.jsonl")),
    )
