"""The neuron HTTP API against real mlx_lm runners on the demo model.

One `neuron serve` subprocess and one loaded runner are shared by the module;
admission is capped at 1 in flight and 1 queued so that the queue is easy to fill.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from shared.sse import HEARTBEAT
from shared.wire import Discovery, NodeHealth
from tests.conftest import (
    LONG_STREAM,
    NeuronProcess,
    kill_pid,
    read_until,
    runner_pids,
    stop_quietly,
    wait_until,
)
from tests.support.waiting import until

# Unique: other test sessions on this machine may run runners for "demo" too.
MODEL = f"demo-{uuid.uuid4().hex[:8]}"
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def neuron(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[NeuronProcess]:
    n = NeuronProcess.start(
        tmp_path_factory.mktemp("neuron-api"),
        {
            "max_body_bytes": 1024 * 1024,
            "heartbeat_s": 0.2,
            "admission": {"max_in_flight": 1, "max_queue": 1, "queue_timeout_s": 60.0},
            # A runner a test freezes (SIGSTOP) is never taken for stalled meanwhile.
            "runner": {"stall_timeout_s": 600.0},
        },
    )
    # A staged copy in the store, so /store/storage has something in use.
    staged = n.dir / "store" / "models" / "demo"
    shutil.copytree(demo_model, staged)
    t0 = time.monotonic()
    n.load_ready(MODEL, staged)
    print(f"\nload to ready: {time.monotonic() - t0:.2f} s")
    try:
        yield n
    finally:
        stop_quietly(n)


def client(n: NeuronProcess) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=n.url + "/v1", api_key="unused", max_retries=0)


async def test_chat_non_streamed_through_openai_sdk(neuron: NeuronProcess) -> None:
    """A plain chat completion answers through the OpenAI SDK."""
    async with client(neuron) as c:
        r = await c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage is not None and r.usage.completion_tokens >= 1


async def test_chat_streamed_through_openai_sdk(neuron: NeuronProcess) -> None:
    """A streamed chat completion yields chunks and a finish reason."""
    t0 = time.monotonic()
    first: float | None = None
    chunks, finish = 0, None
    async with client(neuron) as c:
        stream = await c.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=16, stream=True
        )
        async for chunk in stream:
            if first is None:
                first = time.monotonic() - t0
            chunks += 1
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
    print(f"\ntime to first token through the neuron: {first:.3f} s")
    assert chunks >= 1
    assert finish in ("length", "stop")


async def test_sse_passes_through_as_frames(neuron: NeuronProcess) -> None:
    """The raw stream is SSE: data frames or comments, ending in [DONE]."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            neuron.url + "/v1/completions",
            json={"model": MODEL, "prompt": "Once upon", "max_tokens": 12, "stream": True},
        ) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = await r.read()
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert all(e.startswith((b"data: ", b":")) for e in events)
    assert sum(e.startswith(b"data: {") for e in events) >= 1


async def test_eight_concurrent_loads_make_one_runner_and_unload_stops_it(
    neuron: NeuronProcess, demo_model: Path
) -> None:
    """Eight simultaneous loads of one model start one runner; unload leaves none."""
    model_id = f"concurrent-{uuid.uuid4().hex[:8]}"
    body = {"model_id": model_id, "source": str(demo_model)}
    async with aiohttp.ClientSession() as s:

        async def load() -> tuple[int, Any]:
            async with s.post(neuron.url + "/models/load", json=body) as r:
                return r.status, await r.json()

        answers = await asyncio.gather(*(load() for _ in range(8)))
    assert {status for status, _ in answers} == {202}
    assert {a["model_id"] for _, a in answers} == {model_id}
    await asyncio.to_thread(neuron.wait_state, model_id, "ready")
    assert len(runner_pids(model_id)) == 1

    status, out = neuron.post("/models/unload", {"model_id": model_id})
    assert status == 200, out
    assert runner_pids(model_id) == []
    assert neuron.model(model_id) is None
    status, out = neuron.post("/models/unload", {"model_id": model_id})
    assert status == 404
    assert out["error"]["code"] == "model_not_found"


async def test_full_queue_answers_429(neuron: NeuronProcess) -> None:
    """Over the in-flight cap and queue bound: 429 queue_full with Retry-After."""
    url = neuron.url + "/v1/completions"
    long = {"model": MODEL, "prompt": "a", "stream": True, **LONG_STREAM}
    short = {"model": MODEL, "prompt": "b", "max_tokens": 2}
    [pid] = runner_pids(MODEL)
    async with aiohttp.ClientSession() as s:
        holder = await s.post(url, json=long)
        await read_until(holder, b"data: {")
        # Frozen, the runner never ends the holder's stream by itself (a live one
        # would, after its context's worth of tokens, sooner on a faster machine).
        os.kill(pid, signal.SIGSTOP)
        try:
            queued = asyncio.create_task(s.post(url, json=short))

            async def queue_depth() -> int:
                async with s.get(neuron.url + "/health") as r:
                    h = NodeHealth.from_json(await r.json())
                return next(m.queue_depth for m in h.models if m.model_id == MODEL)

            depth = await until(queue_depth, timeout=120, what="the second request queued")
            assert depth >= 1, "the second request never queued"
            async with s.post(url, json=short) as over:
                assert over.status == 429
                assert int(over.headers["Retry-After"]) >= 1
                assert (await over.json())["error"]["code"] == "queue_full"
            # The holder disconnects: its slot goes to the queued request.
            holder.close()
        finally:
            kill_pid(pid, signal.SIGCONT)
        done = await queued
        assert done.status == 200
        assert (await done.json())["choices"]
        done.release()


async def test_runner_sigkill_mid_stream_ends_stream_with_error_and_recovers(
    neuron: NeuronProcess,
) -> None:
    """SIGKILL of the runner mid-stream: an error frame, then the model is ready again."""
    [pid] = runner_pids(MODEL)
    body = {"model": MODEL, "messages": CHAT, "stream": True, **LONG_STREAM}
    async with (
        aiohttp.ClientSession() as s,
        s.post(neuron.url + "/v1/chat/completions", json=body) as r,
    ):
        assert r.status == 200
        await read_until(r, b"data: {")
        kill_pid(pid)
        t0 = time.monotonic()
        rest = await r.content.read()
        elapsed = time.monotonic() - t0
    print(f"\nkill to end of stream: {elapsed:.3f} s")
    events = [e for e in rest.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert events[-2].startswith(b'data: {"error"')

    def replaced() -> dict[str, Any] | None:
        # Ready with a new runner (a poll just after the kill may still read the old state).
        m = neuron.model(MODEL)
        new = m is not None and m["state"] == "ready" and runner_pids(MODEL) not in ([], [pid])
        return m if new else None

    m = await asyncio.to_thread(wait_until, replaced, 120, "a new runner, ready")
    # Ready again, and /models still says why the runner was restarted.
    assert m["error"].startswith("recovered from: runner exited with code -9"), m["error"]
    async with client(neuron) as c:
        r2 = await c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert r2.choices


async def test_silent_runner_gets_heartbeats_not_a_timeout(neuron: NeuronProcess) -> None:
    """While the runner is silent the client gets SSE comment heartbeats."""
    [pid] = runner_pids(MODEL)
    body = {"model": MODEL, "prompt": "tick", "stream": True, **LONG_STREAM}
    async with (
        aiohttp.ClientSession() as s,
        s.post(neuron.url + "/v1/completions", json=body) as r,
    ):
        await read_until(r, b"data: {")
        os.kill(pid, signal.SIGSTOP)  # a runner deep in a long prefill looks like this
        try:
            await read_until(r, HEARTBEAT)
        finally:
            os.kill(pid, signal.SIGCONT)
        more = await read_until(r, b"data: {")
        assert b"error" not in more
    # Closing the stream above gave its admission slot back: a new request runs.
    async with client(neuron) as c:
        r2 = await c.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert r2.choices


@pytest.mark.parametrize(
    ("path", "data", "status", "code"),
    [
        ("/v1/chat/completions", b"{not json", 400, "invalid_request"),
        ("/v1/chat/completions", b'{"messages": []}', 400, "invalid_request"),
        (
            "/v1/chat/completions",
            b'{"model": "no-such-model", "messages": []}',
            404,
            "model_not_found",
        ),
        ("/v1/completions", b"[1, 2]", 400, "invalid_request"),
        ("/models/load", b'{"model_id": "x", "source": "/no/such/dir"}', 400, "invalid_model_path"),
        ("/models/load", b'{"source": "/tmp"}', 400, "invalid_request"),
        ("/models/unload", b'{"model_id": "never-loaded"}', 404, "model_not_found"),
        (
            "/v1/chat/completions",
            b'{"model": "' + b"x" * (2 * 1024 * 1024) + b'"}',
            413,
            "request_too_large",
        ),
    ],
)
async def test_bad_input_gets_the_envelope(
    neuron: NeuronProcess, path: str, data: bytes, status: int, code: str
) -> None:
    """Malformed or wrong requests answer the OpenAI error envelope."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(neuron.url + path, data=data, headers={"Content-Type": "application/json"}) as r,
    ):
        assert r.status == status
        err = (await r.json())["error"]
    assert err["code"] == code
    assert set(err) >= {"message", "type", "code", "param"}


async def test_load_of_a_non_model_dir_names_the_path(
    neuron: NeuronProcess, tmp_path: Path
) -> None:
    """A directory without config.json is refused with 400 naming it."""
    status, body = neuron.post("/models/load", {"model_id": "x", "source": str(tmp_path)})
    assert status == 400
    assert body["error"]["code"] == "invalid_model_path"
    assert str(tmp_path) in body["error"]["message"]
    status, body = neuron.post("/models/load", {"model_id": "x", "source": "/no/such/dir"})
    assert "/no/such/dir" in body["error"]["message"]


async def test_second_load_of_a_loaded_model_is_idempotent(neuron: NeuronProcess) -> None:
    """Loading a ready model again answers its state and starts nothing."""
    before = runner_pids(MODEL)
    m = neuron.model(MODEL)
    assert m is not None
    status, body = neuron.post("/models/load", {"model_id": MODEL, "source": m["source"]})
    assert status == 202
    assert body["state"] == "ready"
    assert runner_pids(MODEL) == before


async def test_discovery_health_models_metrics(neuron: NeuronProcess) -> None:
    """The read-only endpoints answer with the documented shapes."""
    status, d = neuron.get("/discovery")
    assert status == 200
    disc = Discovery.from_json(d)
    assert isinstance(disc.memory_total_bytes, int) and disc.memory_total_bytes > 0
    assert isinstance(disc.disk_free_bytes, int)
    assert disc.mlx_device in ("cpu", "metal", "cuda")
    assert isinstance(disc.backends, tuple)

    status, h = neuron.get("/health")
    health = NodeHealth.from_json(h)
    assert health.status in ("idle", "busy", "degraded")
    assert health.node_id == disc.node_id
    [mh] = [m for m in health.models if m.model_id == MODEL]
    assert mh.phase in ("idle", "prefill", "decode")

    status, models = neuron.get("/models")
    [m] = [m for m in models["models"] if m["model_id"] == MODEL]
    assert m["state"] == "ready" and isinstance(m["port"], int)

    async with aiohttp.ClientSession() as s, s.get(neuron.url + "/metrics") as r:
        text = await r.text()
    assert f'neuron_model_state{{model="{MODEL}",state="ready"}} 1.0' in text
    assert "neuron_requests_total" in text
    assert "neuron_time_to_first_token_seconds_bucket" in text


async def test_store_lists_staged_copies_and_purges_unused(neuron: NeuronProcess) -> None:
    """Staged copies show size and use; purge removes only those not in use."""
    junk = neuron.dir / "store" / "models" / "old-model"
    junk.mkdir(parents=True, exist_ok=True)
    (junk / "weights.bin").write_bytes(b"x" * 1000)
    status, st = neuron.get("/store/storage")
    copies = {c["name"]: c for c in st["staged"]}
    assert copies["demo"]["in_use"] is True
    assert copies["demo"]["size_bytes"] > 0
    assert copies["old-model"] == copies["old-model"] | {"in_use": False, "size_bytes": 1000}
    status, out = neuron.post("/store/purge-staging", {})
    assert status == 200
    assert [c["name"] for c in out["removed"]] == ["old-model"]
    assert not junk.exists()
    assert (neuron.dir / "store" / "models" / "demo" / "config.json").exists()
