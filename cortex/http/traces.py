"""GET /admin/traces, /admin/traces/{id} (cortex's view joined with each node's) and
/admin/events. Behind the admin token like every /admin route (cortex.http.auth)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web

from cortex.config import CONFIG
from cortex.core.tracing import Trace, select
from cortex.run.lifecycle import LIFECYCLE
from cortex.run.loader import LOADER
from cortex.run.poller import FLEET
from shared.errors import InvalidRequest, NotFound
from shared.journal import Journal, find

MAX_LIMIT = 1000


def add_trace_routes(app: web.Application) -> None:
    app.router.add_get("/admin/traces", admin_traces)
    app.router.add_get("/admin/traces/{id}", admin_trace)
    app.router.add_get("/admin/events", admin_events)


def _number(request: web.Request, name: str, default: float | None) -> float | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise InvalidRequest(f"{name!r} must be a number", param=name) from None


def _limit(request: web.Request, default: int) -> int:
    n = _number(request, "limit", default)
    assert n is not None
    if n < 1:
        raise InvalidRequest("'limit' must be >= 1", param="limit")
    return min(int(n), MAX_LIMIT)


async def admin_traces(request: web.Request) -> web.Response:
    """Newest first; `since` is wall-clock seconds, `status` a code, or "error"."""
    q = request.query
    found = select(
        request.app[TRACES],
        model=q.get("model") or None,
        since=_number(request, "since", None),
        status=q.get("status") or None,
        limit=_limit(request, 100),
    )
    return web.json_response({"traces": [t.to_json() for t in found]})


async def admin_trace(request: web.Request) -> web.Response:
    """Cortex's trace and, for each node it tried, the neuron's own (or why not)."""
    rid = request.match_info["id"]
    traces = request.app[TRACES]
    mine = find(traces, rid)
    if mine is None:
        raise NotFound(f"no trace {rid[:200]!r} (never seen, or aged out of the ring)")
    fleet = request.app[FLEET]
    session = request.app[LOADER].session  # carries the fleet token
    timeout = aiohttp.ClientTimeout(total=request.app[CONFIG].poll_timeout_s * 2)

    async def one(node: str) -> tuple[str, dict[str, Any]]:
        if node not in fleet.names:
            return node, {"error": "node no longer configured"}
        url = fleet.node(node).url.rstrip("/") + f"/traces/{rid}"
        try:
            async with session.get(url, timeout=timeout) as r:
                body = await r.json(content_type=None)
                if r.status != 200 or not isinstance(body, dict):
                    return node, {"error": f"HTTP {r.status}", "answer": body}
                return node, body
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return node, {"error": str(exc) or type(exc).__name__}

    tried = list(dict.fromkeys(mine.nodes))
    views = dict(await asyncio.gather(*(one(n) for n in tried)))
    # The neuron whose answer the client got, first; every node tried in "nodes".
    main = mine.node if mine.node in views else (tried[-1] if tried else None)
    return web.json_response(
        {
            "id": rid,
            "cortex": mine.to_json(),
            "neuron": None if main is None else views[main],
            "nodes": views,
        }
    )


async def admin_events(request: web.Request) -> web.Response:
    q = request.query
    life = request.app[LIFECYCLE]
    since = _number(request, "since", 0)
    assert since is not None
    found = life.events(
        q.get("model") or None,
        limit=_limit(request, 200),
        node=q.get("node") or None,
        since=int(since),
    )
    return web.json_response(
        {"events": [e.to_json() for e in found], "last_seq": life.journal.last_seq}
    )


# Finished requests' traces (the events journal is the lifecycle's).
TRACES = web.AppKey("traces", Journal[Trace])
