"""DELETE /v1/requests/{id} on a neuron: end a request in flight here (fleet token).

For an operator who sent a request straight to a neuron: cortex does not need it,
since its own cancel closes its connection to the neuron, which stops the runner
as any client that leaves does (cortex.http.cancel). Only a request that came
with an X-Request-Id can be reached (cortex always sends one): a neuron makes up
an id for the others, but tells it to no one while the request runs. The client
gets `request_cancelled` (499): an SSE error frame then `data: [DONE]` once its
stream has begun, else the error answer; the runner connection is closed.
"""

from __future__ import annotations

from collections.abc import Collection

from aiohttp import web

from neuron.tracing import request_id
from shared.cancel import Cancels
from shared.errors import NotFound
from shared.model_id import shown

CANCELS = web.AppKey("cancels", Cancels)


def _given_id(request: web.Request) -> str | None:
    """The request's id if its client gave one (and it is well-formed)."""
    given = request.headers.get("X-Request-Id")
    return given if given is not None and request_id(request) == given else None


def setup(app: web.Application, paths: Collection[str]) -> None:
    """The registry over `paths`, its middleware (innermost), the route."""
    cancels = Cancels(paths=paths, id_of=_given_id)
    app[CANCELS] = cancels
    app.middlewares.append(cancels.middleware())
    app.router.add_delete("/v1/requests/{rid}", delete_request)


async def delete_request(request: web.Request) -> web.Response:
    rid = request.match_info["rid"]
    cancels = request.app[CANCELS]
    runs = cancels.find(rid)
    if not runs:
        raise NotFound(f"no request {shown(rid)} in flight on this neuron", param="id")
    for run in runs:
        cancels.cancel(run, f"request {rid} was cancelled (DELETE /v1/requests/{rid})")
    ended = await cancels.ended(runs)
    return web.json_response({"cancelled": rid, "count": len(runs), "ended": ended})
