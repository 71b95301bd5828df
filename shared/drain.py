"""Graceful shutdown of the inference endpoints, shared by cortex and neuron.

On SIGTERM aiohttp stops accepting connections and then runs `on_shutdown`,
where `Drain.close` lets requests in flight finish for up to `drain_s`. What is
still running then is cancelled by us, and the middleware ends it as a client
can parse: a stream that has begun gets an SSE error frame and `data: [DONE]`
(never a truncated chunked body), a request not answered yet a retryable 503.
A request arriving while draining is refused with the same 503 at once.
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
    closing: bool = False
    # One future per request in flight, resolved when its handler returns, and
    # the cut (cancel) shutdown may make of its handler's task.
    _running: dict[asyncio.Future[None], Interrupt] = attrs.Factory(dict)

    @property
    def in_flight(self) -> int:
        return len(self._running)

    async def close(self, drain_s: float) -> None:
        """Wait up to `drain_s` for requests in flight, then end the rest cleanly."""
        self.closing = True
        if self._running:
            log.info("draining %d request(s) for up to %g s", len(self._running), drain_s)
            await asyncio.wait(list(self._running), timeout=drain_s)
        left = dict(self._running)
        if not left:
            return
        log.warning("ending %d request(s) still running after %g s", len(left), drain_s)
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
