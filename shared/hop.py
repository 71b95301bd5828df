"""A lean HTTP/1.1 client for the inference hops: cortex to neuron, neuron to runner.

Why not aiohttp's client there: per request it builds a URL, header multidicts,
a cookie jar's view, trace hooks, timers, a response object and a StreamReader,
and per chunk of a stream it wakes the reading task through a future. On this
2-core machine that was most of a hop's CPU above its framework floor
(bench.gateway, issue 21). Here a connection is an `asyncio.Protocol` that
parses an answer's head once and de-chunks its body as it arrives, handing the
bytes to a reader (`read`, `readany`) or, for a relayed stream, straight to a
sink called from `data_received` (`splice`): no task switch per frame.

Plain http:// only, HTTP/1.1 with keep-alive, one idle pool per (host, port).
TLS and anything unusual stay with aiohttp (`Unsupported` says so).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol, cast
from urllib.parse import urlsplit

import attrs

MAX_HEAD = 64 * 1024
# A reader that does not keep up: stop reading the socket above this, resume below.
_HIGH, _LOW = 1 << 20, 1 << 18
# Idle connections kept per upstream (more are closed when given back).
MAX_IDLE = 512


class HopError(Exception):
    """The upstream did not answer as it should (closed, reset, malformed)."""


class HopConnectError(HopError):
    """Nobody took the connection (refused, unreachable, connect timed out)."""


class Unsupported(Exception):
    """Not a URL this client handles (https, a path prefix): use aiohttp."""


# A splice sink takes the body's next bytes and says whether to pause reading
# (the downstream is full); `Answer.resume` undoes it.
Sink = Callable[[bytes], bool]


class Upstream(Protocol):
    """What a proxy reads of an answer, whichever client brought it (shared.hop_aiohttp)."""

    status: int
    headers: list[tuple[str, str]]

    def header(self, name: str, default: str | None = None) -> str | None: ...
    @property
    def content_type(self) -> str: ...
    @property
    def complete(self) -> bool: ...
    def read(self) -> Awaitable[bytes]: ...
    def readany(self) -> Awaitable[bytes]: ...
    def splice(self, sink: Sink, idle_s: float) -> asyncio.Future[None]: ...
    def unsplice(self) -> None: ...
    def resume(self) -> None: ...
    def fail(self, exc: BaseException) -> None: ...
    def close(self) -> None: ...
    def release(self) -> None: ...


_HEAD, _BODY, _IDLE, _CLOSED = range(4)
_NO_BODY = frozenset({204, 304})


@attrs.define(eq=False)
class Answer:
    """An upstream's answer: its head, then its body read, read piecewise, or spliced.

    Once its connection serves another request (released, pooled, reused) an answer
    holds it no more: its calls are no-ops (a late timer's `resume`, a second
    `release`) or, for reads, HopError."""

    status: int
    # As sent, in order; `header` looks one up by lower-case name.
    headers: list[tuple[str, str]]
    _keyed: dict[str, str]
    _conn: _Conn
    _gen: int = 0

    def __attrs_post_init__(self) -> None:
        self._gen = self._conn.gen

    def _mine(self) -> _Conn | None:
        return self._conn if self._conn.gen == self._gen else None

    def header(self, name: str, default: str | None = None) -> str | None:
        return self._keyed.get(name.lower(), default)

    @property
    def content_type(self) -> str:
        return self._keyed.get("content-type", "").partition(";")[0].strip().lower()

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    def readany(self) -> asyncio.Future[bytes]:
        """The body's bytes received so far and not yet read; b"" once it has ended."""
        return self._held().take()

    def splice(self, sink: Sink, idle_s: float) -> asyncio.Future[None]:
        """Hand every body byte to `sink` as it arrives (bytes already read first).

        The future ends when the body does, or with the error that cut it: HopError,
        TimeoutError after `idle_s` without a byte (while not paused by the sink),
        or what `fail` was given."""
        return self._held().splice(sink, idle_s)

    def _held(self) -> _Conn:
        conn = self._mine()
        if conn is None:
            raise HopError("this answer's connection has moved on to another request")
        return conn

    def resume(self) -> None:
        """Read the socket again after the sink asked for a pause."""
        if (conn := self._mine()) is not None:
            conn.resume_body()

    def unsplice(self) -> None:
        """End the splice now (the stream is complete to its reader): the future given by
        `splice` is done and later bytes are kept, not sunk, until `release`."""
        if (conn := self._mine()) is not None:
            conn.unsplice()

    def fail(self, exc: BaseException) -> None:
        """End the pending (or next) read or the splice with `exc`."""
        if (conn := self._mine()) is not None:
            conn.fail(exc)

    @property
    def complete(self) -> bool:
        conn = self._mine()
        return conn is None or conn.body_done

    def close(self) -> None:
        """Drop the connection (the upstream sees its client leave)."""
        if (conn := self._mine()) is not None:
            conn.close()

    def release(self) -> None:
        """Done with this answer: the connection goes back to the pool once its body
        has ended (at once, or as the rest of it arrives), else it is closed."""
        if (conn := self._mine()) is not None:
            conn.release()


@attrs.define(eq=False)
class Hop:
    """Keep-alive connections to plain-HTTP upstreams, shared by every request."""

    connect_timeout_s: float = 5.0
    _idle: dict[tuple[str, int], list[_Conn]] = attrs.Factory(dict)
    _addresses: dict[str, tuple[str, int]] = attrs.Factory(dict)
    _closed: bool = False

    async def request(
        self,
        base: str,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes = b"",
        timeout_s: float | None = None,
    ) -> Answer:
        """Send one request and wait for its answer's head (not its body), at most
        `timeout_s` (then TimeoutError).

        A kept-alive connection the upstream closed while idle is replaced once;
        anything else fails with HopError (HopConnectError if nobody listens)."""
        host, port = self._addresses.get(base) or self._address(base)
        req = _encode(method, path, host, port, headers, body)
        conn = self._take(host, port)
        if conn is not None:
            try:
                return await conn.send(req, timeout_s)
            except HopError:
                if conn.heard:
                    raise
                # Closed while idle (it had answered nothing of ours): a fresh one.
        conn = await self._connect(host, port)
        return await conn.send(req, timeout_s)

    def _address(self, base: str) -> tuple[str, int]:
        self._addresses[base] = got = address(base)
        return got

    async def _connect(self, host: str, port: int) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Conn(self, (host, port)), host, port
                )
        except (OSError, TimeoutError) as exc:
            raise HopConnectError(f"connect to {host}:{port}: {exc or 'timed out'}") from exc
        return conn

    def _take(self, host: str, port: int) -> _Conn | None:
        idle = self._idle.get((host, port))
        while idle:
            conn = idle.pop()
            if conn.usable():
                return conn
        return None

    def _give(self, conn: _Conn) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if self._closed or len(idle) >= MAX_IDLE:
            conn.close()
        else:
            idle.append(conn)

    def _forget(self, conn: _Conn) -> None:
        idle = self._idle.get(conn.key)
        if idle is not None and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


def address(base: str) -> tuple[str, int]:
    """(host, port) of a plain http:// base URL with no path; else Unsupported."""
    parts = urlsplit(base)
    if parts.scheme != "http" or not parts.hostname or parts.path.strip("/"):
        raise Unsupported(base)
    return parts.hostname, parts.port or 80


def _encode(
    method: str, path: str, host: str, port: int, headers: Mapping[str, str], body: bytes
) -> bytes:
    shown = f"[{host}]" if ":" in host else host  # an IPv6 literal
    lines = [f"{method} {path} HTTP/1.1", f"Host: {shown}:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in _OWN]
    lines.append(f"Content-Length: {len(body)}")
    # aiohttp decodes a client's header bytes as UTF-8 with surrogateescape: the same
    # bytes go on (latin-1 would fail on any non-Latin value).
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


# Written by this client itself, whatever the caller's headers say.
_OWN = frozenset({"host", "content-length", "transfer-encoding", "connection"})


class _Conn(asyncio.Protocol):
    """One connection; parses one answer at a time."""

    def __init__(self, hop: Hop, key: tuple[str, int]) -> None:
        self.hop, self.key = hop, key
        # Looked up once: asyncio.get_running_loop() checks the pid (a getpid() syscall
        # per call on Python 3.11), which per frame was 5 % of a relay's CPU.
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.state = _IDLE
        self.heard = False  # this answer's first byte arrived
        self.gen = 0  # which request this connection serves (Answer holds it while equal)
        self.body_done = False
        self._head_waiter: asyncio.Future[Answer] | None = None
        self._buf = b""
        self._keep = True
        # Body framing: bytes left of a Content-Length body, or -1 chunked, -2 to EOF.
        self._left = 0
        self._chunk_left = 0  # of the current chunk, plus its CRLF (chunked only)
        self._trailers = False
        self._parts: list[bytes] = []
        self._size = 0
        self._waiter: asyncio.Future[bytes] | None = None
        self._sink: Sink | None = None
        self._spliced: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._released = False
        self._paused = False
        self._idle_s = 0.0
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._give_up_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport is an asyncio.Transport in all but its class.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        was = self.state
        self.state = _CLOSED
        self.transport = None
        self.hop._forget(self)
        if was == _BODY and self._left == -2 and self._error is None and exc is None:
            self._end_body()  # read to EOF: the close is the end (a reset is not)
            return
        if was in (_HEAD, _BODY) and not self.body_done:
            what = "closed the connection" if exc is None else f"reset ({exc})"
            self._set_error(HopError(f"upstream {self.key[0]}:{self.key[1]} {what}"))

    def data_received(self, data: bytes) -> None:
        self.heard = True
        if self.state == _BODY:
            self._body(data)
        elif self.state == _HEAD:
            self._head(data)
        else:
            self.close()  # bytes nobody asked for: the connection is not ours to trust

    def eof_received(self) -> bool | None:
        return None  # close our side too

    # -- a request -------------------------------------------------------------------------

    def usable(self) -> bool:
        return (
            self.state == _IDLE and self.transport is not None and not self.transport.is_closing()
        )

    async def send(self, req: bytes, timeout_s: float | None) -> Answer:
        assert self.transport is not None and self.state == _IDLE
        loop = self._loop
        self.gen += 1  # answers of earlier requests on this connection let go of it
        self.state, self.heard, self.body_done = _HEAD, False, False
        self._keep, self._buf, self._parts, self._size = True, b"", [], 0
        self._error, self._released, self._sink, self._spliced = None, False, None, None
        waiter: asyncio.Future[Answer] = loop.create_future()
        self._head_waiter = waiter
        self.transport.write(req)
        # One timer handle, not an asyncio.timeout (a context, a task cancel) per request.
        timer = None if timeout_s is None else loop.call_later(timeout_s, self._late, timeout_s)
        try:
            return await waiter
        except BaseException:
            self.close()
            raise
        finally:
            self._head_waiter = None
            if timer is not None:
                timer.cancel()

    def _late(self, timeout_s: float) -> None:
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(TimeoutError(f"no answer within {timeout_s:g} s"))

    def _head(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                self._broken("answer head too long")
            else:
                self._buf = buf
            return
        self._buf = b""
        try:
            answer = self._parse(buf[:end])
        except ValueError as exc:
            self._broken(f"malformed answer head: {exc}")
            return
        self.state = _BODY
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(answer)
        if self._left == 0:
            self._end_body()
        elif end + 4 < len(buf):
            self._body(buf[end + 4 :])

    def _parse(self, head: bytes) -> Answer:
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/1."):
            raise ValueError(f"not HTTP/1.x: {lines[0][:80]!r}")
        status = int(rest[:3])
        headers: list[tuple[str, str]] = []
        keyed: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                name, value = name.strip(), value.strip()
                headers.append((name, value))
                keyed[name.lower()] = value
        self._keep = version == "HTTP/1.1" and keyed.get("connection", "").lower() != "close"
        if status in _NO_BODY or status < 200:
            self._left = 0
        elif "chunked" in keyed.get("transfer-encoding", "").lower():
            self._left, self._chunk_left, self._trailers = -1, 0, False
        elif "content-length" in keyed:
            self._left = int(keyed["content-length"])
            if self._left < 0:
                raise ValueError("negative Content-Length")
        else:
            self._left, self._keep = -2, False
        return Answer(status, headers, keyed, self)

    # -- the body --------------------------------------------------------------------------

    def _body(self, data: bytes) -> None:
        left = self._left
        if left == -1:
            self._chunked(self._buf + data if self._buf else data)
        elif left == -2:
            self._emit(data)
        else:
            take = data if len(data) <= left else data[:left]
            self._left = left - len(take)
            self._emit(take)
            if self._left == 0:
                self._end_body()

    def _chunked(self, buf: bytes) -> None:
        """De-chunk `buf` (this read, after what the last one left unparsed)."""
        pos, n = 0, len(buf)
        self._buf = b""
        while pos < n and self.state == _BODY:
            if self._chunk_left:
                # Inside a chunk: its data, then its CRLF (not passed on).
                take = min(self._chunk_left, n - pos)
                data_left = self._chunk_left - 2
                if data_left > 0:
                    piece = buf[pos : pos + min(take, data_left)]
                    if piece:
                        self._emit(piece)
                self._chunk_left -= take
                pos += take
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                self._buf = buf[pos:]
                if len(self._buf) > MAX_HEAD:
                    self._broken("chunk size line too long")
                return
            line = buf[pos:eol]
            pos = eol + 2
            if self._trailers:
                if not line:
                    self._end_body()
                continue
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                size = -1
            if size < 0:  # a negative one would walk `pos` back: parsing it forever
                self._broken(f"bad chunk size {line[:40]!r}")
                return
            if size == 0:
                self._trailers = True
            else:
                self._chunk_left = size + 2

    def _emit(self, data: bytes) -> None:
        sink = self._sink
        if sink is not None:
            self._last = self._loop.time()
            try:
                full = sink(data)
            except Exception as exc:  # the downstream's (its client left): ends the splice
                self._set_error(exc)
                self.close()
                return
            if full:
                self._pause()
            return
        self._parts.append(data)
        self._size += len(data)
        if self._size > _HIGH:
            self._pause()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(self._drain())

    def _end_body(self) -> None:
        self.body_done = True
        self.state = _IDLE if self._keep else _CLOSED
        self._stop_timer()
        waiter, spliced = self._waiter, self._spliced
        if waiter is not None and not waiter.done():
            waiter.set_result(self._drain())
        if spliced is not None and not spliced.done():
            spliced.set_result(None)
        if self._released:
            self._recycle()

    def _drain(self) -> bytes:
        parts, self._parts, self._size = self._parts, [], 0
        if self._paused:
            self._resume()
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def take(self) -> asyncio.Future[bytes]:
        fut: asyncio.Future[bytes] = self._loop.create_future()
        if self._parts:
            fut.set_result(self._drain())
        elif self._error is not None:
            fut.set_exception(self._error)
        elif self.body_done:
            fut.set_result(b"")
        else:
            self._waiter = fut
        return fut

    def splice(self, sink: Sink, idle_s: float) -> asyncio.Future[None]:
        loop = self._loop
        fut: asyncio.Future[None] = loop.create_future()
        self._spliced, self._idle_s = fut, idle_s
        if self._error is not None:
            fut.set_exception(self._error)
            return fut
        self._sink = sink
        self._last = loop.time()
        if self._parts:
            self._emit(self._drain())  # as if just arrived: a sink's error ends `fut`
        if fut.done():
            return fut
        if self.body_done:
            fut.set_result(None)
        else:
            self._timer = loop.call_at(self._last + idle_s, self._on_idle)
        return fut

    def unsplice(self) -> None:
        self._sink = None
        self._stop_timer()
        spliced = self._spliced
        if spliced is not None and not spliced.done():
            spliced.set_result(None)

    def _on_idle(self) -> None:
        self._timer = None
        if self._spliced is None or self._spliced.done():
            return
        loop = self._loop
        due = self._last + self._idle_s
        if self._paused or loop.time() < due:
            # Heard since (or waiting on our own downstream): look again later.
            self._last = loop.time() if self._paused else self._last
            self._timer = loop.call_at(max(due, loop.time() + 0.01), self._on_idle)
            return
        self._set_error(TimeoutError(f"upstream silent for {self._idle_s:g} s"))

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def resume_body(self) -> None:
        self._resume()

    # -- endings ---------------------------------------------------------------------------

    def _set_error(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._sink = None  # its splice has ended: later bytes are no longer its
        self._stop_timer()
        head, waiter, spliced = self._head_waiter, self._waiter, self._spliced
        if head is not None and not head.done():
            head.set_exception(exc)
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        if spliced is not None and not spliced.done():
            spliced.set_exception(exc)

    def _broken(self, why: str) -> None:
        self._set_error(HopError(f"upstream {self.key[0]}:{self.key[1]}: {why}"))
        self.close()

    def fail(self, exc: BaseException) -> None:
        if self.body_done:
            return
        self._set_error(exc)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._sink = None
        if self.body_done:
            self._recycle()
        elif self.state == _BODY and self._error is None:
            # The rest of the body is on its way: pooled once it has come, else closed.
            self._give_up_timer = self._loop.call_later(self._idle_s or 5.0, self._give_up)
        else:
            self.close()

    def _give_up(self) -> None:
        if not self.body_done:
            self.close()

    def _recycle(self) -> None:
        self._stop_give_up()  # else it would close the connection's next answer
        if self.state == _IDLE and self._keep and self.usable():
            self._resume()  # a sink's last pause is not the next answer's
            self.hop._give(self)
        else:
            self.close()

    def _stop_give_up(self) -> None:
        if self._give_up_timer is not None:
            self._give_up_timer.cancel()
            self._give_up_timer = None

    def close(self) -> None:
        self._stop_timer()
        self._stop_give_up()
        if self.state != _CLOSED:
            if self.state in (_HEAD, _BODY) and not self.body_done:
                # A read or splice still waiting (another task's) ends, not hangs.
                self._set_error(HopError(f"upstream {self.key[0]}:{self.key[1]}: closed"))
            self.state = _CLOSED
            self.hop._forget(self)
        if self.transport is not None:
            with contextlib.suppress(RuntimeError):
                self.transport.close()
