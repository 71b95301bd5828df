"""The poller's own GET /status client against a real aiohttp server on port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from cortex.run.status_client import StatusClient, StatusError, Unsupported


@pytest.fixture
async def server() -> AsyncIterator[tuple[TestServer, list[tuple[str, int]]]]:
    peers: list[tuple[str, int]] = []

    async def status(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername")[:2])  # type: ignore[union-attr]
        if request.headers.get("If-None-Match") == '"v1"':
            return web.Response(status=304, headers={"ETag": '"v1"'})
        if request.query.get("close") or request.headers.get("X-Close"):
            return web.Response(body=b"{}", headers={"Connection": "close"})
        resp = web.StreamResponse(headers={"ETag": '"v1"'})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for part in (b'{"health": ', b'{"a": 1}', b"}"):
            await resp.write(part)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/status", status)
    srv = TestServer(app, port=0)
    await srv.start_server()
    yield srv, peers
    await srv.close()


async def test_chunked_answer_then_304_on_one_kept_alive_connection(
    server: tuple[TestServer, list[tuple[str, int]]],
) -> None:
    """A chunked 200 is read whole; the 304 that follows reuses the connection."""
    srv, peers = server
    client = StatusClient()
    base = str(srv.make_url("")).rstrip("/")
    try:
        first = await client.get(base, None, 5.0)
        assert (first.status, first.etag, first.body) == (200, '"v1"', b'{"health": {"a": 1}}')
        again = await client.get(base, '"v1"', 5.0)
        assert (again.status, again.body) == (304, b"")
        assert len(peers) == 2 and peers[0] == peers[1], "one connection for both"
    finally:
        client.close()


async def test_a_closed_connection_is_reopened(
    server: tuple[TestServer, list[tuple[str, int]]],
) -> None:
    """A kept-alive connection the node closed (a restart on the same port) is
    replaced at once; a refused one is a StatusError; https is left to aiohttp."""
    srv, peers = server
    client = StatusClient()
    base = str(srv.make_url("")).rstrip("/")
    port = srv.port
    try:
        await client.get(base, None, 5.0)
        app = srv.app
        await srv.close()
        again = TestServer(app, port=port)
        await again.start_server()
        try:
            answer = await client.get(base, None, 5.0)
            assert answer.status == 200 and len(peers) == 2 and peers[0] != peers[1]
        finally:
            await again.close()
        with pytest.raises(StatusError):
            await client.get(base, None, 5.0)
        with pytest.raises(Unsupported):
            await client.get("https://127.0.0.1:1", None, 5.0)
    finally:
        client.close()
