"""GET /traces, /traces/{id} and /events: the neuron's own journals (fleet token)."""

from __future__ import annotations

from aiohttp import web

from neuron.tracing import Trace
from shared.errors import InvalidRequest, NotFound
from shared.journal import Event, Journal, find

TRACES = web.AppKey("traces", Journal[Trace])
EVENTS = web.AppKey("events", Journal[Event])
MAX_LIMIT = 1000


def add_trace_routes(app: web.Application) -> None:
    app.router.add_get("/traces", get_traces)
    app.router.add_get("/traces/{id}", get_trace)
    app.router.add_get("/events", get_events)


def _int(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if not raw:
        return default
    try:
        return int(float(raw))
    except ValueError:
        raise InvalidRequest(f"{name!r} must be a number", param=name) from None


async def get_traces(request: web.Request) -> web.Response:
    """Newest first; `model`, `status` and `limit` filter."""
    q = request.query
    limit = min(max(1, _int(request, "limit", 100)), MAX_LIMIT)
    out = []
    traces = request.app[TRACES]
    for t in reversed(list(traces)):
        if q.get("model") and t.model != q["model"]:
            continue
        if q.get("status") and t.status != q["status"]:
            continue
        out.append(t.to_json())
        if len(out) >= limit:
            break
    return web.json_response({"traces": out})


async def get_trace(request: web.Request) -> web.Response:
    rid = request.match_info["id"]
    traces = request.app[TRACES]
    found = find(traces, rid)
    if found is None:
        raise NotFound(f"no trace {rid[:200]!r} on this node")
    return web.json_response(found.to_json())


async def get_events(request: web.Request) -> web.Response:
    journal = request.app[EVENTS]
    q = request.query
    since = _int(request, "since", 0)
    limit = min(max(1, _int(request, "limit", 200)), MAX_LIMIT)
    found = [
        e.to_json() for e in journal.since(since) if (not q.get("model") or e.model == q["model"])
    ]
    return web.json_response({"events": found[-limit:], "last_seq": journal.last_seq})
