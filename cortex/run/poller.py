"""Health polling: every neuron concurrently, each call with its own timeout.

A node turns unhealthy only after `failure_threshold` failed polls in a row and
one good poll restores it; a node never heard from starts unhealthy. A proxied
request that cannot connect reports here at once (passive health). A node that
answers `draining` (SIGTERM, a restart) is out of routing but not lost: the
streams it holds go on until it is gone (its polls fail) or says otherwise.

One GET /status per node and interval (health, models and staged copies in one
answer) with the last ETag in If-None-Match: an unchanged node answers 304 with
no body and costs no parsing. A neuron without /status (404: an older version)
is polled the old way, /health + /models + /store/storage, until it restarts.

A node that answers 401 or 403 refuses cortex's fleet token: a `stranger`,
never routed to nor loaded, until it answers as one of the fleet.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import attrs
from aiohttp import web
from yarl import URL

from cortex.core.state import Fleet, NodeState
from cortex.run.status_client import StatusClient, StatusError, Unsupported
from shared.wire import Discovery, ModelStatus, NodeHealth

# What a poll may fail on while reading an answer's fields.
_BAD = (AttributeError, KeyError, TypeError, ValueError)

log = logging.getLogger(__name__)

# Called after every change of a node's health record (metrics, logs).
Listener = Callable[[NodeState], None]


class PollError(Exception):
    """A neuron endpoint that did not answer usefully."""


class Refused(PollError):
    """The neuron refused cortex's fleet token (401/403): not this fleet's node."""


# What a neuron answers a request whose fleet token it does not hold.
REFUSED = (401, 403)


def refusal(status: int) -> str:
    return f"refuses this cortex's fleet token (HTTP {status}): run `neuron join` on it"


class NoStatus(Exception):
    """GET /status answered, but not 200/304 (`status` 404: a neuron without it)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


@attrs.frozen
class Seen:
    """A node's last /status answer, parsed: what a 304 repeats."""

    etag: str
    # Monotonic start of the poll that read it.
    read_at: float
    health: NodeHealth
    statuses: tuple[ModelStatus, ...] | None
    staged: frozenset[str] | None


@attrs.define
class Poller:
    fleet: Fleet
    session: aiohttp.ClientSession
    interval_s: float = 2.0
    timeout_s: float = 1.5
    listeners: list[Listener] = attrs.field(factory=list)
    # Requests in flight at once; a call's timeout starts once it has a slot, so a
    # big fleet queues here instead of timing out in the connection pool.
    concurrency: int = 128
    # Called with each round's wall time (the metric cortex_poll_round_seconds).
    on_round: Callable[[float], None] | None = None
    _slots: asyncio.Semaphore | None = attrs.field(default=None, init=False)
    _seen: dict[str, Seen] = attrs.field(factory=dict, init=False)
    # Nodes that answered 404 on /status (older neurons), until they restart.
    _legacy: set[str] = attrs.field(factory=set, init=False)
    _urls: dict[str, URL] = attrs.field(factory=dict, init=False)
    # GET /status's own light client (plain http); aiohttp for everything else.
    _client: StatusClient | None = attrs.field(default=None, init=False)

    def close(self) -> None:
        """Close the kept-alive /status connections (the session is the caller's)."""
        if self._client is not None:
            self._client.close()

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
        started = time.monotonic()
        await asyncio.gather(*(self._poll_member(name) for name in self.fleet.names))
        if self.on_round is not None:
            self.on_round(time.monotonic() - started)

    async def _poll_member(self, name: str) -> None:
        try:
            await self.poll_node(name)
        except KeyError:
            if name in self.fleet.names:
                raise
            # It left the poll set (a discovered node gone for good) while being polled.

    def forget(self, name: str) -> None:
        """`name` left the poll set: nothing cached of it may outlive it."""
        self._seen.pop(name, None)
        self._legacy.discard(name)
        url = self.fleet.node(name).url if name in self.fleet.names else None
        if url is not None:
            self._urls.pop(url, None)

    def uses_status(self, name: str) -> bool:
        """False for a node polled the old way (it answered 404 on /status)."""
        return name not in self._legacy

    async def poll_node(self, name: str) -> NodeState:
        if name not in self._legacy:
            try:
                return await self._poll_status(name)
            except NoStatus as exc:
                if exc.status in REFUSED:
                    return self._refused(name, refusal(exc.status))
                if exc.status == 404:
                    log.info(
                        "node %s has no /status (an older neuron): polling it the old way", name
                    )
                    self._legacy.add(name)
                # Any other answer: this round the old way, whose calls say what is wrong.
        return await self._poll_legacy(name)

    async def _poll_status(self, name: str) -> NodeState:
        node = self.fleet.node(name)
        started = time.monotonic()
        seen = self._seen.get(name)
        try:
            got = await self._get_status(node.url, None if seen is None else seen.etag)
        except PollError as exc:
            return self._failed(node, f"/status: {exc}")
        if got is None and seen is not None:
            if _rediscover(node, seen.health):
                return await self._succeeded(node, seen.health, started, seen.statuses, seen.staged)
            new = self.fleet.poll_unchanged(
                name,
                seen.health,
                started=started,
                read_at=seen.read_at,
                statuses=seen.statuses,
                staged=seen.staged,
            )
            return self._notify(node, new)
        assert got is not None  # a 304 only answers an ETag sent
        etag, body = got
        try:
            health = NodeHealth.from_json(body["health"])
        except _BAD as exc:
            self._seen.pop(name, None)
            return self._failed(node, f"/status health: {exc}")
        statuses: tuple[ModelStatus, ...] | None
        try:
            statuses = tuple(ModelStatus.from_json(m) for m in body["models"])
        except _BAD as exc:
            # Health answered, so the node is up; keep the model list we had.
            log.debug("poll of %s: /status models unreadable: %s", name, exc)
            statuses = None
        staged = _parse_staged(body.get("staged") if isinstance(body, dict) else None)
        if etag and statuses is not None and staged is not None:
            self._seen[name] = Seen(etag, started, health, statuses, staged)
        else:
            self._seen.pop(name, None)
        return await self._succeeded(node, health, started, statuses, staged)

    async def _poll_legacy(self, name: str) -> NodeState:
        node = self.fleet.node(name)
        started = time.monotonic()
        # The three calls at once; /health decides, so only its failure cancels the others.
        failed: Exception | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                health_t = tg.create_task(self._health(node.url))
                models_t = tg.create_task(_caught(self._get(node.url, "/models")))
                staged_t = tg.create_task(_settle(self._get(node.url, "/store/storage")))
        except* (PollError, *_BAD) as group:
            failed = group.exceptions[0]
        if failed is not None:
            return self._failed(node, f"/health: {failed}")
        health = health_t.result()
        if isinstance(models_t.result(), Refused):
            # /health is open to anyone; /models tells whether the token is ours.
            return self._refused(name, str(models_t.result()))
        if (
            name in self._legacy
            and node.health is not None
            and node.health.started_at != health.started_at
        ):
            # A restart may be an upgrade: ask for /status again next round.
            self._legacy.discard(name)
        statuses = _statuses(name, models_t.result())
        staged = _parse_staged(staged_t.result())
        return await self._succeeded(node, health, started, statuses, staged)

    async def _health(self, base: str) -> NodeHealth:
        return NodeHealth.from_json(await self._get(base, "/health"))

    def _refused(self, name: str, reason: str) -> NodeState:
        old = self.fleet.node(name)
        self._seen.pop(name, None)
        if not old.stranger:
            log.warning("node %s is a %s", name, reason)
        return self._notify(old, self.fleet.poll_refused(name, reason))

    def _failed(self, node: NodeState, reason: str) -> NodeState:
        new = self.fleet.poll_failed(node.name, reason)
        log.debug("poll of %s failed (%d in a row): %s", node.name, new.failures, reason)
        return self._notify(node, new)

    async def _succeeded(
        self,
        node: NodeState,
        health: NodeHealth,
        started: float,
        statuses: tuple[ModelStatus, ...] | None,
        staged: frozenset[str] | None,
    ) -> NodeState:
        name = node.name
        discovery = None
        if _rediscover(node, health):
            try:
                discovery = Discovery.from_json(await self._get(node.url, "/discovery"))
            except (PollError, *_BAD) as exc:
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
        if new.draining and not old.draining:
            log.info("node %s is draining: no new requests, its streams go on", new.name)
        elif old.healthy != new.healthy:
            if new.healthy:
                log.info("node %s is healthy", new.name)
            else:
                log.warning("node %s is unhealthy: %s", new.name, new.last_error)
        for listener in self.listeners:
            listener(new)
        return new

    def _slot(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(max(1, self.concurrency))
        return self._slots

    async def _get(self, base: str, path: str) -> Any:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with self._slot():
            try:
                async with self.session.get(base.rstrip("/") + path, timeout=timeout) as resp:
                    if resp.status in REFUSED:
                        raise Refused(refusal(resp.status))
                    if resp.status != 200:
                        raise PollError(f"HTTP {resp.status}")
                    # Bytes straight to json: no charset sniffing of the text.
                    return json.loads(await resp.read())
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                raise PollError(str(exc) or type(exc).__name__) from exc

    async def _get_status(self, base: str, etag: str | None) -> tuple[str, Any] | None:
        """(ETag, body) of GET /status; None for 304 Not Modified."""
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        headers = None if etag is None else {"If-None-Match": etag}
        if self._client is None:
            self._client = StatusClient(authorization=self.session.headers.get("Authorization"))
        async with self._slot():
            try:
                answer = await self._client.get(base, etag, self.timeout_s)
            except Unsupported:
                answer = None  # https, or an odd answer: aiohttp below
            except StatusError as exc:
                raise PollError(str(exc)) from exc
        if answer is not None:
            if answer.status == 304 and etag is not None:
                return None
            if answer.status != 200:
                raise NoStatus(answer.status)
            try:
                return answer.etag, json.loads(answer.body)
            except ValueError as exc:
                raise PollError(f"unreadable JSON: {exc}") from exc
        url = self._urls.get(base)
        if url is None:
            # Parsed once per node: yarl's parse was a visible share of a poll's CPU.
            url = self._urls[base] = URL(base.rstrip("/") + "/status")
        async with self._slot():
            try:
                async with self.session.get(url, timeout=timeout, headers=headers) as resp:
                    if resp.status == 304 and etag is not None:
                        return None
                    if resp.status != 200:
                        raise NoStatus(resp.status)
                    return resp.headers.get("ETag", ""), json.loads(await resp.read())
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                raise PollError(str(exc) or type(exc).__name__) from exc


def _rediscover(node: NodeState, health: NodeHealth) -> bool:
    """No discovery yet, or a new node or a restart: what it is may have changed."""
    d = node.discovery
    return d is None or d.node_id != health.node_id or d.started_at != health.started_at


async def _settle(task: Awaitable[Any]) -> Any:
    try:
        return await task
    except PollError:
        return None


async def _caught(call: Awaitable[Any]) -> Any:
    """`call`'s answer, or the PollError it raised (for the caller to judge)."""
    try:
        return await call
    except PollError as exc:
        return exc


def _statuses(name: str, body: Any) -> tuple[ModelStatus, ...] | None:
    """The models a legacy /models answered; None (keep the list we had) if unreadable."""
    try:
        if isinstance(body, PollError):
            raise body
        return tuple(ModelStatus.from_json(m) for m in body["models"])
    except (PollError, *_BAD) as exc:
        # Health answered, so the node is up; keep the model list we had.
        log.debug("poll of %s: /models unreadable: %s", name, exc)
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


# Where the app keeps the poller and the fleet store it alone fills.
POLLER = web.AppKey("poller", Poller)
FLEET = web.AppKey("fleet", Fleet)
