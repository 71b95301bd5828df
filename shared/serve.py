"""`web.run_app` as `cortex serve` and `neuron serve` use it: uvloop, no access log,
bounded work for every connection before any handler runs, and a drain on SIGTERM.

uvloop's loop is a third or more cheaper per proxied chunk than asyncio's (the
relay is mostly socket reads and writes); aiohttp's access log formats and
writes a line per request, which costs more than routing one. Both are levers
the gateway bench measures (bench/gateway.py).

What a client may cost before a handler runs (issue 19):
- a request body is read raw and inflated by us, capped and off the loop
  (HANDLER_ARGS turns aiohttp's own decoding off; shared.errors.read_body);
- a request's headers must arrive within `header_timeout_s` of its first byte (of the
  connection opening, for its first request), and its body within `body_timeout_s`;
- one client address holds at most `max_connections_per_address` connections.

aiohttp has no header timeout (its keep-alive timer closes a connection still short
of a whole request only after `keepalive_timeout`, 75 s) and no hook per connection.
The least invasive place that sees every connection is the protocol factory the
listening socket is created with: the loop this module makes wraps it, so that each
connection's aiohttp RequestHandler sits inside a ConnectionGuard that forwards every
event to it. The guard learns that a request has reached the app from
`guard_middleware` (through the transport's protocol: public API, no private state).

Signals (issue 19): aiohttp's own handler closes the listener at once, so during a
drain a neuron's /status and cortex's /health were refused, and cortex took a
draining neuron for a dead one. Here SIGTERM (or SIGINT) begins the app's drain
(shared.drain) with the listener open: new inference requests get 503
`shutting_down`, the rest is answered as usual. When no request is left or
`drain_s` has passed, GracefulExit ends web.run_app and aiohttp's shutdown runs as
before. A second signal waits no longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections import Counter
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, cast

import attrs
from aiohttp import web
from aiohttp.web_runner import GracefulExit

from shared.config import ServerConfig
from shared.drain import DRAIN, Drain
from shared.errors import BODY_TIMEOUT, Handler, TooManyConnections

log = logging.getLogger(__name__)

# web.Application(handler_args=...): the body comes raw, shared.errors.read_body
# inflates it (aiohttp would inflate on the loop, and the rest of a refused bomb too).
HANDLER_ARGS: Mapping[str, Any] = MappingProxyType({"auto_decompress": False})
# A refused connection is closed once its request has come in (a close with unread
# bytes would reset it, and the client might never read its 429), or after this long.
REFUSED_LINGER_S = 1.0
HEADERS, HANDLING, IDLE = "headers", "handling", "idle"


@attrs.frozen
class ConnectionLimits:
    """What one connection may cost; ServerConfig's settings of the same names."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    # 0: no cap.
    max_connections_per_address: int = 1024

    @classmethod
    def of(cls, config: ServerConfig) -> ConnectionLimits:
        return cls(
            header_timeout_s=config.header_timeout_s,
            body_timeout_s=config.body_timeout_s,
            max_connections_per_address=config.max_connections_per_address,
        )


@attrs.define
class Guards:
    """The connections one process serves, counted per client address."""

    limits: ConnectionLimits
    open: Counter[str] = attrs.Factory(Counter)
    # Addresses at the cap, so that a flood is logged once, not once a connection.
    full: set[str] = attrs.Factory(set)

    def wrap(self, factory: Callable[[], asyncio.BaseProtocol]) -> Callable[[], ConnectionGuard]:
        return lambda: ConnectionGuard(self, factory())

    def admit(self, address: str) -> bool:
        cap = self.limits.max_connections_per_address
        if cap and self.open[address] >= cap:
            if address not in self.full:
                self.full.add(address)
                log.warning("refusing connections from %s: %d open (the cap)", address, cap)
            return False
        self.open[address] += 1
        return True

    def release(self, address: str) -> None:
        self.open[address] -= 1
        if self.open[address] <= 0:
            del self.open[address]
        cap = self.limits.max_connections_per_address
        if address in self.full and self.open[address] < cap:
            self.full.discard(address)


class ConnectionGuard(asyncio.Protocol):
    """One connection: refused past the per-address cap, closed when a request's headers
    are late. Every event goes on to aiohttp's handler (`inner`) unchanged."""

    def __init__(self, guards: Guards, inner: asyncio.BaseProtocol) -> None:
        self.guards = guards
        self.limits = guards.limits
        self._inner: Any = inner  # aiohttp's RequestHandler: a Protocol in all but name
        self._transport: asyncio.Transport | None = None
        self._address: str | None = None  # set once admitted
        self._timer: asyncio.TimerHandle | None = None
        # HEADERS: a request's first bytes are in, the rest is timed; HANDLING: the app
        # has it; IDLE: between requests (aiohttp's keep-alive timer's business).
        self._state = HEADERS

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is an asyncio.Transport in all but its class.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        address = _address(transport)
        if not self.guards.admit(address):
            self._refuse(transport, address)
            return
        self._address = address
        self._inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._address is None:
            self._close()  # refused: its request is in, the 429 was sent
            return
        if self._state == IDLE:
            self._state = HEADERS  # the first byte of the next request
            self._arm()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._address is None:
            return None
        result: bool | None = self._inner.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._address is not None:
            self.guards.release(self._address)
            self._inner.connection_lost(exc)
        self._transport = None

    def pause_writing(self) -> None:
        if self._address is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._address is not None:
            self._inner.resume_writing()

    # -- told by guard_middleware ----------------------------------------------------------

    def request_started(self) -> None:
        self._disarm()
        self._state = HANDLING

    def request_ended(self) -> None:
        self._state = IDLE

    # -- the timer -------------------------------------------------------------------------

    def _arm(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.limits.header_timeout_s, self._late)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _late(self) -> None:
        self._timer = None
        if self._state == HEADERS:
            log.debug(
                "closing a connection from %s: no whole request within %g s",
                self._address,
                self.limits.header_timeout_s,
            )
            self._close()

    def _close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def _refuse(self, transport: asyncio.Transport, address: str) -> None:
        cap = self.limits.max_connections_per_address
        err = TooManyConnections(f"more than {cap} connections from {address}; retry later")
        body = json.dumps(err.to_json()).encode()
        head = (
            f"HTTP/1.1 {err.status} Too Many Requests\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nRetry-After: {err.retry_after}\r\n"
            "Connection: close\r\n\r\n"
        )
        transport.write(head.encode() + body)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(REFUSED_LINGER_S, self._close)


def _address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "local"


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Tell the connection's guard that a request reached the app (its header timer
    stops) and when it is done; give read_body the body timeout. Outermost middleware."""
    transport = request.transport
    guard = transport.get_protocol() if transport is not None else None
    if not isinstance(guard, ConnectionGuard):
        return await handler(request)  # a server not started by run_app (tests' TestServer)
    guard.request_started()
    request[BODY_TIMEOUT] = guard.limits.body_timeout_s
    try:
        return await handler(request)
    finally:
        guard.request_ended()


def new_event_loop(guards: Guards | None = None) -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed (Linux, macOS), else asyncio's; with `guards`,
    every server it creates wraps its connections in a ConnectionGuard."""
    try:
        import uvloop
    except ImportError:
        base: type[asyncio.AbstractEventLoop] = asyncio.SelectorEventLoop
    else:
        base = uvloop.Loop
    if guards is None:
        return base()
    return _guarded(base, guards)


def _guarded(base: type[asyncio.AbstractEventLoop], guards: Guards) -> asyncio.AbstractEventLoop:
    class GuardedLoop(base):  # type: ignore[valid-type,misc]
        async def create_server(
            self, protocol_factory: Callable[[], asyncio.BaseProtocol], *args: Any, **kwargs: Any
        ) -> asyncio.AbstractServer:
            server: asyncio.AbstractServer = await super().create_server(
                guards.wrap(protocol_factory), *args, **kwargs
            )
            return server

    loop: asyncio.AbstractEventLoop = GuardedLoop()
    return loop


SIGNALS = (signal.SIGTERM, signal.SIGINT)


@attrs.define
class Stopper:
    """What SIGTERM and SIGINT do: drain first (the listener stays open), then exit."""

    drain: Drain | None
    _waiting: asyncio.Task[None] | None = None
    _exiting: bool = False

    def signalled(self, sig: signal.Signals) -> None:
        if self._waiting is None:
            log.info("%s: draining, then shutting down (again: stop waiting)", sig.name)
            self._waiting = asyncio.get_running_loop().create_task(
                self._drain_then_exit(), name="drain on signal"
            )
            return
        log.warning("%s again: not waiting for requests in flight any longer", sig.name)
        if self.drain is not None:
            self.drain.hurry()  # shutdown's Drain.close cuts what still runs, at once
        self._exit()

    async def _drain_then_exit(self) -> None:
        if self.drain is not None:
            await self.drain.drained()
        self._exit()

    def _exit(self) -> None:
        if not self._exiting:
            self._exiting = True
            # Raised from a loop callback, GracefulExit (a SystemExit) leaves
            # run_until_complete, and web.run_app runs aiohttp's shutdown (uvloop too).
            asyncio.get_running_loop().call_soon(_graceful_exit)


def _graceful_exit() -> None:
    raise GracefulExit


def _on_signals(app: web.Application) -> None:
    """Install the signal handlers as the app starts, and remove them once it is cleaned up."""
    stopper = Stopper(app.get(DRAIN))

    async def install(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            with contextlib.suppress(NotImplementedError):  # no signals on Windows
                loop.add_signal_handler(sig, stopper.signalled, sig)

    async def remove(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(sig)

    # First: a signal during startup (a slow [[load]]) already drains and exits.
    app.on_startup.insert(0, install)
    app.on_cleanup.append(remove)


LISTEN_BACKLOG = 4096


def run_app(
    app: web.Application,
    *,
    access_log: bool,
    limits: ConnectionLimits | None = None,
    **kwargs: Any,
) -> None:
    """Serve `app` until a signal; `access_log` logs a line per request (off by default).

    SIGTERM drains the app's DRAIN (shared.drain) before aiohttp's shutdown."""
    from aiohttp.log import access_logger

    _on_signals(app)
    # aiohttp listens with a backlog of 128: 256 clients connecting at once (a burst of
    # streams, a load generator) overflowed it, and each dropped SYN cost its client a
    # 1 s retransmit before its first byte (bench-gateway's paced streams: 0.76x of
    # direct, all of it from streams that began a second late). The kernel caps it at
    # net.core.somaxconn.
    kwargs.setdefault("backlog", LISTEN_BACKLOG)
    web.run_app(
        app,
        loop=new_event_loop(Guards(limits or ConnectionLimits())),
        access_log=access_logger if access_log else None,
        handle_signals=False,
        **kwargs,
    )
