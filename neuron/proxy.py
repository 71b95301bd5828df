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
from neuron.supervisor import ModelSupervisor, Supervisor, describe, race_exit
from shared.drain import mark_streaming
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
# How the final `data: [DONE]` event starts behind its separator (see _FrameCounter).
_DONE_EVENT = b"\n\n" + DONE.rstrip(b"\n")


class _Lost(Exception):
    """The runner went away or fell silent mid-request."""


@attrs.define
class _FrameCounter:
    """Counts SSE data frames in a byte stream split anywhere.

    Only complete events count (those ended by a blank line).  `pending` is the
    unfinished tail behind the last event separator, kept with that separator (a
    virtual one at the stream's start), so each data event reads `\n\ndata:` and a
    chunk costs a few C-level scans instead of a split into events.
    """

    pending: bytes = b"\n\n"
    frames: int = 0
    done: bool = False
    first_at: float | None = None
    last_at: float | None = None

    def feed(self, chunk: bytes, now: float) -> None:
        buf = self.pending + chunk
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        cut = buf.rfind(b"\n\n")  # >= 0: `pending` starts with a separator
        complete, self.pending = buf[:cut], buf[cut:]
        if not complete:
            return
        # Comments (runner keepalives) are not tokens, nor is the final [DONE].
        dones = complete.count(_DONE_EVENT)
        frames = complete.count(b"\n\ndata:") - dones
        if dones:
            self.done = True
        if frames:
            self.frames += frames
            if self.first_at is None:
                self.first_at = now
            self.last_at = now

    @property
    def at_boundary(self) -> bool:
        return len(self.pending) == 2


class _LostOnExit:
    """Within it, the runner's exit cancels the current task and surfaces as `_Lost`.

    A stream blocked on its runner thus ends the moment the runner dies, without a
    watcher task or timer per chunk.  Any other cancel (the client left) propagates.
    """

    def __init__(self, runner: RunnerProcess) -> None:
        self._runner = runner
        self._fired = False
        task = asyncio.current_task()
        assert task is not None
        self._task = task

    def _on_exit(self, _: asyncio.Future[int]) -> None:
        self._fired = True
        self._task.cancel()

    def __enter__(self) -> None:
        self._runner.exited.add_done_callback(self._on_exit)

    def __exit__(self, exc_type: type[BaseException] | None, exc: Any, tb: Any) -> None:
        self._runner.exited.remove_done_callback(self._on_exit)
        if not self._fired:
            return
        # Our cancel was delivered inside (the task was waiting in here): take it back.
        if self._task.uncancel() == 0 and exc_type is asyncio.CancelledError:
            raise _Lost(f"runner exited with code {self._runner.exited.result()}") from exc


class _QuietReads:
    """`read()` gives the runner's next chunk, or None once it has been silent `quiet_s`.

    Like `asyncio.timeout(quiet_s)` around each read, but with one timer per
    `quiet_s` per stream instead of one per chunk (every cancelled timer churns the
    loop's heap): a read only moves the deadline, and the timer, should it fire
    early, re-arms itself at the deadline.  Reads run in the caller's task, which
    the timer cancels to interrupt a read; a cancel from anyone else propagates.
    """

    def __init__(self, upstream: aiohttp.ClientResponse, quiet_s: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._loop = task.get_loop()
        self._readany = upstream.content.readany
        self._quiet_s = quiet_s
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._reading = False
        self._fired = False

    async def read(self) -> bytes | None:
        self._deadline = self._loop.time() + self._quiet_s
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
        self._reading = True
        try:
            return await self._readany()
        except asyncio.CancelledError:
            fired, self._fired = self._fired, False
            if fired and self._task.uncancel() == 0:
                return None
            raise
        finally:
            self._reading = False

    def _on_timer(self) -> None:
        self._timer = None
        if not self._reading:
            return  # the next read arms it again
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
        else:
            self._fired = True
            self._task.cancel()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


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
        # Errors once the runner is reached count in `requests` by outcome instead.
        reached_runner = False
        try:
            self._check_state(m, model_id)
            assert m is not None
            async with m.admission.slot():
                runner = self._check_state(m, model_id)
                reached_runner = True
                m.stats.last_used = time.time()
                payload = json.dumps({**body, "model": RUNNER_MODEL_NAME}).encode()
                if stream:
                    resp = await self._stream(request, m, runner, path, payload)
                else:
                    resp = await self._unary(m, runner, path, payload)
                m.stats.last_used = time.time()
                return resp
        except ApiError as exc:
            if not reached_runner:
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
        # No timeout: the whole answer comes at the end, however long the generation.
        # A dead runner ends the wait at once; a stalled one is killed by the
        # supervisor's stall watchdog (which ends it the same way).
        try:
            upstream = await race_exit(self._open(runner, path, payload), runner, _Lost)
            raw = await race_exit(upstream.read(), runner, _Lost)
            m.stats.last_byte_at = time.monotonic()
        except (_Lost, aiohttp.ClientError, TimeoutError) as exc:
            metrics.requests.labels(m.model_id, "upstream_lost").inc()
            raise UpstreamUnavailable(f"runner of {m.model_id!r} lost: {describe(exc)}") from exc
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
        reads: _QuietReads | None = None
        counter = _FrameCounter()
        phase = "prefill"
        _start_work(m)
        outcome = "ok"
        opening = asyncio.ensure_future(self._open(runner, path, payload))

        async def begin() -> web.StreamResponse:
            r = web.StreamResponse(status=200, headers=SSE_HEADERS)
            await r.prepare(request)
            mark_streaming(request, r)
            return r

        async def silence() -> web.StreamResponse:
            """The runner said nothing for `hb` seconds: a heartbeat, or the end."""
            if time.monotonic() - last_byte > idle_limit:
                raise _Lost(f"runner silent for {idle_limit:g} s")
            r = response if response is not None else await begin()
            if counter.at_boundary:
                await r.write(HEARTBEAT)
            return r

        try:
            with _LostOnExit(runner):
                # The runner's answer headers (it may send them only after prefill).
                while not opening.done():
                    await asyncio.wait({opening}, timeout=hb)
                    if not opening.done():
                        response = await silence()
                try:
                    upstream = opening.result()
                except aiohttp.ClientError as exc:
                    raise _Lost(f"runner connection failed: {describe(exc)}") from exc
                last_byte = m.stats.last_byte_at = time.monotonic()
                if upstream.status >= 400:
                    raw = await upstream.read()
                    err = _runner_error(upstream.status, raw)
                    outcome = "upstream_error"
                    if response is None:
                        raise err
                    await response.write(sse_error_frame(err.message, err.status, err.code))
                    return response
                if response is None:
                    response = await begin()
                # Plain reads in the handler's own task: no task, wait or timer per
                # chunk. Silence comes back as None; the runner's exit as _Lost.
                reads = _QuietReads(upstream, hb)
                while True:
                    try:
                        chunk = await reads.read()
                    except aiohttp.ClientError as exc:
                        raise _Lost(f"runner connection failed: {describe(exc)}") from exc
                    if chunk is None:
                        response = await silence()
                        continue
                    last_byte = m.stats.last_byte_at = now = time.monotonic()
                    if not chunk:
                        if not counter.done:
                            raise _Lost("runner closed the stream before [DONE]")
                        return response
                    await response.write(chunk)
                    counter.feed(chunk, now)
                    if counter.frames and phase == "prefill":
                        phase = "decode"
                        m.stats.prefilling -= 1
                        m.stats.decoding += 1
                        ttft = (counter.first_at or now) - started
                        m.stats.ttft_s = ttft
                        metrics.ttft.labels(m.model_id).observe(ttft)
        except _Lost as exc:
            outcome = "upstream_lost"
            metrics.stream_errors.labels(m.model_id, "runner_lost").inc()
            message = f"runner of {m.model_id!r} lost: {describe(exc)}"
            if response is None:
                raise UpstreamUnavailable(message) from exc
            with contextlib.suppress(ConnectionError, RuntimeError):
                await response.write(sse_error_frame(message))
            return response
        except (ConnectionError, asyncio.CancelledError):
            # The client went away: closing the upstream stops the runner's work.
            outcome = "client_gone"
            raise
        finally:
            if reads is not None:
                reads.close()
            if upstream is None:
                # Not opened yet, or opened just as the stream was cut short.
                opening.cancel()
                with contextlib.suppress(BaseException):
                    upstream = await opening
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
