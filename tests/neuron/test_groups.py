"""Multi-rank runner groups (real MLX ring on loopback) and the stall watchdog."""

from __future__ import annotations

import asyncio
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
from tests.support.waiting import until

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


def _frozen(pid: int) -> float:
    """SIGSTOP a runner; the monotonic time it was frozen."""
    os.kill(pid, signal.SIGSTOP)
    return time.monotonic()


def _replaced(n: NeuronProcess, model_id: str, old: int) -> Callable[[], int | None]:
    """A check: the pid of a new, ready runner of model_id, once there is one."""

    def check() -> int | None:
        m = n.model(model_id)
        pids = runner_pids(model_id)
        if m is None or m["state"] != "ready" or pids in ([], [old]):
            return None
        return pids[0]

    return check


async def _rest_after_freeze(url: str, body: dict[str, Any], pid: int) -> tuple[list[bytes], float]:
    """Stream `body` from `url`, SIGSTOP `pid` once it has begun: the events that
    followed, and how long after the freeze the stream ended."""
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        await read_until(r, b"data: {")
        t0 = _frozen(pid)
        async with asyncio.timeout(60):
            rest = await r.content.read()
        return [e for e in rest.split(b"\n\n") if e], time.monotonic() - t0


async def _in_flight(n: NeuronProcess, model_id: str) -> None:
    """Wait until the neuron has a request of model_id in flight at its runner."""

    async def busy() -> bool:
        _, h = await asyncio.to_thread(n.get, "/health")
        return any(m["model_id"] == model_id and m["in_flight"] for m in h["models"])

    await until(busy, timeout=60, interval=0.1, what=f"a request of {model_id} in flight")


async def test_frozen_runner_idle_one_piece_and_streamed(
    neuron_factory: Factory, demo_model: Path
) -> None:
    """With the shipped settings a frozen runner is stalled (not routable) within seconds,
    idle or busy; a request to it is refused or ended with an error, never left hanging;
    and it is killed and replaced."""
    model_id = unique("frozen")
    n = neuron_factory({"restart": {"max_crashes": 10}})
    n.load_ready(model_id, demo_model)
    figures: dict[str, float] = {}

    # Idle: stalled at once (its process is stopped), refused with a 503, then replaced.
    [pid] = runner_pids(model_id)
    t0 = _frozen(pid)
    n.wait_state(model_id, "stalled", timeout=30)
    figures["idle: out of routing"] = time.monotonic() - t0
    status, answer = post_chat(n.url, model_id, text="hi", token=n.token, max_tokens=2)
    assert status == 503 and answer["error"]["code"] == "model_loading", answer
    pid = wait_until(_replaced(n, model_id, pid), 60, "a new runner, ready")
    figures["idle: replaced"] = time.monotonic() - t0

    # One piece: the client gets its error instead of waiting for a frozen runner.
    body = {"model": model_id, "prompt": "tick", "stream": False, **LONG_STREAM}
    async with aiohttp.ClientSession() as s:
        post = asyncio.ensure_future(s.post(n.url + "/v1/completions", json=body))
        await _in_flight(n, model_id)
        t0 = _frozen(pid)
        async with asyncio.timeout(60), await post as r:
            text = await r.text()
        figures["one piece: error"] = time.monotonic() - t0
    assert r.status in (502, 503), text
    assert f"runner of '{model_id}' lost" in text
    pid = wait_until(_replaced(n, model_id, pid), 60, "a new runner, ready")

    # Streamed: an error frame, then [DONE].
    body["stream"] = True
    events, figures["stream: error frame"] = await _rest_after_freeze(
        n.url + "/v1/completions", body, pid
    )
    assert events[-1] == b"data: [DONE]"
    assert f"runner of '{model_id}' lost".encode() in events[-2]
    assert "runner stalled: its process is stopped" in n.log()
    wait_until(_replaced(n, model_id, pid), 60, "a new runner, ready")
    print("frozen runner, s after SIGSTOP:", {k: round(v, 1) for k, v in figures.items()})
    # The heartbeat's probes (one a second) leave no access-log line in the runner's log.
    log = (n.dir / "store" / "logs" / f"{model_id}.log").read_text(errors="replace")
    assert "POST /v1/completions" in log and "GET /health" not in log
    assert "--- request " in log  # each request's id, to match the output with a trace


async def test_hung_rank_tears_the_group_down(neuron_factory: Factory, demo_model: Path) -> None:
    """Rank 1 frozen mid-stream (a hung collective): its neuron kills it, so its model is
    failed and rank 0's stream ends with an error, instead of keepalives for minutes."""
    n0, n1 = neuron_factory(), neuron_factory()
    model_id, group_id = unique("hung"), unique("g")
    hosts = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    n0.load(model_id, demo_model, group=group(group_id, 0, hosts))
    n1.load(model_id, demo_model, group=group(group_id, 1, hosts))
    n0.wait_state(model_id, "ready")
    [rank1] = runner_pids(model_id, parent=n1.process.pid)
    body = {"model": model_id, "prompt": "tick", "stream": True, **LONG_STREAM}
    events, took = await _rest_after_freeze(n0.url + "/v1/completions", body, rank1)
    assert events[-1] == b"data: [DONE]"
    assert b"error" in events[-2], events[-3:]
    m = n1.wait_state(model_id, "failed", timeout=30)
    assert "runner stalled: its process is stopped" in m["error"]
    assert f"rank 1 of group {group_id}" in m["error"]
    print(f"hung rank: rank 0's stream ended {took:.1f} s after rank 1 froze")
    for n in (n0, n1):
        assert n.post("/models/unload", {"model_id": model_id})[0] == 200
    wait_until(lambda: runner_pids(model_id) == [], 30, "no runner left")
