"""The OpenAI endpoints: admission, then a streaming proxy to the model's runner.

SSE bytes pass through unchanged.  Reads from the runner have an idle timeout,
never a total one.  While the runner is silent at a frame boundary the client
gets an SSE comment heartbeat every `heartbeat_s`, so a gateway can tell a
long prefill from a dead runner.  The runner's exit ends the stream at once
with an error frame.  A client that goes away closes the upstream connection,
which makes the runner stop generating.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

import aiohttp
import attrs
from aiohttp import web

from neuron.config import NeuronConfig
from neuron.runner import RunnerProcess
from neuron.supervisor import ModelSupervisor, Supervisor
from shared.errors import (
    ApiError,
    InvalidRequest,
    ModelFailed,
    ModelLoading,
    ModelNotFound,
    UpstreamError,
    UpstreamUnavailable,
    read_json_object,
    sse_error_frame,
)
from shared.sse import DONE, HEARTBEAT, SSE_HEADERS

# mlx_lm.server loads any other name from the hub; its own model is "default_model".
RUNNER_MODEL_NAME = "default_model"


class _Lost(Exception):
    """The runner went away or fell silent mid-request."""


@attrs.define
class _FrameCounter:
    """Counts SSE data frames in a byte stream split anywhere."""

    pending: bytes = b""
    frames: int = 0
    done: bool = False
    first_at: float | None = None
    last_at: float | None = None

    def feed(self, chunk: bytes) -> None:
        buf = (self.pending + chunk).replace(b"\r\n", b"\n")
        *events, self.pending = buf.split(b"\n\n")
        for ev in events:
            if not ev.startswith(b"data:"):
                continue  # comments (runner keepalives) are not tokens
            if ev.strip() == DONE.strip():
                self.done = True
                continue
            now = time.monotonic()
            self.frames += 1
            self.first_at = self.first_at or now
            self.last_at = now

    @property
    def at_boundary(self) -> bool:
        return not self.pending


@attrs.define
class Proxy:
    config: NeuronConfig
    supervisor: Supervisor

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self.handle(request, "/v1/chat/completions")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.handle(request, "/v1/completions")

    async def handle(self, request: web.Request, path: str) -> web.StreamResponse:
        body = await read_json_object(request)
        model_id = body.get("model")
        if not isinstance(model_id, str) or not model_id:
            raise InvalidRequest("missing `model` (a non-empty string)", param="model")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise InvalidRequest("`stream` must be a boolean", param="stream")
        m = self.supervisor.get(model_id)
        metrics = self.supervisor.metrics
        try:
            self._check_state(m, model_id)
            assert m is not None
            async with m.admission.slot():
                runner = self._check_state(m, model_id)
                m.stats.last_used = time.time()
                payload = json.dumps({**body, "model": RUNNER_MODEL_NAME}).encode()
                if stream:
                    resp = await self._stream(request, m, runner, path, payload)
                else:
                    resp = await self._unary(m, runner, path, payload)
                m.stats.last_used = time.time()
                return resp
        except ApiError as exc:
            metrics.rejected.labels(model_id if m is not None else "", exc.code).inc()
            raise

    def _check_state(self, m: ModelSupervisor | None, model_id: str) -> RunnerProcess:
        if m is None:
            raise ModelNotFound(f"model {model_id!r} is not loaded on this node", param="model")
        if m.state == "failed":
            raise ModelFailed(f"model {model_id!r} failed: {m.error}")
        if m.state == "unloading":
            raise ModelLoading(f"model {model_id!r} is unloading")
        if m.state != "ready" or m.runner is None or not m.runner.alive:
            raise ModelLoading(f"model {model_id!r} is {m.state}")
        if not m.is_rank0:
            raise InvalidRequest(f"model {model_id!r}: this node is not rank 0 of its group")
        return m.runner

    async def _open(
        self, runner: RunnerProcess, path: str, payload: bytes
    ) -> aiohttp.ClientResponse:
        return await self.supervisor.session.post(
            runner.base_url + path,
            data=payload,
            headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
        )

    async def _unary(
        self, m: ModelSupervisor, runner: RunnerProcess, path: str, payload: bytes
    ) -> web.Response:
        metrics = self.supervisor.metrics
        _start_work(m)
        upstream: aiohttp.ClientResponse | None = None
        try:
            async with asyncio.timeout(self.config.idle_read_timeout_s):
                upstream = await self._race(self._open(runner, path, payload), runner)
                raw = await self._race(upstream.read(), runner)
                m.stats.last_byte_at = time.monotonic()
        except (_Lost, aiohttp.ClientError, TimeoutError) as exc:
            metrics.requests.labels(m.model_id, "upstream_lost").inc()
            raise UpstreamUnavailable(f"runner of {m.model_id!r} lost: {exc}") from exc
        finally:
            m.stats.prefilling -= 1
            if upstream is not None:
                upstream.close()
        if upstream.status >= 400:
            metrics.requests.labels(m.model_id, "upstream_error").inc()
            raise _runner_error(upstream.status, raw)
        metrics.requests.labels(m.model_id, "ok").inc()
        return web.Response(
            body=raw,
            status=upstream.status,
            content_type=upstream.content_type or "application/json",
        )

    async def _race(self, aw: Any, runner: RunnerProcess) -> Any:
        task = asyncio.ensure_future(aw)
        try:
            await asyncio.wait({task, runner.exited}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if task.cancelled():
            raise _Lost(f"runner exited with code {runner.exited.result()}")
        return task.result()

    async def _stream(
        self,
        request: web.Request,
        m: ModelSupervisor,
        runner: RunnerProcess,
        path: str,
        payload: bytes,
    ) -> web.StreamResponse:
        metrics = self.supervisor.metrics
        hb = self.config.heartbeat_s
        idle_limit = self.config.idle_read_timeout_s
        started = time.monotonic()
        last_byte = started
        response: web.StreamResponse | None = None
        upstream: aiohttp.ClientResponse | None = None
        counter = _FrameCounter()
        phase = "prefill"
        _start_work(m)
        outcome = "ok"
        pending: asyncio.Future[Any] = asyncio.ensure_future(self._open(runner, path, payload))

        async def begin() -> web.StreamResponse:
            r = web.StreamResponse(status=200, headers=SSE_HEADERS)
            await r.prepare(request)
            return r

        try:
            while True:
                done, _ = await asyncio.wait(
                    {pending, runner.exited}, timeout=hb, return_when=asyncio.FIRST_COMPLETED
                )
                now = time.monotonic()
                if pending in done:
                    try:
                        result = pending.result()
                    except aiohttp.ClientError as exc:
                        raise _Lost(f"runner connection failed: {exc}") from exc
                    last_byte = m.stats.last_byte_at = now
                    if upstream is None:
                        upstream = result
                        if upstream.status >= 400:
                            raw = await upstream.read()
                            err = _runner_error(upstream.status, raw)
                            if response is None:
                                outcome = "upstream_error"
                                raise err
                            await response.write(sse_error_frame(err.message, err.status, err.code))
                            outcome = "upstream_error"
                            return response
                        if response is None:
                            response = await begin()
                    else:
                        chunk: bytes = result
                        assert response is not None
                        if not chunk:
                            if not counter.done:
                                raise _Lost("runner closed the stream before [DONE]")
                            return response
                        await response.write(chunk)
                        counter.feed(chunk)
                        if counter.frames and phase == "prefill":
                            phase = "decode"
                            m.stats.prefilling -= 1
                            m.stats.decoding += 1
                            ttft = (counter.first_at or now) - started
                            m.stats.ttft_s = ttft
                            metrics.ttft.labels(m.model_id).observe(ttft)
                    pending = asyncio.ensure_future(upstream.content.readany())
                    continue
                if runner.exited.done():
                    raise _Lost(f"runner exited with code {runner.exited.result()}")
                # Silence from the runner.
                if now - last_byte > idle_limit:
                    raise _Lost(f"runner silent for {idle_limit:g} s")
                if response is None:
                    response = await begin()
                if counter.at_boundary:
                    await response.write(HEARTBEAT)
        except _Lost as exc:
            outcome = "upstream_lost"
            metrics.stream_errors.labels(m.model_id, "runner_lost").inc()
            if response is None:
                raise UpstreamUnavailable(f"runner of {m.model_id!r} lost: {exc}") from exc
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write(sse_error_frame(f"runner of {m.model_id!r} lost: {exc}"))
            return response
        except (ConnectionError, asyncio.CancelledError):
            # The client went away: closing the upstream stops the runner's work.
            outcome = "client_gone"
            raise
        finally:
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            if upstream is not None:
                upstream.close()
            if phase == "prefill":
                m.stats.prefilling -= 1
            else:
                m.stats.decoding -= 1
            if counter.frames > 1 and counter.first_at and counter.last_at:
                span = counter.last_at - counter.first_at
                if span > 0:
                    tps = (counter.frames - 1) / span
                    m.stats.decode_tps = tps
                    metrics.decode_tps.labels(m.model_id).observe(tps)
            metrics.requests.labels(m.model_id, outcome).inc()


def _start_work(m: ModelSupervisor) -> None:
    # An idle runner's silence counts for the stall watchdog from now on; a busy
    # one's keeps counting from its last byte (new requests do not hide a stall).
    if m.stats.phase == "idle":
        m.stats.last_byte_at = time.monotonic()
    m.stats.prefilling += 1


def _runner_error(status: int, raw: bytes) -> ApiError:
    """A runner's error answer as our envelope; never a 404 (gateways bench on it)."""
    message = raw.decode(errors="replace")[:2000]
    with contextlib.suppress(ValueError):
        body = json.loads(raw)
        if isinstance(body, dict):
            err = body.get("error")
            if isinstance(err, dict):
                message = str(err.get("message", message))
            elif err is not None:
                message = str(err)
    if status == 400:
        return InvalidRequest(f"runner refused the request: {message}")
    return UpstreamError(f"runner answered {status}: {message}")
