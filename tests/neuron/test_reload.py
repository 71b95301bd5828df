"""SIGHUP on a real `neuron serve`: safe keys applied at once, the others named."""

from __future__ import annotations

import asyncio
import signal
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w

from tests.conftest import LONG_STREAM, read_until, wait_until
from tests.neuron.test_groups import unique


async def test_sighup_raises_admission_for_queued_requests(
    neuron_factory: Any, demo_model: Path
) -> None:
    """max_in_flight 1 -> 2 by a reload: the queued stream starts while the first runs;
    a changed key that needs a restart is named in the log, and not applied."""
    n = neuron_factory({"admission": {"max_in_flight": 1}})
    model_id = unique("reload")
    n.load_ready(model_id, demo_model)
    body = {"model": model_id, "prompt": "tick", "stream": True, **LONG_STREAM}
    async with (
        aiohttp.ClientSession() as s,
        s.post(n.url + "/v1/completions", json=body) as first,
    ):
        await read_until(first, b"data: {")
        # Its headers come only once it is admitted: not awaited until after the reload.
        second = asyncio.ensure_future(s.post(n.url + "/v1/completions", json=body))

        def depth() -> int:
            _, h = n.get("/health")
            return sum(m["queue_depth"] for m in h["models"] if m["model_id"] == model_id)

        await asyncio.to_thread(wait_until, depth, 30, "the second request queued")
        path = n.dir / "neuron.toml"
        config = tomllib.loads(path.read_text())
        config["admission"]["max_in_flight"] = 2
        config["heartbeat_s"] = 0.7  # needs a restart
        path.write_text(tomli_w.dumps(config))
        n.process.send_signal(signal.SIGHUP)
        async with asyncio.timeout(30), await second as queued:
            assert queued.status == 200
            await read_until(queued, b"data: {")  # admitted while the first still runs
        assert not first.content.at_eof()
    assert "needs a restart to apply: heartbeat_s" in n.log()
    # A file that does not read keeps the running config.
    path.write_text("[admission\n")
    n.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "config reload refused" in n.log(), 30, "the refusal logged")
    assert n.get("/health")[0] == 200
