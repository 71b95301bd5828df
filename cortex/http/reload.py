"""Hot reload: cortex.toml and its catalogue, re-read on SIGHUP or (`watch_config`) when
either changes on disk.

The whole new config is read and checked before anything is applied: the files
parse, every key and model is valid, and `cortex check` finds no problem. A bad
edit changes nothing: one log line naming the file and key, an event in the log,
and `/admin/state` and `cortex doctor` show it until a good edit replaces it.
A good edit is applied at once:
- the catalogue through the lifecycle, the one owner of every model's life
  (`Lifecycle.reload_catalogue`): a new model is servable by the next request, a
  removed one takes no new request and each copy is unloaded once its requests
  end, a changed `replicas` or `pinned_on` converges on the reconciler's next pass;
- API keys and the admin token, for the next request;
- any other key of cortex.toml that changed needs a restart: it is named, not applied.
Nothing a reload does touches a request in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
from aiohttp import web

from cortex.config import CONFIG, CortexConfig, catalogue_problems
from cortex.http.auth import AUTH
from cortex.metrics import METRICS
from cortex.run.lifecycle import LIFECYCLE
from shared.catalogue import Catalogue
from shared.config import ConfigError

log = logging.getLogger(__name__)

# What a reload applies; every other key of cortex.toml needs a restart.
RELOADABLE = frozenset({"api_keys", "admin_token", "catalogue"})


@attrs.frozen
class Outcome:
    """One reload: applied (what changed) or refused (why), and the keys left for a restart."""

    ok: bool
    at: float  # wall
    why: str  # "SIGHUP", "file changed", ...
    detail: str
    restart_keys: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self, recurse=False) | {"restart_keys": list(self.restart_keys)}


def read(path: Path) -> tuple[CortexConfig, Catalogue]:
    """The new config and catalogue, checked whole; ConfigError says what is wrong."""
    try:
        config = CortexConfig.from_file(path)
        catalogue = Catalogue.load(config.catalogue)
    except (OSError, ValueError) as exc:  # a ConfigError already names file and key
        raise ConfigError(f"{path}: {exc}") from exc
    problems = catalogue_problems(config, catalogue)
    if problems:
        raise ConfigError(f"{config.catalogue}: {'; '.join(problems)}")
    return config, catalogue


def restart_keys(running: CortexConfig, new: CortexConfig) -> tuple[str, ...]:
    """The keys of cortex.toml that changed and only a restart applies."""
    return tuple(
        f.name
        for f in attrs.fields(CortexConfig)
        if f.name not in RELOADABLE and getattr(running, f.name) != getattr(new, f.name)
    )


def _changes(added: list[str], removed: list[str], changed: list[str], keys: bool) -> str:
    parts = [
        f"{what}: {', '.join(ids)}"
        for what, ids in (("added", added), ("removed", removed), ("changed", changed))
        if ids
    ]
    if keys:
        parts.append("API keys or admin token changed")
    return "; ".join(parts) or "nothing changed"


@attrs.define
class Reloader:
    """Applies reloads to a running app; `problem` is the refused edit still on disk."""

    path: Path
    app: web.Application
    # The config in force: what cortex started with, plus what reloads applied.
    running: CortexConfig
    last: Outcome | None = None
    problem: Outcome | None = None
    reloads: int = 0
    _lock: asyncio.Lock = attrs.Factory(asyncio.Lock)

    async def reload(self, why: str) -> Outcome:
        """Read, check, then apply; one at a time (a burst of edits is read in turn)."""
        async with self._lock:
            try:
                config, catalogue = await asyncio.to_thread(read, self.path)
            except ConfigError as exc:
                return self._refused(why, str(exc))
            return self._apply(why, config, catalogue)

    def _refused(self, why: str, detail: str) -> Outcome:
        out = Outcome(ok=False, at=time.time(), why=why, detail=detail)
        log.error("config reload (%s) refused, the running config stays: %s", why, detail)
        self.app[LIFECYCLE].event(None, "config refused", detail)
        self.last = self.problem = out
        return out

    def _apply(self, why: str, config: CortexConfig, catalogue: Catalogue) -> Outcome:
        auth = self.app[AUTH]
        keys = (auth.keys, auth.admin_token) != (config.api_keys, config.admin_token)
        auth.keys, auth.admin_token = config.api_keys, config.admin_token
        self.app[METRICS].add_models(m.id for m in catalogue.models)
        added, removed, changed = self.app[LIFECYCLE].reload_catalogue(catalogue)
        later = restart_keys(self.running, config)
        self.running = attrs.evolve(
            self.running,
            api_keys=config.api_keys,
            admin_token=config.admin_token,
            catalogue=config.catalogue,
        )
        detail = _changes(added, removed, changed, keys)
        if later:
            detail += f"; needs a restart to apply: {', '.join(later)}"
        out = Outcome(ok=True, at=time.time(), why=why, detail=detail, restart_keys=later)
        log.info("config reloaded (%s): %s", why, detail)
        self.app[LIFECYCLE].event(None, "config reloaded", detail)
        self.reloads += 1
        self.last, self.problem = out, None
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "reloads": self.reloads,
            "last": None if self.last is None else self.last.to_json(),
            "problem": None if self.problem is None else self.problem.to_json(),
        }


RELOADER = web.AppKey("reloader", Reloader)


async def _watch(reloader: Reloader) -> None:
    """Reload when cortex.toml or the catalogue changes (editors write in bursts: watchfiles
    debounces them into one change)."""
    from watchfiles import awatch

    while True:
        paths = _watched(reloader)
        # Folders, not files: an editor that saves by rename replaces the file.
        folders = sorted({str(p.parent) for p in paths})
        stop = asyncio.Event()
        async for batch in awatch(*folders, stop_event=stop, debounce=300):
            if _touches(batch, paths):
                await reloader.reload("file changed")
                if _watched(reloader) != paths:
                    stop.set()  # the catalogue moved: watch its new folder


def _touches(batch: set[tuple[Any, str]], paths: set[Path]) -> bool:
    return any(Path(p).resolve() in paths for _, p in batch)


def _watched(reloader: Reloader) -> set[Path]:
    return {reloader.path.resolve(), Path(reloader.running.catalogue).resolve()}


def setup(app: web.Application, path: str | Path) -> None:
    """Reload `path` (the cortex.toml this app was made from) on SIGHUP, and on change
    when `watch_config` is set; `cortex serve` calls this (tests embedding the app do not)."""
    app[RELOADER] = reloader = Reloader(Path(path), app, app[CONFIG])

    async def reloads(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(
            signal.SIGHUP, lambda: asyncio.ensure_future(reloader.reload("SIGHUP"))
        )
        watch = (
            asyncio.create_task(_watch(reloader), name="cortex config watch")
            if app[CONFIG].watch_config
            else None
        )
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
            if watch is not None:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watch

    app.cleanup_ctx.append(reloads)
