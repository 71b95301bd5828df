"""Multi-rank runner groups (real MLX ring on loopback) and the stall watchdog."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import (
    LONG_STREAM,
    NeuronProcess,
    free_port,
    kill_pid,
    read_until,
    runner_pids,
    wait_until,
)
from tests.support.clients import answer_text, post_chat

Factory = Callable[..., NeuronProcess]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def group(group_id: str, rank: int, hosts: list[str]) -> dict[str, Any]:
    return {
        "group_id": group_id,
        "rank": rank,
        "world_size": len(hosts),
        "backend": "ring",
        "sharding": "tensor",
        "hosts": hosts,
    }


def chat_text(n: NeuronProcess, model_id: str) -> str:
    status, answer = post_chat(
        n.url,
        model_id,
        text="Count with me: one, two, three",
        token=n.token,
        max_tokens=24,
        temperature=0.0,
    )
    assert status == 200, answer
    return answer_text(answer)


def test_ring_group_matches_single_rank_and_fails_on_lost_rank(
    neuron_factory: Factory, demo_model: Path
) -> None:
    """Two ranks answer like one; a killed rank leaves its model failed, not restarted."""
    n0, n1 = neuron_factory(), neuron_factory()

    single = unique("single")
    n0.load_ready(single, demo_model)
    expected = chat_text(n0, single)
    assert n0.post("/models/unload", {"model_id": single})[0] == 200

    model_id, group_id = unique("grp"), unique("g")
    hosts = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    t0 = time.monotonic()
    n0.load(model_id, demo_model, group=group(group_id, 0, hosts))
    n1.load(model_id, demo_model, group=group(group_id, 1, hosts))
    n0.wait_state(model_id, "ready")
    print(f"group load to rank 0 ready: {time.monotonic() - t0:.1f} s")
    rank1_model = n1.model(model_id)
    assert rank1_model is not None and rank1_model["state"] == "ready"

    assert chat_text(n0, model_id) == expected

    [rank1] = runner_pids(model_id, parent=n1.process.pid)
    kill_pid(rank1)
    m = n1.wait_state(model_id, "failed", "recovering")
    assert m["state"] == "failed"
    assert f"rank 1 of group {group_id}" in m["error"]
    assert runner_pids(model_id, parent=n1.process.pid) == []

    for n in (n0, n1):
        assert n.post("/models/unload", {"model_id": model_id})[0] == 200
    assert runner_pids(model_id) == []
    assert runner_pids(single) == []


def test_group_connect_deadline_fails_without_restart(
    neuron_factory: Factory, demo_model: Path
) -> None:
    """Rank 0 whose peer never comes misses the group-connect deadline and stays failed."""
    n = neuron_factory({"runner": {"group_connect_deadline_s": 3.0}})
    model_id, group_id = unique("lonely"), unique("g")
    hosts = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    n.load(model_id, demo_model, group=group(group_id, 0, hosts))
    m = n.wait_state(model_id, "failed", "recovering")
    assert m["state"] == "failed"
    assert f"rank 0 of group {group_id}" in m["error"]
    assert "not ready within 3 s" in m["error"]
    assert runner_pids(model_id) == []
    assert n.post("/models/unload", {"model_id": model_id})[0] == 200


async def _freeze_mid_stream(n: NeuronProcess, model_id: str, pid: int) -> tuple[bytes, float]:
    """SIGSTOP the runner once its stream has begun: the rest of it, and how long it took."""
    body = {"model": model_id, "prompt": "tick", "stream": True, **LONG_STREAM}
    async with (
        aiohttp.ClientSession() as s,
        s.post(n.url + "/v1/completions", json=body) as r,
    ):
        await read_until(r, b"data: {")
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            rest = await r.content.read()
        finally:
            kill_pid(pid, signal.SIGCONT)
        return rest, time.monotonic() - t0


async def test_stall_watchdog_kills_a_stopped_runner(
    neuron_factory: Factory, demo_model: Path
) -> None:
    """A runner frozen mid-stream is killed: an error frame, then recovery."""
    model_id = unique("stall")
    n = neuron_factory(
        {"heartbeat_s": 0.2, "runner": {"stall_timeout_s": 2.0, "health_probe_timeout_s": 2.0}}
    )
    n.load_ready(model_id, demo_model)
    [pid] = runner_pids(model_id)
    rest, _ = await _freeze_mid_stream(n, model_id, pid)
    events = [e for e in rest.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    # "exited with code -9" or "closed the stream", whichever the proxy sees first.
    assert b"error" in events[-2]
    assert f"runner of '{model_id}' lost".encode() in events[-2]
    assert "runner stalled" in n.log()

    def recovered() -> bool:
        m = n.model(model_id)
        return m is not None and m["state"] == "ready" and runner_pids(model_id) not in ([], [pid])

    wait_until(recovered, what="a new runner, ready")


async def test_stopped_runner_costs_a_stream_seconds_with_defaults(
    neuron_factory: Factory, demo_model: Path
) -> None:
    """With the shipped watchdog settings a frozen runner's stream ends well inside a minute."""
    model_id = unique("stall-defaults")
    n = neuron_factory()
    n.load_ready(model_id, demo_model)
    [pid] = runner_pids(model_id)
    rest, took = await _freeze_mid_stream(n, model_id, pid)
    assert rest.endswith(b"data: [DONE]\n\n")
    assert b"runner stalled" in rest or b"lost" in rest
    # Before: 60 s of silence plus the probe (65 s). Now 15 s plus the probe.
    assert took < 45, f"{took:.1f} s to end the stream of a frozen runner"
