"""GET /status of a real neuron: one answer for the poller, with an ETag and 304s."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from cortex.core.state import Fleet
from cortex.run.poller import Poller
from neuron.http import app as neuron_app
from tests.conftest import InProcessFactory
from tests.support.waiting import until


@pytest.fixture(autouse=True)
def steady_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """Free memory and disk held still: the ETag counts them (in 64 MiB steps), and on a
    busy machine other processes move them across a step between any two reads."""
    monkeypatch.setattr(neuron_app, "memory_available_bytes", lambda: 8 * 2**30)
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage)


async def _status(
    s: aiohttp.ClientSession, url: str, etag: str | None = None
) -> tuple[int, str, Any]:
    headers = {} if etag is None else {"If-None-Match": etag}
    async with s.get(url, headers=headers) as r:
        body = await r.read()
        return r.status, r.headers.get("ETag", ""), body


async def _settled(s: aiohttp.ClientSession, url: str) -> str:
    """The ETag once two reads in a row agree (a 304): the node has settled."""
    _, etag, _ = await _status(s, url)

    async def agreed() -> bool:
        nonlocal etag
        status, new, _ = await _status(s, url, etag)
        if status == 304:
            return True
        etag = new
        return False

    await until(
        agreed,
        timeout=10,
        interval=0.1,
        what="GET /status to answer 304 to its own ETag",
        seen=lambda: f"a new ETag each time, the last {etag!r}",
    )
    return etag


async def test_status_etag_304_and_a_load_changes_it(
    neuron_app_factory: InProcessFactory, demo_model: Path
) -> None:
    """200 with an ETag and health+models+staged; 304 with no body on that ETag; a load
    gives a new ETag and body, which settles to 304 again once the model is ready."""
    server = await neuron_app_factory()
    url = str(server.make_url("/status"))
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            assert r.status == 200
            etag = r.headers["ETag"]
            body = await r.json()
        assert etag.startswith('"') and etag.endswith('"')
        assert set(body) == {"health", "models", "staged"}
        assert body["models"] == [] and body["health"]["models"] == []
        etag = await _settled(s, url)
        status, again, raw = await _status(s, url, etag)
        assert (status, again, raw) == (304, etag, b"")

        load = {"model_id": "demo", "source": str(demo_model)}
        async with s.post(str(server.make_url("/models/load")), json=load) as r:
            assert r.status == 202, await r.text()
        status, changed, raw = await _status(s, url, etag)
        assert status == 200 and changed != etag

        async def all_ready() -> Any:
            async with s.get(url) as r:
                body = await r.json()
            return body if [m["state"] for m in body["models"]] == ["ready"] else None

        body = await until(all_ready, timeout=120, what="the model ready", interval=0.1)
        assert [(m["model_id"], m["state"]) for m in body["models"]] == [("demo", "ready")]
        ready = await _settled(s, url)
        assert ready not in (etag, changed)


async def test_poller_uses_status_on_a_real_neuron(
    neuron_app_factory: InProcessFactory, demo_model: Path
) -> None:
    """Against a current neuron the poller reads /status; an unchanged node's 304
    keeps the very health record it had, and a load shows at the next poll."""
    server = await neuron_app_factory()
    base = str(server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as s:
        poller = Poller(fleet=Fleet.of([("n1", base)], threshold=3), session=s, timeout_s=5.0)
        await _settled(s, base + "/status")
        await poller.poll_once()
        first = poller.fleet.node("n1")
        assert first.healthy and first.discovery is not None and first.models == ()
        assert poller.uses_status("n1")
        await _settled(s, base + "/status")
        await poller.poll_once()
        second = poller.fleet.node("n1")
        assert second.healthy and second.health is first.health, "a 304 must reuse the record"

        load = {"model_id": "demo", "source": str(demo_model)}
        async with s.post(base + "/models/load", json=load) as r:
            assert r.status == 202
        await poller.poll_once()
        assert [m.model_id for m in poller.fleet.node("n1").models] == ["demo"]
        assert poller.uses_status("n1")
