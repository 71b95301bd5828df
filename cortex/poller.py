"""Health polling: every neuron concurrently, each call with its own timeout.

A node turns unhealthy only after `failure_threshold` failed polls in a row and
one good poll restores it; a node never heard from starts unhealthy. A proxied
request that cannot connect reports here at once (passive health).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import attrs

from cortex.state import Fleet, NodeState
from shared.wire import Discovery, ModelStatus, NodeHealth

log = logging.getLogger(__name__)

# Called after every change of a node's health record (metrics, logs).
Listener = Callable[[NodeState], None]


class PollError(Exception):
    """A neuron endpoint that did not answer usefully."""


@attrs.define
class Poller:
    fleet: Fleet
    session: aiohttp.ClientSession
    interval_s: float = 2.0
    timeout_s: float = 1.5
    listeners: list[Listener] = attrs.field(factory=list)

    async def run(self) -> None:
        """Poll forever; meant to run as a background task."""
        while True:
            started = time.monotonic()
            try:
                await self.poll_once()
            except Exception:  # one bad answer must not end polling
                log.exception("poll round failed")
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def poll_once(self) -> None:
        """One round over every node; one slow node never delays another."""
        await asyncio.gather(*(self.poll_node(name) for name in self.fleet.names))

    async def poll_node(self, name: str) -> NodeState:
        node = self.fleet.node(name)
        started = time.monotonic()
        health_t = asyncio.ensure_future(self._get(node.url, "/health"))
        models_t = asyncio.ensure_future(self._get(node.url, "/models"))
        staged_t = asyncio.ensure_future(self._get(node.url, "/store/storage"))
        try:
            health = NodeHealth.from_json(await health_t)
        except (PollError, AttributeError, KeyError, TypeError, ValueError) as exc:
            for t in (models_t, staged_t):
                t.cancel()
            await asyncio.gather(models_t, staged_t, return_exceptions=True)
            reason = f"/health: {exc}"
            new = self.fleet.poll_failed(name, reason)
            log.debug("poll of %s failed (%d in a row): %s", name, new.failures, reason)
            return self._notify(node, new)
        statuses: list[ModelStatus] | None
        try:
            statuses = [ModelStatus.from_json(m) for m in (await models_t)["models"]]
        except (PollError, AttributeError, KeyError, TypeError, ValueError) as exc:
            # Health answered, so the node is up; keep the model list we had.
            log.debug("poll of %s: /models unreadable: %s", name, exc)
            statuses = None
        staged = _parse_staged(await _settle(staged_t))
        discovery = None
        if (
            node.discovery is None
            or node.discovery.node_id != health.node_id
            or node.discovery.started_at != health.started_at
        ):
            # New node or a restart: what it is may have changed (memory, version).
            try:
                discovery = Discovery.from_json(await self._get(node.url, "/discovery"))
            except (PollError, AttributeError, KeyError, TypeError, ValueError) as exc:
                log.warning("discovery of %s unreadable: %s", name, exc)
        new = self.fleet.poll_succeeded(
            name, health, started=started, statuses=statuses, discovery=discovery, staged=staged
        )
        return self._notify(node, new)

    def record_failure(self, name: str, reason: str, *, fatal: bool = True) -> NodeState:
        """Passive health: a proxied request could not reach `name`."""
        old = self.fleet.node(name)
        new = self.fleet.passive_failure(name, reason, fatal=fatal)
        log.warning("passive failure on %s: %s", name, reason)
        return self._notify(old, new)

    def _notify(self, old: NodeState, new: NodeState) -> NodeState:
        if old.healthy != new.healthy:
            if new.healthy:
                log.info("node %s is healthy", new.name)
            else:
                log.warning("node %s is unhealthy: %s", new.name, new.last_error)
        for listener in self.listeners:
            listener(new)
        return new

    async def _get(self, base: str, path: str) -> Any:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with self.session.get(base.rstrip("/") + path, timeout=timeout) as resp:
                if resp.status != 200:
                    raise PollError(f"HTTP {resp.status}")
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise PollError(str(exc) or type(exc).__name__) from exc


async def _settle(task: asyncio.Future[Any]) -> Any:
    try:
        return await task
    except PollError:
        return None


def _parse_staged(body: Any) -> frozenset[str] | None:
    """Sources with a staged copy on the node, from GET /store/storage if it answered.

    The store names a hub copy "org--name" after its repo id; local paths count too.
    """
    if body is None:
        return None
    entries = body
    if isinstance(body, dict):
        # "staged": the complete copies (a neuron also lists stages under way and
        # partial copies, which no load may count on yet).
        entries = body.get("staged")
        if entries is None:
            entries = next((v for v in body.values() if isinstance(v, list)), [])
    if not isinstance(entries, list):
        return None
    ids = set()
    for e in entries:
        if isinstance(e, dict):
            name, path = e.get("name"), e.get("path")
            if isinstance(name, str):
                ids.update({name, name.replace("--", "/", 1)})
            if isinstance(path, str):
                ids.add(path)
        elif isinstance(e, str):
            ids.add(e)
    return frozenset(ids)
