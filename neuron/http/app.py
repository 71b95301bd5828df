"""The neuron's aiohttp application: `create_app(config)`."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from neuron import sensors
from neuron.config import NeuronConfig
from neuron.discovery import (
    discover,
    load_or_create_node_id,
    memory_available_bytes,
    memory_bytes,
    package_version,
)
from neuron.http import cancel, reboot, recycle
from neuron.http.auth import fleet_token_middleware
from neuron.http.proxy import Proxy
from neuron.http.traces import EVENTS, TRACES, add_trace_routes
from neuron.metrics import NeuronMetrics, NodeFigures
from neuron.runner import linktest, model_options
from neuron.runner.ports import check_ring_port
from neuron.runner.runner_log import log_files
from neuron.runner.supervisor import Supervisor
from neuron.store.sources import COPY_NAME, Store, copy_name, is_local_source
from neuron.store.staging import PLAN_WAIT_S, Stager
from neuron.tracing import journals
from shared.drain import DRAIN, Drain
from shared.errors import (
    ApiError,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    error_middleware,
    quiet_bad_requests,
    read_json_object,
)
from shared.journal import MB, journal_health
from shared.kinds import EMBEDDINGS_PATH
from shared.serve import HANDLER_ARGS, guard_middleware
from shared.wire import (
    FieldError,
    LoadRequest,
    ModelStatus,
    NodeHealth,
    NodeStatus,
    StageRequest,
)

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", NeuronConfig)
SUPERVISOR = web.AppKey("supervisor", Supervisor)
METRICS = web.AppKey("metrics", NeuronMetrics)
STORE = web.AppKey("store", Store)
STAGER = web.AppKey("stager", Stager)
STARTED = web.AppKey("started_at", float)
NODE_ID = web.AppKey("node_id", str)
# The package version /health names, read once (as /discovery's `version`).
VERSION = web.AppKey("version", str)
INFERENCE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", EMBEDDINGS_PATH})


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    supervisor = app[SUPERVISOR]
    await supervisor.open()
    # The budget at startup: copies (and partial ones a crash left) beyond it go.
    await app[STAGER].evict((), ())
    app[NODE_ID] = await asyncio.to_thread(load_or_create_node_id, config.store_path)
    if config.fleet_token is None and not _loopback(config.host):
        log.warning(
            "listening on %s without a fleet token: anyone who can reach this port can "
            "load and unload models (set fleet_token_file or fleet_token_env)",
            config.host,
        )
    for entry in config.load:
        try:
            await supervisor.load(
                LoadRequest(model_id=entry.model_id, source=entry.source, kind=entry.kind)
            )
        except ApiError as exc:
            # One bad [[load]] entry must not keep the node from serving the others.
            log.error("[[load]] %s: %s", entry.model_id, exc.message)
    try:
        yield
    finally:
        # Stages this stop cuts (a load's too) stay wished: the next start resumes them.
        app[STAGER].stopping()
        # Runners never outlive the neuron: stop them all before the loop ends.
        await supervisor.close()
        # The journals' writer threads write what is queued, off the loop.
        await asyncio.to_thread(supervisor.journal.close)
        await asyncio.to_thread(app[TRACES].close)


async def _drain(app: web.Application) -> None:
    # Before cleanup stops the runners: streams in flight may finish first (on SIGTERM
    # they had their time already, listener open, and only what is left is cut here).
    await app[DRAIN].close(app[CONFIG].drain_s)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def create_app(config: NeuronConfig) -> web.Application:
    quiet_bad_requests()
    drain = Drain(paths=INFERENCE_PATHS, drain_s=config.drain_s)
    middlewares: list[Middleware] = [guard_middleware, error_middleware, drain.middleware()]
    if config.fleet_token is not None:
        middlewares.append(fleet_token_middleware(config.fleet_token))
    app = web.Application(
        middlewares=middlewares, client_max_size=config.max_body_bytes, handler_args=HANDLER_ARGS
    )
    app[DRAIN] = drain
    metrics = NeuronMetrics.create()
    store = Store(config.store_path, tuple(Path(r).expanduser() for r in config.model_roots))
    events, traces = journals(config)
    stager = Stager(store=store, config=config, hub_endpoint=config.hub_endpoint, journal=events)
    supervisor = Supervisor(
        config=config, store=store, metrics=metrics, stager=stager, journal=events
    )
    app[TRACES], app[EVENTS] = traces, events
    app[STAGER] = stager
    metrics.watch(supervisor.health)
    metrics.watch_node(NodeFigures(config.store_path, memory_bytes))
    app[CONFIG] = config
    app[METRICS] = metrics
    app[STORE] = store
    app[SUPERVISOR] = supervisor
    app[STARTED] = time.time()
    app[VERSION] = package_version()
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_drain)

    proxy = Proxy(config=config, supervisor=supervisor, traces=traces)

    async def _close_hop(_: web.Application) -> None:
        proxy.hop.close()

    app.on_cleanup.append(_close_hop)
    app.router.add_post("/v1/chat/completions", proxy.chat_completions)
    app.router.add_post("/v1/completions", proxy.completions)
    app.router.add_post(EMBEDDINGS_PATH, proxy.embeddings)
    app.router.add_get("/v1/models", openai_models)
    app.router.add_get("/v1/models/{model_id:.+}", openai_model)
    app.router.add_get("/discovery", get_discovery)
    app.router.add_get("/health", get_health)
    app.router.add_get("/models", get_models)
    app.router.add_get("/status", get_status)
    app.router.add_post("/models/load", post_load)
    app.router.add_post("/models/unload", post_unload)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/store/storage", get_storage)
    app.router.add_post("/store/purge-staging", post_purge)
    app.router.add_post("/store/stage", post_stage)
    app.router.add_post("/store/cancel", post_cancel)
    app.router.add_get("/store/models/{name}/manifest", get_manifest)
    app.router.add_get("/store/models/{name}/files/{path:.+}", get_file)
    linktest.setup(app, config, store)
    recycle.setup(app, config)
    sensors.setup(app, config)
    reboot.setup(app, config)
    cancel.setup(app, INFERENCE_PATHS)  # after the middlewares above: innermost
    add_trace_routes(app)
    return app


async def get_discovery(request: web.Request) -> web.Response:
    app = request.app
    config = app[CONFIG]
    # Fresh figures (memory, disk) each time; node_id is persisted by discover().
    d = await asyncio.to_thread(
        discover, config.store_path, config.ring_host, started_at=app[STARTED]
    )
    body = d.to_json()
    body["node_name"] = config.node_name or d.hostname
    return web.json_response(body)


async def _node_health(app: web.Application) -> NodeHealth:
    models = tuple(app[SUPERVISOR].health())
    status: NodeStatus
    if app[DRAIN].closing:
        # SIGTERM or a restart: cortex sends no new work, and lets the streams finish.
        status = "draining"
    # A model with no working runner (failed, or restarting one) degrades the node.
    elif any(m.state in ("failed", "stalled", "recovering") for m in models):
        status = "degraded"
    elif any(m.in_flight or m.queue_depth for m in models):
        status = "busy"
    else:
        status = "idle"
    now = time.time()
    return NodeHealth(
        status=status,
        node_id=app[NODE_ID],
        started_at=app[STARTED],
        uptime_s=now - app[STARTED],
        # A subprocess on macOS (vm_stat): never on the event loop.
        memory_available_bytes=await asyncio.to_thread(memory_available_bytes),
        models=models,
        **_health_extras(app),
    )


def _health_body(app: web.Application, health: NodeHealth) -> dict[str, Any]:
    # Status and version first: the cluster-health page's first check reads just those.
    body = {"status": health.status, "version": app[VERSION], **health.to_json()}
    # Informational, outside the verdict: a journal that only counts serves all the same.
    body.update(journal_health({"events": app[SUPERVISOR].journal, "traces": app[TRACES]}))
    return body


def _health_extras(app: web.Application) -> dict[str, Any]:
    """Disk (a statvfs: cheap), the store's floor and the jaccl reload count, for doctor."""
    config = app[CONFIG]
    free: int | None = None
    total: int | None = None
    with contextlib.suppress(OSError):
        disk = shutil.disk_usage(config.store_path)
        free, total = disk.free, disk.total
    return {
        "disk_free_bytes": free,
        "disk_total_bytes": total,
        "min_free_bytes": int(config.min_free_gb * 1e9),
        "jaccl_loads": app[SUPERVISOR].jaccl_loads,
        "jaccl_reload_budget": config.jaccl_reload_budget,
    }


async def get_health(request: web.Request) -> web.Response:
    app = request.app
    body = _health_body(app, await _node_health(app))
    # The last reading (neuron.sensors' thread): never read here, never in /status.
    if (figures := app[sensors.SENSORS].latest) is not None:
        body["sensors"] = figures.to_json()
    return web.json_response(body)


# Free memory moves by pages all the time: the status version counts it in these
# steps, so an idle node keeps one version (placement has 256 MiB of headroom).
STATUS_MEMORY_STEP = 64 * 1024 * 1024


async def get_status(request: web.Request) -> web.Response:
    """/health, /models and the complete staged copies in one answer, for the poller.

    Its ETag is a hash of everything but the uptime (and free memory in 64 MiB
    steps): a poller sending it back in If-None-Match gets 304 and no body while
    nothing it routes or places by has changed.
    """
    app = request.app
    health = await _node_health(app)
    copies = await asyncio.to_thread(app[STORE].staged, app[SUPERVISOR].in_use_dirs())
    body: dict[str, Any] = {
        "health": _health_body(app, health),
        "models": [s.to_json() for s in app[SUPERVISOR].statuses()],
        "staged": [c.to_json() for c in copies],
    }
    etag = _status_etag(body)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if etag in _if_none_match(request):
        return web.Response(status=304, headers=headers)
    return web.json_response(body, headers=headers)


def _status_etag(body: dict[str, Any]) -> str:
    health = dict(body["health"])
    del health["uptime_s"]
    health["memory_available_bytes"] //= STATUS_MEMORY_STEP
    if health.get("disk_free_bytes") is not None:  # moves with every log line
        health["disk_free_bytes"] //= STATUS_MEMORY_STEP
    # A copy's last use is touched by every load of it; the poller reads names only.
    staged = sorted((c["name"], c["path"]) for c in body["staged"])
    canon = json.dumps([health, body["models"], staged], sort_keys=True, default=str)
    return '"' + hashlib.blake2b(canon.encode(), digest_size=12).hexdigest() + '"'


def _if_none_match(request: web.Request) -> set[str]:
    raw = request.headers.get("If-None-Match", "")
    return {t.strip().removeprefix("W/") for t in raw.split(",") if t.strip()}


async def get_models(request: web.Request) -> web.Response:
    statuses = request.app[SUPERVISOR].statuses()
    return web.json_response({"models": [s.to_json() for s in statuses]})


def _openai_model(sup: Supervisor, s: ModelStatus) -> dict[str, Any]:
    m = sup.get(s.model_id)
    return {
        "id": s.model_id,
        "object": "model",
        # When this node began loading it.
        "created": m.created if m is not None else int(s.last_used),
        "owned_by": "neuron",
        "state": s.state,
        "kind": m.kind if m is not None else "chat",
    }


async def openai_models(request: web.Request) -> web.Response:
    sup = request.app[SUPERVISOR]
    data = [_openai_model(sup, s) for s in sup.statuses()]
    return web.json_response({"object": "list", "data": data})


async def openai_model(request: web.Request) -> web.Response:
    """GET /v1/models/{id}: what `client.models.retrieve(id)` reads."""
    model_id = request.match_info["model_id"]
    sup = request.app[SUPERVISOR]
    for s in sup.statuses():
        if s.model_id == model_id:
            return web.json_response(_openai_model(sup, s))
    raise ModelNotFound(f"model {model_id!r} is not loaded on this node", param="model")


async def post_load(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    try:
        req = LoadRequest.from_json(body)
    except FieldError as exc:
        raise InvalidRequest(f"bad load request: {exc}", param=exc.param) from exc
    await check_ring_port(req, request.app[SUPERVISOR].get(req.model_id))  # 409 at once
    # A draft or adapters outside the store and model roots (or a draft not staged
    # here) is 400 now; the draft's tokenizer is checked once the model's files are in.
    await asyncio.to_thread(model_options.resolve, request.app[STORE], req.options)
    # A bad source is 400 and a floor refusal 507, both before any work.
    m = await request.app[SUPERVISOR].load(req, refuse_floor=True)
    return web.json_response(m.status().to_json(), status=202)


async def post_unload(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    model_id = body.get("model_id")
    if not isinstance(model_id, str) or not model_id:
        raise InvalidRequest("missing `model_id` (a non-empty string)", param="model_id")
    app = request.app
    if app[SUPERVISOR].get(model_id) is None and app[STAGER].cancel(model_id) is not None:
        # Only a stage of it was under way (POST /store/stage): that is what stops.
        return web.json_response({"model_id": model_id, "unloaded": False, "stage_cancelled": True})
    m = await app[SUPERVISOR].unload(model_id)
    return web.json_response({"model_id": m.model_id, "unloaded": True})


async def get_metrics(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    if metrics.node is not None:
        await asyncio.to_thread(metrics.node.refresh)
    data = generate_latest(metrics.registry)
    resp = web.Response(body=data)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


async def get_storage(request: web.Request) -> web.Response:
    app = request.app
    store = app[STORE]
    copies = await asyncio.to_thread(store.staged, app[SUPERVISOR].in_use_dirs(), partial=True)
    done = [c for c in copies if not c.partial]
    logs, free = await asyncio.to_thread(_logs_and_free, store)
    # "staged" first: cortex's poller reads the complete copies from it.
    return web.json_response(
        {
            "staged": [c.to_json() for c in done],
            "store_dir": str(store.root),
            "total_bytes": sum(c.size_bytes for c in copies),
            "staging": app[STAGER].listing(),
            "partial": [c.to_json() for c in copies if c.partial],
            "keep_recent_bytes": int(app[CONFIG].staging_keep_recent_gb * 1e9),
            "min_free_bytes": int(app[CONFIG].min_free_gb * 1e9),
            "disk_free_bytes": free,
            "runner_logs": _runner_logs(app, logs),
        }
    )


def _logs_and_free(store: Store) -> tuple[list[dict[str, Any]], int | None]:
    """The runner logs with their bytes, and the disk free under the store (blocking)."""
    free = None
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(store.root).free
    return log_files(store.logs_dir), free


def _runner_logs(app: web.Application, logs: list[dict[str, Any]]) -> dict[str, Any]:
    """/store/storage's `runner_logs`: each model's log and rotated copies, the limits,
    and the live runners' logs that are not being written (under the floor, an error)."""
    config = app[CONFIG]
    runners = [m.runner for m in app[SUPERVISOR].models.values() if m.runner is not None]
    return {
        "dir": str(app[STORE].logs_dir),
        "total_bytes": sum(entry["bytes"] for entry in logs),
        "max_bytes": int(config.runner.log_max_mb * MB),
        "keep": config.runner.log_keep,
        "min_free_bytes": int(config.journal_min_free_mb * MB),
        "logs": logs,
        "not_written": [
            r.log.status() for r in runners if r.log.counting_only or r.log.error is not None
        ],
    }


async def post_purge(request: web.Request) -> web.Response:
    """Delete unused copies: all of them, or `model_id`'s, or beyond `keep_recent_gb`.

    Never a copy in use, nor one (complete or partial) a stage is writing.
    """
    app = request.app
    body = await read_json_object(request) if request.can_read_body else {}
    only = body.get("model_id")
    if only is not None and not isinstance(only, str):
        raise InvalidRequest("`model_id` must be a string", param="model_id")
    keep_gb = body.get("keep_recent_gb", 0)
    if not isinstance(keep_gb, (int, float)) or isinstance(keep_gb, bool) or keep_gb < 0:
        raise InvalidRequest("`keep_recent_gb` must be a number >= 0", param="keep_recent_gb")
    supervisor, stager = app[SUPERVISOR], app[STAGER]
    protected = supervisor.protected_copies() | stager.active_names()
    removed = await asyncio.to_thread(
        app[STORE].purge,
        supervisor.in_use_dirs(),
        protected,
        keep_bytes=int(keep_gb * 1e9),
        only=None if only is None else copy_name(only),
    )
    return web.json_response(
        {
            "removed": [c.to_json() for c in removed],
            "freed_bytes": sum(c.size_bytes for c in removed),
        }
    )


async def post_stage(request: web.Request) -> web.Response:
    """202 with the stage job; 507 with the arithmetic when the floor refuses it."""
    app = request.app
    body = await read_json_object(request)
    try:
        req = StageRequest.from_json(body)
    except FieldError as exc:
        raise InvalidRequest(f"bad stage request: {exc}", param=exc.param) from exc
    store = app[STORE]
    if is_local_source(req.source):
        path = store.local_model_dir(req.source)  # used in place: nothing to stage
        return web.json_response(
            {
                "model_id": req.model_id,
                "source": req.source,
                "state": "staged",
                "path": str(path),
                "in_place": True,
            }
        )
    job = app[STAGER].stage(req.model_id, req.source, req.peers)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(PLAN_WAIT_S):
            await job.planned.wait()
    if job.refusal is not None:
        raise job.refusal
    return web.json_response(job.to_json(), status=200 if job.state == "staged" else 202)


async def post_cancel(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    model_id = body.get("model_id")
    if not isinstance(model_id, str) or not model_id:
        raise InvalidRequest("missing `model_id` (a non-empty string)", param="model_id")
    job = request.app[STAGER].cancel(model_id)
    if job is None:
        return web.json_response({"model_id": model_id, "cancelled": False})
    await job.finished.wait()
    return web.json_response({"model_id": model_id, "cancelled": True, "job": job.to_json()})


def _copy_name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not COPY_NAME.match(name) or not request.app[STORE].has_copy(name):
        raise NotFound(f"no staged copy {name[:200]!r} on this node", param="name")
    return name


async def get_manifest(request: web.Request) -> web.Response:
    """What a peer may copy: every file of a staged copy with its size and sha256."""
    name = _copy_name(request)
    entries = await request.app[STORE].run_blocking(request.app[STORE].manifest, name)
    return web.json_response({"name": name, "files": [e.to_json() for e in entries]})


async def get_file(request: web.Request) -> web.StreamResponse:
    """One file of a staged copy, with HTTP Range; only files its manifest lists."""
    name = _copy_name(request)
    store = request.app[STORE]
    path = await store.run_blocking(store.copy_file, name, request.match_info["path"])
    if path is None:
        raise NotFound("no such file in this copy", param="path")
    return web.FileResponse(path, chunk_size=1024 * 1024)
