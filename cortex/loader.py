"""Cold loads: one load per model however many requests ask, room made by eviction.

The first request for an unloaded model claims the model in `Fleet` (a
synchronous check-and-set, so under asyncio it acts as the per-model lock) and
starts the load as a task of its own, so a client that gives up never cancels
a load half-way. That request waits up to `load_wait_s` for it; everyone else
is told 503 model_loading at once. Each step is written to `Fleet` as it
happens (evicted, accepted, ready), not at the next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Collection, Sequence
from typing import Any

import aiohttp
import attrs

from cortex.config import CortexConfig
from cortex.metrics import Metrics
from cortex.placement import (
    Candidate,
    PlacementPending,
    best,
    candidates,
    explain,
    pending_nodes,
)
from cortex.poller import Poller
from cortex.router import ColdLoad, eviction_order, node_infos, plan_evictions
from cortex.state import Fleet, LoadFailure, NodeModel
from shared.catalogue import Catalogue, ModelFacts, ModelSpec
from shared.errors import (
    ApiError,
    ColdLoadFailed,
    InvalidRequest,
    ModelLoading,
    PlacementRefused,
    UpstreamUnavailable,
)
from shared.wire import Backend, Discovery, GroupSpec, LoadRequest, ModelStatus, Sharding

log = logging.getLogger(__name__)


@attrs.define
class LoadJob:
    """One load under way: `accepted` resolves once every member answered 202."""

    spec: ModelSpec
    candidate: Candidate
    task: asyncio.Task[None]
    accepted: asyncio.Future[tuple[str, ...]]


@attrs.define
class Loader:
    fleet: Fleet
    catalogue: Catalogue
    session: aiohttp.ClientSession
    config: CortexConfig
    metrics: Metrics
    poller: Poller
    _jobs: dict[str, LoadJob] = attrs.field(factory=dict)
    _facts: dict[str, ModelFacts] = attrs.field(factory=dict)

    def facts(self, spec: ModelSpec) -> ModelFacts:
        """A model's shape, read from its files once (they do not change under us)."""
        f = self._facts.get(spec.id)
        if f is None:
            f = spec.facts()
            # An absent local directory reads as zero bytes; do not cache that guess.
            if f.weights_bytes:
                self._facts[spec.id] = f
        return f

    async def close(self) -> None:
        """Stop loads under way (cortex shutting down)."""
        jobs = list(self._jobs.values())
        for job in jobs:
            job.task.cancel()
        for job in jobs:
            with contextlib.suppress(BaseException):
                await job.task

    def job(self, model_id: str) -> LoadJob | None:
        return self._jobs.get(model_id)

    async def cold_load(self, plan: ColdLoad) -> None:
        """Load for a request: returns once ready, else 503 model_loading or cold_load_failed."""
        job = self.start(plan.spec, plan.candidate)
        try:
            await asyncio.wait_for(asyncio.shield(job.task), timeout=self.config.load_wait_s)
        except TimeoutError:
            raise ModelLoading(
                f"model {plan.spec.id!r} is loading on {', '.join(plan.candidate.nodes)};"
                " retry shortly"
            ) from None

    def start(self, spec: ModelSpec, cand: Candidate) -> LoadJob:
        """Begin loading `spec` on `cand`; ModelLoading if a load of it is under way."""
        if not self.fleet.begin_load(spec.id):
            raise ModelLoading(f"model {spec.id!r} is loading; retry shortly")
        # Spoken for now, before any await: a second cold load placed meanwhile
        # must see this memory as taken.
        for fit in cand.fits:
            self.fleet.reserve(fit.node, spec.id, fit.need_bytes)
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[tuple[str, ...]] = loop.create_future()
        task = loop.create_task(self._run(spec, cand, accepted), name=f"load {spec.id}")
        job = LoadJob(spec, cand, task, accepted)
        self._jobs[spec.id] = job
        task.add_done_callback(lambda t: self._done(spec.id, job))
        log.info("loading %s on %s", spec.id, ", ".join(cand.nodes))
        return job

    def _done(self, model_id: str, job: LoadJob) -> None:
        # Only this job: a newer load of the same model may have started already.
        if self._jobs.get(model_id) is job:
            del self._jobs[model_id]
        if not job.task.cancelled():
            job.task.exception()  # retrieved here: nobody else may await a load's outcome

    async def place(
        self,
        spec: ModelSpec,
        *,
        nodes: Sequence[str] | None = None,
        exclude: Collection[str] = (),
    ) -> LoadJob:
        """An explicit load (admin): the best set now, or a 400 with the arithmetic.

        `nodes` asks for exactly that node set (one placement: a node, or a
        group's members); `exclude` keeps nodes out of the choice.
        """
        known = set(self.fleet.names)
        unknown = sorted((set(nodes or ()) | set(exclude)) - known)
        if unknown:
            raise InvalidRequest(f"unknown node(s): {', '.join(unknown)}", param="nodes")
        deadline = time.monotonic() + self.config.discovery_wait_s
        while any(n.healthy and n.discovery is None for n in self.fleet.snapshot().nodes):
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)
        snap = self.fleet.snapshot()
        facts = self.facts(spec)
        infos = node_infos(snap, self.catalogue, loading=spec.id)
        if nodes:
            chosen = [i for i in infos if i.name in nodes]
            silent = pending_nodes(chosen, now=True)
            if silent:
                raise PlacementPending(silent)
            cands = [c for c in candidates(spec, facts, chosen) if set(c.nodes) == set(nodes)]
            if not cands or not cands[0].feasible:
                size = f"{spec.min_nodes}+" if spec.min_nodes > 1 else "1"
                raise PlacementRefused(
                    f"cannot place {spec.id} on exactly [{', '.join(nodes)}] "
                    f"(it places on {size} node(s)): "
                    + explain(spec, cands or candidates(spec, facts, chosen)),
                    details={"candidates": [c.to_json() for c in cands[:10]]},
                )
            cand: Candidate | None = cands[0]
        else:
            # PlacementPending: 503 with Retry-After.
            cand = best(spec, facts, infos, exclude=exclude, now=True)
        if cand is None:
            cands = candidates(spec, facts, [i for i in infos if i.name not in exclude])
            raise PlacementRefused(
                explain(spec, cands), details={"candidates": [c.to_json() for c in cands[:10]]}
            )
        job = self.start(spec, cand)
        waiting: list[asyncio.Future[Any]] = [job.accepted, job.task]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if job.task.done() and not job.task.cancelled():
            exc = job.task.exception()
            if exc is not None:
                raise exc
        return job

    async def _run(
        self, spec: ModelSpec, cand: Candidate, accepted: asyncio.Future[tuple[str, ...]]
    ) -> None:
        started = time.monotonic()
        failure: LoadFailure | None = None
        try:
            await self._load(spec, cand, accepted)
        except asyncio.CancelledError:
            failure = LoadFailure("cortex stopped during the load", until=0.0)
            raise
        except Exception as exc:
            err = _as_load_failure(spec, exc)
            failure = LoadFailure(
                err.message, until=time.monotonic() + (err.retry_after or 5), details=err.details
            )
            self.metrics.cold_loads.labels(self.metrics.model(spec.id), "failed").inc()
            log.warning("loading %s failed: %s", spec.id, err.message)
            if not accepted.done():
                accepted.set_exception(err)
                accepted.exception()
            raise err from exc
        else:
            self.metrics.cold_loads.labels(self.metrics.model(spec.id), "ok").inc()
            self.metrics.cold_load_duration.labels(self.metrics.model(spec.id)).observe(
                time.monotonic() - started
            )
            log.info("%s ready on %s", spec.id, ", ".join(cand.nodes))
        finally:
            if not accepted.done():
                accepted.cancel()
            if failure is not None:
                for node in cand.nodes:
                    self.fleet.release(node, spec.id)
            self.fleet.end_load(spec.id, failure)

    async def _load(
        self, spec: ModelSpec, cand: Candidate, accepted: asyncio.Future[tuple[str, ...]]
    ) -> None:
        snap = self.fleet.snapshot()
        for node, model_id in plan_evictions(cand, snap, self.catalogue, keep=spec.id):
            await self._evict(node, model_id)
        requests = self._requests(spec, cand)
        statuses = await asyncio.gather(*(self._post_load(node, req) for node, req in requests))
        accepted.set_result(cand.nodes)
        if all(s.state == "ready" for s in statuses):
            return
        await self._wait_ready(spec, cand.nodes)

    async def _evict(self, node: str, model_id: str) -> None:
        # Re-check at the last moment: a request may have arrived since the plan.
        snap = self.fleet.snapshot()
        state = snap.node(node)
        if state is None or model_id not in {
            m.model_id for m in eviction_order(state, self.catalogue, snap)
        }:
            raise ColdLoadFailed(f"could not make room on {node}: {model_id} is in use again")
        log.info("evicting idle %s from %s to make room", model_id, node)
        await self.unload(node, model_id)
        self.metrics.evictions.labels(self.metrics.model(model_id)).inc()

    async def unload(self, node: str, model_id: str) -> None:
        """POST /models/unload on `node`, recorded at once."""
        url = self.fleet.node(node).url.rstrip("/") + "/models/unload"
        await self._post(node, url, {"model_id": model_id})
        self.fleet.drop_model(node, model_id)

    def _requests(self, spec: ModelSpec, cand: Candidate) -> list[tuple[str, LoadRequest]]:
        # The catalogue's context is the serving limit: placement sized the KV for it.
        limit = spec.context_limit
        if len(cand.nodes) == 1:
            req = LoadRequest(model_id=spec.id, source=spec.source, context_limit=limit)
            return [(cand.nodes[0], req)]
        discs = [self.fleet.node(n).discovery for n in cand.nodes]
        groups = group_specs(
            spec,
            cand,
            [d for d in discs if d is not None],
            base_port=self.config.ring_base_port,
        )
        return [
            (n, LoadRequest(model_id=spec.id, source=spec.source, group=g, context_limit=limit))
            for n, g in zip(cand.nodes, groups, strict=True)
        ]

    async def _post_load(self, node: str, req: LoadRequest) -> ModelStatus:
        url = self.fleet.node(node).url.rstrip("/") + "/models/load"
        body = await self._post(node, url, req.to_json())
        try:
            status = ModelStatus.from_json(body)
        except (KeyError, TypeError, ValueError) as exc:
            raise ColdLoadFailed(f"node {node} answered the load unreadably: {exc}") from exc
        # Recorded now so routing says model_loading (the memory was reserved at start).
        self.fleet.set_model(node, NodeModel.merge(status, None))
        return status

    async def _post(self, node: str, url: str, payload: dict[str, Any]) -> Any:
        connect = self.config.connect_timeout_s
        timeout = aiohttp.ClientTimeout(total=max(60.0, connect), sock_connect=connect)
        try:
            async with self.session.post(url, json=payload, timeout=timeout) as resp:
                body = await resp.json(content_type=None)
                if resp.status >= 400:
                    raise ApiError.from_envelope(resp.status, body, resp.headers.get("Retry-After"))
                return body
        except aiohttp.ClientConnectorError as exc:
            self.poller.record_failure(node, f"connect: {exc}", fatal=True)
            raise UpstreamUnavailable(f"node {node} is unreachable: {exc}") from exc
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise UpstreamUnavailable(f"node {node} did not answer: {exc!r}") from exc

    async def _wait_ready(self, spec: ModelSpec, nodes: Sequence[str]) -> None:
        """Follow GET /models on every member until the model is ready or failed."""
        deadline = time.monotonic() + self.config.load_deadline_s
        pending = set(nodes)
        timeout = aiohttp.ClientTimeout(total=self.config.poll_timeout_s)
        while pending:
            if time.monotonic() > deadline:
                raise ColdLoadFailed(
                    f"model {spec.id!r} not ready after {self.config.load_deadline_s:g} s"
                )
            await asyncio.sleep(self.config.load_poll_interval_s)
            for node in sorted(pending):
                state = self.fleet.node(node)
                if not state.healthy and state.seen:
                    raise ColdLoadFailed(f"node {node} went down while loading {spec.id!r}")
                try:
                    async with self.session.get(
                        state.url.rstrip("/") + "/models", timeout=timeout
                    ) as resp:
                        body = await resp.json(content_type=None)
                    found = [
                        ModelStatus.from_json(m)
                        for m in body["models"]
                        if m.get("model_id") == spec.id
                    ]
                except (aiohttp.ClientError, TimeoutError, KeyError, TypeError, ValueError):
                    continue  # the poller judges the node's health; keep waiting
                if not found:
                    raise ColdLoadFailed(f"node {node} no longer has {spec.id!r} (restarted?)")
                status = found[0]
                if status.state == "failed":
                    raise ColdLoadFailed(
                        f"model {spec.id!r} failed on {node}: {status.error or 'no reason given'}"
                    )
                current = self.fleet.node(node).model(spec.id)
                rec = NodeModel.merge(status, None)
                if current is not None:
                    rec = attrs.evolve(
                        rec, in_flight=current.in_flight, queue_depth=current.queue_depth
                    )
                self.fleet.set_model(node, rec)
                if status.state == "ready":
                    pending.discard(node)


def _as_load_failure(spec: ModelSpec, exc: BaseException) -> ApiError:
    if isinstance(exc, ColdLoadFailed):
        return exc
    if isinstance(exc, ApiError):
        msg = f"loading model {spec.id!r} failed: {exc.message}"
        return ColdLoadFailed(msg, details=exc.details)
    return ColdLoadFailed(f"loading model {spec.id!r} failed: {exc!r}")


def group_specs(
    spec: ModelSpec, cand: Candidate, discs: Sequence[Discovery], *, base_port: int
) -> list[GroupSpec]:
    """One GroupSpec per member, in rank order (candidate order)."""
    n = len(cand.nodes)
    group_id = f"{spec.id}-{secrets.token_hex(4)}"
    # A fresh block of ports per group so a restarted group never meets its old sockets.
    port = base_port + secrets.randbelow(1000) * n
    backend: Backend = "jaccl" if cand.backend == "jaccl" else "ring"
    sharding: Sharding = "pipeline" if cand.sharding == "pipeline" else "tensor"
    hosts = tuple(f"{d.ring_host}:{port + i}" for i, d in enumerate(discs))
    ibv: tuple[tuple[str | None, ...], ...] = ()
    if backend == "jaccl":
        # Discovery does not say which port reaches which peer: the k-th active
        # port of each member is taken to reach its k-th peer.
        rows = []
        for i, d in enumerate(discs):
            active = iter(p.device for p in d.rdma_ports if p.active)
            rows.append(tuple(None if j == i else next(active, None) for j in range(n)))
        ibv = tuple(rows)
    out = []
    for rank in range(len(discs)):
        out.append(
            GroupSpec(
                group_id=group_id,
                rank=rank,
                world_size=n,
                backend=backend,
                sharding=sharding,
                hosts=hosts if backend == "ring" else (),
                coordinator=hosts[0] if backend == "jaccl" else None,
                ibv_devices=ibv,
                layer_split=(cand.layer_split or ()) if sharding == "pipeline" else (),
            )
        )
    return out
