"""Discovery: neurons that announce themselves over mDNS join the poll set on proof.

With `discover = true` cortex browses DNS-SD for `_cortex-neuron._tcp.local.`.
An announcement is unauthenticated multicast, so an announced neuron is first
asked to prove it holds this cortex's fleet token (GET /fleet/proof, sent
without the token; shared.fleet_discovery). One that proves it is added to the
poll set (a "member", named after the node); one that cannot (it holds another
token, none while cortex has one, or is too old to answer) is a `stranger`:
listed in /admin/state and `cortex status`, never polled with the token, never
routed to or loaded. Strangers are asked again now and then, and at once when
they announce anew (after `neuron join` and a restart, they become members).

Nodes already in the poll set some other way ([[neurons]]) win a conflict: an
announcement with their node id or their address is ignored. A member that
has not answered for `discover_forget_s` leaves the poll set (a goodbye alone
does not remove a node that still answers; a crash sends no goodbye).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
import attrs
from aiohttp import web

from cortex.config import CONFIG, CortexConfig
from cortex.core.state import Fleet, NodeState
from cortex.run.lifecycle import LIFECYCLE
from cortex.run.poller import FLEET, POLLER, Poller
from shared.fleet_discovery import (
    PROOF_PATH,
    SERVICE_TYPE,
    Announcement,
    parse_txt,
    proof,
)

if TYPE_CHECKING:  # zeroconf is imported only by a cortex that discovers
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

log = logging.getLogger(__name__)

Kind = Literal["member", "stranger", "unreachable"]
# How long mDNS may take to answer for one announced service's records.
RESOLVE_TIMEOUT_MS = 3000
# A stranger is asked again this often (and at once when it announces anew).
RECHECK_S = 10.0
Event = Callable[..., None]


@attrs.frozen
class Verdict:
    kind: Kind
    url: str
    reason: str = ""


@attrs.frozen
class Known:
    """A node in the poll set that discovery does not own ([[neurons]])."""

    name: str
    url: str
    node_id: str | None


def _url_key(url: str) -> str:
    return url.rstrip("/").lower()


def claimed(ann: Announcement, known: Iterable[Known]) -> Known | None:
    """The poll-set node an announcement is (same node id, or same address and port):
    that entry wins, and the announcement is ignored."""
    urls = {_url_key(u) for u in ann.urls}
    for k in known:
        if k.node_id == ann.node_id or _url_key(k.url) in urls:
            return k
    return None


def choose_name(desired: str, node_id: str, taken: Iterable[str]) -> str:
    """The node's own name if free, else suffixed with its id: names never change hands."""
    used = set(taken)
    if desired not in used:
        return desired
    return f"{desired}-{node_id[:6]}"


def judge(
    status: int, body: Any, *, token: str | None, nonce: str, node_id: str, url: str
) -> Verdict:
    """What a GET /fleet/proof answer says of the neuron at `url` (pure)."""
    if status == 404:
        return Verdict(
            "stranger", url, "cannot show the fleet token (an older neuron): list it in [[neurons]]"
        )
    if status != 200 or not isinstance(body, dict):
        return Verdict("unreachable", url, f"{PROOF_PATH} answered HTTP {status}")
    said = body.get("node_id")
    if said != node_id:
        return Verdict("stranger", url, f"answers as node {said!r}, not the announced {node_id!r}")
    has_token = body.get("token") is True
    if token is None:
        if has_token:
            return Verdict("stranger", url, "holds a fleet token; this cortex has none")
        return Verdict("member", url)
    if not has_token:
        return Verdict("stranger", url, "has no fleet token: run `neuron join` on it")
    host, _, port = url.removeprefix("http://").rpartition(":")
    expected = proof(token, nonce=nonce, node_id=node_id, host=host.strip("[]"), port=int(port))
    given = body.get("proof")
    if isinstance(given, str) and hmac.compare_digest(expected, given):
        return Verdict("member", url)
    return Verdict("stranger", url, "holds another fleet token: run `neuron join` on it")


async def prove(
    session: aiohttp.ClientSession, ann: Announcement, token: str | None, timeout_s: float
) -> Verdict:
    """Ask each announced address in turn; the first that answers decides."""
    reason = "no address answered"
    for url in ann.urls:
        nonce = secrets.token_hex(16)
        try:
            async with session.get(
                url + PROOF_PATH,
                params={"nonce": nonce},
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                allow_redirects=False,
            ) as resp:
                body = await resp.json(content_type=None) if resp.status == 200 else None
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            reason = f"{url}: {exc or type(exc).__name__}"
            continue
        return judge(status, body, token=token, nonce=nonce, node_id=ann.node_id, url=url)
    return Verdict("unreachable", ann.urls[0] if ann.urls else "", reason)


@attrs.define
class Member:
    """A discovered node in the poll set, under the name cortex gave it."""

    node_id: str
    name: str
    url: str
    # Wall clock it joined (it counts as heard from then, until its first poll).
    since: float


@attrs.define
class Outsider:
    """An announced node not in the poll set: a stranger, or one not reached yet."""

    ann: Announcement
    verdict: Verdict
    # Monotonic time of the last proof asked.
    checked_at: float


@attrs.define
class Discoverer:
    """What mDNS says (heard/withdrawn), turned into poll-set changes by `step`."""

    fleet: Fleet
    poller: Poller
    config: Callable[[], CortexConfig]
    session: aiohttp.ClientSession | None = None
    # lifecycle.event(model_id, what, detail, node=...): the event log.
    event: Event | None = None
    members: dict[str, Member] = attrs.field(factory=dict)
    outsiders: dict[str, Outsider] = attrs.field(factory=dict)
    _heard: dict[str, Announcement] = attrs.field(factory=dict)
    _wake: asyncio.Event = attrs.field(factory=asyncio.Event)

    # -- what the browser reports ---------------------------------------------------

    def heard(self, ann: Announcement) -> None:
        self._heard[ann.service] = ann
        old = self.outsiders.get(ann.service)
        if old is not None and old.ann != ann:
            # Announced anew (a restart, after `neuron join`): ask again at once.
            self.outsiders[ann.service] = attrs.evolve(old, ann=ann, checked_at=float("-inf"))
        self._wake.set()

    def withdrawn(self, service: str) -> None:
        self._heard.pop(service, None)
        # A stranger is listed while it announces; a member stays while it answers.
        self.outsiders.pop(service, None)
        self._wake.set()

    # -- the loop -------------------------------------------------------------------

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config().poll_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.step()
            except Exception:  # one bad round must not end discovery
                log.exception("discovery round failed")

    async def step(self) -> None:
        """Yield to configured nodes, admit what proves itself, forget what is gone."""
        self._yield_to_known()
        await self._admit()
        self._forget_gone()

    def _known(self) -> list[Known]:
        mine = {m.name for m in self.members.values()}
        out = []
        for name in self.fleet.names:
            if name not in mine:
                n = self.fleet.node(name)
                out.append(Known(name, n.url, None if n.discovery is None else n.discovery.node_id))
        return out

    def _unheard(self, name: str) -> bool:
        n = self.fleet.node(name)
        return n.discovery is None and not n.seen and n.failures < self.fleet.threshold

    def _yield_to_known(self) -> None:
        known = self._known()
        ids = {k.node_id for k in known}
        urls = {_url_key(k.url) for k in known}
        for m in list(self.members.values()):
            if m.node_id in ids or _url_key(m.url) in urls:
                self._drop(m, "a configured node is the same node")

    async def _admit(self) -> None:
        known = self._known()
        if any(self._unheard(k.name) for k in known):
            # A configured node's id is not known yet: an announcement may be that very
            # node (under another address), and must not join twice. Its first polls
            # settle it (or give it up) within a few poll intervals.
            return
        now = time.monotonic()
        due = []
        for ann in self._heard.values():
            member = self.members.get(ann.node_id)
            if member is not None and member.url in ann.urls:
                self.outsiders.pop(ann.service, None)
                continue
            if claimed(ann, known) is not None:
                self.outsiders.pop(ann.service, None)
                continue
            old = self.outsiders.get(ann.service)
            if (
                old is None
                or old.verdict.kind == "unreachable"
                or now - old.checked_at >= RECHECK_S
            ):
                due.append(ann)
        if not due:
            return
        cfg = self.config()
        session = self.session
        assert session is not None, "Discoverer.session is set before its first step"
        verdicts = await asyncio.gather(
            *(prove(session, a, cfg.fleet_token, cfg.poll_timeout_s) for a in due)
        )
        for ann, verdict in zip(due, verdicts, strict=True):
            if ann.service not in self._heard:
                continue  # withdrawn while we asked
            if verdict.kind == "member":
                self.outsiders.pop(ann.service, None)
                await self._join(ann, verdict.url)
            else:
                self._outsider(ann, verdict, now)

    def _outsider(self, ann: Announcement, verdict: Verdict, now: float) -> None:
        old = self.outsiders.get(ann.service)
        self.outsiders[ann.service] = Outsider(ann, verdict, now)
        if verdict.kind == "stranger" and (old is None or old.verdict != verdict):
            log.warning("stranger %s at %s: %s", ann.name, verdict.url, verdict.reason)
            self._note("stranger", f"{verdict.url} (node id {ann.node_id}): {verdict.reason}")

    async def _join(self, ann: Announcement, url: str) -> None:
        moved = self.members.get(ann.node_id)
        if moved is not None:
            self._drop(moved, f"it moved to {url}")
        taken = set(self.fleet.names)
        name = choose_name(ann.name, ann.node_id, taken) if moved is None else moved.name
        self.members[ann.node_id] = Member(ann.node_id, name, url, time.time())
        self.fleet.add_node(name, url)
        log.info("discovered neuron %s at %s (node id %s)", name, url, ann.node_id)
        self._note("node discovered", f"{url} (node id {ann.node_id}, version {ann.version})", name)
        # Polled at once: a new node serves within a poll, not after the next round.
        await self.poller.poll_node(name)

    def _forget_gone(self) -> None:
        forget_s = self.config().discover_forget_s
        now = time.time()
        for m in list(self.members.values()):
            if m.name not in self.fleet.names:
                self.members.pop(m.node_id)  # taken out by someone else (a reload)
                continue
            node = self.fleet.node(m.name)
            heard = max(node.last_ok or 0.0, m.since)
            if not node.healthy and now - heard >= forget_s:
                self._drop(m, f"unheard from for {now - heard:.0f} s")

    def _drop(self, m: Member, why: str) -> None:
        self.members.pop(m.node_id, None)
        if m.name in self.fleet.names:
            self.poller.forget(m.name)
            self.fleet.remove_node(m.name)
        log.info("discovered neuron %s left the poll set: %s", m.name, why)
        self._note("node forgotten", why, m.name)

    def _note(self, what: str, detail: str, node: str | None = None) -> None:
        if self.event is not None:
            self.event(None, what, detail, node=node)

    # -- what /admin/state shows ------------------------------------------------------

    def is_member(self, name: str) -> bool:
        return any(m.name == name for m in self.members.values())

    def outsiders_json(self) -> list[dict[str, Any]]:
        """Announced nodes not in the poll set, shaped as /admin/state's nodes."""
        taken = set(self.fleet.names)
        out = []
        for o in sorted(self.outsiders.values(), key=lambda o: (o.ann.name, o.ann.node_id)):
            name = choose_name(o.ann.name, o.ann.node_id, taken)
            taken.add(name)
            stranger = o.verdict.kind == "stranger"
            d = NodeState(name=name, url=o.verdict.url, seen=stranger, stranger=stranger).to_json()
            d.update(
                status=o.verdict.kind,
                node_id=o.ann.node_id,
                version=o.ann.version,
                last_error=o.verdict.reason,
                discovered=True,
                outstanding=0,
            )
            out.append(d)
        return out


DISCOVERER = web.AppKey("discoverer", Discoverer)


def setup(app: web.Application, *, background: bool) -> None:
    """With `discover = true` (and the app's background loops on), browse while serving."""
    if app[CONFIG].discover and background:
        app.cleanup_ctx.append(_discovering)


def state_extras(app: web.Application, nodes: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """/admin/state's nodes: each marked discovered or not, then the strangers."""
    d = app.get(DISCOVERER)
    for n in nodes:
        n["discovered"] = d is not None and d.is_member(str(n.get("name")))
    return [] if d is None else d.outsiders_json()


async def _discovering(app: web.Application) -> AsyncIterator[None]:
    d = Discoverer(
        fleet=app[FLEET], poller=app[POLLER], config=lambda: app[CONFIG], event=app[LIFECYCLE].event
    )
    app[DISCOVERER] = d
    async with aiohttp.ClientSession() as session:  # no fleet token on this one
        d.session = session
        browsing = await _browse(d)
        task = asyncio.create_task(d.run(), name="cortex discovery")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if browsing is not None:
                await _stop_browsing(*browsing)


async def _browse(d: Discoverer) -> tuple[AsyncZeroconf, AsyncServiceBrowser, set[Any]] | None:
    """Start the DNS-SD browser feeding `d`; None (logged) where multicast is refused."""
    from zeroconf import IPVersion, ServiceStateChange
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    try:
        zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
    except OSError as exc:
        log.warning("discovery off: cannot open mDNS sockets: %s", exc)
        return None
    tasks: set[asyncio.Task[None]] = set()

    async def resolve(name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(zc.zeroconf, RESOLVE_TIMEOUT_MS):
            log.debug("announced service %s did not resolve", name)
            return
        got = parse_txt(
            name,
            info.properties,
            port=info.port,
            addresses=tuple(info.parsed_addresses(IPVersion.V4Only)),
        )
        if isinstance(got, str):
            log.info("ignored an announcement: %s", got)
        else:
            d.heard(got)

    def on_change(
        zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            d.withdrawn(name)
            return
        task = asyncio.get_running_loop().create_task(resolve(name))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    browser = AsyncServiceBrowser(zc.zeroconf, SERVICE_TYPE, handlers=[on_change])
    log.info("discovery on: browsing mDNS for %s", SERVICE_TYPE)
    return zc, browser, tasks


async def _stop_browsing(zc: AsyncZeroconf, browser: AsyncServiceBrowser, tasks: set[Any]) -> None:
    for t in list(tasks):
        t.cancel()
    with contextlib.suppress(Exception):
        async with asyncio.timeout(3):
            await browser.async_cancel()
            await zc.async_close()
