"""The stages this neuron accepted and has not finished, kept on disk for a restart.

One small JSON file in the store (`stage-wishes.json`), rewritten whole as a
temporary file, fsynced and renamed into place, so a kill at any moment leaves
the old list or the new one, never half of one. A stage's entry is written when
the stage is accepted and dropped when it completes, when a caller cancels it
(POST /store/cancel, an unload), or when it fails in a way a retry would repeat.
A neuron killed or stopped mid-stage keeps the entry, and so does a stage the
disk cut short; the next start resumes them from their `.part` files.

Writes run off the event loop, one at a time: each writes the list as it is
then, so several changes in a row cost one write and the last one always lands.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs

from neuron.store.sources import COPY_NAME, copy_name, is_local_source

log = logging.getLogger(__name__)

WISHES_FILE = "stage-wishes.json"
VERSION = 1


@attrs.frozen
class StageWish:
    """One accepted stage: enough to start it again (what, from where, for which model)."""

    model_id: str
    source: str
    peers: tuple[str, ...] = ()
    accepted_at: float = attrs.Factory(time.time)

    @property
    def name(self) -> str:
        return copy_name(self.source)

    def to_json(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "source": self.source,
            "peers": list(self.peers),
            "accepted_at": self.accepted_at,
        }

    @classmethod
    def from_json(cls, d: Any) -> StageWish:
        """Strictly: the file is ours, but a bad entry must not start a stage of anything."""
        if not isinstance(d, dict):
            raise ValueError("an entry is not an object")
        model_id, source, peers = d.get("model_id"), d.get("source"), d.get("peers")
        if not isinstance(model_id, str) or not model_id:
            raise ValueError("an entry has no model_id")
        if not isinstance(source, str) or is_local_source(source):
            raise ValueError(f"an entry's source {str(source)[:200]!r} is not a hub repo")
        if not COPY_NAME.match(copy_name(source)):
            raise ValueError(f"an entry's source {source[:200]!r} names no copy")
        if not isinstance(peers, list) or not all(
            isinstance(p, str) and p.startswith(("http://", "https://")) for p in peers
        ):
            raise ValueError(f"the peers of {source!r} are not a list of URLs")
        at = d.get("accepted_at")
        at = float(at) if isinstance(at, int | float) and not isinstance(at, bool) else 0.0
        return cls(model_id=model_id, source=source, peers=tuple(peers), accepted_at=at)


@attrs.define
class StageWishes:
    """The store's list of unfinished stages, by copy name; one writer (the event loop)."""

    path: Path
    _wishes: dict[str, StageWish] = attrs.Factory(dict)
    _dirty: bool = False
    _writer: asyncio.Task[None] | None = None

    def load(self) -> list[StageWish]:
        """The entries a previous run left (blocking: at startup, off the loop)."""
        try:
            body = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("stage wishes in %s unreadable, none resumed: %s", self.path, exc)
            return []
        entries = body.get("stages") if isinstance(body, dict) else None
        for raw in entries if isinstance(entries, list) else ():
            try:
                wish = StageWish.from_json(raw)
            except ValueError as exc:
                log.warning("stage wishes in %s: an entry skipped: %s", self.path, exc)
                continue
            self._wishes[wish.name] = wish
        return list(self._wishes.values())

    def __contains__(self, name: object) -> bool:
        return name in self._wishes

    def get(self, name: str) -> StageWish | None:
        return self._wishes.get(name)

    def put(self, wish: StageWish) -> None:
        self._wishes[wish.name] = wish
        self._save()

    def drop(self, name: str) -> None:
        if self._wishes.pop(name, None) is not None:
            self._save()

    async def flush(self) -> None:
        """Wait until the file says what the list says now."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)

    def _save(self) -> None:
        self._dirty = True
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(
                self._write_loop(), name="stage wishes"
            )

    async def _write_loop(self) -> None:
        while self._dirty:
            self._dirty = False
            body = {"version": VERSION, "stages": [w.to_json() for w in self._wishes.values()]}
            try:
                await asyncio.to_thread(_write_atomic, self.path, body)
            except OSError as exc:  # a full disk: the stages still run, a restart forgets
                log.warning("stage wishes not saved to %s: %s", self.path, exc.strerror or exc)


def _write_atomic(path: Path, body: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
