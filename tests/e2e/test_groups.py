"""A model sharded over two neurons (MLX ring), placed and kept placed by cortex.

Where this machine lets us (root, iproute2), each neuron runs in a network
namespace of its own with its own address, so the ranks talk over a real
network hop; otherwise both run on loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import LONG_STREAM, NeuronProcess, kill_pid, runner_pids, wait_until
from tests.e2e.conftest import CortexProcess
from tests.support import netns
from tests.support.clients import answer_text, post_chat
from tests.support.waiting import until

Wrap = Callable[[list[str]], list[str]] | None


@pytest.fixture
def two_hosts() -> Iterator[list[tuple[str, Wrap]]]:
    """(address, command wrapper) for two test hosts."""
    if netns.available():
        with netns.hosts(2) as hosts:
            yield [(h.address, h.wrap) for h in hosts]
    else:
        yield [("127.0.0.1", None), ("127.0.0.1", None)]


def _group_members(c: CortexProcess, model_id: str) -> dict[str, dict[str, Any]]:
    """node -> its record of model_id, for members of a multi-rank group."""
    state = c.get("/admin/state")[1]
    out = {}
    for n in state["nodes"]:
        for m in n["models"]:
            if m["model_id"] == model_id and m["group"] is not None:
                out[n["name"]] = m
    return out


def _group_ready(c: CortexProcess, model_id: str) -> str | None:
    """The group id once both ranks are ready, else None."""
    members = _group_members(c, model_id)
    ids = {m["group"]["group_id"] for m in members.values()}
    if len(members) == 2 and len(ids) == 1 and all(m["state"] == "ready" for m in members.values()):
        return str(ids.pop())
    return None


async def _chat(c: CortexProcess, model: str, max_tokens: int = 24) -> str:
    last: Any = None

    async def answered() -> tuple[int, Any] | None:
        nonlocal last
        status, last = await asyncio.to_thread(
            post_chat,
            c.url,
            model,
            text="Tell me about the ring.",
            timeout=300,
            max_tokens=max_tokens,
            temperature=0,
        )
        return None if status == 503 else (status, last)  # 503: still loading, ask again

    status, answer = await until(
        answered, timeout=180, interval=1.0, what=f"{model} to answer", seen=lambda: last
    )
    assert status == 200, answer
    return answer_text(answer)


async def test_tensor_sharded_ring_group_through_cortex(
    neuron_factory: Any,
    cortex_factory: Any,
    demo_model: Any,
    model_id: str,
    two_hosts: list[tuple[str, Wrap]],
) -> None:
    """Two ranks over ring equal one process at temperature 0; a lost rank is healed."""
    neurons: list[tuple[str, NeuronProcess]] = []
    for name, (addr, wrap) in zip("ab", two_hosts, strict=True):
        settings: dict[str, Any] = {
            "host": addr,
            "ring_host": addr,
        }
        if wrap is not None:
            settings["port"] = 9410
        neurons.append((name, neuron_factory(settings, name=name, wrap=wrap)))
    big = {
        "id": model_id,
        "source": str(demo_model),
        "min_nodes": 2,
        "sharding": "tensor",
        "backend": "ring",
        "keep_loaded": True,
    }
    single = {"id": f"{model_id}-one", "source": str(demo_model)}
    c = cortex_factory(neurons, [big, single])

    group = wait_until(lambda: _group_ready(c, model_id), 180, "the ring group ready")
    members = _group_members(c, model_id)
    assert sorted(m["group"]["rank"] for m in members.values()) == [0, 1]
    placements = c.get(f"/admin/placements?model_id={model_id}")[1]
    # Both nodes hold it now, so a further replica is refused with that reason.
    pair = next(p for p in placements["candidates"] if sorted(p["nodes"]) == ["a", "b"])
    assert "already holds" in " ".join(pair["reasons"])

    sharded = await _chat(c, model_id)
    unsharded = await _chat(c, f"{model_id}-one")
    assert sharded and sharded == unsharded

    # Freeze rank 1's runner while a stream is open through cortex (a hung collective:
    # rank 0's /health still answers). Rank 1's neuron finds it stopped and kills it.
    rank1_node = next(n for n, m in members.items() if m["group"]["rank"] == 1)
    rank1 = dict(neurons)[rank1_node]
    body = {
        "model": model_id,
        "messages": [{"role": "user", "content": "A long answer, please."}],
        "stream": True,
        **LONG_STREAM,
    }
    frames: list[str] = []
    async with (
        aiohttp.ClientSession() as s,
        s.post(c.url + "/v1/chat/completions", json=body) as r,
    ):
        assert r.status == 200
        frozen_at: float | None = None
        pids = runner_pids(model_id, parent=rank1.process.pid)
        assert pids, "rank 1 runner not found"
        try:
            async with asyncio.timeout(120):
                async for raw in r.content:
                    line = raw.decode().strip()
                    if not line.startswith("data:"):
                        continue
                    frames.append(line)
                    if frozen_at is None:
                        for pid in pids:
                            os.kill(pid, signal.SIGSTOP)
                        frozen_at = time.monotonic()
        finally:
            for pid in pids:
                kill_pid(pid, signal.SIGCONT)
    assert frozen_at is not None
    to_error = time.monotonic() - frozen_at
    assert frames[-1] == "data: [DONE]"
    error = json.loads(frames[-2][len("data:") :])
    assert "error" in error, frames[-3:]

    # Meanwhile a request is answered at once: a 503 with Retry-After, or a 200.
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s,
        s.post(c.url + "/v1/chat/completions", json={**body, "stream": False}) as r,
    ):
        meanwhile = r.status, r.headers.get("Retry-After"), await r.text()
    assert meanwhile[0] == 200 or (meanwhile[0] == 503 and meanwhile[1]), meanwhile

    # The whole group is torn down on both members, then placed again by itself.
    wait_until(
        lambda: all(m["group"]["group_id"] != group for m in _group_members(c, model_id).values()),
        60,
        "the broken group gone from both members",
    )
    new_group = wait_until(lambda: _group_ready(c, model_id), 180, "the group placed again")
    assert new_group != group
    print(
        f"hung rank: error frame {to_error:.1f} s after it froze, the group serving again"
        f" {time.monotonic() - frozen_at:.1f} s after; a request meanwhile: {meanwhile[0]}"
    )
    assert await _chat(c, model_id) == unsharded

    # A restarted cortex adopts the running group: no teardown, no second load.
    c.stop()
    c2 = cortex_factory(neurons, [big, single])
    assert wait_until(lambda: _group_ready(c2, model_id), 60, "group seen") == new_group
    assert await _chat(c2, model_id) == unsharded
    assert _group_ready(c2, model_id) == new_group
