"""DELETE /v1/requests/{id}: end a request in flight, on whichever node runs it.

The id is the request's X-Request-Id (the client's, or the one cortex returned in
that header). Cortex registers every inference request under it while it runs
(shared.cancel); a cancel interrupts its handler, whose proxy then closes the
connection to the neuron, which closes its runner's: the runner stops at its next
token or prefill step. The client gets `request_cancelled` (499): as an SSE error
frame and `data: [DONE]` once its stream has begun, else as the error answer.

Who may cancel: the admin token, any request; an API key, the requests it sent
(403 `request_not_yours` for another's); anyone when auth is off (no keys), as
anyone may send. 404 when no such request is in flight here (never sent, already
ended, or sent to another gateway). GET /admin/requests lists what is in flight,
to find an id.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Any

import attrs
from aiohttp import web

from cortex.config import ApiKey
from cortex.http.auth import AUTH, REQUEST_KEY
from cortex.http.inference import DRAIN
from cortex.http.proxy import OUTCOME, request_id, trace_of
from shared.cancel import Cancels, Running
from shared.errors import InvalidApiKey, InvalidRequest, NotFound, RequestNotYours
from shared.request_id import is_request_id

log = logging.getLogger(__name__)

# How a cancelled request is counted (cortex_requests_total{code}) and traced.
CANCELLED_CODE = "cancelled"


@attrs.frozen
class Caller:
    """Who asks for a cancel: the admin token, or an API key (None with auth off)."""

    admin: bool
    api_key: ApiKey | None = attrs.field(default=None, repr=False)


CANCELS = web.AppKey("cancels", Cancels)


def setup(app: web.Application) -> None:
    """The registry (on the inference paths the drain knows), its middleware, the routes.

    Call after the app's other middlewares are listed: this one must run inside auth's,
    which names the key a request came with."""
    cancels = Cancels(paths=app[DRAIN].paths, id_of=request_id)
    app[CANCELS] = cancels
    app.middlewares.append(cancels.middleware())
    app.router.add_delete("/v1/requests/{rid}", delete_request)
    app.router.add_get("/admin/requests", admin_requests)


async def delete_request(request: web.Request) -> web.Response:
    rid = request.match_info["rid"]
    if not is_request_id(rid):
        raise InvalidRequest("not a request id: 1-128 of A-Z a-z 0-9 . _ : -", param="id")
    caller = _caller(request)
    cancels = request.app[CANCELS]
    live = [r for r in cancels.find(rid) if not _finished(r)]
    if not live:
        raise NotFound(f"no request {rid} in flight on this cortex", param="id")
    mine = [r for r in live if _may(request, caller, r)]
    if not mine:
        raise RequestNotYours(f"request {rid} was sent with another API key", param="id")
    who = "the admin token" if caller.admin else "its sender"
    message = f"request {rid} was cancelled by {who} (DELETE /v1/requests/{rid})"
    for run in mine:
        _mark(run, message)
        cancels.cancel(run, message)
    first = _describe(mine[0])
    log.info("%s: cancelled by %s (on %s)", rid, who, first["node"] or "no node yet")
    # Answered once its handler has unwound: its connection to the node is closed by then.
    ended = await cancels.ended(mine)
    return web.json_response(
        {
            "cancelled": rid,
            "node": first["node"],
            "model": first["model"],
            "count": len(mine),
            "ended": ended,
        }
    )


async def admin_requests(request: web.Request) -> web.Response:
    """The inference requests in flight on this cortex, oldest first (admin token)."""
    runs = sorted(request.app[CANCELS].all(), key=lambda r: r.started)
    return web.json_response({"requests": [_describe(r) for r in runs if not _finished(r)]})


def _caller(request: web.Request) -> Caller:
    """The admin token, else the caller's API key (None with auth off); 401 for neither."""
    auth = request.app[AUTH]
    try:
        auth.admin(request)
    except InvalidApiKey:
        return Caller(admin=False, api_key=auth.client(request))
    return Caller(admin=True)


def _may(request: web.Request, caller: Caller, run: Running) -> bool:
    if caller.admin or not request.app[AUTH].enabled:
        return True
    sender: ApiKey | None = run.request.get(REQUEST_KEY)
    if sender is None or caller.api_key is None:
        return False  # sent with the admin token: only the admin token cancels it
    return hmac.compare_digest(sender.key.encode(), caller.api_key.key.encode())


def _finished(run: Running) -> bool:
    """Its answer is complete (a stream's [DONE] sent) or it already failed or was left:
    it is only unwinding, nothing is left to cancel."""
    out = run.request.get(OUTCOME)
    return out is not None and out.code is not None


def _mark(run: Running, message: str) -> None:
    """Count and trace it as cancelled, not as a client that left."""
    out = run.request.get(OUTCOME)
    if out is not None and out.code is None:
        out.code = CANCELLED_CODE
    trace = trace_of(run.request)
    if trace is not None:
        trace.error = message


def _describe(run: Running) -> dict[str, Any]:
    trace = trace_of(run.request)
    key: ApiKey | None = run.request.get(REQUEST_KEY)
    node = None
    if trace is not None:
        node = trace.node or (trace.nodes[-1] if trace.nodes else None)
    return {
        "id": run.rid,
        "api": None if trace is None else trace.api,
        "model": None if trace is None else trace.model,
        "stream": None if trace is None else trace.stream,
        # The node answering it, or the one it was last sent to; null while it waits
        # for a route (a cold load).
        "node": node,
        "key": None if key is None else key.label,
        "age_s": round(time.monotonic() - run.started, 3),
    }
