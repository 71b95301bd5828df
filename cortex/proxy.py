"""The streaming proxy: route, forward, pass the answer through unchanged.

Response headers go to the client only once a replica has answered (and, for a
stream, sent its first event: keepalive comments do not count), so anything that
fails before that is retried on another replica by a bounded policy and the
client never sees it. After that the stream cannot be replayed: it ends with an
SSE error frame and `data: [DONE]`. A client that goes away closes the upstream
connection, which the neuron takes as a cancel.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any

import aiohttp
import attrs
from aiohttp import web

from cortex.config import CortexConfig
from cortex.lifecycle import parse_keep_alive
from cortex.loader import Loader
from cortex.metrics import Metrics
from cortex.poller import Poller
from cortex.router import ColdLoad, Route, prefix_keys, route
from cortex.state import AffinityTable, Fleet, FleetSnapshot
from shared.catalogue import Catalogue
from shared.drain import mark_streaming
from shared.errors import (
    ApiError,
    QueueFull,
    UpstreamUnavailable,
    sse_error_frame,
)
from shared.retry import proxy_attempts
from shared.sse import HOP_HEADERS

log = logging.getLogger(__name__)

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Never copied from a replica to the client: the server stamps its own.
_RESPONSE_SKIP = HOP_HEADERS | {"server", "date"}


class _TryAnother(Exception):
    """A replica failed before the first byte; `error` is the answer if no other is left."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


def request_id(request: web.Request) -> str:
    """The client's X-Request-Id if it is a sane token, else a fresh one."""
    given = request.headers.get("X-Request-Id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


def upstream_headers(request: web.Request, rid: str) -> dict[str, str]:
    """Client headers minus hop-by-hop and identity ones, re-stamped by cortex."""
    out = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
    out["Content-Type"] = "application/json"
    out["X-Request-Id"] = rid
    if request.remote:
        out["X-Forwarded-For"] = request.remote
    return out


async def _first_event(up: aiohttp.ClientResponse) -> bytes:
    """A stream's bytes up to its first line that is not an SSE comment.

    A neuron sends `: keepalive` while its runner is still in prefill: that proves
    the link, not the runner, so the answer is committed only on real data and a
    runner lost before then is retried elsewhere. Each read has the idle timeout.
    """
    got = b""
    while chunk := await up.content.readany():
        got += chunk
        if any(line.strip() and not line.startswith(b":") for line in got.split(b"\n")):
            break
    return got


def _client_headers(headers: Mapping[str, str], rid: str) -> dict[str, str]:
    out = {k: v for k, v in headers.items() if k.lower() not in _RESPONSE_SKIP}
    out["X-Request-Id"] = rid
    return out


@attrs.define
class Proxy:
    fleet: Fleet
    poller: Poller
    loader: Loader
    catalogue: Catalogue
    config: CortexConfig
    metrics: Metrics
    session: aiohttp.ClientSession
    affinity: AffinityTable

    async def handle(
        self, request: web.Request, path: str, body: dict[str, Any], raw: bytes, rid: str
    ) -> web.StreamResponse:
        """Serve one inference request; raises the typed error when it cannot."""
        model = str(body["model"])
        spec = self.catalogue.resolve(model)
        payload = raw
        keep_alive = parse_keep_alive(body.get("keep_alive"))
        if (spec is not None and model != spec.id) or "keep_alive" in body:
            # Neurons know models by id only; keep_alive is cortex's, not the runner's.
            fwd = {k: v for k, v in body.items() if k != "keep_alive"}
            payload = json.dumps({**fwd, "model": spec.id if spec else model}).encode()
        keys = prefix_keys({**body, "model": spec.id if spec else model})
        headers = upstream_headers(request, rid)
        stream = bool(body.get("stream"))
        exclude: set[str] = set()
        full: set[str] = set()
        last: _TryAnother | None = None
        try:
            async for attempt in proxy_attempts(self.config.retry_attempts, _TryAnother):
                with attempt:
                    try:
                        r = await self._route(model, keys, exclude, full)
                    except (UpstreamUnavailable, QueueFull):
                        # No replica left to try: the last one's own answer (its code,
                        # its Retry-After) says more than the router's generic one.
                        if last is None:
                            raise
                        raise last.error from None
                    if last is not None:
                        log.info("%s: retrying on %s", rid, r.node)
                    try:
                        resp = await self._forward(
                            request, r, path, payload, headers, rid, stream, exclude, full, keys
                        )
                        self.loader.life.answered(r.node, r.model_id, keep_alive)
                        return resp
                    except _TryAnother as exc:
                        last = exc
                        raise
        except _TryAnother as exc:
            raise exc.error from exc
        raise AssertionError("unreachable: the retry policy returns or raises")

    async def _route(
        self, model: str, keys: tuple[str, ...], exclude: set[str], full: set[str]
    ) -> Route:
        spec = self.catalogue.resolve(model)

        def decide(snap: FleetSnapshot) -> Route | ColdLoad:
            return route(
                snap,
                self.catalogue,
                model,
                facts=self.loader.facts,
                prefix=keys,
                affinity=self.affinity.view(),
                exclude=exclude,
                full=full,
                margin=self.config.affinity_margin,
            )

        # Loads a cold model (once, however many ask) or waits for one loading.
        return await self.loader.life.routed(spec.id if spec else model, decide)

    async def _forward(
        self,
        request: web.Request,
        r: Route,
        path: str,
        payload: bytes,
        headers: dict[str, str],
        rid: str,
        stream: bool,
        exclude: set[str],
        full: set[str],
        keys: tuple[str, ...],
    ) -> web.StreamResponse:
        cfg = self.config
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=cfg.connect_timeout_s,
            # A stream must show life (tokens or the neuron's keepalives) this often;
            # a one-piece answer may take as long as the whole generation.
            sock_read=cfg.idle_read_timeout_s if stream else cfg.response_timeout_s,
        )
        label = self.metrics.model(r.model_id)
        started = time.monotonic()
        self.fleet.begin_request(r.node, r.model_id)
        self.metrics.in_flight.labels(label).inc()
        try:
            try:
                up = await self.session.post(
                    r.url.rstrip("/") + path, data=payload, headers=headers, timeout=timeout
                )
            except aiohttp.ClientConnectorError as exc:
                # Nobody listens: the node is out of routing now, not after three polls.
                self.poller.record_failure(r.node, f"connect: {exc}", fatal=True)
                self.metrics.passive_failures.labels(r.node).inc()
                self._retry(r, exclude, "connect")
                raise _TryAnother(
                    UpstreamUnavailable(f"no replica of {r.model_id!r} reachable: {exc}")
                ) from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.poller.record_failure(r.node, f"request: {exc!r}", fatal=False)
                self._retry(r, exclude, "no_answer")
                raise _TryAnother(
                    UpstreamUnavailable(f"replica {r.node} did not answer: {exc!r}")
                ) from exc
            try:
                return await self._answer(request, up, r, rid, exclude, full, keys, started)
            except BaseException:
                # Cancelled (the client left) or failed: drop the connection so the
                # neuron sees the disconnect and stops generating.
                up.close()
                raise
            finally:
                up.release()
        finally:
            self.fleet.end_request(r.node, r.model_id)
            self.metrics.in_flight.labels(label).dec()

    def _retry(self, r: Route, exclude: set[str], reason: str) -> None:
        exclude.add(r.node)
        self.metrics.upstream_retries.labels(reason).inc()

    async def _answer(
        self,
        request: web.Request,
        up: aiohttp.ClientResponse,
        r: Route,
        rid: str,
        exclude: set[str],
        full: set[str],
        keys: tuple[str, ...],
        started: float,
    ) -> web.StreamResponse:
        label = self.metrics.model(r.model_id)
        is_sse = up.content_type == "text/event-stream"
        try:
            first = await (_first_event(up) if is_sse else up.read())
        except (aiohttp.ClientError, TimeoutError) as exc:
            up.close()
            self._retry(r, exclude, "no_first_byte")
            raise _TryAnother(
                UpstreamUnavailable(f"replica {r.node} failed before answering: {exc!r}")
            ) from exc
        self.metrics.first_byte.labels(label).observe(time.monotonic() - started)
        if up.status >= 400:
            self._upstream_error(up, first, r, exclude, full)
        if up.status < 400:
            self.affinity.remember(keys, r.node)
        headers = _client_headers(up.headers, rid)
        if not is_sse:
            return web.Response(body=first, status=up.status, headers=headers)

        resp = web.StreamResponse(status=up.status, headers=headers)
        await resp.prepare(request)
        mark_streaming(request, resp)
        try:
            await resp.write(first)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            # The client left: closing our side tells the neuron to stop generating.
            up.close()
            log.info("%s: client disconnected from %s", rid, r.node)
            return resp
        except (aiohttp.ClientError, TimeoutError) as exc:
            up.close()
            self.metrics.stream_errors.labels(label).inc()
            log.warning("%s: stream from %s broke after its first byte: %r", rid, r.node, exc)
            what = "stalled" if isinstance(exc, TimeoutError) else "was lost"
            try:
                await resp.write(sse_error_frame(f"replica {r.node} {what} mid-stream"))
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                return resp
        await resp.write_eof()
        return resp

    def _upstream_error(
        self,
        up: aiohttp.ClientResponse,
        raw: bytes,
        r: Route,
        exclude: set[str],
        full: set[str],
    ) -> None:
        """A replica's error: retry elsewhere if another may do better, else let it through."""
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        err = ApiError.from_envelope(up.status, body, up.headers.get("Retry-After"))
        if up.status == 429:
            full.add(r.node)
            self.metrics.upstream_retries.labels("queue_full").inc()
            raise _TryAnother(err if isinstance(err, QueueFull) else QueueFull(err.message))
        if up.status == 404:
            # The replica lost the model since the last poll; never pass a 404 on for
            # something transient (LiteLLM benches an upstream that says 404).
            self.fleet.drop_model(r.node, r.model_id)
            self._retry(r, exclude, "gone")
            raise _TryAnother(
                UpstreamUnavailable(f"replica {r.node} no longer serves {r.model_id!r}")
            )
        if up.status >= 500:
            self._retry(r, exclude, f"http_{up.status}")
            if err.retry_after is None:
                err = UpstreamUnavailable(f"replica {r.node}: {err.message}")
            raise _TryAnother(err)
        # A 4xx is about the request itself: another replica would say the same.
