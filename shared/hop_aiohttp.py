"""A proxy's link to its upstreams: the lean hop (shared.hop) for plain http://,
aiohttp's client for the rest (https, a base URL with a path), behind the same
answer methods, so a proxy has one code path; the aiohttp answer costs what
aiohttp costs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

import aiohttp
import attrs

from shared.hop import Hop, HopConnectError, HopError, Sink, Unsupported, Upstream, address


@attrs.define(eq=False)
class Link:
    """Where a proxy sends its requests: each base URL to the lean hop if it takes it."""

    hop: Hop
    session: aiohttp.ClientSession
    # Sent with every request (the fleet token), under the caller's own headers.
    headers: Mapping[str, str] = attrs.Factory(dict)
    _lean: dict[str, bool] = attrs.Factory(dict)

    async def post(
        self,
        base: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        timeout_s: float | None = None,
    ) -> Upstream:
        """POST and wait for the answer's head, at most `timeout_s` (TimeoutError)."""
        lean = self._lean.get(base)
        if lean is None:
            try:
                address(base)
                lean = True
            except Unsupported:
                lean = False
            self._lean[base] = lean
        merged = {**self.headers, **headers} if self.headers else headers
        if lean:
            return await self.hop.request(base, "POST", path, merged, body, timeout_s)
        url = base.rstrip("/") + path
        return await post(self.session, url, merged, body, self.hop.connect_timeout_s, timeout_s)


async def post(
    session: aiohttp.ClientSession,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    connect_timeout_s: float,
    timeout_s: float | None = None,
) -> AiohttpAnswer:
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=timeout_s)
    try:
        resp = await session.post(url, data=body, headers=dict(headers), timeout=timeout)
    except aiohttp.ClientConnectorError as exc:
        raise HopConnectError(str(exc)) from exc
    except aiohttp.ClientError as exc:
        raise HopError(repr(exc)) from exc
    return AiohttpAnswer(resp)


class AiohttpAnswer:
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = list(resp.headers.items())
        self._resume = asyncio.Event()
        self._resume.set()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    def header(self, name: str, default: str | None = None) -> str | None:
        return self._resp.headers.get(name, default)

    @property
    def content_type(self) -> str:
        return self._resp.content_type

    @property
    def complete(self) -> bool:
        return self._resp.content.at_eof()

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except aiohttp.ClientError as exc:
            raise HopError(repr(exc)) from exc

    async def readany(self) -> bytes:
        try:
            return await self._resp.content.readany()
        except aiohttp.ClientError as exc:
            raise HopError(repr(exc)) from exc

    def splice(self, sink: Sink, idle_s: float) -> asyncio.Future[None]:
        self._task = asyncio.ensure_future(self._pump(sink, idle_s))
        return self._task

    async def _pump(self, sink: Sink, idle_s: float) -> None:
        while True:
            async with asyncio.timeout(idle_s):
                chunk = await self.readany()
            if not chunk:
                return
            full = sink(chunk)
            if self._stopped:
                return
            if full:
                self._resume.clear()
                await self._resume.wait()

    def resume(self) -> None:
        self._resume.set()

    def unsplice(self) -> None:
        # Called by the sink, inside the pump: it returns after this chunk.
        self._stopped = True

    def fail(self, exc: BaseException) -> None:
        self._resp.content.set_exception(exc)
        self._resume.set()  # a pump paused by its sink reads on, and meets `exc`

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._resp.close()

    def release(self) -> None:
        if self._task is not None:
            self._task.cancel()
        with contextlib.suppress(Exception):
            self._resp.release()
