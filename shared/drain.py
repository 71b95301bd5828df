"""Graceful shutdown of the inference endpoints, shared by cortex and neuron.

A drain is a state both sides of a connection can see. It begins on SIGTERM
(`shared.serve.run_app`), or when a neuron is asked to restart; the listener stays
open meanwhile, so that cortex's polls read a neuron's `draining` and a load
balancer reads cortex's 503. From then on a new inference request is refused with
503 `shutting_down` (Retry-After) and requests in flight may finish for up to
`drain_s`. When none is left, or the time is up, aiohttp's own shutdown runs
(listener closed, `on_shutdown`, cleanup), where `Drain.close` cuts what is still
running, and the middleware ends it as a client can parse: a stream that has
begun gets an SSE error frame and `data: [DONE]` (never a truncated chunked
body), a request not answered yet a retryable 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection

import attrs
from aiohttp import web
from aiohttp.typedefs import Middleware

from shared.errors import ShuttingDown, sse_error_frame
from shared.interrupt import Interrupt

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# A stream's response once its headers are sent: the proxies set it after prepare().
SSE_RESPONSE = web.RequestKey("sse_response", web.StreamResponse)


# How a stream in another API than chat says it was cut: (message, status) -> its bytes.
SSE_FAIL = web.RequestKey("sse_fail", object)


def mark_streaming(
    request: web.Request,
    response: web.StreamResponse,
    fail: Callable[[str, int], bytes] | None = None,
) -> None:
    """Tell the drain that this request's answer is a stream that has begun; `fail`
    writes its last event when it is not a chat stream (a translated API's)."""
    request[SSE_RESPONSE] = response
    if fail is not None:
        request[SSE_FAIL] = fail


@attrs.define
class Drain:
    paths: Collection[str]
    # How long requests in flight may run once the drain begins (the service's drain_s).
    drain_s: float = 30.0
    closing: bool = False
    # One future per request in flight, resolved when its handler returns, and
    # the cut (cancel) shutdown may make of its handler's task.
    _running: dict[asyncio.Future[None], Interrupt] = attrs.Factory(dict)
    # loop.time() by which requests in flight must be done; set when the drain begins.
    _deadline: float | None = None
    # Set when a request ends or the deadline moves: a waiting `drained` looks again.
    _changed: asyncio.Event = attrs.Factory(asyncio.Event)

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def begin(self, drain_s: float | None = None) -> None:
        """Refuse new requests from now on; those in flight may run `drain_s` more.

        A second begin (a restart's, then its SIGTERM's) never extends the first one's
        deadline."""
        wait = self.drain_s if drain_s is None else drain_s
        deadline = asyncio.get_running_loop().time() + wait
        if self._deadline is None or deadline < self._deadline:
            self._deadline = deadline
            self._changed.set()
        if not self.closing:
            self.closing = True
            log.info("draining %d request(s) for up to %g s", len(self._running), wait)

    def hurry(self) -> None:
        """Wait no longer (a second signal): what is still running is cut at once."""
        self.begin(0.0)

    async def drained(self, drain_s: float | None = None) -> bool:
        """Begin, then wait until no request is in flight or the deadline; True if none is."""
        self.begin(drain_s)
        loop = asyncio.get_running_loop()
        while self._running and self._deadline is not None:
            left = self._deadline - loop.time()
            if left <= 0:
                break
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._changed.wait()
        return not self._running

    async def close(self, drain_s: float | None = None) -> None:
        """The drain's end (`on_shutdown`): wait out what is left of it, then end the
        requests still running cleanly."""
        if await self.drained(drain_s):
            return
        left = dict(self._running)
        log.warning("ending %d request(s) still running at the end of the drain", len(left))
        for cut in left.values():
            cut.fire()
        await asyncio.wait(list(left), timeout=5.0)

    def middleware(self) -> Middleware:
        @web.middleware
        async def drain_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path not in self.paths:
                return await handler(request)
            if self.closing:
                raise ShuttingDown("server is shutting down; retry on another replica")
            task = asyncio.current_task()
            assert task is not None
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._running[done] = cut = Interrupt(task)
            try:
                return await handler(request)
            except asyncio.CancelledError:
                if not cut.fired:
                    raise  # the client left
                cut.withdraw()  # ours: the request ends with an answer, not a cancel
                return await _end(request)
            finally:
                del self._running[done]
                done.set_result(None)
                self._changed.set()

        return drain_middleware


async def _end(request: web.Request) -> web.StreamResponse:
    """The answer of a request cut short by shutdown."""
    resp: web.StreamResponse | None = request.get(SSE_RESPONSE)
    if resp is None:
        return ShuttingDown("server shut down before answering; retry").to_response()
    message = "server shutting down mid-stream"
    fail = request.get(SSE_FAIL)
    # A leading blank line ends any event the stream was in the middle of (a
    # translated API's stream is written in whole events).
    frame = (
        fail(message, 503)
        if callable(fail)
        else b"\n\n" + sse_error_frame(message, 503, "shutting_down")
    )
    with contextlib.suppress(ConnectionError, RuntimeError):
        await resp.write(frame)
        await resp.write_eof()
    return resp


# The drain `shared.serve.run_app` begins on SIGTERM; each service's create_app sets it.
DRAIN = web.AppKey("drain", Drain)
