"""The lean HTTP/1.1 hop (shared.hop), its aiohttp twin (shared.hop_aiohttp) and the
callback-written downstream (shared.downstream), against real servers on port 0:
aiohttp apps for well-behaved upstreams, raw asyncio servers for the protocol's
corners (a byte at a time, resets, malformed heads, idle closes)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal, TypeVar

import aiohttp
import attrs
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.downstream import HIGH, Downstream
from shared.hop import Answer, Hop, HopConnectError, HopError, Unsupported, Upstream, address
from shared.hop_aiohttp import AiohttpAnswer, Link
from tests.conftest import free_port
from tests.support.waiting import until

# Generous upper bounds for anything awaited; never a measured duration.
BOUND_S = 20.0


@functools.cache
def blob() -> bytes:
    """4 MB of numbered 8-byte records: any byte lost, doubled or moved shows."""
    return b"".join(b"%07d\n" % k for k in range(1 << 19))


def ok(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chunked(parts: list[bytes], *, ext: bool = False, trailers: bool = False) -> bytes:
    out = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"]
    for part in parts:
        out.append(b"%x%s\r\n%s\r\n" % (len(part), b";x=1" if ext else b"", part))
    out.append(b"0\r\nX-Trailer: t\r\nX-More: m\r\n\r\n" if trailers else b"0\r\n\r\n")
    return b"".join(out)


# -- a raw server ---------------------------------------------------------------------------

Script = Callable[["Raw", asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@attrs.define(eq=False)
class Raw:
    """A raw HTTP server: `script` plays each connection (given its index)."""

    script: Script
    port: int = 0
    connections: int = 0
    requests: list[bytes] = attrs.Factory(list)
    # Set by a test (same loop) when a script may go on: the client has got so far.
    go: asyncio.Event = attrs.Factory(asyncio.Event)
    # Set as each connection's script ends (it saw the client leave, or returned).
    ended: asyncio.Event = attrs.Factory(asyncio.Event)
    tasks: set[asyncio.Task[None]] = attrs.Factory(set)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index, self.connections = self.connections, self.connections + 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.script(self, reader, writer, index)
        except (ConnectionError, asyncio.CancelledError):
            # The client left (what some tests are about), or the server's teardown
            # cancelled the script: either way this connection is over.
            pass
        finally:
            writer.close()
            self.ended.set()

    async def request(self, reader: asyncio.StreamReader) -> bytes | None:
        """The next request on this connection (head and body), or None at its end."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        length = 0
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        req = head + await reader.readexactly(length)
        self.requests.append(req)
        return req


@contextlib.asynccontextmanager
async def raw_server(script: Script) -> AsyncIterator[Raw]:
    raw = Raw(script)
    server = await asyncio.start_server(raw.accept, "127.0.0.1", 0)
    raw.port = server.sockets[0].getsockname()[1]
    try:
        yield raw
    finally:
        server.close()
        for task in raw.tasks:
            task.cancel()
        await asyncio.gather(*raw.tasks, return_exceptions=True)
        await server.wait_closed()


def answering(*answers: bytes) -> Script:
    """Each request on a connection gets the next of `answers` (the last one repeats)."""

    async def script(
        raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        n = 0
        while await raw.request(reader) is not None:
            writer.write(answers[min(n, len(answers) - 1)])
            await writer.drain()
            n += 1

    return script


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()


@pytest_asyncio.fixture
async def hop() -> AsyncIterator[Hop]:
    h = Hop(connect_timeout_s=BOUND_S)
    yield h
    h.close()


# -- an aiohttp upstream ---------------------------------------------------------------------

GATE = web.AppKey("gate", asyncio.Event)
PEERS = web.AppKey("peers", set[object])


def _seen(request: web.Request) -> None:
    assert request.transport is not None
    request.app[PEERS].add(request.transport.get_extra_info("peername"))


async def _echo(request: web.Request) -> web.Response:
    _seen(request)
    got = ",".join(request.headers.get(h, "-") for h in ("X-Probe", "X-Token"))
    return web.Response(
        body=await request.read(),
        content_type="application/x-echo",
        headers={"X-Got": got, "Retry-After": "7"},
    )


async def _stream(request: web.Request) -> web.StreamResponse:
    """`n` chunks of `size` bytes of the blob; with `gate`, held after the first."""
    _seen(request)
    n, size = int(request.query.get("n", "8")), int(request.query.get("size", "1024"))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(n):
        await resp.write(blob()[i * size : (i + 1) * size])
        if i == 0 and "gate" in request.query:
            await asyncio.wait_for(request.app[GATE].wait(), BOUND_S)
    await resp.write_eof()
    return resp


async def _empty(request: web.Request) -> web.Response:
    _seen(request)
    return web.Response(status=204)


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[TestServer]:
    """The same routes at / and under /p (a base with a path goes through aiohttp)."""
    app = web.Application()
    app[GATE], app[PEERS] = asyncio.Event(), set()
    for prefix in ("", "/p"):
        app.router.add_post(prefix + "/echo", _echo)
        app.router.add_post(prefix + "/stream", _stream)
        app.router.add_post(prefix + "/empty", _empty)
    server = TestServer(app, port=0)
    await server.start_server()
    yield server
    app[GATE].set()  # let held handlers finish before the server waits on them
    await server.close()


def _base(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}"


Kind = Literal["hop", "aiohttp"]


@pytest_asyncio.fixture(params=["hop", "aiohttp"])
async def linked(
    request: pytest.FixtureRequest, upstream: TestServer
) -> AsyncIterator[tuple[Link, str]]:
    """A Link and a base URL that it sends to the hop, or (a path) to aiohttp."""
    kind: Kind = request.param
    async with aiohttp.ClientSession() as session:
        link = Link(Hop(connect_timeout_s=BOUND_S), session, {"X-Token": "tok"})
        yield link, _base(upstream) + ("" if kind == "hop" else "/p")
        link.hop.close()


T = TypeVar("T")


async def _within(fut: Awaitable[T]) -> T:
    async with asyncio.timeout(BOUND_S):
        return await fut


def collector() -> tuple[list[bytes], Callable[[bytes], bool]]:
    got: list[bytes] = []

    def sink(data: bytes) -> bool:
        got.append(data)
        return False

    return got, sink


# -- bodies -----------------------------------------------------------------------------------


async def test_content_length_body(upstream: TestServer, hop: Hop) -> None:
    """A Content-Length answer: head, headers (any case), content type, body; the
    request's own framing headers are the client's, whatever the caller passed."""
    headers = {"X-Probe": "p", "Content-Length": "999", "Connection": "close"}
    a = await hop.request(_base(upstream), "POST", "/echo", headers, b"hello")
    assert a.status == 200
    assert a.header("x-got") == "p,-"
    assert a.header("Retry-After") == "7"  # looked up as the proxy does, not lower-cased
    assert a.header("x-none", "d") == "d"
    assert ("X-Got", "p,-") in a.headers
    assert a.content_type == "application/x-echo"
    assert await a.read() == b"hello"
    assert a.complete
    a.release()


async def test_chunked_readany(upstream: TestServer, hop: Hop) -> None:
    """A chunked answer read piecewise: every byte, in order, then b"" for good."""
    a = await hop.request(_base(upstream), "POST", "/stream?n=64&size=4000", {}, b"")
    assert a.content_type == "text/event-stream"
    parts = []
    while chunk := await _within(a.readany()):
        parts.append(chunk)
    assert b"".join(parts) == blob()[: 64 * 4000]
    assert await a.readany() == b"" and a.complete
    a.release()


async def test_no_body_status(upstream: TestServer, hop: Hop) -> None:
    """A 204 has no body whatever its head says; the connection serves the next one."""
    for _ in range(2):
        a = await hop.request(_base(upstream), "POST", "/empty", {}, b"")
        assert a.status == 204 and await a.read() == b"" and a.complete
        a.release()
    assert len(upstream.app[PEERS]) == 1


async def test_one_byte_at_a_time(hop: Hop) -> None:
    """Head, chunk sizes with extensions, data, CRLFs and trailers split at every byte."""
    parts = [b"a", b"hello world" * 20, b"\r\n0\r\n", b"z" * 300]
    answer = chunked(parts, ext=True, trailers=True)

    async def script(
        raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        while await raw.request(reader) is not None:
            for i in range(len(answer)):
                writer.write(answer[i : i + 1])
                await writer.drain()
                await asyncio.sleep(0)  # a turn for the client to read it alone

    async with raw_server(script) as raw:
        a = await hop.request(raw.base, "POST", "/", {}, b"")
        assert await _within(a.read()) == b"".join(parts)
        a.release()
        a = await hop.request(raw.base, "POST", "/", {}, b"")
        got, sink = collector()
        await _within(a.splice(sink, BOUND_S))
        assert b"".join(got) == b"".join(parts)
        a.release()
        assert raw.connections == 1


@attrs.define
class Cuts:
    answer: bytes = b""
    cuts: list[int] = attrs.Factory(list)


def cut_script(plan: Cuts) -> Script:
    """The first request gets `plan.answer` written in pieces cut at `plan.cuts`;
    the next ones a short "ok" (the first answer's framing ended where it should)."""

    async def script(
        raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        first = True
        while await raw.request(reader) is not None:
            if not first:
                writer.write(ok(b"ok"))
                continue
            first = False
            edges = [0, *sorted({c for c in plan.cuts if 0 < c < len(plan.answer)})]
            for start, end in zip(edges, [*edges[1:], len(plan.answer)], strict=True):
                writer.write(plan.answer[start:end])
                await writer.drain()
                await asyncio.sleep(0)

    return script


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    parts=st.lists(st.binary(min_size=1, max_size=300), max_size=5),
    framing=st.sampled_from(["chunked", "length"]),
    ext=st.booleans(),
    trailers=st.booleans(),
    spliced=st.booleans(),
    cuts=st.lists(st.integers(0, 1800), max_size=10),
)
async def test_any_split(
    parts: list[bytes], framing: str, ext: bool, trailers: bool, spliced: bool, cuts: list[int]
) -> None:
    """Any body, either framing, cut anywhere across reads: the same bytes come out,
    and the connection is left exactly at the answer's end (the next one parses)."""
    body = b"".join(parts)
    answer = chunked(parts, ext=ext, trailers=trailers) if framing == "chunked" else ok(body)
    async with raw_server(cut_script(Cuts(answer, cuts))) as raw:
        hop = Hop(connect_timeout_s=BOUND_S)
        a = await hop.request(raw.base, "POST", "/", {}, b"")
        if spliced:
            got, sink = collector()
            await _within(a.splice(sink, BOUND_S))
            assert b"".join(got) == body
        else:
            assert await _within(a.read()) == body
        a.release()
        a = await hop.request(raw.base, "POST", "/", {}, b"")
        assert await _within(a.read()) == b"ok"
        a.release()
        hop.close()
        assert raw.connections == 1


async def test_read_to_eof_and_connection_close(hop: Hop) -> None:
    """No framing: the body is all until the upstream closes. Connection: close (or
    HTTP/1.0) is obeyed: the next request has a connection of its own."""

    async def script(
        raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int
    ) -> None:
        await raw.request(reader)
        if index == 0:
            writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + blob()[:70000])
        else:
            writer.write(ok(b"last", "Connection: close"))
        await writer.drain()
        if index == 0:
            writer.close()
        else:
            await raw.request(reader)  # stays open: the client is the one to leave

    async with raw_server(script) as raw:
        a = await hop.request(raw.base, "POST", "/", {}, b"")
        assert await _within(a.read()) == blob()[:70000]
        a.release()
        for n in (2, 3):
            a = await hop.request(raw.base, "POST", "/", {}, b"")
            assert await _within(a.read()) == b"last"
            a.release()
            assert raw.connections == n


# -- the pool ---------------------------------------------------------------------------------


async def test_keep_alive_reuse(upstream: TestServer, hop: Hop) -> None:
    """Answers read to their end and released: one connection serves them all."""
    for path in ("/echo", "/stream?n=3", "/echo"):
        a = await hop.request(_base(upstream), "POST", path, {}, b"x")
        await a.read()
        a.release()
    assert len(upstream.app[PEERS]) == 1


async def test_idle_close_replaced(hop: Hop) -> None:
    """The upstream closes a kept-alive connection while it idles (and, the race,
    just as our next request reaches it): the request goes on a fresh one."""

    async def script(
        raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int
    ) -> None:
        await raw.request(reader)
        writer.write(ok(b"first" if index == 0 else b"again"))
        await writer.drain()
        if index == 1:
            await raw.request(reader)  # the request arrives, and the close answers it
        elif index == 2:
            await raw.request(reader)  # stays

    async with raw_server(script) as raw:
        for n, want in ((1, b"first"), (2, b"again"), (3, b"again")):
            a = await hop.request(raw.base, "POST", "/", {}, b"")
            assert await _within(a.read()) == want
            a.release()
            assert raw.connections == n
        assert len(raw.requests) == 4  # the third went twice: closed on, then answered


async def test_fresh_connection_closed_is_an_error(hop: Hop) -> None:
    """A new connection closed before any answer is not retried: HopError."""

    async def script(
        raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        await raw.request(reader)

    async with raw_server(script) as raw:
        with pytest.raises(HopError, match="closed"):
            await _within(hop.request(raw.base, "POST", "/", {}, b""))
        assert raw.connections == 1


async def test_connect_refused(hop: Hop) -> None:
    with pytest.raises(HopConnectError):
        await hop.request(f"http://127.0.0.1:{free_port()}", "POST", "/", {}, b"")


def test_address() -> None:
    assert address("http://h:81") == ("h", 81)
    assert address("http://h/") == ("h", 80)
    for base in ("https://h:1", "http://h:1/prefix", "unix:/x"):
        with pytest.raises(Unsupported):
            address(base)


# -- broken answers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        b"garbage\r\n\r\n",
        b"HTTP/1.1 abc\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70000,
    ],
    ids=["not-http", "status", "length", "negative-length", "head-too-long"],
)
async def test_malformed_head(hop: Hop, answer: bytes) -> None:
    async with raw_server(answering(answer)) as raw:
        with pytest.raises(HopError, match=r"malformed|too long"):
            await _within(hop.request(raw.base, "POST", "/", {}, b""))


@pytest.mark.parametrize(
    "body",
    [b"zz\r\nabcdefgh\r\n", b"-6\r\nabcdefgh\r\n", b"9" * 70000],
    ids=["hex", "negative", "endless-line"],
)
async def test_bad_chunk_size(hop: Hop, body: bytes) -> None:
    """A chunk size that is no size ends the body with HopError (not garbage; -6 once
    had the parser step back onto its own line for ever, the event loop with it)."""
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    async with raw_server(answering(answer)) as raw:
        a = await hop.request(raw.base, "POST", "/", {}, b"")
        with pytest.raises(HopError, match="chunk size"):
            await _within(a.read())
        a.release()


def cut_short(answer: bytes, how: Literal["close", "reset"]) -> Script:
    """Send `answer` (a head and part of its body); once the test has read that much
    (`go`), close or reset."""

    async def script(
        raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int
    ) -> None:
        await raw.request(reader)
        writer.write(answer)
        await writer.drain()
        await asyncio.wait_for(raw.go.wait(), BOUND_S)
        if how == "close":
            writer.close()
        else:
            reset(writer)

    return script


CUT_ANSWERS = {
    "length": ok(b"x" * 100)[:-60],
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n" + b"x" * 40,
    "eof": b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 40,
}


async def _take(a: Upstream, n: int) -> bytes:
    """Read until `n` bytes have come."""
    got = b""
    while len(got) < n:
        chunk = await _within(a.readany())
        assert chunk, f"the body ended after {got!r}"
        got += chunk
    return got


# A close is how an unframed body ends: only a reset cuts one short.
CUTS = [("length", "close"), ("length", "reset"), ("chunked", "close"), ("chunked", "reset")]


@pytest.mark.parametrize(("framing", "how"), [*CUTS, ("eof", "reset")])
@pytest.mark.parametrize("spliced", [False, True], ids=["read", "splice"])
async def test_cut_mid_body(
    hop: Hop, how: Literal["close", "reset"], framing: str, spliced: bool
) -> None:
    """A body cut short (a close before its framing's end; a reset, whatever the
    framing) is HopError to its reader or splice, after the bytes that did come."""
    async with raw_server(cut_short(CUT_ANSWERS[framing], how)) as raw:
        a = await hop.request(raw.base, "POST", "/", {}, b"")
        assert await _take(a, 40) == b"x" * 40
        got, sink = collector()
        rest = a.splice(sink, BOUND_S) if spliced else asyncio.ensure_future(a.read())
        raw.go.set()
        with pytest.raises(HopError, match=r"closed|reset"):
            await _within(rest)
        assert got == [] and not a.complete
        a.release()


# -- splice, pause, fail: the hop and aiohttp alike (through a Link) ---------------------------


async def test_link_same_answers(linked: tuple[Link, str]) -> None:
    """http:// goes to the hop, a base with a path to aiohttp: the same answer either
    way, with the link's own headers under the caller's."""
    link, base = linked
    a = await link.post(base, "/echo", {"X-Probe": "p"}, b"body")
    assert isinstance(a, AiohttpAnswer if base.endswith("/p") else Answer)
    assert (a.status, a.header("X-Got"), a.header("retry-after")) == (200, "p,tok", "7")
    assert a.content_type == "application/x-echo"
    assert ("X-Got", "p,tok") in a.headers
    assert await a.read() == b"body" and a.complete
    a.release()
    a = await link.post(base, "/echo", {"X-Token": "mine"}, b"")
    assert a.header("x-got") == "-,mine"
    a.release()


@pytest.mark.parametrize("suffix", ["", "/p"], ids=["hop", "aiohttp"])
async def test_link_connect_refused(suffix: str) -> None:
    async with aiohttp.ClientSession() as session:
        link = Link(Hop(connect_timeout_s=BOUND_S), session)
        with pytest.raises(HopConnectError):
            await link.post(f"http://127.0.0.1:{free_port()}{suffix}", "/echo", {}, b"")


async def test_splice_in_order(linked: tuple[Link, str]) -> None:
    """Every byte of a long stream reaches the sink, in order; the future ends with it."""
    link, base = linked
    a = await link.post(base, "/stream?n=200&size=4096", {}, b"")
    got, sink = collector()
    await _within(a.splice(sink, BOUND_S))
    assert b"".join(got) == blob()[: 200 * 4096]
    assert a.complete
    a.release()


async def test_unsplice_ends_the_splice(linked: tuple[Link, str], upstream: TestServer) -> None:
    """A sink that has seen the stream's end unsplices: the future ends then, not
    when the upstream's body does (it is held here)."""
    link, base = linked
    a = await link.post(base, "/stream?n=3&gate=1", {}, b"")
    got: list[bytes] = []

    def sink(data: bytes) -> bool:
        got.append(data)
        a.unsplice()
        return False

    await _within(a.splice(sink, BOUND_S))
    assert len(got) == 1 and blob().startswith(got[0])
    assert not a.complete
    upstream.app[GATE].set()
    a.release()


async def test_idle_timeout(linked: tuple[Link, str]) -> None:
    """An upstream silent for idle_s mid-stream: the splice ends with TimeoutError."""
    link, base = linked
    a = await link.post(base, "/stream?n=2&gate=1", {}, b"")
    assert await _take(a, 1024) == blob()[:1024]  # then the upstream holds
    got, sink = collector()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await _within(a.splice(sink, 0.2))
    print(f"idle 0.2 s: timed out after {time.monotonic() - started:.3f} s")
    assert got == []
    a.close()


class Boom(Exception):
    pass


async def test_fail_ends_a_pending_read(linked: tuple[Link, str]) -> None:
    link, base = linked
    a = await link.post(base, "/stream?n=2&gate=1", {}, b"")
    assert await _take(a, 1024) == blob()[:1024]
    pending = asyncio.ensure_future(a.readany())
    a.fail(Boom("client left"))
    with pytest.raises(Boom):
        await _within(pending)
    a.close()


@pytest.mark.parametrize("paused", [False, True], ids=["reading", "paused"])
async def test_fail_ends_a_splice(linked: tuple[Link, str], paused: bool) -> None:
    """fail() ends a splice with its error, also while the sink has it paused."""
    link, base = linked
    a = await link.post(base, "/stream?n=2&gate=1", {}, b"")
    got: list[bytes] = []

    def sink(data: bytes) -> bool:
        got.append(data)
        return paused

    spliced = a.splice(sink, BOUND_S)
    await until(lambda: sum(map(len, got)) >= 1024, timeout=BOUND_S, what="the first chunk")
    a.fail(Boom("cut"))
    with pytest.raises(Boom):
        await _within(spliced)
    a.close()


async def test_sink_error_on_early_bytes(upstream: TestServer, hop: Hop) -> None:
    """A sink failing on bytes that came before the splice ends the splice's future
    with its error, as it does for later ones (not raised from splice())."""
    a = await hop.request(_base(upstream), "POST", "/echo", {}, b"early")
    await until(lambda: a.complete, timeout=BOUND_S, what="the whole body")

    def sink(data: bytes) -> bool:
        raise ConnectionResetError("the client left")

    spliced = a.splice(sink, BOUND_S)
    with pytest.raises(ConnectionResetError):
        await _within(spliced)
    a.release()


async def test_no_bytes_to_a_sink_after_its_splice_failed(upstream: TestServer, hop: Hop) -> None:
    """Once fail() (or the idle timeout) has ended a splice, the rest of the body does
    not reach its sink: the proxy is writing its own ending by then."""
    a = await hop.request(_base(upstream), "POST", "/stream?n=3&gate=1", {}, b"")
    got, sink = collector()
    spliced = a.splice(sink, BOUND_S)
    await until(lambda: sum(map(len, got)) >= 1024, timeout=BOUND_S, what="the first chunk")
    a.fail(Boom("cut"))
    with pytest.raises(Boom):
        await _within(spliced)
    upstream.app[GATE].set()
    await until(lambda: a.complete, timeout=BOUND_S, what="the rest of the body")
    assert b"".join(got) == blob()[:1024]
    a.release()


async def test_pause_and_resume(linked: tuple[Link, str]) -> None:
    """A sink that asks for a pause at every chunk, resumed a turn later: 2 MB, all
    of it, in order."""
    link, base = linked
    a = await link.post(base, "/stream?n=64&size=32768", {}, b"")
    got: list[bytes] = []
    loop = asyncio.get_running_loop()

    def sink(data: bytes) -> bool:
        got.append(data)
        loop.call_soon(a.resume)
        return True

    await _within(a.splice(sink, BOUND_S))
    assert b"".join(got) == blob()[: 64 * 32768]
    print(f"2 MB in {len(got)} paused pieces")
    a.release()


# -- the hop's own pause, release and close --------------------------------------------------


async def test_pause_stops_reading(hop: Hop) -> None:
    """While the sink has the splice paused nothing more is read, though the upstream
    has sent it all; resume() brings the rest, nothing lost."""
    body = blob()[:200_000]
    sent = asyncio.Event()

    async def script(
        raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int
    ) -> None:
        await raw.request(reader)
        if index == 1:  # the barrier's connection
            writer.write(ok(b"ok"))
            return
        writer.write(ok(body)[: -len(body) + 1000])
        await asyncio.wait_for(raw.go.wait(), BOUND_S)
        writer.write(body[1000:])
        await writer.drain()
        sent.set()

    async with raw_server(script) as raw:
        a = await hop.request(raw.base, "POST", "/", {}, b"")
        got: list[bytes] = []
        full = True

        def sink(data: bytes) -> bool:
            got.append(data)
            return full

        spliced = a.splice(sink, BOUND_S)
        await until(lambda: got, timeout=BOUND_S, what="the first bytes")
        raw.go.set()
        await _within(sent.wait())
        # A round trip on another connection: the loop has turned many times since.
        other = Hop()
        b = await other.request(raw.base, "POST", "/", {}, b"")
        assert await b.read() == b"ok"
        other.close()
        assert len(got) == 1, "bytes were read while paused"
        full = False
        a.resume()
        await _within(spliced)
        assert b"".join(got) == body
        a.release()


async def test_paused_at_the_end_is_not_pooled_paused(upstream: TestServer, hop: Hop) -> None:
    """A sink's last pause (its downstream full as the body ends) does not stay with
    the connection once it is pooled: the next request on it is read."""
    a = await hop.request(_base(upstream), "POST", "/echo", {}, b"small")
    got: list[bytes] = []

    def sink(data: bytes) -> bool:
        got.append(data)
        return True

    await _within(a.splice(sink, BOUND_S))
    assert got == [b"small"]
    a.release()
    b = await asyncio.wait_for(hop.request(_base(upstream), "POST", "/echo", {}, b"2"), 5)
    assert await _within(b.read()) == b"2"
    b.release()
    assert len(upstream.app[PEERS]) == 1


def held(rest: bytes, then: bytes) -> Script:
    """Connection 0: the head and first 1000 bytes of a 1000 + len(rest) body, the rest
    once `go` is set; `then` for later requests. Other connections: `then`."""

    async def script(
        raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, index: int
    ) -> None:
        await raw.request(reader)
        if index == 0:
            writer.write(ok(b"x" * 1000 + rest)[: -len(rest)])
            await asyncio.wait_for(raw.go.wait(), BOUND_S)
            writer.write(rest)
        else:
            writer.write(then)
        while await raw.request(reader) is not None:
            writer.write(then)

    return script


async def test_release_mid_body_pools_once_it_ends(hop: Hop) -> None:
    async with raw_server(held(b"y" * 1000, ok(b"next"))) as raw:
        a = await hop.request(raw.base, "POST", "/", {}, b"")
        assert await _take(a, 1000) == b"x" * 1000
        a.release()
        raw.go.set()
        await until(lambda: a.complete, timeout=BOUND_S, what="the rest of the body")
        b = await hop.request(raw.base, "POST", "/", {}, b"")
        assert await _within(b.read()) == b"next"
        b.release()
        assert raw.connections == 1


async def test_release_timer_spares_the_next_answer(hop: Hop) -> None:
    """A connection released mid-body, pooled when the rest came and reused: the
    release's give-up timer (idle_s) must not close the next answer's stream."""
    idle_s = 0.3
    slow = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345"
    async with raw_server(held(b"y" * 1000, slow)) as raw:
        a = await hop.request(raw.base, "POST", "/", {}, b"")

        def sink(data: bytes) -> bool:
            a.unsplice()
            return False

        await _within(a.splice(sink, idle_s))
        a.release()
        raw.go.set()
        await until(lambda: a.complete, timeout=BOUND_S, what="the rest of the body")
        b = await hop.request(raw.base, "POST", "/", {}, b"")
        assert await _take(b, 5) == b"12345"
        pending = asyncio.ensure_future(b.readany())
        # Past the stale timer's due time: what this test is about is that it does not fire.
        await asyncio.sleep(idle_s * 2)
        assert not pending.done() and not raw.ended.is_set(), "the next answer was cut"
        assert raw.connections == 1
        b.close()
        with pytest.raises(HopError):
            await _within(pending)
        assert not b.complete


async def test_release_after_an_error_closes(hop: Hop) -> None:
    async with raw_server(held(b"y" * 1000, ok(b"next"))) as raw:
        a = await hop.request(raw.base, "POST", "/", {}, b"")
        await _take(a, 1000)
        a.fail(Boom("cut"))
        a.release()
        raw.go.set()  # the script reads again: it sees us gone
        await _within(raw.ended.wait())  # the upstream saw us leave
        b = await hop.request(raw.base, "POST", "/", {}, b"")
        assert await _within(b.read()) == b"next"
        b.release()
        assert raw.connections == 2


async def test_close_mid_body(hop: Hop) -> None:
    """close() drops the connection (the upstream sees it) and ends a pending read."""
    async with raw_server(held(b"y" * 1000, ok(b"next"))) as raw:
        a = await hop.request(raw.base, "POST", "/", {}, b"")
        await _take(a, 1000)
        pending = asyncio.ensure_future(a.readany())
        a.close()
        raw.go.set()  # the script reads again: it sees us gone
        await _within(raw.ended.wait())
        with pytest.raises(HopError):
            await _within(pending)
        a.release()  # after close: nothing to give back


# -- Downstream ------------------------------------------------------------------------------

PIECES = [blob()[i * 5000 : (i + 1) * 5000] for i in range(40)]


async def _relay(request: web.Request) -> web.StreamResponse:
    """A begun stream: its first piece through aiohttp, the rest through Downstream."""
    resp = web.StreamResponse()
    mode = request.query["mode"]
    if mode == "explicit":
        resp.enable_chunked_encoding()
    elif mode == "length":
        resp.content_length = sum(map(len, PIECES))
    await resp.prepare(request)
    await resp.write(PIECES[0])
    down = Downstream(request, resp, lambda: None)
    for piece in PIECES[1:]:
        down.write(piece)
        down.write(b"")  # nothing: not the last chunk
    await resp.write_eof()
    return resp


LEFT = web.AppKey("left", asyncio.Future[str])


async def _abandoned(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    await resp.prepare(request)
    await resp.write(b"first")
    down = Downstream(request, resp, lambda: None)
    t = request.transport
    assert t is not None
    try:
        await until(t.is_closing, timeout=BOUND_S, what="the client to leave")
    finally:  # aiohttp may cancel the handler as the client leaves, instead
        try:
            down.write(b"more")
            request.app[LEFT].set_result("written")
        except ConnectionResetError:
            request.app[LEFT].set_result("reset")
    return resp


@attrs.define
class Flood:
    full: asyncio.Future[int] = attrs.Factory(asyncio.Future)
    resumed: asyncio.Event = attrs.Factory(asyncio.Event)


FLOOD = web.AppKey("flood", Flood)
PIECE = 16384


async def _flood(request: web.Request) -> web.StreamResponse:
    """Write pieces until Downstream says full, wait for its resume, one more, end."""
    flood = request.app[FLOOD]
    t = request.transport
    assert t is not None
    t.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    resp = web.StreamResponse()
    await resp.prepare(request)
    await resp.write(blob()[:PIECE])
    down = Downstream(request, resp, flood.resumed.set)
    k, full = 1, False
    while not full and k < len(blob()) // PIECE - 1:
        full = down.write(blob()[k * PIECE : (k + 1) * PIECE])
        k += 1
    flood.full.set_result(k if full else -1)
    await asyncio.wait_for(flood.resumed.wait(), BOUND_S)
    down.write(blob()[k * PIECE : (k + 1) * PIECE])
    await resp.write_eof()
    return resp


@pytest_asyncio.fixture
async def relay() -> AsyncIterator[TestServer]:
    app = web.Application()
    app[LEFT], app[FLOOD] = asyncio.get_running_loop().create_future(), Flood()
    app.router.add_get("/relay", _relay)
    app.router.add_get("/abandoned", _abandoned)
    app.router.add_get("/flood", _flood)
    server = TestServer(app, port=0)
    await server.start_server()
    yield server
    await server.close()


@pytest.mark.parametrize("mode", ["implicit", "explicit", "length"])
async def test_downstream_bytes_in_order(relay: TestServer, mode: str) -> None:
    """A real client reads exactly the bytes, framed as the response was prepared
    (chunked as aiohttp chose it, or asked for; a Content-Length), and the
    connection serves the next request."""
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.get(f"{_base(relay)}/relay?mode={mode}") as resp:
                assert await resp.read() == b"".join(PIECES)
                assert ("Transfer-Encoding" in resp.headers) == (mode != "length")


async def test_downstream_client_gone(relay: TestServer) -> None:
    async with aiohttp.ClientSession() as session:
        resp = await session.get(f"{_base(relay)}/abandoned")
        assert await resp.content.readexactly(5) == b"first"
        resp.close()
    left: asyncio.Future[str] = relay.app[LEFT]
    assert await _within(left) == "reset"


async def _dechunk(reader: asyncio.StreamReader) -> bytes:
    out = []
    while size := int((await reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16):
        out.append((await reader.readexactly(size + 2))[:-2])
    assert await reader.readuntil(b"\r\n") == b"\r\n"
    return b"".join(out)


async def test_downstream_backpressure(relay: TestServer) -> None:
    """A client that does not read: past HIGH queued, write says full; once it reads,
    resume is called, and it gets every byte in order."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", relay.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")
        flood = relay.app[FLOOD]
        k = await _within(flood.full)
        assert k * PIECE > HIGH
        assert not flood.resumed.is_set()
        print(f"full after {k * PIECE} bytes written (HIGH {HIGH})")
        head = await _within(reader.readuntil(b"\r\n\r\n"))
        assert b"Transfer-Encoding: chunked" in head
        body = await _within(_dechunk(reader))
        assert flood.resumed.is_set()
        assert body == blob()[: (k + 1) * PIECE]
    finally:
        writer.close()
