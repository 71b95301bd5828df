"""The drain as a state (shared.drain): refusing new work at once, waiting for the work in
flight, a deadline a second begin never extends, and a hurry that ends the wait."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from shared.drain import Drain
from shared.errors import error_middleware
from tests.support.waiting import until

Served = tuple[Drain, asyncio.Event, TestClient[web.Request, web.Application]]


@pytest_asyncio.fixture
async def served() -> AsyncIterator[Served]:
    """An app whose /v1/work answers once `release` is set, behind a Drain."""
    drain = Drain(paths={"/v1/work"}, drain_s=60.0)
    release = asyncio.Event()

    async def work(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"done": True})

    async def other(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[error_middleware, drain.middleware()])
    app.router.add_post("/v1/work", work)
    app.router.add_get("/status", other)
    async with TestClient(TestServer(app)) as client:
        yield drain, release, client


async def test_a_drain_refuses_new_work_and_waits_for_the_work_in_flight(served: Served) -> None:
    """From begin on: 503 shutting_down with Retry-After for new work, other paths answer;
    drained() returns once the request in flight has finished, and it got its answer."""
    drain, release, client = served
    running = asyncio.ensure_future(client.post("/v1/work"))
    await until(lambda: drain.in_flight == 1, timeout=30, what="the request in flight")
    waiting = asyncio.ensure_future(drain.drained())
    await until(lambda: drain.closing, timeout=30, what="the drain to begin")
    refused = await client.post("/v1/work")
    assert refused.status == 503 and refused.headers["Retry-After"] == "2"
    assert (await refused.json())["error"]["code"] == "shutting_down"
    assert (await client.get("/status")).status == 200
    assert not waiting.done()
    release.set()
    assert await asyncio.wait_for(waiting, 30) is True
    answer = await running
    assert answer.status == 200 and await answer.json() == {"done": True}


async def test_a_second_signal_ends_the_wait_and_close_cuts_what_is_left(served: Served) -> None:
    """hurry() ends drained() at once with work still in flight; close() answers that work
    with a retryable 503 instead of leaving it hanging."""
    drain, _, client = served
    running = asyncio.ensure_future(client.post("/v1/work"))
    await until(lambda: drain.in_flight == 1, timeout=30, what="the request in flight")
    waiting = asyncio.ensure_future(drain.drained())
    await until(lambda: drain.closing, timeout=30, what="the drain to begin")
    t0 = time.monotonic()
    drain.hurry()
    assert await asyncio.wait_for(waiting, 30) is False
    await asyncio.wait_for(drain.close(), 30)
    print(f"\nthe wait ended {time.monotonic() - t0:.3f} s after the hurry (drain_s 60)")
    cut = await running
    assert cut.status == 503 and (await cut.json())["error"]["code"] == "shutting_down"


async def test_a_second_begin_never_extends_the_deadline(served: Served) -> None:
    """A restart's drain, then its SIGTERM's: the first deadline holds."""
    drain, release, client = served
    running = asyncio.ensure_future(client.post("/v1/work"))
    await until(lambda: drain.in_flight == 1, timeout=30, what="the request in flight")
    drain.begin(0.0)
    drain.begin(600.0)
    assert await asyncio.wait_for(drain.drained(600.0), 30) is False
    release.set()
    assert (await running).status == 200
