"""Hot-path levers: the runner admits late requests mid-batch; serve runs on uvloop
with no access log unless asked."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.serve import new_event_loop
from tests.conftest import NeuronProcess

WAIT_S = 120.0  # an upper bound for the whole exchange, never a measured duration
EOS = 1  # the demo model's eos_token_id (neuron/demo_model.py)


async def _stream(
    session: aiohttp.ClientSession,
    url: str,
    text: str,
    max_tokens: int,
    frames: list[int],
    on_frame: Callable[[], None] = lambda: None,
) -> None:
    """Stream one completion straight from the runner; `frames[0]` counts its tokens."""
    body = {
        "model": "default_model",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        # Never stop early: the long request must outlast the late one.
        "logit_bias": {str(EOS): -1000.0},
    }
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data: {") and b'"content"' in line:
                frames[0] += 1
                on_frame()


async def test_runner_admits_a_request_that_arrives_mid_batch(
    neuron_factory: Any, demo_model: Path
) -> None:
    """mlx_lm.server alone serves a late request only after 0.5 s of batch steps
    (or once its batch drains); through our shim it joins the batch at the next step.
    Counted in the long stream's tokens, not in seconds."""
    n: NeuronProcess = neuron_factory({"runner": {"max_tokens": 4000}})
    port = n.load_ready("demo", demo_model)["port"]
    url = f"http://127.0.0.1:{port}"
    long_frames, late_frames = [0], [0]
    at: dict[str, int] = {}

    decoding = asyncio.Event()

    def long_frame() -> None:
        if long_frames[0] == 5:
            decoding.set()

    def late_frame() -> None:
        at.setdefault("first", long_frames[0])

    async def late() -> None:
        await decoding.wait()  # sent once the long request is decoding, i.e. mid-batch
        at["sent"] = long_frames[0]
        await _stream(session, url, "a late one", 4, late_frames, late_frame)

    async with aiohttp.ClientSession() as session:
        long = _stream(session, url, "a long one", 3000, long_frames, long_frame)
        await asyncio.wait_for(asyncio.gather(long, late()), WAIT_S)
    assert late_frames[0] >= 1, at
    # Unpatched, the late one waits out 0.5 s of steps: hundreds of tokens.
    assert at["first"] - at["sent"] <= 30, at


def _access_lines(n: NeuronProcess) -> list[str]:
    return [line for line in n.log().splitlines() if "aiohttp.access" in line]


@pytest.mark.parametrize("access_log", [False, True])
def test_serve_logs_requests_only_when_asked(neuron_factory: Any, access_log: bool) -> None:
    n: NeuronProcess = neuron_factory({"access_log": access_log} if access_log else None)
    for _ in range(3):
        assert n.get("/health")[0] == 200
    deadline = time.monotonic() + 10
    # Log lines are written as each request ends; give the last one a moment.
    while access_log and len(_access_lines(n)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (len(_access_lines(n)) >= 3) is access_log


def test_serve_loop_is_uvloop_where_installed() -> None:
    uvloop = pytest.importorskip("uvloop")
    loop = new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_cortex_config_access_log_key(tmp_path: Path) -> None:
    from cortex.config import CortexConfig

    assert CortexConfig().access_log is False
    cfg = tmp_path / "cortex.toml"
    cfg.write_text("access_log = true\n")
    assert CortexConfig.from_file(str(cfg)).access_log is True
