"""What a client may cost before a handler runs (issue 19), in-process: the capped
inflater, read_body on a raw body, the connection guard (header timeout, per-address
cap), the body timeout, a client reset mid-write, and the error frame's shape.

The guard is the one `cortex serve` and `neuron serve` install (shared.serve); here it
wraps a small app's server on port 0 directly. tests/e2e/test_hostile_clients.py runs
the same against the real services.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import socket
import struct
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from bench.hostile import gzip_bomb
from shared.errors import error_middleware, frame_error, read_body, sse_error_frame
from shared.inflate import InflatedTooLarge, InflateError, inflate
from shared.serve import HANDLER_ARGS, ConnectionLimits, Guards, guard_middleware
from tests.support import rawhttp
from tests.support.waiting import until

DATA = os.urandom(100_000) + b"words " * 200_000

# -- the inflater ---------------------------------------------------------------------------


def _raw_deflate(data: bytes) -> bytes:
    d = zlib.compressobj(6, zlib.DEFLATED, -15)
    return d.compress(data) + d.flush()


@pytest.mark.parametrize(
    ("encoding", "body"),
    [
        ("gzip", gzip.compress(DATA)),
        ("x-gzip", gzip.compress(DATA)),
        ("deflate", zlib.compress(DATA)),
        ("deflate", _raw_deflate(DATA)),
    ],
    ids=["gzip", "x-gzip", "zlib deflate", "raw deflate"],
)
def test_inflate_reads_what_clients_send(encoding: str, body: bytes) -> None:
    assert inflate(body, encoding, len(DATA)) == DATA


def test_inflate_joins_gzip_members_and_refuses_too_many() -> None:
    assert inflate(gzip.compress(b"a") + gzip.compress(b"b"), "gzip", 10) == b"ab"
    with pytest.raises(InflateError, match="members"):
        inflate(gzip.compress(b"") * 100, "gzip", 10)


def test_inflate_stops_at_the_limit_not_at_the_end_of_the_bomb() -> None:
    """1 GiB of zeros in 1 MB: refused after the limit, in well under a second of CPU."""
    bomb = gzip_bomb()
    t0 = time.process_time()
    with pytest.raises(InflatedTooLarge, match="more than 8388608 bytes"):
        inflate(bomb, "gzip", 8 << 20)
    print(f"\n{len(bomb)} bytes refused after {time.process_time() - t0:.3f} s of CPU")
    # The same bomb, smaller: inflated exactly to the limit, it is accepted whole.
    assert inflate(gzip_bomb(4 << 20), "gzip", 4 << 20) == bytes(4 << 20)
    with pytest.raises(InflatedTooLarge):
        inflate(gzip_bomb(4 << 20), "gzip", (4 << 20) - 1)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"not gzip at all", "not valid gzip"),
        (gzip.compress(DATA)[:-100], "ends too soon"),
        (gzip.compress(b"{}") + b"garbage", "not valid gzip"),
    ],
)
def test_inflate_refuses_bad_bytes(body: bytes, match: str) -> None:
    with pytest.raises(InflateError, match=match):
        inflate(body, "gzip", len(DATA))


# -- the error frame ----------------------------------------------------------------------


def test_the_error_frame_carries_a_string_code_and_the_status() -> None:
    frame = sse_error_frame("runner lost")
    assert frame.endswith(b"\n\ndata: [DONE]\n\n")
    err = json.loads(frame.split(b"\n", 1)[0][len(b"data: ") :])["error"]
    assert err == {
        "message": "runner lost",
        "type": "server_error",
        "code": "upstream_error",
        "param": None,
        "status": 502,
    }
    err = json.loads(sse_error_frame("bad stop", 400, "invalid_request")[6:].split(b"\n")[0])
    assert (err["error"]["type"], err["error"]["code"]) == (
        "invalid_request_error",
        "invalid_request",
    )
    assert frame_error(err["error"]) == (400, "invalid_request")


def test_frames_of_the_old_shape_still_read() -> None:
    """A neuron from before issue 19 sent the status as `code`, the code as `type`."""
    assert frame_error({"code": 400, "type": "invalid_request"}) == (400, "invalid_request")
    assert frame_error({"code": 503, "type": "shutting_down"}) == (503, "shutting_down")
    assert frame_error({"message": "x"}) == (502, "upstream_error")
    assert frame_error("not a dict") == (502, "upstream_error")


# -- an app served like the services ------------------------------------------------------


async def _echo(request: web.Request) -> web.Response:
    body = await read_body(request)
    again = await read_body(request)  # kept: a handler may ask twice (cortex does)
    assert again is body
    return web.json_response({"bytes": len(body)})


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _app() -> web.Application:
    app = web.Application(
        middlewares=[guard_middleware, error_middleware],
        client_max_size=1 << 20,
        handler_args=HANDLER_ARGS,
    )
    app.router.add_post("/echo", _echo)
    app.router.add_get("/health", _health)
    return app


class Served:
    def __init__(self, guards: Guards, port: int) -> None:
        self.guards = guards
        self.port = port


async def _serve(limits: ConnectionLimits) -> AsyncIterator[Served]:
    runner = web.AppRunner(_app(), handle_signals=False)
    await runner.setup()
    assert runner.server is not None
    guards = Guards(limits)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(guards.wrap(runner.server), "127.0.0.1", 0)
    try:
        yield Served(guards, server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await runner.cleanup()


@pytest.fixture
async def quick() -> AsyncIterator[Served]:
    """Header and body timeouts of half a second; a cap of 2 connections per address."""
    limits = ConnectionLimits(
        header_timeout_s=0.5, body_timeout_s=0.5, max_connections_per_address=2
    )
    async for served in _serve(limits):
        yield served


async def _connect(port: int, source: str = "127.0.0.1") -> tuple[Any, Any]:
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((source, 0))
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


async def _until_closed(reader: asyncio.StreamReader, within: float = 30.0) -> bytes:
    """What the server sent before it closed the connection (bounded wait)."""
    got = b""
    async with asyncio.timeout(within):
        try:
            while chunk := await reader.read(4096):
                got += chunk
        except ConnectionError:
            pass
    return got


async def test_a_gzip_bomb_is_413_and_good_bodies_are_read(quick: Served) -> None:
    """The body comes raw (aiohttp's decoding is off) and read_body inflates it, capped."""
    bomb = rawhttp.request("POST", "/echo", gzip_bomb(), {"Content-Encoding": "gzip"})
    answer = await rawhttp.send(quick.port, bomb)
    assert (answer.status, answer.code) == (413, "request_too_large"), answer
    assert answer.headers.get("connection") == "close"
    for encoding, body in (("gzip", gzip.compress(b"x" * 1000)), ("deflate", zlib.compress(b"x"))):
        req = rawhttp.request("POST", "/echo", body, {"Content-Encoding": encoding})
        answer = await rawhttp.send(quick.port, req)
        assert answer.status == 200 and answer.json()["bytes"] in (1000, 1), answer
    for encoding in ("br", "compress"):
        req = rawhttp.request("POST", "/echo", b"{}", {"Content-Encoding": encoding})
        answer = await rawhttp.send(quick.port, req)
        assert (answer.status, answer.code) == (400, "invalid_request"), answer
    big = rawhttp.request("POST", "/echo", b"x" * ((1 << 20) + 1))
    assert (await rawhttp.send(quick.port, big)).code == "request_too_large"


async def test_late_headers_close_the_connection(quick: Served) -> None:
    """A connection that sends nothing, or half its headers, is closed at the timeout."""
    silent_r, _ = await _connect(quick.port)
    slow_r, slow_w = await _connect(quick.port)
    slow_w.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    t0 = time.monotonic()
    assert await _until_closed(silent_r) == b""
    assert await _until_closed(slow_r) == b""
    print(f"\nclosed {time.monotonic() - t0:.2f} s after a 0.5 s header timeout")


async def test_an_idle_connection_between_requests_is_not_late(quick: Served) -> None:
    """Keep-alive idleness is aiohttp's business (75 s): only a begun request is timed."""
    reader, writer = await _connect(quick.port)
    for _ in range(2):
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        await reader.readexactly(int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0]))
        await asyncio.sleep(1.0)  # twice the header timeout, idle
    writer.write(b"GET /health HTTP/1.1\r\n")  # a request begun, never finished
    assert await _until_closed(reader) == b""


async def test_a_late_body_is_408_and_closed(quick: Served) -> None:
    reader, writer = await _connect(quick.port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
    answer = await _until_closed(reader)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b'"code": "request_timeout"' in answer


async def test_connections_past_the_cap_get_429_then_close(quick: Served) -> None:
    """Two open connections from 127.0.0.2: a third is refused; 127.0.0.1 is served."""
    held = [await _connect(quick.port, "127.0.0.2") for _ in range(2)]
    await until(lambda: quick.guards.open["127.0.0.2"] == 2, what="two connections counted")
    reader, writer = await _connect(quick.port, "127.0.0.2")
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await _until_closed(reader)
    assert answer.startswith(b"HTTP/1.1 429"), answer
    assert b'"code": "too_many_connections"' in answer and b"Retry-After: 1" in answer
    assert (await rawhttp.send(quick.port, rawhttp.request("GET", "/health"))).status == 200
    held[0][1].close()
    await until(lambda: quick.guards.open["127.0.0.2"] < 2, what="a held connection released")
    reader, writer = await _connect(quick.port, "127.0.0.2")
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert (await _until_closed(reader)).startswith(b"HTTP/1.1 200")


# -- a client reset while we write --------------------------------------------------------


async def test_a_client_reset_mid_write_is_debug_not_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The handler writes after the client reset (no handler cancellation here, so the
    write does meet the closed transport): DEBUG, never an ERROR with a traceback."""
    gone = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        transport = request.transport
        await until(lambda: transport is None or transport.is_closing(), what="the reset")
        try:
            while True:
                await resp.write(b"data: more\n\n")
                await asyncio.sleep(0.01)
        finally:
            gone.set()

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/stream", stream)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        with caplog.at_level(logging.DEBUG, logger="shared.errors"):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.to_thread(_recv_until, sock, b"first")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            await asyncio.wait_for(gone.wait(), 30)
            await until(lambda: _records(caplog, "went away"), what="the DEBUG line")
    finally:
        await runner.cleanup()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors


def _recv_until(sock: socket.socket, marker: bytes) -> None:
    sock.settimeout(30)
    got = b""
    while marker not in got:
        chunk = sock.recv(4096)
        assert chunk, got
        got += chunk


def _records(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]
