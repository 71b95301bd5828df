"""Hostile clients against the real services (issue 19): `cortex serve` and `neuron serve`
as processes, loopback only.

- gzip bombs (1 MB inflating to 1 GiB, 1, 4 and 8 at once): each gets its 413 while
  /health keeps answering; latency and RSS are printed, bounded only generously (before
  issue 19: /health waited 3-9 s and RSS grew by 90-500 MB);
- slowloris (headers at 1 byte/s): every connection is closed after the header
  timeout, /health answering meanwhile (before: all still open after 45 s);
- the per-address connection cap: the extra connection gets 429 and is closed, other
  addresses are served, and a freed slot is usable again;
- a client that resets mid-stream: DEBUG on the neuron, never an ERROR.

The same clients make the figures of `python -m bench.hostile`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest
from aiohttp import web

from bench.hostile import (
    bomb_round,
    gzip_bomb,
    health_once,
    raise_fd_limit,
    rss_mb,
    slowloris,
)
from neuron.config import LoadEntry, NeuronConfig
from neuron.http.app import create_app
from tests.conftest import LONG_STREAM, TEST_ROOT, NeuronProcess
from tests.e2e.conftest import CortexProcess
from tests.support.waiting import until

# Generous: the machine is shared and noisy. Before issue 19 these were 3-9 s and
# +90 to +500 MB; after, tens of ms and +10 to +30 MB.
HEALTH_BOUND_S = 2.0
RSS_GROWTH_BOUND_MB = 120.0
# The test holds the mechanism with fewer than the 2,000 (kept short for
# the suite's time); `python -m bench.hostile` measures the 2,000.
SLOWLORIS = 500
HEADER_TIMEOUT_S = 2.0


@attrs.frozen
class Served:
    name: str
    port: int
    pid: int


@pytest.fixture(params=["cortex", "neuron"])
def start(
    request: pytest.FixtureRequest,
    cortex_factory: Callable[..., CortexProcess],
    neuron_factory: Callable[..., NeuronProcess],
) -> Callable[..., Served]:
    """`start(**settings)`: the service under test (cortex with no neuron and an empty
    catalogue, a neuron with no model), as a process."""

    def make(**settings: Any) -> Served:
        if request.param == "cortex":
            c = cortex_factory([], [], **settings)
            assert c.process is not None
            return Served("cortex", c.port, c.process.pid)
        n = neuron_factory(settings)
        return Served("neuron", n.port, n.process.pid)

    return make


async def test_gzip_bombs_leave_health_answering(start: Callable[..., Served]) -> None:
    s = start()
    body = gzip_bomb()
    rest = rss_mb(s.pid)
    print(f"\n{s.name}: RSS at rest {rest:.0f} MB; bombs of {len(body)} bytes -> 1 GiB")
    for n in (8,):  # the worst case; bench.hostile also measures 1 and 4
        r = await bomb_round(s.port, s.pid, "/v1/chat/completions", n, body)
        print(
            f"  {n} bomb(s): /health {r.health}; RSS {r.rss_before_mb:.0f} -> peak "
            f"{r.rss_peak_mb:.0f} MB"
        )
        assert r.answers == ("413 request_too_large",) * n, r
        assert r.max_health_s is not None and "failed" not in r.health, r
        assert r.max_health_s < HEALTH_BOUND_S, r
        assert r.rss_peak_mb - rest < RSS_GROWTH_BOUND_MB, r


async def test_slowloris_is_closed_after_the_header_timeout(
    start: Callable[..., Served],
) -> None:
    n = min(SLOWLORIS, raise_fd_limit(2 * SLOWLORIS + 512) // 2 - 256)
    s = start(header_timeout_s=HEADER_TIMEOUT_S)
    watch_s = 30.0
    result = await slowloris(s.port, n, watch_s)
    longest = result.max_lifetime()
    after = HEADER_TIMEOUT_S + 2.0
    print(
        f"\n{s.name}: {result.opened} slow connections (of {n}; {SLOWLORIS} wanted), "
        f"header timeout {HEADER_TIMEOUT_S:g} s: open after {after:g} s: "
        f"{result.open_after(after)}, after {watch_s:g} s: {result.open_after(watch_s)}; "
        f"longest lived {longest or 0:.2f} s; /health {result.health}"
    )
    assert result.failed_to_open == 0, result.failed_to_open
    assert result.open_after(watch_s) == 0
    assert "failed" not in result.health and "no answer" not in result.health
    assert await health_once(s.port) is not None


async def test_connections_past_the_cap_are_refused(start: Callable[..., Served]) -> None:
    s = start(max_connections_per_address=4, header_timeout_s=120.0)
    held = [await _connect(s.port, "127.0.0.2") for _ in range(4)]
    # The fifth from the same address: 429 too_many_connections, then closed.
    reader, writer = await _connect(s.port, "127.0.0.2")
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await _until_closed(reader)
    status_line = answer.split(b"\r\n", 1)[0]
    print(f"\n{s.name}: the fifth connection got {status_line!r}")
    assert answer.startswith(b"HTTP/1.1 429"), answer
    assert b'"code": "too_many_connections"' in answer
    # Another address is served meanwhile.
    assert await health_once(s.port) is not None
    for _, w in held:
        w.close()

    async def served_again() -> bool:
        r, w = await _connect(s.port, "127.0.0.2")
        w.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return (await _until_closed(r)).startswith(b"HTTP/1.1 200")

    await until(served_again, what="127.0.0.2 served once its connections closed")


async def test_a_client_reset_mid_stream_is_debug_not_error(
    tmp_path: Path, demo_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stream from a real runner; the client resets it mid-stream. Served here without
    handler cancellation, the handler's next write meets the closed transport every
    time (under `neuron serve` it does when it beats the cancellation: 4 resets in 30
    before issue 19): logged at DEBUG ("went away"), never at ERROR with a traceback."""
    model = f"reset-{uuid.uuid4().hex[:8]}"
    config = NeuronConfig(
        port=0,
        store_dir=str(tmp_path / "store"),
        model_roots=tuple(str(r) for r in TEST_ROOT),
        load=(LoadEntry(model_id=model, source=str(demo_model)),),
    )
    runner = web.AppRunner(create_app(config), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        await until(lambda: _ready(port, model), timeout=120, what=f"{model} ready")
        with caplog.at_level(logging.DEBUG, logger="shared.errors"):
            await asyncio.to_thread(_stream_then_reset, port, model)
            await until(
                lambda: [r for r in caplog.records if "went away" in r.getMessage()],
                what="the DEBUG line of the reset",
                seen=lambda: [r.getMessage()[:200] for r in caplog.records[-5:]],
            )
    finally:
        await runner.cleanup()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors


def _stream_then_reset(port: int, model: str) -> None:
    body = json.dumps(
        {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        | LONG_STREAM
    ).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head.encode() + body)
        got = b""
        while b'"content"' not in got:
            chunk = sock.recv(65536)
            assert chunk, got[-500:]
            got += chunk
        # SO_LINGER 0: close() sends a reset, not a FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _ready(port: int, model: str) -> bool:
    url = f"http://127.0.0.1:{port}/models"
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        body = await r.json()
    return any(m["model_id"] == model and m["state"] == "ready" for m in body["models"])


async def _connect(port: int, source: str) -> tuple[asyncio.StreamReader, Any]:
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((source, 0))
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    got = b""
    async with asyncio.timeout(30):
        try:
            while chunk := await reader.read(4096):
                got += chunk
        except ConnectionError:
            pass
    return got
