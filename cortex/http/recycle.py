"""POST /admin/nodes/{name}/restart: recycle a node without a client noticing.

Cortex takes the node out of routing first (new requests go to other
replicas; the node's own drain lets the ones it holds finish), then asks the
neuron to restart (POST /admin/restart: drain, stop its runners, re-execute
itself). The node stays out until a poll shows a new process (a new
`started_at`, the same persisted node_id), or `recycle_timeout_s` passes; then
the reconciler loads the models its wishes want back on it.
"""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

from cortex.config import CONFIG
from cortex.core.state import NodeState
from cortex.run.lifecycle import LIFECYCLE
from cortex.run.loader import LOADER
from cortex.run.poller import FLEET
from shared.errors import ApiError, NotFound, UpstreamUnavailable


def named_node(request: web.Request) -> tuple[str, NodeState]:
    """The node the path names (`{name}`), or 404: for the admin actions on one node."""
    name = request.match_info["name"]
    fleet = request.app[FLEET]
    if name not in fleet.names:
        raise NotFound(f"no node {name!r} in this fleet", param="name")
    return name, fleet.node(name)


async def ask_recycle(
    app: web.Application,
    name: str,
    path: str,
    body: dict[str, Any],
    what: str,
    total_s: float,
    why: str = "restart requested",
) -> Any:
    """Mark node `name` recycling (out of routing at once) and POST `body` to its
    `path`; its answer. The mark is undone if the neuron does not take it (its error
    raised as it said it, or 503 when it could not be asked)."""
    fleet = app[FLEET]
    node = fleet.begin_recycle(name, app[CONFIG].recycle_timeout_s, why)
    url = node.url.rstrip("/") + path
    timeout = aiohttp.ClientTimeout(total=total_s, sock_connect=app[CONFIG].connect_timeout_s)
    try:
        async with app[LOADER].session.post(url, json=body, timeout=timeout) as resp:
            answer: Any = await resp.json(content_type=None)
            if resp.status >= 400:
                raise ApiError.from_envelope(resp.status, answer, resp.headers.get("Retry-After"))
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        fleet.end_recycle(name)
        raise UpstreamUnavailable(f"node {name} did not take the {what}: {exc!r}") from exc
    except ApiError:
        fleet.end_recycle(name)
        raise
    return answer


async def post_restart(request: web.Request) -> web.Response:
    app = request.app
    name, before = named_node(request)
    # What it serves now: what `cortex restart --wait` expects back.
    models = [m.model_id for m in before.models if m.serves_http and m.state == "ready"]
    if before.recycling:
        # Recycling already (draining, or gone): asking again must not undo the mark.
        return web.json_response(
            {"node": name, "recycling": True, "already": True, "models": models}, status=202
        )
    answer = await ask_recycle(
        app, name, "/admin/restart", {"reason": "cortex: admin restart"}, "restart", 10.0
    )
    for model_id in models:
        app[LIFECYCLE].event(model_id, "node recycling", f"{name} restarts; the reconciler reloads")
    return web.json_response(
        {
            "node": name,
            "recycling": True,
            "node_id": None if before.discovery is None else before.discovery.node_id,
            "started_at": None if before.health is None else before.health.started_at,
            "models": models,
            "drain_s": answer.get("drain_s") if isinstance(answer, dict) else None,
        },
        status=202,
    )


def setup(app: web.Application) -> None:
    app.router.add_post("/admin/nodes/{name}/restart", post_restart)
