"""The cortex aiohttp application: `create_app(config)` and its endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import attrs
from aiohttp import web

from cortex.config import CATALOGUE, CONFIG, ApiKey, CortexConfig
from cortex.core.life import loading, unload_targets, where_now
from cortex.core.placement import candidates
from cortex.core.router import node_infos
from cortex.core.state import AffinityTable, Fleet, FleetSnapshot
from cortex.core.tracing import journals
from cortex.http import (
    anthropic,
    cancel,
    inference,
    join,
    linktest,
    reboot,
    recycle,
    reload,
    responses,
)
from cortex.http.auth import AUTH, REQUEST_KEY, Auth
from cortex.http.dashboard import setup as dashboard_setup
from cortex.http.dialect import dialect_errors
from cortex.http.inference import DRAIN
from cortex.http.proxy import AFFINITY, PROXY, Proxy
from cortex.http.traces import TRACES, add_trace_routes
from cortex.metrics import CONTENT_TYPE, METRICS, Metrics
from cortex.run import discover, doctor
from cortex.run.lifecycle import LIFECYCLE, Lifecycle, replica_counts
from cortex.run.loader import LOADER, Loader
from cortex.run.poller import FLEET, POLLER, Poller
from cortex.run.reconciler import RECONCILER, Reconciler
from shared.catalogue import Catalogue, ModelSpec
from shared.drain import DRAIN as SERVE_DRAIN
from shared.drain import Drain
from shared.errors import (
    ForceNeedsAdminToken,
    InvalidRequest,
    ModelKeptLoaded,
    ModelNotFound,
    ShuttingDown,
    error_middleware,
    quiet_bad_requests,
    read_json_object,
    reject_unknown,
)
from shared.hop import Hop
from shared.hop_aiohttp import Link
from shared.journal import Event, Journal, journal_health
from shared.model_id import RULE as MODEL_ID_RULE
from shared.model_id import is_valid as is_model_id
from shared.model_id import shown
from shared.serve import HANDLER_ARGS, guard_middleware
from shared.versions import DISTRIBUTION, dist_version

log = logging.getLogger(__name__)


@attrs.frozen
class Started:
    """When this app was created, for uptime (monotonic) and display (wall clock)."""

    monotonic: float
    wall: float


# Where the app keeps what only this module sets up; each service's key lives
# beside the service (CONFIG and CATALOGUE in cortex.config, DRAIN in
# cortex.http.inference, LIFECYCLE in cortex.run.lifecycle, ...).
STARTED = web.AppKey("started", Started)
# The package version /health names, read once (as `cortex --version` does).
VERSION = web.AppKey("version", str)


async def _drain(app: web.Application) -> None:
    # On SIGTERM the drain had its time already (listener open): only the rest is cut.
    await app[DRAIN].close(app[CONFIG].drain_s)


def create_app(
    config: CortexConfig, *, catalogue: Catalogue | None = None, background: bool = True
) -> web.Application:
    """The gateway. `background=False` leaves polling to the caller (tests drive it)."""
    quiet_bad_requests()
    cat = catalogue if catalogue is not None else Catalogue.load(config.catalogue)
    auth = Auth(keys=config.api_keys, admin_token=config.admin_token)
    drain = Drain(paths=inference.PATHS | anthropic.PATHS | responses.PATHS, drain_s=config.drain_s)
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[
            guard_middleware,
            error_middleware,
            dialect_errors,
            drain.middleware(),
            auth.middleware(),
        ],
        handler_args=HANDLER_ARGS,
    )
    # The inference APIs' key, and the one `shared.serve.run_app` drains on SIGTERM.
    app[DRAIN] = app[SERVE_DRAIN] = drain
    app.on_shutdown.append(_drain)
    app[CONFIG] = config
    app[STARTED] = Started(monotonic=time.monotonic(), wall=time.time())
    app[VERSION] = dist_version(DISTRIBUTION) or "0+unknown"
    app[CATALOGUE] = cat
    app[FIRST_SEEN] = {}
    app[AUTH] = auth
    app[FLEET] = Fleet.of(
        ((n.name, n.base_url) for n in config.neurons), threshold=config.failure_threshold
    )
    app[METRICS] = Metrics.create((m.id for m in cat.models), (n.name for n in config.neurons))
    app[AFFINITY] = AffinityTable(capacity=config.affinity_entries)
    events, app[TRACES] = journals(config)
    # (The lifecycle comes with the services: no replicas before the app starts.)
    app[METRICS].watch_replicas(
        lambda: replica_counts(cat, app[LIFECYCLE].snapshot()) if LIFECYCLE in app else []
    )
    app.cleanup_ctx.append(_services(events, background=background))
    for api in (inference, anthropic, responses):
        api.add_routes(app)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/v1/models/{model_id:.+}", _model)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/admin/state", _admin_state)
    app.router.add_get("/admin/placements", _admin_placements)
    # `.+`: an id may hold a slash ("org/name"; see shared.model_id).
    app.router.add_post("/admin/models/{model_id:.+}/load", _admin_load)
    app.router.add_post("/admin/models/{model_id:.+}/unload", _admin_unload)
    app.router.add_post("/admin/store/purge", _admin_store_purge)
    app.router.add_get("/admin/doctor", _admin_doctor)
    dashboard_setup(app, background=background)  # the page, its charts' history
    linktest.setup(app)
    recycle.setup(app)
    reboot.setup(app)  # POST /admin/nodes/{name}/reboot (opt-in on the node)
    join.setup(app)  # POST /admin/join-codes, POST /join
    discover.setup(app, background=background)  # mDNS, with `discover = true`
    cancel.setup(app)  # after the middlewares above: its own runs inside auth's
    add_trace_routes(app)
    return app


def _services(events: Journal[Event], *, background: bool) -> Any:
    async def services(app: web.Application) -> AsyncIterator[None]:
        sessions = _Sessions.open(app[CONFIG])
        poller, reconciler = _wire(app, events, sessions)
        task = (
            asyncio.create_task(_background(poller, reconciler), name="cortex background")
            if background
            else None
        )
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await app[LIFECYCLE].close()
            app[PROXY].link.hop.close()
            await sessions.proxy.close()
            await sessions.calls.close()
            poller.close()
            await sessions.status.close()
            # The writer threads write what is queued, off the loop.
            await asyncio.to_thread(events.close)
            await asyncio.to_thread(app[TRACES].close)

    return services


async def _background(poller: Poller, reconciler: Reconciler) -> None:
    """Poll and reconcile for the app's life (each loop survives its own errors)."""
    async with asyncio.TaskGroup() as tg:
        tg.create_task(poller.run(), name="cortex poller")
        tg.create_task(reconciler.run(), name="cortex reconciler")


@attrs.frozen
class _Sessions:
    """cortex's client pools towards the neurons."""

    calls: aiohttp.ClientSession  # the loader's: loads, unloads, staging
    proxy: aiohttp.ClientSession  # the proxy's to https:// neurons (shared.hop_aiohttp)
    status: aiohttp.ClientSession  # the poller's
    fleet_headers: dict[str, str]

    @classmethod
    def open(cls, cfg: CortexConfig) -> _Sessions:
        # The fleet token on every call to a neuron (poller, loader, proxy). The
        # proxy drops the client's own Authorization, so this is the one that arrives.
        headers = {} if cfg.fleet_token is None else {"Authorization": f"Bearer {cfg.fleet_token}"}
        calls = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=headers)
        # No pool limit: every stream holds a connection for its whole life.
        proxy = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), headers=headers)
        # The poller's own pool, capped: loads and unloads never queue behind polls.
        status = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=cfg.poll_concurrency), headers=headers
        )
        return cls(calls=calls, proxy=proxy, status=status, fleet_headers=headers)


def _poller(app: web.Application, session: aiohttp.ClientSession) -> Poller:
    cfg, metrics = app[CONFIG], app[METRICS]
    poller = Poller(
        fleet=app[FLEET],
        session=session,
        interval_s=cfg.poll_interval_s,
        timeout_s=cfg.poll_timeout_s,
        listeners=[metrics.observe_node],
        concurrency=cfg.poll_concurrency,
        on_round=metrics.poll_round.set,
    )
    for name in app[FLEET].names:
        metrics.observe_node(app[FLEET].node(name))
    return poller


def _wire(
    app: web.Application, events: Journal[Event], sessions: _Sessions
) -> tuple[Poller, Reconciler]:
    """The services, each under its key: poller, loader, lifecycle, proxy, reconciler."""
    cfg = app[CONFIG]
    poller = _poller(app, sessions.status)
    loader = Loader(
        fleet=app[FLEET],
        session=sessions.calls,
        config=cfg,
        metrics=app[METRICS],
        poller=poller,
    )
    # The one owner of every model's life; the loader is its I/O.
    life = Lifecycle(
        fleet=app[FLEET],
        catalogue=app[CATALOGUE],
        config=cfg,
        loader=loader,
        journal=events,
        state_file=cfg.state_file,
    )
    life.restore()
    app[LIFECYCLE] = life
    poller.listeners += [life.polled, life.transitions]
    app[POLLER] = poller
    app[LOADER] = loader
    app[PROXY] = Proxy(
        fleet=app[FLEET],
        poller=poller,
        loader=loader,
        life=life,
        config=cfg,
        metrics=app[METRICS],
        link=Link(
            Hop(connect_timeout_s=cfg.connect_timeout_s), sessions.proxy, sessions.fleet_headers
        ),
        affinity=app[AFFINITY],
    )
    reconciler = Reconciler(
        life=app[LIFECYCLE],
        loader=loader,
        interval_s=cfg.poll_interval_s,
    )
    app[RECONCILER] = reconciler
    return poller, reconciler


# -- models, health, metrics ----------------------------------------------------------


def _model_entry(
    model_id: str,
    snap: FleetSnapshot,
    life: Lifecycle,
    *,
    created: int,
    owned_by: str,
    aliases: tuple[str, ...] = (),
    feasible_on: list[list[str]] | None = None,
    context_length: int | None = None,
    kind: str = "chat",
) -> dict[str, Any]:
    """One /v1/models entry; `locations` only where the model takes requests (rank 0)."""
    locs = snap.locations(model_id)
    f = life.failure(model_id)
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": owned_by,
        "aliases": list(aliases),
        # "chat" or "embedding" (which endpoints serve it); a model outside the
        # catalogue is taken for chat.
        "kind": kind,
        "loaded": any(n.healthy and m.state == "ready" for n, m in locs),
        "locations": [
            {
                "node": n.name,
                "state": m.state,
                "healthy": n.healthy,
                # Wall clock (s) this copy is unloaded if still idle; null: never.
                "expires_at": life.expires_at(snap, n, m),
            }
            for n, m in locs
            if m.serves_http
        ],
        "feasible_on": feasible_on or [],
        "context_length": context_length,
        "last_failure": None if f is None else f.to_json(life.clock()),
    }


# Wall clock (s) cortex first saw each model a neuron serves outside the catalogue.
FIRST_SEEN = web.AppKey("first_seen", dict[str, int])


async def _models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": _model_list(request)})


async def _model(request: web.Request) -> web.Response:
    """GET /v1/models/{id} (an id or an alias): what `client.models.retrieve(id)` reads."""
    asked = request.match_info["model_id"]
    spec = request.app[LIFECYCLE].catalogue.resolve(asked)
    model_id = spec.id if spec is not None else asked
    for entry in _model_list(request):
        if entry["id"] == model_id:
            return web.json_response(entry)
    raise ModelNotFound(f"model {shown(asked)} is not in the catalogue nor loaded", param="model")


def _model_list(request: web.Request) -> list[dict[str, Any]]:
    app = request.app
    life = app[LIFECYCLE]
    snap = life.snapshot()
    cat = app[LIFECYCLE].catalogue
    key: ApiKey | None = request.get(REQUEST_KEY)
    infos = node_infos(snap, cat)
    data = []
    for spec in cat.models:
        if not Auth.allowed(key, spec.id, cat):
            continue
        facts = app[LOADER].facts(spec)
        feasible = [list(c.nodes) for c in candidates(spec, facts, infos, now=False) if c.feasible]
        data.append(
            _model_entry(
                spec.id,
                snap,
                life,
                # Catalogued when cortex read its catalogue, at start.
                created=int(app[STARTED].wall),
                owned_by="cortex",
                aliases=spec.aliases,
                feasible_on=feasible,
                context_length=spec.context_limit,
                kind=spec.kind,
            )
        )
    # Models a neuron serves that the catalogue does not name are routable too (but
    # for those a reload removed: they finish their requests, and are unloaded).
    extra = sorted(
        {m.model_id for n in snap.nodes for m in n.models if cat.resolve(m.model_id) is None}
        - snap.retired
    )
    seen = app[FIRST_SEEN]
    now = int(time.time())
    data.extend(
        _model_entry(mid, snap, life, created=seen.setdefault(mid, now), owned_by="neuron")
        for mid in extra
        if Auth.allowed(key, mid, cat)
    )
    return data


async def _health(request: web.Request) -> web.Response:
    if request.app[DRAIN].closing:
        # A load balancer takes a draining gateway out; its streams go on meanwhile.
        raise ShuttingDown("cortex is shutting down; use another gateway")
    # The lifecycle's snapshot: it knows the loads under way and the failed ones.
    snap = request.app[LIFECYCLE].snapshot()
    healthy, total = len(snap.healthy), len(snap.nodes)
    broken = unserved_models(snap, request.app[LIFECYCLE].catalogue)
    status = "ok" if total and healthy == total and not broken else "degraded"
    return web.json_response(
        {
            "status": status,
            "version": request.app[VERSION],
            "nodes": {"healthy": healthy, "total": total},
            "models_without_replica": broken,
            # Informational: a journal that only counts serves every request all the same.
            **journal_health(
                {"events": request.app[LIFECYCLE].journal, "traces": request.app[TRACES]}
            ),
        }
    )


def unserved_models(snap: FleetSnapshot, cat: Catalogue) -> list[dict[str, Any]]:
    """Models that should be served but have no working replica, each with why.

    Wanted (keep_loaded or pinned_on) or loaded somewhere, yet no replica is ready
    on a healthy node; one merely loading (a cold load under way) is on its way,
    not broken.
    """
    ids = [s.id for s in cat.models]
    ids += sorted({m.model_id for n in snap.nodes for m in n.models} - set(ids) - snap.retired)
    out = []
    for mid in ids:
        spec = cat.get(mid)
        locs = [(n, m) for n, m in snap.locations(mid) if m.serves_http]
        wanted = spec is not None and (spec.keep_loaded or bool(spec.pinned_on))
        if not locs and not wanted:
            continue
        if any(n.healthy and m.state == "ready" for n, m in locs) or loading(snap, mid):
            continue
        replicas = [
            {"node": n.name, "healthy": n.healthy, "state": m.state, "error": m.error}
            for n, m in locs
        ]
        failure = snap.failure(mid)
        if failure is not None:
            why = f"last load failed: {failure.message}"
        elif not locs:
            why = "loaded nowhere"
        else:
            why = "; ".join(
                f"{r['node']}: {r['state'] if r['healthy'] else 'node unhealthy'}"
                + (f" ({r['error']})" if r["error"] else "")
                for r in replicas
            )
        out.append({"model": mid, "reason": why, "replicas": replicas})
    return out


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


# -- admin ------------------------------------------------------------------------------


async def _admin_state(request: web.Request) -> web.Response:
    app = request.app
    life = app[LIFECYCLE]
    snap = life.snapshot()
    cat = app[LIFECYCLE].catalogue
    nodes = []
    for n in snap.nodes:
        d = n.to_json()
        d["outstanding"] = snap.node_outstanding(n.name)
        d.update(doctor.node_extras(n))
        nodes.append(d)
    nodes += discover.state_extras(app, nodes)  # who was discovered; the strangers
    models = []
    for spec in cat.models:
        failure = snap.failure(spec.id)
        job = life.job(spec.id)
        models.append(
            {
                "id": spec.id,
                "aliases": list(spec.aliases),
                "source": spec.source,
                "pinned_on": list(spec.pinned_on),
                "replicas": spec.replicas,
                "keep_loaded": spec.keep_loaded,
                "why": life.why(spec, snap, app[LOADER].facts(spec)),
                "loading": spec.id in snap.loading,
                "loading_on": None if job is None else list(job.nodes),
                "last_failure": None if failure is None else failure.message,
                "life": life.to_json(spec, snap),
                "placements": [
                    {"node": n.name, "healthy": n.healthy, **m.to_json()}
                    for n, m in snap.locations(spec.id)
                ],
            }
        )
    return web.json_response(
        {
            "nodes": nodes,
            "models": models,
            "affinity_entries": len(app[AFFINITY]),
            "events": [e.to_json() for e in life.events(limit=100)],
            # The last reload, and a refused edit still on disk (`cortex serve` only).
            "config": app[reload.RELOADER].to_json() if reload.RELOADER in app else None,
        }
    )


def _admin_model_id(model_id: object) -> str:
    """An id the admin API was given, within the fleet's charset (never echoed if not)."""
    if not is_model_id(model_id):
        raise InvalidRequest(f"'model_id' must be a model id: {MODEL_ID_RULE}", param="model_id")
    return model_id


def _spec(request: web.Request, model_id: str | None) -> ModelSpec:
    if not model_id:
        raise InvalidRequest("missing model_id", param="model_id")
    spec = request.app[LIFECYCLE].catalogue.resolve(_admin_model_id(model_id))
    if spec is None:
        raise ModelNotFound(f"model {model_id!r} is not in the catalogue", param="model_id")
    return spec


async def _admin_placements(request: web.Request) -> web.Response:
    app = request.app
    spec = _spec(request, request.query.get("model_id"))
    snap = app[LIFECYCLE].snapshot()
    infos = node_infos(snap, app[LIFECYCLE].catalogue, loading=spec.id)
    facts = app[LOADER].facts(spec)
    return web.json_response(
        {
            "model_id": spec.id,
            "facts": facts.to_json(),
            "candidates": [c.to_json() for c in candidates(spec, facts, infos, now=True)],
            "ever": [c.to_json() for c in candidates(spec, facts, infos, now=False)],
        }
    )


async def _admin_load(request: web.Request) -> web.Response:
    """Place a model. Body (optional): {"nodes": [...]} exactly there, or {"exclude": [...]};
    {"force": true} places despite a refused fit (admin token only).

    Always releases an operator's hold and forgets a failed load's backoff, and
    says so. Without a body the call is idempotent (a loaded model stays as it
    is); with one it places one more copy, so an operator can add a replica by hand.
    """
    app = request.app
    life = app[LIFECYCLE]
    spec = _spec(request, request.match_info["model_id"])
    body = await read_json_object(request) if request.can_read_body else {}
    nodes, exclude = _names(body, "nodes"), _names(body, "exclude")
    reject_unknown(body, {"nodes", "exclude", "force"})
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise InvalidRequest("'force' must be true or false", param="force")
    if force and app[AUTH].admin_token is None:
        raise ForceNeedsAdminToken(
            "a forced load needs admin_token set in cortex.toml (and presented)", param="force"
        )
    # What the operator's word undid, said in the answer.
    did = life.admin_release(spec.id)
    here = where_now(life.snapshot(), spec.id)
    if here is not None and not {k: v for k, v in body.items() if k != "force"}:
        state, on = here
        now = {"model_id": spec.id, "state": state, "nodes": on, "did": did}
        return web.json_response(now, status=200 if state == "ready" else 202)
    job = life.job(spec.id)
    if job is None or job.kind != "load":
        job = await life.place(spec, nodes=nodes or None, exclude=exclude, force=force)
    did.append(f"loading on {', '.join(job.nodes)}")
    answer: dict[str, Any] = {
        "model_id": spec.id,
        "state": "loading",
        "nodes": list(job.nodes),
        "did": did,
        "placement": None if job.candidate is None else job.candidate.to_json(),
    }
    if job.warning is not None:
        answer["warning"] = job.warning
    return web.json_response(answer, status=202)


def _names(body: dict[str, Any], field: str) -> list[str]:
    value = body.get(field, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidRequest(f"{field!r} must be an array of node names", param=field)
    return list(value)


async def _admin_unload(request: web.Request) -> web.Response:
    """Remove a model everywhere, or only from {"nodes": [...]} (with their groups' other
    ranks). A keep_loaded or pinned one needs {"force": true}, and then stays unloaded
    (the reconciler leaves it) until the next admin load."""
    app = request.app
    model_id = _admin_model_id(request.match_info["model_id"])
    body = await read_json_object(request) if request.can_read_body else {}
    reject_unknown(body, {"force", "nodes"})
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise InvalidRequest("'force' must be true or false", param="force")
    only = _names(body, "nodes")
    spec = app[LIFECYCLE].catalogue.resolve(model_id)
    mid = spec.id if spec is not None else model_id
    did: list[str] = []
    life = app[LIFECYCLE]
    nodes = unload_targets(life.snapshot(), mid, only)
    if not nodes:
        where = f" on {', '.join(only)}" if only else ""
        raise ModelNotFound(f"model {mid!r} is loaded nowhere{where}", param="model_id")
    hold = None
    if spec is not None and (spec.keep_loaded or spec.pinned_on):
        if not force:
            why = "keep_loaded" if spec.keep_loaded else f"pinned_on {list(spec.pinned_on)}"
            raise ModelKeptLoaded(
                f"model {mid!r} is {why} in the catalogue: the reconciler would load it"
                ' again; send {"force": true} to unload it until the next admin load',
                param="force",
            )
        hold = "forced unload"
    failed = await life.admin_unload(mid, nodes, hold=hold)
    held = life.held(mid)
    if hold is not None and held is not None:
        did.append(f"held it: not loaded by wish until the next admin load (since {held.since})")
    done = [n for n in nodes if n not in failed]
    did.append(f"unloaded from {', '.join(done)}" if done else "unloaded nothing")
    status = 200 if not failed else 502
    return web.json_response(
        {"model_id": mid, "unloaded": done, "failed": failed, "did": did}, status=status
    )


async def _admin_store_purge(request: web.Request) -> web.Response:
    """POST /store/purge-staging on every node at once; `{"model_id": ...}` narrows it.

    Each node deletes only copies no runner uses and no stage is writing. A node
    that does not answer is reported, never waited on past the unload timeout.
    """
    app = request.app
    body = await read_json_object(request) if request.can_read_body else {}
    reject_unknown(body, {"model_id"})
    model_id = body.get("model_id")
    if model_id is not None:
        model_id = _admin_model_id(model_id)
    forward: dict[str, Any] = {}
    if model_id is not None:
        # A catalogued model's copy is named after its source on every node.
        spec = app[LIFECYCLE].catalogue.resolve(model_id)
        forward["model_id"] = spec.source if spec is not None else model_id
    fleet = app[FLEET]
    session = app[LOADER].session
    timeout = aiohttp.ClientTimeout(total=app[CONFIG].unload_timeout_s)

    async def one(name: str) -> tuple[str, dict[str, Any]]:
        url = fleet.node(name).url.rstrip("/") + "/store/purge-staging"
        try:
            async with session.post(url, json=forward, timeout=timeout) as r:
                answer = await r.json(content_type=None)
                if r.status != 200:
                    return name, {"error": f"HTTP {r.status}", "answer": answer}
                return name, answer if isinstance(answer, dict) else {"error": "not an object"}
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return name, {"error": str(exc) or type(exc).__name__}

    results = dict(await asyncio.gather(*(one(n) for n in fleet.names)))
    freed = sum(int(r.get("freed_bytes", 0)) for r in results.values() if "error" not in r)
    failed = sorted(n for n, r in results.items() if "error" in r)
    return web.json_response(
        {"nodes": results, "freed_bytes": freed, "failed": failed},
        status=200 if not failed else 502,
    )


async def _admin_doctor(request: web.Request) -> web.Response:
    """The morning checklist (cortex.run.doctor): every check's verdict and the fix to try."""
    app = request.app
    cfg = app[CONFIG]
    snap = app[LIFECYCLE].snapshot()
    limits = doctor.Limits.of(cfg)
    checks = await doctor.run(
        app[LOADER].session,
        snap,
        unserved_models(snap, app[LIFECYCLE].catalogue),
        limits,
        cfg.poll_timeout_s,
    )
    return web.json_response(doctor.report([*checks, *reload_checks(app)]))


def reload_checks(app: web.Application) -> list[doctor.Check]:
    """A refused config edit on disk fails the checklist until it is fixed."""
    problem = app[reload.RELOADER].problem if reload.RELOADER in app else None
    if problem is None:
        return []
    return [
        doctor.Check(
            name="config reload",
            verdict="fail",
            detail=f"an edit was refused ({problem.why}), the running config stays: "
            + problem.detail,
            fix="fix the file, then `systemctl reload cortex` (SIGHUP) or save it again",
        )
    ]
