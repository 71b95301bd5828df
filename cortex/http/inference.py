"""The inference endpoints: chat and completions, and the seam the translated APIs use.

Every inference request, whatever API it came in, is served here: checked,
authorised for its model, traced, counted by model, status and API, and handed
to the proxy. A translated API (`cortex.http.anthropic`, `cortex.http.responses`)
calls `serve_chat` with the chat body it built and the dialect that turns the
answer back into its own shape.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from cortex.config import ApiKey
from cortex.core.tracing import TraceDraft
from cortex.http.auth import AUTH, NODE_HEADER, REQUEST_KEY
from cortex.http.dialect import DIALECT, Dialect
from cortex.http.proxy import PROXY, Outcome, request_id
from cortex.http.traces import TRACES
from cortex.metrics import CLIENT_CLOSED, METRICS, STREAM_ERROR
from cortex.run.lifecycle import LIFECYCLE
from shared.drain import SSE_RESPONSE, Drain
from shared.errors import ApiError, InvalidRequest, read_body, read_json_object
from shared.kinds import EMBEDDINGS_PATH, wrong_kind

# Paths whose requests the drain lets finish at shutdown (the translated APIs add theirs).
PATHS = frozenset({"/v1/chat/completions", "/v1/completions", EMBEDDINGS_PATH})
# The chat path's field that must be in a body, per path.
_FIELDS = {
    "/v1/chat/completions": "messages",
    "/v1/completions": "prompt",
    EMBEDDINGS_PATH: "input",
}

# Where the app keeps its drain (requests in flight at shutdown).
DRAIN = web.AppKey("drain", Drain)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post(EMBEDDINGS_PATH, _embeddings)


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "/v1/chat/completions", "chat")


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "/v1/completions", "completions")


async def _embeddings(request: web.Request) -> web.StreamResponse:
    # Routed as chat is (cold load, placement, retries); the neuron's runner is an encoder.
    return await _serve(request, EMBEDDINGS_PATH, "embeddings")


async def serve_chat(
    request: web.Request, chat: dict[str, Any], dialect: Dialect
) -> web.StreamResponse:
    """Serve `chat` (a chat-completions body a translated API built) exactly as POST
    /v1/chat/completions, its answer translated by `dialect`; raises the typed error
    for whatever fails before the answer starts."""
    request[DIALECT] = dialect
    return await _serve(request, "/v1/chat/completions", dialect.api, chat)


async def _serve(
    request: web.Request, path: str, api: str, given: dict[str, Any] | None = None
) -> web.StreamResponse:
    app = request.app
    metrics = app[METRICS]
    started = time.monotonic()
    label = "other"
    outcome = Outcome()
    rid = request_id(request)
    trace = TraceDraft(rid, api=api)
    error: str | None = None
    try:
        if given is None:
            body = await read_json_object(request)
            raw = await read_body(request)  # the decoded bytes, kept by read_json_object
        else:
            body, raw = given, json.dumps(given).encode()
        label = _checked(request, body, path, trace)
        # X-Cortex-Node (admin token checked by the auth middleware): that replica only.
        node = request.headers.get(NODE_HEADER) or None
        resp = await app[PROXY].handle(request, path, body, raw, rid, outcome, trace, node=node)
        # A stream's outcome is what it sent (set by the proxy as it went).
        outcome.code = outcome.code or str(resp.status)
        return resp
    except ApiError as exc:
        outcome.code = outcome.code or str(exc.status)
        error = exc.message
        raise
    except asyncio.CancelledError:
        outcome.code = _cut(request, label, outcome)
        raise
    finally:
        metrics.child(metrics.requests, label, outcome.code or "500", api).inc()
        metrics.child(metrics.request_duration, label).observe(time.monotonic() - started)
        code = outcome.code or "500"
        app[TRACES].append_made(lambda seq: trace.done(code, error, seq))


def _checked(request: web.Request, body: dict[str, Any], path: str, trace: TraceDraft) -> str:
    """The body's model, known to this key and of the kind the path serves, and the field
    the path needs: the model's metrics label, or the 400/401/403 that says what is wrong."""
    app = request.app
    field = _FIELDS[path]
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("missing or empty 'model'", param="model")
    spec = app[LIFECYCLE].catalogue.resolve(model)
    label = app[METRICS].model(spec.id if spec is not None else None)
    if field not in body:
        raise InvalidRequest(f"missing {field!r}", param=field)
    if field == "messages" and (not isinstance(body["messages"], list) or not body[field]):
        raise InvalidRequest("'messages' must be a non-empty array", param="messages")
    key: ApiKey | None = request.get(REQUEST_KEY)
    trace.model, trace.stream = spec.id if spec is not None else model, bool(body.get("stream"))
    trace.key = None if key is None else key.label
    app[AUTH].check_model(key, model, app[LIFECYCLE].catalogue)
    if spec is not None and (wrong := wrong_kind(model, spec.kind, path)) is not None:
        raise wrong  # permanent: an embedding model asked to chat, or the other way round
    return label


def _cut(request: web.Request, label: str, outcome: Outcome) -> str:
    """How a cancelled request ended: cut by the drain at shutdown (it sends the error
    frame or a 503), or by the client leaving."""
    app = request.app
    if app[DRAIN].closing and outcome.code is None:
        if SSE_RESPONSE in request:
            app[METRICS].stream_errors.labels(label, "shutdown").inc()
            return STREAM_ERROR
        return "503"
    return outcome.code or CLIENT_CLOSED
