"""POST /admin/restart on a neuron: only `neuron serve` re-executes itself."""

from __future__ import annotations

import aiohttp

from tests.conftest import InProcessFactory


async def test_an_in_process_neuron_refuses_to_restart(
    neuron_app_factory: InProcessFactory,
) -> None:
    """Embedded in another process (this test's), the app must not SIGTERM its host:
    501 restart_unsupported, and it keeps serving."""
    server = await neuron_app_factory()
    async with aiohttp.ClientSession() as s:
        async with s.post(server.make_url("/admin/restart"), json={}) as r:
            assert r.status == 501
            assert (await r.json())["error"]["code"] == "restart_unsupported"
        async with s.get(server.make_url("/health")) as r:
            assert r.status == 200
