"""Fake neurons: real aiohttp apps on port 0 speaking the neuron API, with knobs and counters.

Reusable by any cortex test: start one, point a cortex at `url`, flip its
behaviour (`health_ok`, `load_error`, `die_after_first_byte`...), read what it
saw (`calls`, `load_requests`, `chat_headers`...).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any

import attrs
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cortex.config import CortexConfig, NeuronRef
from cortex.http.app import create_app
from cortex.run.poller import POLLER
from shared.catalogue import GIB, Catalogue, ModelSpec
from shared.wire import Discovery, ModelState


def sse_frames(n: int = 3, model: str = "m") -> list[bytes]:
    """A deterministic OpenAI-style stream: n token frames then [DONE]."""
    frames = [
        b"data: "
        + json.dumps(
            {
                "id": "c1",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": {"content": f"tok{i} "}}],
            }
        ).encode()
        + b"\n\n"
        for i in range(n)
    ]
    return [*frames, b"data: [DONE]\n\n"]


@attrs.define
class FakeModel:
    model_id: str
    state: ModelState = "ready"
    in_flight: int = 0
    queue_depth: int = 0
    last_used: float = 0.0
    memory_bytes: int = 0
    error: str | None = None
    # A multi-node group member: GroupSpec JSON.
    group: dict[str, Any] | None = None
    # A stage job's JSON (neuron.store.staging StageJob.to_json), as /models carries it.
    staging: dict[str, Any] | None = None
    # What /health says the runner is doing, and its completion-token counter.
    phase: str = "idle"
    completion_tokens: int = 0

    def status_json(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "state": self.state,
            "source": self.model_id,
            "group": self.group,
            "port": 1234,
            "memory_bytes": self.memory_bytes,
            "last_used": self.last_used,
            "error": self.error,
            "staging": self.staging,
        }

    def health_json(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "state": self.state,
            "in_flight": self.in_flight,
            "queue_depth": self.queue_depth,
            "phase": self.phase,
            "decode_tps": None,
            "ttft_s": None,
            "last_used": self.last_used,
            "completion_tokens": self.completion_tokens,
        }


@attrs.define(eq=False)
class FakeNeuron:
    name: str = "fake"
    node_id: str = attrs.Factory(lambda: uuid.uuid4().hex)
    memory_total_bytes: int = 64 * GIB
    # One host for several fakes lets them form a loopback ring group.
    hostname: str | None = None
    memory_available_bytes: int = 48 * GIB
    models: dict[str, FakeModel] = attrs.Factory(dict)
    # -- behaviour ----------------------------------------------------------------
    health_ok: bool = True
    discovery_ok: bool = True
    # Answer GET /status (health + models + staged in one, with an ETag and 304s)
    # as a current neuron does; off, it is an older neuron (404 there).
    serves_status: bool = False
    # (status, code, message): /models/load answers this error envelope.
    load_error: tuple[int, str, str] | None = None
    # A loaded model becomes ready only once this is set (None: ready at once).
    load_gate: asyncio.Event | None = None
    # POST /models/load answers only once this is set (a slow neuron, a load in flight).
    load_post_gate: asyncio.Event | None = None
    # POST /models/unload answers only once this is set (a hung member).
    unload_gate: asyncio.Event | None = None
    # After the gate: the model fails with this error instead of becoming ready.
    load_fails_with: str | None = None
    memory_per_model: int = 2 * GIB
    stream_chunks: list[bytes] = attrs.Factory(sse_frames)
    die_after_first_byte: bool = False
    # A pause between the last chunk ([DONE]) and the end of the body, as a neuron
    # has while its runner winds down: a client may leave in between.
    linger_after_last_s: float = 0.0
    # A stream pauses after its first chunk until this is set.
    stream_gate: asyncio.Event | None = None
    # A one-piece (non-streamed) answer waits until this is set (a node gone silent).
    answer_gate: asyncio.Event | None = None
    # (status, code): /v1/* answers this error envelope instead of a completion.
    chat_error: tuple[int, str] | None = None
    # The Retry-After of its 429 and 503 answers.
    retry_after: str = "2"
    # Raw entries appended to GET /models (to send malformed ones).
    models_extra: list[Any] = attrs.Factory(list)
    # Sources it holds a staged copy of (GET /store/storage), and its disk free.
    staged: list[str] = attrs.Factory(list)
    disk_free_bytes: int = 500 * GIB
    disk_total_bytes: int = 1000 * GIB
    # The store's free-space floor it reports in /health (min_free_gb).
    min_free_bytes: int = 5 * 10**9
    # Versions its discovery reports (doctor's alignment check).
    version: str = "0.1.0"
    mlx_version: str = "0.29.0"
    mlx_lm_version: str = "0.28.0"
    python_version: str = "3.11.7"
    # jaccl-group loads since it started, against its jaccl_reload_budget.
    jaccl_loads: int = 0
    jaccl_reload_budget: int = 20
    # -- what it saw ----------------------------------------------------------------
    calls: Counter[str] = attrs.Factory(Counter)
    load_requests: list[dict[str, Any]] = attrs.Factory(list)
    unload_requests: list[str] = attrs.Factory(list)
    purge_requests: list[dict[str, Any]] = attrs.Factory(list)
    stage_requests: list[dict[str, Any]] = attrs.Factory(list)
    chat_headers: list[dict[str, str]] = attrs.Factory(list)
    chat_bodies: list[dict[str, Any]] = attrs.Factory(list)
    # Streams whose client (cortex) went away mid-answer.
    cancelled: int = 0
    # -- plumbing -------------------------------------------------------------------
    started_at: float = attrs.Factory(time.time)
    url: str = ""
    port: int = 0
    _runner: web.AppRunner | None = None
    _tasks: set[asyncio.Task[None]] = attrs.Factory(set)

    def add_model(self, model_id: str, state: ModelState = "ready", **kw: Any) -> FakeModel:
        m = FakeModel(model_id, state, **kw)
        self.models[model_id] = m
        return m

    def discovery(self) -> Discovery:
        return Discovery(
            node_id=self.node_id,
            hostname=self.hostname or f"{self.name}.local",
            version=self.version,
            os="Darwin",
            kernel="24.0",
            arch="arm64",
            chip="Apple M2 Ultra",
            memory_total_bytes=self.memory_total_bytes,
            memory_available_bytes=self.memory_available_bytes,
            unified_memory=True,
            mlx_version=self.mlx_version,
            mlx_device="metal",
            recommended_working_set_bytes=None,
            backends=("ring",),
            rdma_ports=(),
            disk_free_bytes=self.disk_free_bytes,
            store_dir="/tmp/store",
            ring_host="127.0.0.1",
            started_at=self.started_at,
            mlx_lm_version=self.mlx_lm_version,
            python_version=self.python_version,
            disk_total_bytes=self.disk_total_bytes,
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/discovery", self._discovery)
        app.router.add_get("/health", self._health)
        app.router.add_get("/models", self._models)
        app.router.add_get("/status", self._status)
        app.router.add_post("/models/load", self._load)
        app.router.add_post("/models/unload", self._unload)
        app.router.add_get("/store/storage", self._storage)
        app.router.add_post("/store/purge-staging", self._purge)
        app.router.add_post("/store/stage", self._stage)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._chat)
        # An embeddings answer is one JSON body, as an unstreamed chat answer is.
        app.router.add_post("/v1/embeddings", self._chat)
        return app

    async def start(self, port: int = 0) -> FakeNeuron:
        # Like the neuron: a client that disconnects cancels its handler.
        self._runner = web.AppRunner(self.app(), handle_signals=False, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port or self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    async def stop(self) -> None:
        """Close the listening socket: from now on connections are refused."""
        for t in list(self._tasks):
            t.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def restart(self) -> None:
        """Come back on the same port as a new process (new started_at, models gone)."""
        await self.stop()
        self.started_at = time.time() + 1
        self.models.clear()
        await self.start(self.port)

    # -- handlers ---------------------------------------------------------------------

    async def _discovery(self, request: web.Request) -> web.Response:
        self.calls["discovery"] += 1
        if not self.discovery_ok:
            return web.json_response({"error": "down"}, status=500)
        return web.json_response(self.discovery().to_json())

    def _health_json(self) -> dict[str, Any]:
        used = sum(m.memory_bytes for m in self.models.values())
        return {
            "status": "idle",
            "node_id": self.node_id,
            "started_at": self.started_at,
            # Its clock's now is started_at + uptime_s (doctor's skew check).
            "uptime_s": time.time() - self.started_at,
            "memory_available_bytes": self.memory_available_bytes - used,
            "models": [m.health_json() for m in self.models.values()],
            "disk_free_bytes": self.disk_free_bytes,
            "disk_total_bytes": self.disk_total_bytes,
            "min_free_bytes": self.min_free_bytes,
            "jaccl_loads": self.jaccl_loads,
            "jaccl_reload_budget": self.jaccl_reload_budget,
        }

    def _staged_json(self) -> list[dict[str, Any]]:
        return [
            {"name": s.replace("/", "--", 1), "path": f"/tmp/store/models/{s}", "in_use": False}
            for s in self.staged
        ]

    async def _health(self, request: web.Request) -> web.Response:
        self.calls["health"] += 1
        if not self.health_ok:
            return web.json_response({"error": "down"}, status=500)
        return web.json_response(self._health_json())

    async def _status(self, request: web.Request) -> web.Response:
        if not self.serves_status:
            self.calls["status_404"] += 1
            raise web.HTTPNotFound()
        self.calls["status"] += 1
        if not self.health_ok:
            return web.json_response({"error": "down"}, status=500)
        models = [m.status_json() for m in self.models.values()]
        body = {
            "health": self._health_json(),
            "models": [*models, *self.models_extra],
            "staged": self._staged_json(),
        }
        raw = json.dumps(body, sort_keys=True).encode()
        # Like the neuron's: the uptime (the clock) is left out of the version.
        versioned = {**body, "health": {**self._health_json(), "uptime_s": None}}
        digest = hashlib.sha256(json.dumps(versioned, sort_keys=True).encode())
        etag = '"' + digest.hexdigest()[:16] + '"'
        if request.headers.get("If-None-Match") == etag:
            self.calls["status_304"] += 1
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(body=raw, content_type="application/json", headers={"ETag": etag})

    async def _storage(self, request: web.Request) -> web.Response:
        return web.json_response({"staged": self._staged_json(), "staging": [], "partial": []})

    async def _stage(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.stage_requests.append(body)
        return web.json_response({"model_id": body["model_id"], "state": "queued"}, status=202)

    async def _purge(self, request: web.Request) -> web.Response:
        self.purge_requests.append(await request.json())
        return web.json_response({"removed": [], "freed_bytes": 1000})

    async def _models(self, request: web.Request) -> web.Response:
        self.calls["models"] += 1
        if not self.health_ok:
            return web.json_response({"error": "down"}, status=500)
        models = [m.status_json() for m in self.models.values()]
        return web.json_response({"models": [*models, *self.models_extra]})

    async def _load(self, request: web.Request) -> web.Response:
        self.calls["load"] += 1
        body = await request.json()
        self.load_requests.append(body)
        if self.load_post_gate is not None:
            await self.load_post_gate.wait()
        if self.load_error is not None:
            status, code, message = self.load_error
            return _envelope(status, code, message)
        mid = body["model_id"]
        m = self.models.get(mid)
        if m is None:
            m = self.add_model(mid, "loading", memory_bytes=self.memory_per_model)
            task = asyncio.create_task(self._finish_load(m))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return web.json_response(m.status_json(), status=202)

    async def _finish_load(self, m: FakeModel) -> None:
        if self.load_gate is not None:
            await self.load_gate.wait()
        if self.load_fails_with is not None:
            m.state, m.error = "failed", self.load_fails_with
        else:
            m.state = "ready"

    async def _unload(self, request: web.Request) -> web.Response:
        self.calls["unload"] += 1
        body = await request.json()
        self.unload_requests.append(body["model_id"])
        if self.unload_gate is not None:
            await self.unload_gate.wait()
        self.models.pop(body["model_id"], None)
        return web.json_response({"model_id": body["model_id"], "state": "unloaded"})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.calls["chat"] += 1
        self.chat_headers.append(dict(request.headers))
        body = await request.json()
        self.chat_bodies.append(body)
        if self.chat_error is not None:
            status, code = self.chat_error
            return _envelope(status, code, f"fake {self.name}: {code}", self.retry_after)
        m = self.models.get(body.get("model", ""))
        if m is None:
            return _envelope(404, "model_not_found", "no such model here")
        m.last_used = time.time()
        if not body.get("stream"):
            if self.answer_gate is not None:
                await self.answer_gate.wait()
            return web.json_response(
                {
                    "id": "c1",
                    "object": "chat.completion",
                    "model": m.model_id,
                    "served_by": self.name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i, chunk in enumerate(self.stream_chunks):
                await resp.write(chunk)
                if i == 0 and self.die_after_first_byte:
                    # A crash mid-stream: the connection drops, the chunked body unfinished.
                    await asyncio.sleep(0.05)
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                if i == 0 and self.stream_gate is not None:
                    await self.stream_gate.wait()
            await asyncio.sleep(self.linger_after_last_s)
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled += 1
            raise
        return resp


def _envelope(status: int, code: str, message: str, retry_after: str = "2") -> web.Response:
    headers = {"Retry-After": retry_after} if status in (429, 503) else {}
    return web.json_response(
        {"error": {"message": message, "type": "server_error", "code": code, "param": None}},
        status=status,
        headers=headers,
    )


def catalogue(*specs: ModelSpec) -> Catalogue:
    """A test catalogue; by default two small hub models."""
    if not specs:
        specs = (
            ModelSpec(id="m1", source="org/m1", aliases=("one",), memory_gb=1.0, kv_gb=0.1),
            ModelSpec(id="m2", source="org/m2", memory_gb=1.0, kv_gb=0.1),
        )
    return Catalogue(models=specs)


def config(neurons: Sequence[FakeNeuron], **kw: Any) -> CortexConfig:
    """A cortex config for fakes: polling left to the test, quick load waits."""
    defaults: dict[str, Any] = {
        "port": 0,
        "poll_interval_s": 3600.0,
        "poll_timeout_s": 2.0,
        "load_wait_s": 0.2,
        "load_poll_interval_s": 0.02,
        "discovery_wait_s": 0.5,
    }
    defaults.update(kw)
    return CortexConfig(
        neurons=tuple(NeuronRef(name=n.name, url=n.url) for n in neurons), **defaults
    )


@contextlib.asynccontextmanager
async def gateway(
    neurons: Sequence[FakeNeuron], cat: Catalogue | None = None, **kw: Any
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """A running cortex in front of `neurons`, polled once so they are healthy."""
    app = create_app(config(neurons, **kw), catalogue=cat or catalogue(), background=False)
    # Like `cortex serve`: a client that disconnects cancels its handler.
    async with TestClient(TestServer(app, handler_cancellation=True)) as client:
        await app[POLLER].poll_once()
        yield client


async def fleet(*names: str, **kw: Any) -> list[FakeNeuron]:
    return [await FakeNeuron(name=n, **kw).start() for n in names]


async def stop_all(neurons: Sequence[FakeNeuron]) -> None:
    for n in neurons:
        await n.stop()
