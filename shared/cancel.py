"""Cancel a request in flight by its id (DELETE /v1/requests/{id}), for cortex and neuron.

Each inference request is registered under its request id for as long as its handler
runs (`Cancels.middleware`, the innermost one, so that auth has named the caller). A
cancel fires an `Interrupt` (shared.interrupt) at the handler's task: its current await
raises CancelledError wherever it is (routing, a cold load, a queue, the stream), and
it unwinds exactly as when its client leaves: the proxy closes its upstream connection,
which the next hop takes as its client gone (cortex -> neuron -> runner), so the
runner stops at its next token or prefill step. The middleware takes the cancel back
where it lands and ends the request as its client can parse, as the drain does at
shutdown: a stream that has begun gets an error frame (`request_cancelled`, status 499)
then `data: [DONE]`; a request not answered yet gets the 499 error itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Collection, Iterator

import attrs
from aiohttp import web
from aiohttp.typedefs import Middleware

from shared.drain import SSE_FAIL, SSE_RESPONSE
from shared.errors import RequestCancelled, sse_error_frame
from shared.interrupt import Interrupt

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Set on a request once it is cancelled: what its client is told.
CANCELLED = web.RequestKey("cancelled", str)
# How long a DELETE waits for the request to have ended before it answers.
END_WAIT_S = 5.0


@attrs.frozen(eq=False)
class Running:
    """One request in flight that a cancel can reach."""

    rid: str
    request: web.Request
    interrupt: Interrupt
    # Resolved when its handler has returned (its upstream connection is closed by then).
    ended: asyncio.Future[None]
    started: float = attrs.field(factory=time.monotonic)


def cancelled(request: web.Request) -> bool:
    """This request's handler is unwinding from a cancel (not from its client leaving)."""
    return CANCELLED in request


@attrs.define
class Cancels:
    """The requests in flight by id; `id_of` gives a request's id (None: not cancellable)."""

    paths: Collection[str]
    id_of: Callable[[web.Request], str | None]
    # A client may choose its X-Request-Id: two requests in flight may share one.
    _running: dict[str, list[Running]] = attrs.Factory(dict)

    def find(self, rid: str) -> list[Running]:
        return list(self._running.get(rid, ()))

    def all(self) -> list[Running]:
        return [r for runs in self._running.values() for r in runs]

    def cancel(self, run: Running, message: str) -> None:
        """End `run` with `message` (what its client reads); a second cancel is a no-op."""
        run.request.setdefault(CANCELLED, message)
        run.interrupt.fire()

    async def ended(self, runs: Collection[Running], timeout: float = END_WAIT_S) -> bool:  # noqa: ASYNC109
        """Wait until every one of `runs` has ended (or `timeout`); True if they have."""
        if not runs:
            return True
        _, pending = await asyncio.wait([r.ended for r in runs], timeout=timeout)
        return not pending

    @contextlib.contextmanager
    def _registered(self, rid: str, request: web.Request) -> Iterator[Running]:
        task = asyncio.current_task()
        assert task is not None
        run = Running(rid, request, Interrupt(task), asyncio.get_running_loop().create_future())
        self._running.setdefault(rid, []).append(run)
        try:
            yield run
        finally:
            runs = self._running.get(rid, [])
            if run in runs:
                runs.remove(run)
            if not runs:
                self._running.pop(rid, None)
            run.ended.set_result(None)

    def middleware(self) -> Middleware:
        @web.middleware
        async def cancel_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            rid = self.id_of(request) if request.path in self.paths else None
            if rid is None:
                return await handler(request)
            with self._registered(rid, request) as run:
                try:
                    resp = await handler(request)
                except asyncio.CancelledError:
                    # Anyone else's cancel too (the client left, the drain's cut): theirs.
                    if not run.interrupt.withdraw():
                        raise
                    return await _end(request)
                if run.interrupt.fired:
                    # Fired as the handler was ending, and swallowed on its way: take it
                    # back, or the task's next await would raise it.
                    run.interrupt.withdraw()
                return resp

        return cancel_middleware


async def _end(request: web.Request) -> web.StreamResponse:
    """The answer of a cancelled request: its stream's last frame, or the 499."""
    message = request.get(CANCELLED, "request cancelled")
    resp: web.StreamResponse | None = request.get(SSE_RESPONSE)
    if resp is None:
        raise RequestCancelled(message)
    fail = request.get(SSE_FAIL)
    # A leading blank line ends any event the stream was in the middle of (a
    # translated API's stream is written in whole events, and says it its own way).
    frame = (
        fail(message, RequestCancelled.status)
        if callable(fail)
        else b"\n\n" + sse_error_frame(message, RequestCancelled.status, RequestCancelled.code)
    )
    with contextlib.suppress(ConnectionError, RuntimeError):
        await resp.write(frame)
        await resp.write_eof()
    return resp
