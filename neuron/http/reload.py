"""SIGHUP: re-read neuron.toml and apply what is safe without a restart.

Safe, and applied at once: `[admission]` (the limits of every model, running or
not: a larger one admits queued requests now, a smaller one lets running ones
finish), `model_roots`, and `[runner]`, `[restart]` (for runners started from
now on; a running runner keeps the settings it started with). Every other key
that changed needs a restart: it is named in the log, not applied. A file that
does not read or check keeps the running config, with one ERROR line naming the
file and key. Nothing a reload does touches a request in flight.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
from aiohttp import web

from neuron.config import NeuronConfig
from neuron.http.app import CONFIG, STORE, SUPERVISOR
from shared.config import ConfigError

log = logging.getLogger(__name__)

SAFE = frozenset({"admission", "model_roots", "runner", "restart"})


def restart_keys(running: NeuronConfig, new: NeuronConfig) -> tuple[str, ...]:
    """The keys that changed and only a restart applies."""
    return tuple(
        f.name
        for f in attrs.fields(NeuronConfig)
        if f.name not in SAFE and getattr(running, f.name) != getattr(new, f.name)
    )


def apply(app: web.Application, running: NeuronConfig, new: NeuronConfig) -> NeuronConfig:
    """Apply `new`'s safe keys to the app; the config in force after it."""
    supervisor = app[SUPERVISOR]
    a = new.admission
    for m in supervisor.models.values():
        m.admission.resize(a.max_in_flight, a.max_queue, a.queue_timeout_s)
    app[STORE].model_roots = tuple(Path(r).expanduser() for r in new.model_roots)
    now = attrs.evolve(
        running,
        admission=new.admission,
        model_roots=new.model_roots,
        runner=new.runner,
        restart=new.restart,
    )
    supervisor.config = now  # new models and runners start with these
    return now


def setup(app: web.Application, path: str | Path, **overrides: Any) -> None:
    """Reload `path` (this neuron's config file) on SIGHUP; `neuron serve` calls this,
    with the settings its command line overrides (kept over the file's)."""
    running = [app[CONFIG]]

    def reload() -> None:
        try:
            new = attrs.evolve(NeuronConfig.from_file(path), **overrides)
        except (ConfigError, OSError, ValueError) as exc:
            log.error("config reload refused, the running config stays: %s", exc)
            return
        later = restart_keys(running[0], new)
        running[0] = apply(app, running[0], new)
        tail = f"; needs a restart to apply: {', '.join(later)}" if later else ""
        log.info("config reloaded from %s: admission, model_roots, runner, restart%s", path, tail)

    async def on_hup(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, reload)
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGHUP)

    app.cleanup_ctx.append(on_hup)
