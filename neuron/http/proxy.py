"""The OpenAI endpoints: checks, admission, then a streaming proxy to the model's runner.

The runner gets only the allow-listed fields (neuron.runner.request_check) and is
always asked to stream, with usage: a client that goes away (aiohttp cancels
its handler) closes the runner connection, which makes the runner stop at its
next write, whether the client streamed or not, in prefill (keepalives) or
decode.  A streaming client gets the runner's events unchanged but for the
usage frame, which it gets only if it asked; a non-streaming one gets the
answer assembled from them (shared.assemble).  Reads from the runner have an
idle timeout, never a total one.  While the runner is silent a streaming client
gets an SSE comment heartbeat every `heartbeat_s`.  The runner's exit ends the
stream with an error frame; the proxy tells the runner's health record
(neuron.runner.health) what it saw, and a runner that record finds broken is
restarted by its supervisor.

The runner's connection is the lean hop's (shared.hop). Once its headers are in,
its bytes are spliced: `_Relay._sink` accounts for each read and writes it to
the client from the connection's own callback (shared.downstream), and the
handler's task waits in one place, `IdleRace.next` (shared.quiet), which wakes
it only on the heartbeat's beat, the runner's exit or the stream's end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any, Literal

import attrs
from aiohttp import web

from neuron.config import NeuronConfig
from neuron.http.embeddings import check_embedding
from neuron.http.timing import timed_body, timed_event, timing, wants_timing
from neuron.runner.health import answer_kind
from neuron.runner.process import RunnerProcess
from neuron.runner.request_check import (
    RUNNER_MODEL_NAME,
    Checked,
    Kind,
    check_constraint,
    check_size,
    count_prompt,
    finish,
    validate,
)
from neuron.runner.supervisor import ModelSupervisor, Supervisor, describe, race_exit
from neuron.tracing import QUEUE_WAIT_HEADER, Trace, TraceDraft, request_id, usage_comment
from shared import logjson
from shared.assemble import answer_usage, assemble, is_usage_frame
from shared.cancel import cancelled
from shared.downstream import Downstream
from shared.drain import mark_streaming
from shared.errors import (
    ApiError,
    InvalidRequest,
    ModelNotFound,
    UpstreamError,
    UpstreamUnavailable,
    read_json_object,
    sse_error_frame,
)
from shared.hop import Hop, HopError, Upstream
from shared.journal import Journal
from shared.kinds import EMBEDDINGS_PATH, wrong_kind
from shared.model_id import shown
from shared.quiet import IdleRace, StreamEnded
from shared.rates import decode_rate
from shared.sse import ANSWER_MODEL_HEADER, DONE, HEARTBEAT, SSE_HEADERS
from shared.wire import PROBE_HEADER

# mlx_lm.server echoes the model name it was sent (RUNNER_MODEL_NAME) in every
# answer and chunk, spelt by json.dumps' default separators; clients must see the
# id they asked for, so that one value is replaced in the bytes, frames untouched.
_RUNNER_MODEL_FIELD = b'"model": ' + json.dumps(RUNNER_MODEL_NAME).encode()


def renamed(raw: bytes, model_field: bytes) -> bytes:
    """The runner's bytes with its model name replaced by `model_field` (see model_field)."""
    return raw.replace(_RUNNER_MODEL_FIELD, model_field)


def model_field(model_id: str) -> bytes:
    # A JSON string never holds a bare `"` (it is escaped), so only the key can match.
    return b'"model": ' + json.dumps(model_id).encode()


# Prompts up to this many characters are counted on the event loop (tens of µs).
INLINE_COUNT_CHARS = 512
# Every request to a runner carries these (built once, not per request).
_RUNNER_HEADERS = {"Content-Type": "application/json", "Accept": "text/event-stream"}


class _Lost(Exception):
    """The runner went away or fell silent mid-request."""


@attrs.define
class _Events:
    """Splits a byte stream cut anywhere into complete SSE events (each with its `\n\n`)."""

    pending: bytes = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self.pending + chunk
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        cut = buf.rfind(b"\n\n")
        if cut < 0:
            self.pending = buf
            return []
        self.pending = buf[cut + 2 :]
        return [e + b"\n\n" for e in buf[:cut].split(b"\n\n") if e]


@attrs.define
class _Tally:
    """What one request's stream from the runner said: frames, timings, usage."""

    frames: int = 0
    done: bool = False
    first_at: float | None = None
    last_at: float | None = None
    usage: dict[str, Any] | None = None
    # An unstreamed answer's events, their `data:` JSON unparsed: all parsed at once
    # at the end (one json.loads, not one per frame), then assembled.
    raw: list[bytes] = attrs.Factory(list)
    # Only when the client asked for `timing` (neuron.http.timing): when the runner
    # was asked (monotonic), and the admission wait before that.
    sent_at: float | None = None
    queue_s: float | None = None
    # Frames read together with the first (a busy loop reads a burst at once).
    first_read: int = 0

    def timing(self) -> dict[str, float | None]:
        return timing(
            self.usage,
            queue_s=self.queue_s,
            sent_at=self.sent_at,
            first_at=self.first_at,
            last_at=self.last_at,
            first_read=self.first_read,
        )


_TRACE = web.RequestKey("neuron.trace", TraceDraft)


def _trace(request: web.Request) -> TraceDraft | None:
    return request.get(_TRACE)


def _queue_wait(request: web.Request) -> dict[str, str]:
    t = _trace(request)
    if t is None or t.admission_wait_s is None:
        return {}
    return {QUEUE_WAIT_HEADER: f"{t.admission_wait_s:.6f}"}


@attrs.define
class Proxy:
    config: NeuronConfig
    supervisor: Supervisor
    traces: Journal[Trace] = attrs.Factory(Journal[Trace])
    # To the runners (always plain http on loopback): the lean client (shared.hop).
    hop: Hop = attrs.Factory(Hop)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self.handle(request, "/v1/chat/completions", "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.handle(request, "/v1/completions", "completions")

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self.handle(request, EMBEDDINGS_PATH, "embeddings")

    async def handle(
        self, request: web.Request, path: str, kind: Kind | Literal["embeddings"]
    ) -> web.StreamResponse:
        body = await read_json_object(request)
        model_id = body.get("model")
        if not isinstance(model_id, str) or not model_id:
            raise InvalidRequest("missing `model` (a non-empty string)", param="model")
        m = self.supervisor.get(model_id)
        metrics = self.supervisor.metrics
        trace = TraceDraft(request_id(request), model_id, stream=body.get("stream") is True)
        logjson.annotate(request_id=trace.id, model=model_id)  # log_format = "json"
        request[_TRACE] = trace
        status, error = "500", None
        # Errors once the runner is reached count in `requests` by outcome instead.
        reached_runner = False
        try:
            _serving(m, model_id)
            assert m is not None
            if (wrong := wrong_kind(model_id, m.kind, path)) is not None:
                raise wrong  # a chat model asked for embeddings, or the other way round
            checked = await self._check(m, body, kind)
            trace.prompt_tokens = checked.prompt_tokens
            queued_at = time.monotonic()
            async with m.admission.slot():
                waited = time.monotonic() - queued_at
                metrics.child(metrics.queue_wait, m.model_id).observe(waited)
                trace.admission_wait_s = round(waited, 6)
                runner = _serving(m, model_id)
                reached_runner = True
                trace.runner = f"pid {runner.pid} port {runner.port}"
                trace.runner_env = runner.env_shown()
                runner.note(f"request {trace.id} {path}")
                # A probe (doctor) is no use: it must not hold off the idle unload.
                use = PROBE_HEADER not in request.headers
                if use:
                    m.runner_health.used(time.time())
                # The name the answer carries: the id asked for (or cortex's alias of it).
                name = request.headers.get(ANSWER_MODEL_HEADER) or model_id
                if checked.runner_stream:
                    resp = await self._relay(request, m, runner, path, checked, name)
                else:
                    timed = kind != "embeddings" and wants_timing(request.headers)
                    resp = await self._unary(
                        m, runner, path, checked, name, timed=timed, queue_s=waited
                    )
                if use:
                    m.runner_health.used(time.time())
                status = str(resp.status)
                if not resp.prepared:  # an unstreamed answer: its headers are still ours
                    resp.headers.update(_queue_wait(request))
                return resp
        except ApiError as exc:
            status, error = str(exc.status), exc.message
            if not reached_runner:
                metrics.rejected.labels(model_id if m is not None else "", exc.code).inc()
            raise
        except asyncio.CancelledError:
            status = "cancelled" if cancelled(request) else "client_gone"
            raise
        finally:
            self.traces.append_made(lambda seq: trace.done(status, error, seq))

    async def _check(
        self, m: ModelSupervisor, body: dict[str, Any], kind: Kind | Literal["embeddings"]
    ) -> Checked:
        """The runner's body from the allow-list; the prompt counted off the event loop."""
        info = m.info
        if kind == "embeddings":
            return await check_embedding(body, info, m.embed_limits, self.supervisor.tokenizing)
        try:
            draft = validate(body, kind, info)
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:
            # A shape the checks did not foresee is still the client's: never a 500.
            raise InvalidRequest(f"request not understood: {describe(exc)}") from exc
        check_size(draft, info)
        if draft.constraint is not None:
            # Compiling a schema may take milliseconds: off the loop, in the tokenizers' pool.
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.supervisor.tokenizing, check_constraint, draft)
        tokens = None
        if info.tokenizer is not None and sum(map(len, draft.texts)) <= INLINE_COUNT_CHARS:
            # A short prompt costs less to count than a hop to the pool and back
            # (which also staggers requests that arrive together).
            tokens = count_prompt(draft, info)
        elif info.tokenizer is not None:
            # Its own small pool: big prompts must never starve the default one,
            # which /health and /discovery use.
            loop = asyncio.get_running_loop()
            tokens = await loop.run_in_executor(
                self.supervisor.tokenizing, count_prompt, draft, info
            )
        return finish(draft, tokens, info, self.config.runner.max_tokens)

    async def _open(self, runner: RunnerProcess, path: str, checked: Checked) -> Upstream:
        body = json.dumps(checked.body).encode()
        return await self.hop.request(runner.base_url, "POST", path, _RUNNER_HEADERS, body)

    async def _unary(
        self,
        m: ModelSupervisor,
        runner: RunnerProcess,
        path: str,
        checked: Checked,
        name: str,
        *,
        timed: bool = False,
        queue_s: float | None = None,
    ) -> web.Response:
        """Logprobs unstreamed: only the runner's unstreamed answer carries them.

        So these alone are not stopped by a client that leaves; their length is
        capped at the context left like every other request. Its `timing` (when
        `timed`) has the queue wait only: no token's arrival is seen.
        """
        metrics = self.supervisor.metrics
        seen = m.runner_health
        seen.started(time.monotonic())
        upstream: Upstream | None = None
        # No timeout: the whole answer comes at the end, however long the generation.
        # A dead runner ends the wait at once; a stalled one is killed by the
        # supervisor's stall watchdog (which ends it the same way).
        try:
            upstream = await race_exit(self._open(runner, path, checked), runner, _Lost)
            raw = await race_exit(upstream.read(), runner, _Lost)
            seen.byte(time.monotonic())
        except (_Lost, HopError, TimeoutError) as exc:
            metrics.requests.labels(m.model_id, "upstream_lost").inc()
            raise UpstreamUnavailable(f"runner of {m.model_id!r} lost: {describe(exc)}") from exc
        finally:
            seen.ended(decoding=False)
            if upstream is not None:
                upstream.close()
        if upstream.status >= 400:
            err = self._runner_error(m, runner, upstream.status, raw)
            metrics.requests.labels(m.model_id, _error_outcome(err)).inc()
            raise err
        m.runner_answered(runner)
        if (usage := answer_usage(raw)) is not None:
            self._count_tokens(m, usage)
        metrics.child(metrics.requests, m.model_id, "ok").inc()
        body = renamed(raw, model_field(name))
        if timed:
            # No token's arrival is seen here: the queue wait only.
            t = timing(usage, queue_s=queue_s, sent_at=None, first_at=None, last_at=None)
            body = timed_body(body, t)
        return web.Response(
            body=body,
            status=upstream.status,
            content_type=upstream.content_type or "application/json",
        )

    async def _relay(
        self,
        request: web.Request,
        m: ModelSupervisor,
        runner: RunnerProcess,
        path: str,
        checked: Checked,
        name: str,
    ) -> web.StreamResponse:
        """Stream from the runner; to the client as a stream, or assembled at the end."""
        now = time.monotonic()
        m.runner_health.started(now)
        relay = _Relay(
            proxy=self,
            request=request,
            m=m,
            runner=runner,
            checked=checked,
            name=name,
            race=IdleRace(self.config.heartbeat_s, runner.exited),
            opening=asyncio.ensure_future(self._open(runner, path, checked)),
            trace=_trace(request),
            started=now,
            last_byte=now,
            tally=_timed_tally(request, now),
        )
        return await relay.run()

    def _count_tokens(
        self, m: ModelSupervisor, usage: dict[str, Any], tally: _Tally | None = None
    ) -> None:
        metrics = self.supervisor.metrics
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int) and prompt >= 0:
            metrics.child(metrics.tokens, m.model_id, "prompt").inc(prompt)
        if not isinstance(completion, int) or completion < 0:
            return
        metrics.child(metrics.tokens, m.model_id, "completion").inc(completion)
        # Decode speed: the tokens after the first, over the time since the first; only
        # over a real interval (shared.rates), so /models and the dashboard show none
        # rather than a rate over a near-zero time.
        tps = None if tally is None else decode_rate(completion, tally.first_at, tally.last_at)
        if tps is not None:
            metrics.child(metrics.decode_tps, m.model_id).observe(tps)
        m.runner_health.tokens(completion, tps)

    def _runner_error(
        self, m: ModelSupervisor, runner: RunnerProcess, status: int, raw: bytes
    ) -> ApiError:
        """A runner's error answer as our envelope; what it says goes to the health record."""
        message, param = _runner_message(raw)
        kind = answer_kind(status, message)
        if kind == "refused" and param is not None:
            # A refusal the runner explains field by field (a tool call it cannot force).
            return InvalidRequest(message, param=param)
        if kind == "refused":
            return InvalidRequest(f"runner refused the request: {message}")
        if kind == "thread_died":
            m.runner_failed(runner, kind, f"runner answered {status}: {message}")
            return RunnerBroken(
                f"runner of {m.model_id!r} was broken ({message}); it is being restarted"
            )
        if m.runner_failed(runner, kind, f"answered {status}: {message}"):
            return RunnerBroken(
                f"runner of {m.model_id!r} was broken ({status}: {message}); it is being restarted"
            )
        # Never a 404: gateways bench an upstream that answers one.
        return UpstreamError(f"runner answered {status}: {message}")


@attrs.define(eq=False)
class _Relay:
    """One streamed request to a runner, in steps around `IdleRace.next`.

    Either way (to the client as a stream, or assembled at the end) the client's
    going away cancels the handler, which closes the runner connection; the
    runner's next write then fails and it stops.
    """

    proxy: Proxy
    request: web.Request
    m: ModelSupervisor
    runner: RunnerProcess
    checked: Checked
    name: str
    # Races each wait on the runner against the heartbeat and the runner's exit.
    race: IdleRace
    opening: asyncio.Future[Upstream]
    trace: TraceDraft | None
    started: float
    # time.monotonic() of this request's last byte from the runner (its idle limit).
    last_byte: float
    response: web.StreamResponse | None = None
    upstream: Upstream | None = None
    tally: _Tally = attrs.Factory(_Tally)
    decoding: bool = False
    outcome: str = "ok"
    _events: _Events = attrs.Factory(_Events)
    _sink_to: Downstream | None = None
    _wanted: bytes = b""

    async def run(self) -> web.StreamResponse:
        try:
            upstream = await self._headers()
            if upstream.status >= 400:
                return await self._error_answer(upstream)
            if self.checked.stream and self.response is None:
                self.response = await self._begin()
            await self._pump(upstream)
            self.m.runner_answered(self.runner)
            if self.checked.stream:
                assert self.response is not None
                return self.response
            answer = {**assemble(_parsed(self.tally.raw)), "model": self.name}
            if self.tally.sent_at is not None:
                answer["timing"] = self.tally.timing()
            return web.json_response(answer)
        except _Lost as exc:
            return await self._lost(exc)
        except (ConnectionError, asyncio.CancelledError):
            self._cut_short()
            raise
        finally:
            await self._close()

    async def _headers(self) -> Upstream:
        """The runner's answer headers (it may send them only after prefill)."""
        while True:
            try:
                # Shielded: a heartbeat's interruption must not abort the request.
                upstream = await self.race.next(asyncio.shield(self.opening))
            except HopError as exc:
                raise self._connection_failed(exc) from exc
            except StreamEnded:
                raise self._exited() from None
            if upstream is not None:
                break
            await self._silence()
        self.upstream = upstream
        self.last_byte = now = time.monotonic()
        self.m.runner_health.byte(now)
        return upstream

    async def _pump(self, upstream: Upstream) -> None:
        """Relay the runner's events until its stream ends after [DONE].

        The runner's bytes are spliced (shared.hop): each read is handled by `_sink`
        from the connection's own callback, with no task, wait or timer per chunk.
        This task wakes only on the heartbeat's beat, the runner's exit or the end.
        """
        down = None
        if self.response is not None:
            down = Downstream(self.request, self.response, upstream.resume)
        self._sink_to = down
        self._wanted = model_field(self.name)
        spliced = upstream.splice(self._sink, self.proxy.config.idle_read_timeout_s)
        while True:
            try:
                # None either way: the beat (the splice goes on) or the end.
                await self.race.next(asyncio.shield(spliced))
            except HopError as exc:
                raise self._connection_failed(exc) from exc
            except TimeoutError as exc:
                raise _Lost(f"runner silent: {exc}") from exc
            except StreamEnded:
                raise self._exited() from None
            if spliced.done():
                break
            await self._silence()
        if not self.tally.done:
            self.m.runner_failed(self.runner, "cut_short", "closed a stream before [DONE]")
            raise _Lost("runner closed the stream before [DONE]")

    def _sink(self, chunk: bytes) -> bool:
        """One read of the runner's stream: accounted, renamed, on its way to the client."""
        self.last_byte = now = time.monotonic()
        self.m.runner_health.byte(now)
        tally = self.tally
        out = _take(self._events.feed(chunk), tally, self.checked, now)
        if tally.frames and not self.decoding:
            self._first_token(now)
        if out and self._sink_to is not None:
            return self._sink_to.write(renamed(out, self._wanted))
        return False

    async def _begin(self) -> web.StreamResponse:
        r = web.StreamResponse(status=200, headers={**SSE_HEADERS, **_queue_wait(self.request)})
        await r.prepare(self.request)
        mark_streaming(self.request, r)
        return r

    async def _silence(self) -> None:
        """A heartbeat's beat: a heartbeat to a stream whose runner is silent, or the end."""
        limit = self.proxy.config.idle_read_timeout_s
        quiet = time.monotonic() - self.last_byte
        if quiet > limit:
            raise _Lost(f"runner silent for {limit:g} s")
        if not self.checked.stream or quiet < self.proxy.config.heartbeat_s * 0.9:
            return  # bytes came during this beat: the link showed life
        if self.response is None:
            self.response = await self._begin()
        await self.response.write(HEARTBEAT)

    def _first_token(self, now: float) -> None:
        self.decoding = True
        ttft = (self.tally.first_at or now) - self.started
        self.m.runner_health.first_token(ttft)
        if self.trace is not None:
            self.trace.ttft_s = round(ttft, 6)
        metrics = self.proxy.supervisor.metrics
        metrics.child(metrics.ttft, self.m.model_id).observe(ttft)

    def _connection_failed(self, exc: HopError) -> _Lost:
        self.m.runner_failed(self.runner, "connection", f"connection failed: {describe(exc)}")
        return _Lost(f"runner connection failed: {describe(exc)}")

    def _exited(self) -> _Lost:
        return _Lost(f"runner exited with code {self.runner.exited.result()}")

    async def _error_answer(self, upstream: Upstream) -> web.StreamResponse:
        """The runner answered an error status: raise it, or end the begun stream with it."""
        raw = await race_exit(upstream.read(), self.runner, _Lost)
        err = self.proxy._runner_error(self.m, self.runner, upstream.status, raw)
        self.outcome = _error_outcome(err)
        if self.response is None:
            raise err
        self.proxy.supervisor.metrics.stream_errors.labels(self.m.model_id, "upstream_error").inc()
        await self.response.write(sse_error_frame(err.message, err.status, err.code))
        return self.response

    async def _lost(self, exc: _Lost) -> web.StreamResponse:
        self.outcome = "upstream_lost"
        message = f"runner of {self.m.model_id!r} lost: {describe(exc)}"
        if self.trace is not None:
            self.trace.error = message
        if self.response is None:
            raise UpstreamUnavailable(message) from exc
        # Counted only where a client really gets the error frame.
        self.proxy.supervisor.metrics.stream_errors.labels(self.m.model_id, "runner_lost").inc()
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.response.write(sse_error_frame(message))
        return self.response

    def _cut_short(self) -> None:
        if self.checked.stream and self.tally.done:
            # [DONE] had reached the client (cortex closes as soon as it reads
            # it): a complete answer, whichever side closed first after it.
            if self.trace is not None:
                self.trace.status = "200"
        else:
            # The client went away (or a cancel): closing the upstream stops the runner.
            self.outcome = "cancelled" if cancelled(self.request) else "client_gone"

    async def _close(self) -> None:
        self.race.close()
        upstream = self.upstream
        if upstream is None:
            # Not opened yet, or opened just as the stream was cut short.
            self.opening.cancel()
            with contextlib.suppress(BaseException):
                upstream = await self.opening
        if upstream is not None:
            if self.tally.done:
                upstream.release()  # complete: kept alive if the runner allows
            else:
                upstream.close()  # the runner stops at its next write
        self.m.runner_health.ended(self.decoding)
        tally, trace = self.tally, self.trace
        if tally.usage is not None:
            self.proxy._count_tokens(self.m, tally.usage, tally)
            if trace is not None:
                trace.usage(tally.usage)
                trace.tok_s = _tok_s(tally)
        if trace is not None and self.outcome != "ok":
            trace.status = self.outcome
        metrics = self.proxy.supervisor.metrics
        metrics.child(metrics.requests, self.m.model_id, self.outcome).inc()


def _timed_tally(request: web.Request, sent_at: float) -> _Tally:
    """A request's tally, set to time it when the client asked (`X-Cortex-Timing`)."""
    if not wants_timing(request.headers):
        return _Tally()
    t = _trace(request)
    return _Tally(sent_at=sent_at, queue_s=None if t is None else t.admission_wait_s)


def _serving(m: ModelSupervisor | None, model_id: str) -> RunnerProcess:
    """The runner to send this request to (the supervisor says whether there is one)."""
    if m is None:
        raise ModelNotFound(f"model {shown(model_id)} is not loaded on this node", param="model")
    return m.serving_runner()


def _take(batch: list[bytes], tally: _Tally, checked: Checked, now: float) -> bytes:
    """Account for complete events from the runner; the bytes the client gets."""
    out = []
    for event in batch:
        if event.startswith(b":"):  # the runner's prefill keepalive
            out.append(event)
            continue
        if event.startswith(DONE.rstrip(b"\n")):
            tally.done = True
            out.append(event)
            continue
        # Quotes inside strings are escaped in JSON, so this finds only the key.
        chunk = _event_json(event) if b'"usage":' in event else None
        if not checked.stream and (data := _event_data(event)) is not None:
            tally.raw.append(data)
        if chunk is not None and is_usage_frame(chunk):
            tally.usage = chunk["usage"]
            if checked.stream:
                out.append(_usage_event(event, chunk, tally, checked))
            continue
        tally.frames += 1
        if tally.first_at is None:
            tally.first_at = now
        if now == tally.first_at:
            tally.first_read += 1
        tally.last_at = now
        out.append(event)
    return b"".join(out)


def _usage_event(event: bytes, chunk: dict[str, Any], tally: _Tally, checked: Checked) -> bytes:
    """What a streaming client gets for the runner's usage frame."""
    if checked.include_usage:
        return event if tally.sent_at is None else timed_event(chunk, tally.timing())
    # An SSE comment (clients skip it): cortex's trace reads the counts.
    return usage_comment(chunk["usage"])


class RunnerBroken(UpstreamError):
    """502 upstream_error from a runner that is being restarted (no code of its own:
    cortex and clients know upstream_error)."""


def _tok_s(tally: _Tally) -> float | None:
    """Decode speed as the metrics count it: tokens after the first over their span."""
    c = (tally.usage or {}).get("completion_tokens")
    if not isinstance(c, int):
        return None
    return decode_rate(c, tally.first_at, tally.last_at)  # only over a real interval


def _error_outcome(err: ApiError) -> str:
    return "runner_broken" if isinstance(err, RunnerBroken) else "upstream_error"


def _event_data(event: bytes) -> bytes | None:
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            return line[5:]
    return None


def _parsed(raw: list[bytes]) -> list[dict[str, Any]]:
    """The events' JSON objects in order; one that is not JSON is left out."""
    try:
        objs = json.loads(b"[" + b",".join(raw) + b"]")
    except ValueError:
        objs = []
        for data in raw:
            with contextlib.suppress(ValueError):
                objs.append(json.loads(data))
    return [o for o in objs if isinstance(o, dict)]


def _event_json(event: bytes) -> dict[str, Any] | None:
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            with contextlib.suppress(ValueError):
                obj = json.loads(line[5:])
                return obj if isinstance(obj, dict) else None
    return None


def _runner_message(raw: bytes) -> tuple[str, str | None]:
    """(message, param) of a runner's error answer (param only from the shim's own)."""
    message, param = raw.decode(errors="replace")[:2000], None
    with contextlib.suppress(ValueError):
        body = json.loads(raw)
        if isinstance(body, dict):
            err = body.get("error")
            if isinstance(err, dict):
                message = str(err.get("message", message))
                param = err.get("param") if isinstance(err.get("param"), str) else None
            elif err is not None:
                message = str(err)
    return message, param
