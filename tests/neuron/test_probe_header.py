"""Doctor's probe is served but not counted as a use (it must not defeat the idle unload)."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from shared.wire import PROBE_HEADER
from tests.conftest import InProcessFactory
from tests.support.waiting import until

BODY = {"model": "p", "prompt": "hi", "max_tokens": 2}


async def test_a_probe_leaves_last_used_as_it_was(
    neuron_app_factory: InProcessFactory, demo_model: Path
) -> None:
    server = await neuron_app_factory()
    base = str(server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/models/load", json={"model_id": "p", "source": str(demo_model)}):
            pass

        async def last_used() -> tuple[str, float]:
            async with s.get(f"{base}/models") as r:
                (m,) = (await r.json())["models"]
                return m["state"], float(m["last_used"])

        async def ready() -> bool:
            return (await last_used())[0] == "ready"

        await until(ready, timeout=120, what="the model ready", interval=0.2)
        before = (await last_used())[1]
        async with s.post(f"{base}/v1/completions", json=BODY, headers={PROBE_HEADER: "x"}) as r:
            assert r.status == 200, await r.text()
        assert (await last_used())[1] == before
        async with s.post(f"{base}/v1/completions", json=BODY) as r:
            assert r.status == 200
        assert (await last_used())[1] > before
