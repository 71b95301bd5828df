"""A runner's output file, store/logs/<model>.log: bounded like the journals' files.

It rotates by size (`<model>.log` -> `.log.1` ... `.log.<keep>`, the oldest
deleted: shared.journal's `rotate`), and below the journals' free-space floor
it writes nothing and counts the bytes it drops, until the disk has room again.

Written from the event loop, as the runner's output arrives: a write is a
buffered append, a rotation a few renames once per `max_bytes`, and the floor's
statvfs is taken at most once a second (or per MB written), so none of it
waits on the disk for long. An OSError (a full disk, a removed directory) stops
the writing but never the draining of the runner's pipe.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import time
from pathlib import Path
from typing import IO, Any

from shared.journal import MB, FileSettings, rotate

log = logging.getLogger(__name__)

# The floor is looked at again after this long or this many bytes, whichever first.
FLOOR_CHECK_S = 1.0
FLOOR_CHECK_BYTES = MB
# A runner log and its rotated copies: `<model>.log`, `<model>.log.1` ...
LOG_NAME = re.compile(r"^(?P<base>.+\.log)(?:\.(?P<n>\d+))?$")


class RunnerLog:
    """One runner's log file, written chunk by chunk; see the module docstring."""

    def __init__(self, settings: FileSettings) -> None:
        self.settings = settings
        self.counting_only = False
        self.dropped_bytes = 0
        self.error: str | None = None
        self._file: IO[bytes] | None = None
        self._size = 0
        self._checked_at: float | None = None  # monotonic time of the last statvfs
        self._since_check = 0

    @property
    def path(self) -> Path:
        return self.settings.path

    def write(self, data: bytes) -> None:
        """Append `data`, rotating first where it would pass `max_bytes`."""
        if self.error is not None or not data:
            return
        try:
            if self._under_floor(len(data)):
                self.dropped_bytes += len(data)
                return
            self._append(data)
        except OSError as exc:
            self.error = f"{self.path}: {exc}"
            self.dropped_bytes += len(data)
            log.warning("runner log %s: %s; no longer written", self.path, exc)
            self.close()

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def status(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "counting_only": self.counting_only,
            "dropped_bytes": self.dropped_bytes,
            "error": self.error,
        }

    def _append(self, data: bytes) -> None:
        # Files end at a line's end where one fits; only a line longer than a
        # whole file is cut (like the journal: an empty file takes any line).
        max_bytes = self.settings.max_bytes
        while data:
            file = self._open()
            room = max_bytes - self._size
            if len(data) <= room:
                piece = data
            elif (cut := data.rfind(b"\n", 0, room) + 1) > 0:
                piece = data[:cut]
            elif self._size:
                self._rotate()
                continue
            else:
                piece = data[:room]
            file.write(piece)
            self._size += len(piece)
            data = data[len(piece) :]
            if data:
                self._rotate()
        assert self._file is not None
        self._file.flush()

    def _open(self) -> IO[bytes]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("ab")
            self._size = self._file.tell()
        return self._file

    def _rotate(self) -> None:
        self.close()
        rotate(self.path, self.settings.keep)
        self._size = 0

    def _under_floor(self, n: int) -> bool:
        """Is free space under the floor (the journals' `journal_min_free_mb`)?"""
        floor = self.settings.min_free_bytes
        if floor <= 0:
            self.counting_only = False
            return False
        self._since_check += n
        now = time.monotonic()
        recent = self._checked_at is not None and now - self._checked_at < FLOOR_CHECK_S
        if recent and self._since_check < FLOOR_CHECK_BYTES:
            return self.counting_only
        self._checked_at, self._since_check = now, 0
        free = shutil.disk_usage(self.path.parent).free
        under = free < floor
        if under and not self.counting_only:
            log.warning(
                "runner log %s: %d MB free, under the %d MB floor: counting only",
                self.path,
                free // MB,
                floor // MB,
            )
            self.close()
        elif not under and self.counting_only:
            log.warning("runner log %s: free space back above the floor: writing again", self.path)
        self.counting_only = under
        return under


def log_files(logs_dir: Path) -> list[dict[str, Any]]:
    """The runner logs under `logs_dir` with their bytes, per model log, newest first
    within each (blocking: a directory listing; call it off the loop)."""
    groups: dict[str, list[tuple[int, str, int, float]]] = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in logs_dir.iterdir():
            m = LOG_NAME.match(entry.name)
            if m is None:
                continue
            with contextlib.suppress(OSError):
                st = entry.stat()
                if entry.is_file():
                    n = int(m["n"] or 0)
                    groups.setdefault(m["base"], []).append(
                        (n, entry.name, st.st_size, st.st_mtime)
                    )
    out = []
    for base in sorted(groups):
        files = sorted(groups[base])
        out.append(
            {
                "name": base,
                "bytes": sum(f[2] for f in files),
                "files": [{"name": f[1], "bytes": f[2], "modified": f[3]} for f in files],
            }
        )
    return out
