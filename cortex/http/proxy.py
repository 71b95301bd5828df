"""The streaming proxy: route, forward, pass the answer through unchanged.

Response headers go to the client only once a replica has answered (and, for a
stream, sent its first event: keepalive comments do not count), so anything that
fails before that is retried on another replica by a bounded policy and the
client never sees it. After that the stream cannot be replayed: it ends with an
SSE error frame and `data: [DONE]`. A client that goes away closes the upstream
connection, which the neuron takes as a cancel.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import attrs
from aiohttp import web
from prometheus_client import Counter

from cortex.config import CortexConfig
from cortex.core.router import Decision, Route, prefix_keys, route
from cortex.core.state import AffinityTable, Fleet, FleetSnapshot
from cortex.core.tracing import QUEUE_WAIT_HEADER, TraceDraft
from cortex.http.dialect import DIALECT, Dialect, Transcoder
from cortex.metrics import CLIENT_CLOSED, STREAM_ERROR, Metrics
from cortex.run.inflight import InFlight, NodeLost
from cortex.run.lifecycle import Lifecycle, parse_keep_alive
from cortex.run.loader import Loader
from cortex.run.poller import Poller
from shared import logjson
from shared.assemble import answer_usage
from shared.catalogue import Catalogue
from shared.downstream import Downstream
from shared.drain import mark_streaming
from shared.errors import (
    ApiError,
    InvalidRequest,
    QueueFull,
    UpstreamError,
    UpstreamUnavailable,
    frame_error,
    sse_error_frame,
)
from shared.hop import HopConnectError, HopError, Upstream
from shared.hop_aiohttp import Link
from shared.request_id import given_or_new
from shared.sse import ANSWER_MODEL_HEADER, HOP_HEADERS

log = logging.getLogger(__name__)

# The client left: what writing to its response raises then.
_CLIENT_GONE = (ConnectionResetError, aiohttp.ClientConnectionResetError)
# Never copied from a replica to the client: the server stamps its own.
_RESPONSE_SKIP = HOP_HEADERS | {"server", "date"}


class _TryAnother(Exception):
    """A replica failed before the first byte; `error` is the answer if no other is left."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


def request_id(request: web.Request) -> str:
    """The client's X-Request-Id if it is a sane token, else a fresh one (the same one
    every time it is asked: a cancel finds the request under it, cortex.http.cancel)."""
    rid = request.get(_RID)
    if rid is None:
        rid = request[_RID] = given_or_new(request.headers.get("X-Request-Id", ""))
    return rid


def upstream_headers(request: web.Request, rid: str) -> dict[str, str]:
    """Client headers minus hop-by-hop and identity ones, re-stamped by cortex."""
    out = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
    out["Content-Type"] = "application/json"
    out["X-Request-Id"] = rid
    if request.remote:
        out["X-Forwarded-For"] = request.remote
    return out


def _upstream(
    request: web.Request,
    catalogue: Catalogue,
    model: str,
    body: dict[str, Any],
    raw: bytes,
    rid: str,
) -> tuple[bytes, tuple[str, ...], dict[str, str]]:
    """What goes to a replica: the body, its affinity keys, the headers."""
    spec = catalogue.resolve(model)
    payload = raw
    if (spec is not None and model != spec.id) or "keep_alive" in body:
        # Neurons know models by id only; keep_alive is cortex's, not the runner's.
        fwd = {k: v for k, v in body.items() if k != "keep_alive"}
        payload = json.dumps({**fwd, "model": spec.id if spec else model}).encode()
    keys = prefix_keys({**body, "model": spec.id if spec else model})
    headers = upstream_headers(request, rid)
    if spec is not None and model != spec.id and model.isascii():
        headers[ANSWER_MODEL_HEADER] = model  # an alias: the answer says it, not the id
    return payload, keys, headers


def _client_left(up: Upstream, r: Route, rid: str, out: Outcome) -> None:
    # Closing our side tells the neuron to stop generating.
    up.close()
    if out.code is None:
        out.code = CLIENT_CLOSED
    log.info("%s: client disconnected from %s", rid, r.node)


def _client_headers(headers: list[tuple[str, str]], rid: str) -> dict[str, str]:
    out = {k: v for k, v in headers if k.lower() not in _RESPONSE_SKIP}
    out["X-Request-Id"] = rid
    return out


@attrs.define
class Outcome:
    """How a request ended, as cortex_requests_total counts it; set as soon as known.

    An HTTP status ("200", "503"...), or for a stream already answered 200:
    "stream_error" (it ended in an error frame) or "client_closed" (the client
    left first). A stream is "200" once its `[DONE]` is on its way, whatever
    the client does next.
    """

    code: str | None = None


@attrs.define
class _Tries:
    """What one request has learnt about the replicas it tried."""

    # Failed before the first byte: not tried again.
    exclude: set[str] = attrs.Factory(set)
    # Answered queue_full.
    full: set[str] = attrs.Factory(set)
    # Runner faults this request met ("node: reason"); a second one ends it.
    faults: list[str] = attrs.Factory(list)
    last: _TryAnother | None = None


@attrs.define
class Proxy:
    fleet: Fleet
    poller: Poller
    loader: Loader
    life: Lifecycle
    config: CortexConfig
    metrics: Metrics
    # To the neurons: the lean hop for http://, aiohttp for https (shared.hop_aiohttp).
    link: Link
    affinity: AffinityTable
    inflight: InFlight = attrs.Factory(InFlight)
    # Spreads ties between equally loaded replicas (the router takes it as input).
    _turns: Iterator[int] = attrs.Factory(itertools.count)

    def __attrs_post_init__(self) -> None:
        # A node marked unhealthy ends every attempt still waiting on it.
        self.poller.listeners.append(self.inflight.node_changed)

    async def handle(
        self,
        request: web.Request,
        path: str,
        body: dict[str, Any],
        raw: bytes,
        rid: str,
        outcome: Outcome | None = None,
        trace: TraceDraft | None = None,
        node: str | None = None,
    ) -> web.StreamResponse:
        """Serve one inference request; raises the typed error when it cannot.

        `node` pins it to that node's replica (X-Cortex-Node, admin only)."""
        trace = trace if trace is not None else TraceDraft(rid)
        request[_TRACE] = trace
        out = outcome if outcome is not None else Outcome()
        request[OUTCOME] = out  # a cancel reads it (cortex.http.cancel)
        model = str(body["model"])
        logjson.annotate(model=model)  # log_format = "json": on this request's lines
        keep_alive = parse_keep_alive(body.get("keep_alive"))
        payload, keys, headers = _upstream(request, self.life.catalogue, model, body, raw, rid)
        tries = _Tries()
        # Distinct replicas, tried only before a first byte; no wait between them. A
        # plain loop: the first attempt, nearly every request's only one, costs nothing.
        for _ in range(max(1, self.config.retry_attempts)):
            t_route = time.monotonic()
            try:
                r = await self._route(model, keys, tries, trace, node)
            except (UpstreamUnavailable, QueueFull):
                # No replica left to try: the last one's own answer (its code,
                # its Retry-After) says more than the router's generic one.
                if tries.last is None:
                    raise
                raise tries.last.error from None
            finally:
                trace.routing_s += time.monotonic() - t_route
                if trace.cold_load_s == 0.0:  # waited for a load: all of it
                    trace.cold_load_s = time.monotonic() - t_route
            trace.nodes.append(r.node)
            logjson.annotate(node=r.node)
            if tries.last is not None:
                log.info("%s: retrying on %s", rid, r.node)
            try:
                resp = await self._forward(
                    request, r, path, payload, headers, rid, tries, keys, out
                )
            except _TryAnother as exc:
                tries.last = exc
                continue
            self.life.answered(r.node, r.model_id, keep_alive)
            return resp
        assert tries.last is not None
        raise tries.last.error from tries.last

    async def _route(
        self,
        model: str,
        keys: tuple[str, ...],
        tries: _Tries,
        trace: TraceDraft,
        node: str | None = None,
    ) -> Route:
        # One catalogue for the whole decision (a reload may replace it meanwhile).
        cat = self.life.catalogue
        spec = cat.resolve(model)

        def decide(snap: FleetSnapshot) -> Decision:
            return route(
                snap,
                cat,
                model,
                facts=self.loader.facts,
                prefix=keys,
                affinity=self.affinity.view(),
                exclude=tries.exclude,
                full=tries.full,
                margin=self.config.affinity_margin,
                rotation=next(self._turns),
                node=node,
                policy=self.config.routing,
            )

        # Loads a cold model (once, however many ask) or waits for one loading.
        def waiting() -> None:
            trace.cold_load_s = 0.0  # set to the wait once routed

        waited = time.monotonic()
        try:
            return await self.life.routed(spec.id if spec else model, decide, waiting)
        finally:
            label = self.metrics.model(spec.id if spec else None)
            self.metrics.child(self.metrics.queue_wait, label).observe(time.monotonic() - waited)

    async def _forward(
        self,
        request: web.Request,
        r: Route,
        path: str,
        payload: bytes,
        headers: dict[str, str],
        rid: str,
        tries: _Tries,
        keys: tuple[str, ...],
        out: Outcome,
    ) -> web.StreamResponse:
        # The answer's headers may take long: a neuron sends them once it admits the
        # request (its queue may hold it a while) and, unstreamed, only with the whole
        # answer. A node that stops answering is ended by `inflight` when polls mark it
        # down; a stream's body has the idle timeout (`_read`, the splice's).
        label = self.metrics.model(r.model_id)
        started = time.monotonic()
        self.fleet.begin_request(r.node, r.model_id)
        in_flight = self.metrics.child(self.metrics.in_flight, label)
        in_flight.inc()
        try:
            with self.inflight.attempt(r.node) as att:
                try:
                    up = await att.open(
                        self.link.post(
                            r.url, path, headers, payload, self.config.response_timeout_s
                        )
                    )
                except (NodeLost, HopError, TimeoutError) as exc:
                    raise self._not_opened(r, tries, exc) from exc
                att.watch(up)
                try:
                    return await self._answer(request, up, r, rid, tries, keys, started, out)
                except BaseException:
                    # Cancelled (the client left) or failed: drop the connection so the
                    # neuron sees the disconnect and stops generating.
                    up.close()
                    raise
                finally:
                    up.release()
        finally:
            self.fleet.end_request(r.node, r.model_id)
            in_flight.dec()

    def _not_opened(
        self, r: Route, tries: _Tries, exc: NodeLost | HopError | TimeoutError
    ) -> _TryAnother:
        """A replica that took no request: counted, excluded, and the error to try another."""
        if isinstance(exc, HopConnectError):
            # Nobody listens: the node is out of routing now, not after three polls.
            self.poller.record_failure(r.node, f"connect: {exc}", fatal=True)
            self.metrics.passive_failures.labels(r.node).inc()
            self._retry(r, tries, "connect")
            return _TryAnother(
                UpstreamUnavailable(f"no replica of {r.model_id!r} reachable: {exc}")
            )
        if isinstance(exc, NodeLost):
            self._retry(r, tries, "node_down")
            return _TryAnother(UpstreamUnavailable(f"replica {r.node} did not answer: {exc}"))
        self.poller.record_failure(r.node, f"request: {exc!r}", fatal=False)
        self._retry(r, tries, "no_answer")
        return _TryAnother(UpstreamUnavailable(f"replica {r.node} did not answer: {exc!r}"))

    def _retry(self, r: Route, tries: _Tries, reason: str) -> None:
        tries.exclude.add(r.node)
        self.metrics.upstream_retries.labels(reason).inc()

    async def _read(self, up: Upstream) -> bytes:
        """A stream's next bytes: it must show life (tokens or keepalives) this often."""
        async with asyncio.timeout(self.config.idle_read_timeout_s):
            return await up.readany()

    async def _first_event(self, up: Upstream) -> bytes:
        """A stream's bytes up to its first complete line that is not an SSE comment.

        A neuron sends `: keepalive` while its runner is still in prefill: that proves
        the link, not the runner, so the answer is committed only on real data and a
        runner lost before then is retried elsewhere.
        """
        got = b""
        while chunk := await self._read(up):
            got += chunk
            if any(line.strip() and not line.startswith(b":") for line in _lines(got)):
                break
        return got

    async def _answer(
        self,
        request: web.Request,
        up: Upstream,
        r: Route,
        rid: str,
        tries: _Tries,
        keys: tuple[str, ...],
        started: float,
        out: Outcome,
    ) -> web.StreamResponse:
        label = self.metrics.model(r.model_id)
        is_sse = up.content_type == "text/event-stream"
        try:
            # An unstreamed body comes with its headers (the neuron sends both once the
            # answer is whole): no timer of its own; a node lost meanwhile ends it.
            first = await (self._first_event(up) if is_sse else up.read())
        except NodeLost as exc:
            up.close()
            self._retry(r, tries, "node_down")
            raise _TryAnother(
                UpstreamUnavailable(f"replica {r.node} failed before answering: {exc}")
            ) from exc
        except (HopError, TimeoutError) as exc:
            up.close()
            # A timeout counts as one failed poll (DESIGN: passive health).
            self.poller.record_failure(r.node, f"first byte: {exc!r}", fatal=False)
            self._retry(r, tries, "no_first_byte")
            raise _TryAnother(
                UpstreamUnavailable(f"replica {r.node} failed before answering: {exc!r}")
            ) from exc
        self.metrics.child(self.metrics.first_byte, label).observe(time.monotonic() - started)
        _traced_answer(request, up, r, first, is_sse)
        if up.status >= 400:
            self._upstream_error(up, first, r, tries)
        elif is_sse:
            frame = _first_error_frame(first)
            if frame is not None:
                up.close()
                self._error_frame(frame, r, tries)
        if up.status < 400:
            self.affinity.remember(keys, r.node)
        headers = _client_headers(up.headers, rid)
        dialect = request.get(DIALECT)
        if dialect is not None:
            first = _translated(dialect, up, first, is_sse)
        if not is_sse:
            return web.Response(body=first, status=up.status, headers=headers)
        return await self._relay(request, up, r, rid, first, headers, out)

    async def _relay(
        self,
        request: web.Request,
        up: Upstream,
        r: Route,
        rid: str,
        first: bytes,
        headers: dict[str, str],
        out: Outcome,
    ) -> web.StreamResponse:
        """Pass the stream through; its end (done, error frame, client gone) sets `out`."""
        label = self.metrics.model(r.model_id)
        resp = web.StreamResponse(status=up.status, headers=headers)
        await resp.prepare(request)
        relay = _Stream(request, resp, up, out, self.metrics.stream_errors, label)
        try:
            if not await relay.run(first, self.config.idle_read_timeout_s):
                # The neuron ended the body without [DONE]: the client's stream is cut.
                out.code = STREAM_ERROR
                self.metrics.stream_errors.labels(label, "lost").inc()
                with contextlib.suppress(*_CLIENT_GONE):
                    await resp.write(relay.end(f"replica {r.node} ended the stream early", 502))
        except _CLIENT_GONE:
            _client_left(up, r, rid, out)
            return resp
        except (NodeLost, HopError, TimeoutError) as exc:
            up.close()
            message = self._broke(r, rid, label, out, _trace(request), exc)
            try:
                await resp.write(relay.end(message, 502))
            except _CLIENT_GONE:
                return resp
        with contextlib.suppress(*_CLIENT_GONE):
            # A client that closes right after [DONE] is no failure.
            await resp.write_eof()
        return resp

    def _broke(
        self,
        r: Route,
        rid: str,
        label: str,
        out: Outcome,
        trace: TraceDraft | None,
        exc: NodeLost | HopError | TimeoutError,
    ) -> str:
        """A stream that broke after its first byte, counted; what its last frame says."""
        if isinstance(exc, NodeLost):
            reason, what = "node_down", f"was lost ({exc})"
        elif isinstance(exc, TimeoutError):
            reason, what = "stalled", "stalled"
        else:
            reason, what = "lost", "was lost"
        out.code = STREAM_ERROR
        if trace is not None:
            trace.error = f"replica {r.node} {what} mid-stream"
        self.metrics.stream_errors.labels(label, reason).inc()
        log.warning("%s: stream from %s broke after its first byte: %r", rid, r.node, exc)
        return f"replica {r.node} {what} mid-stream"

    def _upstream_error(self, up: Upstream, raw: bytes, r: Route, tries: _Tries) -> None:
        """A replica's error: retry elsewhere if another may do better, else let it through."""
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        err = ApiError.from_envelope(up.status, body, up.header("Retry-After"))
        if up.status == 429:
            tries.full.add(r.node)
            self.metrics.upstream_retries.labels("queue_full").inc()
            raise _TryAnother(err if isinstance(err, QueueFull) else QueueFull(err.message))
        if up.status == 404:
            # The replica lost the model since the last poll; never pass a 404 on for
            # something transient (LiteLLM benches an upstream that says 404).
            self.life.gone(r.node, r.model_id)
            self._retry(r, tries, "gone")
            raise _TryAnother(
                UpstreamUnavailable(f"replica {r.node} no longer serves {r.model_id!r}")
            )
        if up.status >= 500:
            fault = err.code in _RUNNER_FAULTS
            if err.retry_after is None:
                err = UpstreamUnavailable(f"replica {r.node}: {err.message}")
            if fault:
                self._runner_fault(r, tries, err)
            self._retry(r, tries, "upstream_5xx")
            raise _TryAnother(err)
        # A 4xx is about the request itself: another replica would say the same.

    def _error_frame(self, frame: dict[str, Any], r: Route, tries: _Tries) -> None:
        """A stream whose first event is an error: answer it as the error it is."""
        status, code = frame_error(frame)
        message = str(frame.get("message", "error before the first token"))
        if 400 <= status < 500:
            # The neuron (or its runner) refused the request itself, after its first
            # keepalive: the client gets the 4xx, as if it had come before.
            err = ApiError.from_envelope(status, {"error": {**frame, "code": code}}, None)
            raise err if 400 <= err.status < 500 else InvalidRequest(message)
        if code not in _RUNNER_FAULTS:
            # Not the runner's doing (a neuron shutting down...): another replica, no fault.
            self._retry(r, tries, "upstream_5xx")
            raise _TryAnother(UpstreamUnavailable(f"replica {r.node}: {message}"))
        self._runner_fault(r, tries, UpstreamUnavailable(f"replica {r.node}: {message}"))

    def _runner_fault(self, r: Route, tries: _Tries, err: ApiError) -> None:
        """The runner failed this request: once may be the runner, twice is the request.

        A request that broke a runner (a poison field) would break every replica in
        turn; it gets one other replica, then its own 502 with both reasons.
        """
        tries.faults.append(err.message)
        if len(tries.faults) >= 2:
            raise UpstreamError(
                f"the request failed on {len(tries.faults)} replicas of {r.model_id!r}, not"
                f" retried further: {'; '.join(tries.faults)}"
            )
        self._retry(r, tries, "runner_fault")
        raise _TryAnother(err)


_TRACE = web.RequestKey("cortex.trace", TraceDraft)
_RID = web.RequestKey("cortex.request_id", str)
# How the request is ending, once the proxy has it (set as soon as known).
OUTCOME = web.RequestKey("cortex.outcome", Outcome)


@attrs.define(eq=False)
class _Stream:
    """One relayed stream's bytes, from the neuron's reads to the client's socket.

    After the first event (written as aiohttp writes, which also sends the headers)
    the upstream's bytes are spliced: each read is checked for a neuron's error frame
    and for [DONE], counted by the trace, and written from the upstream's own
    callback (shared.downstream), with no task woken per frame. A translated API's
    stream goes through its transcoder on the way, cortex's own cuts as its error
    event (chosen once per stream: the chat path pays nothing per chunk).
    """

    request: web.Request
    resp: web.StreamResponse
    up: Upstream
    out: Outcome
    errors: Counter  # the stream_errors family
    label: str
    done: bool = False
    relayed_error: bool = False
    _tail: bytes = b""
    _xl: Transcoder | None = None
    _write: Callable[[bytes], bool] | None = None
    _trace: TraceDraft | None = None

    def __attrs_post_init__(self) -> None:
        dialect = self.request.get(DIALECT)
        self._trace = _trace(self.request)
        if dialect is None:
            mark_streaming(self.request, self.resp)
        else:
            self._xl = dialect.transcoder()
            mark_streaming(self.request, self.resp, self._xl.fail)

    def end(self, message: str, status: int) -> bytes:
        """Cortex's own last event for a stream it cuts, in the client's API."""
        return (
            self._xl.fail(message, status)
            if self._xl is not None
            else sse_error_frame(message, status)
        )

    async def run(self, first: bytes, idle_s: float) -> bool:
        """Relay to the end; True if the stream was complete ([DONE] seen)."""
        data = self._take(first)
        if data:
            await self.resp.write(data)
        if self.done:
            return True
        down = Downstream(self.request, self.resp, self.up.resume)
        xl = self._xl
        if xl is None:
            self._write = down.write
        else:
            self._write = lambda chunk: down.write(out) if (out := xl.feed(chunk)) else False
        await self.up.splice(self._sink, idle_s)
        return self.done

    def _sink(self, chunk: bytes) -> bool:
        full = self._write(self._checked(chunk)) if self._write is not None else False
        if self.done:
            self.up.unsplice()
        return full

    def _take(self, chunk: bytes) -> bytes:
        chunk = self._checked(chunk)
        return self._xl.feed(chunk) if self._xl is not None else chunk

    def _checked(self, chunk: bytes) -> bytes:
        """Look at a chunk on its way: an error frame, the trace's counts, [DONE]."""
        tail = self._tail
        if not self.relayed_error and _holds(_ERROR_FRAME, tail, chunk):
            # A neuron's own error frame (its runner lost mid-stream): the stream
            # failed though every byte of it arrived.
            self.relayed_error = True
            self.errors.labels(self.label, "upstream_error").inc()
        if self._trace is not None:
            self._trace.scan(chunk)
        if _holds(_DONE, tail, chunk):
            # Complete: whatever the link does from here is no failure of it.
            self.done = True
            self.out.code = STREAM_ERROR if self.relayed_error else "200"
        self._tail = chunk[-_TAIL:]
        return chunk


def _translated(dialect: Dialect, up: Upstream, first: bytes, is_sse: bool) -> bytes:
    """A whole answer in the client's API; a replica's 4xx raised, for the API's envelope."""
    if up.status >= 400:
        try:
            body = json.loads(first)
        except ValueError:
            body = None
        raise ApiError.from_envelope(up.status, body, up.header("Retry-After"))
    if is_sse:
        return first  # the relay feeds it to the transcoder with the rest
    try:
        chat = json.loads(first)
    except ValueError as exc:
        raise UpstreamError(f"the replica's answer is not JSON: {exc}") from exc
    return json.dumps(dialect.answer(chat)).encode()


def trace_of(request: web.Request) -> TraceDraft | None:
    """What is known of a request in flight so far (model, nodes tried), once proxied."""
    return request.get(_TRACE)


_trace = trace_of


def _traced_answer(
    request: web.Request, up: Upstream, r: Route, first: bytes, is_sse: bool
) -> None:
    """The trace learns who answered, how long the neuron queued it, and when."""
    trace = _trace(request)
    if trace is None:
        return
    trace.node = r.node
    with contextlib.suppress(ValueError):
        trace.queue_wait_s = float(up.header(QUEUE_WAIT_HEADER, "") or "")
    now = time.monotonic()
    if up.status >= 400:
        return
    trace.first_at = now
    if is_sse:
        return  # the relay scans every chunk, the first included
    # Not json.loads(first): an embeddings answer in floats can be tens of MB.
    trace.usage(answer_usage(first))
    trace.last_at = now


# A neuron's error frame, and a stream's last one; `_TAIL` bytes of the previous chunk
# are kept so that a marker split across two reads is still seen.
_ERROR_FRAME = b'data: {"error"'
_DONE = b"data: [DONE]"
_TAIL = 16


def _holds(marker: bytes, tail: bytes, chunk: bytes) -> bool:
    """`marker` in the stream at `chunk`, also when split from the previous chunk's
    `tail`; without copying the chunk (only its first bytes join the tail)."""
    return marker in chunk or marker in tail + chunk[: len(marker)]


# A neuron's codes for "its runner failed this request" (an error answer, or lost).
_RUNNER_FAULTS = frozenset({UpstreamError.code, UpstreamUnavailable.code})


def _lines(buf: bytes) -> list[bytes]:
    """Complete lines only: the last piece may still be arriving."""
    return buf.split(b"\n")[:-1]


def _first_error_frame(first: bytes) -> dict[str, Any] | None:
    """The `error` of a stream's first event if that event is an error frame."""
    for line in _lines(first):
        if not line.strip() or line.startswith(b":"):
            continue
        if not line.startswith(_ERROR_FRAME):
            return None
        try:
            err = json.loads(line[len(b"data: ") :]).get("error")
        except (ValueError, AttributeError):
            return {"message": line.decode(errors="replace")[:500]}
        return err if isinstance(err, dict) else {"message": str(err)}
    return None


# Where the app keeps the proxy and the affinity table the proxy alone writes.
PROXY = web.AppKey("proxy", Proxy)
AFFINITY = web.AppKey("affinity", AffinityTable)
