"""GET /status over one kept-alive HTTP/1.1 connection per neuron, without aiohttp.

The poller's one request per node and interval, at 1,000 nodes a second: in
aiohttp's client most of a 304's CPU went to request and response machinery
(URL, headers, cookie jar, tracing, response object), about 0.4 ms each on
this machine. Here a request is one prebuilt write and a 304 one header read.
Only plain http:// and the answers a neuron gives (Content-Length or chunked);
anything else is the caller's to fall back from (`Unsupported`).
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import attrs

MAX_HEAD = 64 * 1024
MAX_BODY = 64 * 1024 * 1024


class Unsupported(Exception):
    """Not a URL or answer this client handles; use a general client instead."""


class StatusError(Exception):
    """The node did not answer (connect, reset, timeout, malformed)."""


@attrs.frozen
class Answer:
    status: int
    etag: str
    body: bytes


@attrs.define
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        self.writer.close()


@attrs.define
class StatusClient:
    authorization: str | None = None
    _conns: dict[tuple[str, int], _Conn] = attrs.field(factory=dict)
    # Per node, the request bytes for its current ETag (rebuilt only when it changes).
    _requests: dict[tuple[str, int], tuple[str | None, bytes]] = attrs.field(factory=dict)

    async def get(self, base: str, etag: str | None, timeout_s: float) -> Answer:
        parts = urlsplit(base)
        if parts.scheme != "http" or not parts.hostname or parts.path.strip("/"):
            raise Unsupported(base)
        host, port = parts.hostname, parts.port or 80
        key = (host, port)
        conn = self._conns.pop(key, None)
        try:
            async with asyncio.timeout(timeout_s):
                reused = conn is not None
                if conn is None:
                    conn = _Conn(*await asyncio.open_connection(host, port))
                try:
                    answer, keep = await self._exchange(conn, host, port, etag)
                except (ConnectionError, asyncio.IncompleteReadError):
                    conn.close()
                    if not reused:
                        raise
                    # The node closed an idle kept-alive connection: one fresh try.
                    conn = _Conn(*await asyncio.open_connection(host, port))
                    answer, keep = await self._exchange(conn, host, port, etag)
        except BaseException as exc:
            if conn is not None:
                conn.close()
            if isinstance(exc, (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError)):
                raise StatusError(str(exc) or type(exc).__name__) from exc
            raise
        if keep:
            self._conns[key] = conn
        else:
            conn.close()
        return answer

    async def _exchange(
        self, conn: _Conn, host: str, port: int, etag: str | None
    ) -> tuple[Answer, bool]:
        conn.writer.write(self._request(host, port, etag))
        try:
            head = await conn.reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError as exc:
            raise ValueError("answer head too long") from exc
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/1."):
            raise ValueError(f"not HTTP/1.x: {lines[0][:80]!r}")
        status = int(rest[:3])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        keep = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
        if status in (204, 304) or 100 <= status < 200:
            body = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            body = await _chunked(conn.reader)
        elif "content-length" in headers:
            size = int(headers["content-length"])
            if size > MAX_BODY:
                raise ValueError("answer too large")
            body = await conn.reader.readexactly(size)
        else:
            raise Unsupported("an answer without a length")
        return Answer(status, headers.get("etag", ""), body), keep

    def _request(self, host: str, port: int, etag: str | None) -> bytes:
        cached = self._requests.get((host, port))
        if cached is not None and cached[0] == etag:
            return cached[1]
        lines = [
            "GET /status HTTP/1.1",
            f"Host: {host}:{port}",
            "Accept: application/json",
            "User-Agent: cortex-poller",
        ]
        if self.authorization is not None:
            lines.append(f"Authorization: {self.authorization}")
        if etag is not None:
            lines.append(f"If-None-Match: {etag}")
        req = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        self._requests[(host, port)] = (etag, req)
        return req

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()


async def _chunked(reader: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        line = await reader.readuntil(b"\r\n")
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            # Trailers, if any, end with an empty line.
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return bytes(out)
        if len(out) + size > MAX_BODY:
            raise ValueError("answer too large")
        out += await reader.readexactly(size)
        await reader.readexactly(2)
