"""A begun stream response written from a callback: the relayed frames' last step.

aiohttp's `StreamResponse.write` is a coroutine: a relay calling it per frame
needs a task woken per frame. Once `prepare` has sent the headers (a
StreamResponse sends them at once), a frame is just its chunk framing and one
`transport.write`, which a splice sink (shared.hop) can do from the upstream's
`data_received`. Backpressure: past `HIGH` bytes queued for the client the sink
asks the upstream to pause, and a timer lets it read again once the client
has taken the queue below `LOW`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

HIGH, LOW = 256 * 1024, 64 * 1024
_RECHECK_S = 0.005


class Downstream:
    def __init__(
        self, request: web.Request, response: web.StreamResponse, resume: Callable[[], None]
    ) -> None:
        if not response.prepared or response.compression:
            raise RuntimeError("a Downstream needs a prepared, uncompressed response")
        self._transport = request.transport
        # aiohttp chunks an HTTP/1.1 answer of no length without setting `chunked`.
        self._chunked = "chunked" in response.headers.get("Transfer-Encoding", "").lower()
        self._resume = resume
        self._waiting = False
        self._loop = asyncio.get_running_loop()  # once: each lookup is a getpid()

    def write(self, data: bytes) -> bool:
        """Queue `data` for the client; True when the client's queue is full (pause)."""
        t = self._transport
        if t is None or t.is_closing():
            raise ConnectionResetError("the client closed its connection")
        if not data:
            return False  # framed, b"" would be the stream's last chunk
        if self._chunked:
            t.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            t.write(data)
        if t.get_write_buffer_size() <= HIGH:
            return False
        if not self._waiting:
            self._waiting = True
            self._loop.call_later(_RECHECK_S, self._check)
        return True

    def _check(self) -> None:
        t = self._transport
        if t is None or t.is_closing() or t.get_write_buffer_size() <= LOW:
            # A client gone: the upstream reads again and the next write says so.
            self._waiting = False
            self._resume()
        else:
            self._loop.call_later(_RECHECK_S, self._check)
