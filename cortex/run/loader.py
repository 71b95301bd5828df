"""Loads, unloads and stages on neurons: the I/O of the jobs `cortex.run.lifecycle` owns.

The loader keeps no state of a model's life (only each model's shape, read
once) and writes none: the lifecycle decides that a load starts (one per model,
memory reserved, failures remembered) and runs `load()` as the job's task, so a
client that gives up never cancels a load half-way. Each step is reported back
as it happens (phase, accepted, a node's record of the model, a copy gone),
not at the next poll; the lifecycle applies it. A group load posts to every
member at once; when one fails, the others' posts are cancelled and every
member is unloaded again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import attrs
from aiohttp import web

from cortex.config import CortexConfig
from cortex.core.life import Accepted, LifeEvent, PhaseChanged
from cortex.core.placement import Candidate
from cortex.core.state import Fleet, NodeModel, NodeState
from cortex.metrics import Metrics
from cortex.run.poller import Poller
from shared.catalogue import ModelFacts, ModelSpec
from shared.errors import ApiError, ColdLoadFailed, RingPortTaken, UpstreamUnavailable
from shared.wire import Backend, Discovery, GroupSpec, LoadRequest, ModelStatus, Sharding

log = logging.getLogger(__name__)


@attrs.frozen
class Recorded:
    """What a node answered about the model, for the fleet's record of it."""

    model_id: str
    node: str
    record: NodeModel


@attrs.frozen
class Gone:
    """The model was unloaded from `node` (an eviction, a failed group's undo)."""

    model_id: str
    node: str


Report = Callable[[LifeEvent | Recorded | Gone], None]
# A group's next block of ring ports after a member found one taken; None: give up.
NextBlock = Callable[[RingPortTaken], int | None]


@attrs.define
class Loader:
    fleet: Fleet
    session: aiohttp.ClientSession
    config: CortexConfig
    metrics: Metrics
    poller: Poller
    # model id -> the entry its facts were read for, and the facts.
    _facts: dict[str, tuple[ModelSpec, ModelFacts]] = attrs.field(factory=dict)

    def facts(self, spec: ModelSpec) -> ModelFacts:
        """A model's shape, read from its files once per catalogue entry (a reload that
        changes the entry, its memory_gb or draft say, reads them anew)."""
        cached = self._facts.get(spec.id)
        if cached is not None and cached[0] == spec:
            return cached[1]
        f = spec.facts()
        # An absent local directory reads as zero bytes; do not cache that guess.
        if f.weights_bytes:
            self._facts[spec.id] = (spec, f)
        return f

    async def load(
        self,
        spec: ModelSpec,
        cand: Candidate,
        ring_port: int | None,
        report: Report,
        *,
        next_block: NextBlock | None = None,
    ) -> None:
        """The load job's body (run by the lifecycle once room is made): post to every
        member, wait.

        `ring_port`: the first of a group's block of ports; `report`: where each step
        goes as it happens; `next_block`: another block, when a member found a port of
        this one taken (the other ranks undone first), or None to fail the load."""
        started = time.monotonic()
        label = self.metrics.model(spec.id)
        try:
            while True:
                try:
                    await self._load(spec, cand, ring_port, report)
                    break
                except RingPortTaken as exc:
                    ring_port = next_block(exc) if next_block is not None else None
                    if ring_port is None:
                        raise
        except asyncio.CancelledError:
            raise
        except Exception:
            self.metrics.cold_loads.labels(label, "failed").inc()
            raise
        self.metrics.cold_loads.labels(label, "ok").inc()
        self.metrics.cold_load_duration.labels(label).observe(time.monotonic() - started)
        log.info("%s ready on %s", spec.id, ", ".join(cand.nodes))

    async def _load(
        self, spec: ModelSpec, cand: Candidate, ring_port: int | None, report: Report
    ) -> None:
        report(PhaseChanged(spec.id, "posting"))
        requests = self._requests(spec, cand, ring_port)
        if len(requests) == 1:
            node, req = requests[0]
            statuses = [await self._post_load(node, req, report)]
        else:
            try:
                statuses = await self._post_group(requests, report)
                report(Accepted(spec.id))
                if not all(s.state == "ready" for s in statuses):
                    await self._wait_ready(spec, cand.nodes, report)
                return
            except BaseException as exc:
                await self._undo_group(spec.id, cand.nodes, report, exc)
                raise
        report(Accepted(spec.id))
        if all(s.state == "ready" for s in statuses):
            return
        await self._wait_ready(spec, cand.nodes, report)

    async def _post_group(
        self, requests: list[tuple[str, LoadRequest]], report: Report
    ) -> list[ModelStatus]:
        """Post to every member at once; the first failure cancels the others' posts.

        A taken ring port is raised once every post has ended instead: the undo that
        follows must find the ranks the others start, not miss a load still in flight."""

        async def post(node: str, req: LoadRequest) -> ModelStatus | RingPortTaken:
            try:
                return await self._post_load(node, req, report)
            except RingPortTaken as exc:
                exc.details = {**(exc.details or {}), "node": node}
                return exc

        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(post(n, r)) for n, r in requests]
        except BaseExceptionGroup as group:
            first = group.exceptions[0]
            raise first from None
        results = [t.result() for t in tasks]
        for r in results:
            if isinstance(r, RingPortTaken):
                raise r
        return [r for r in results if isinstance(r, ModelStatus)]

    async def _undo_group(
        self, model_id: str, nodes: Sequence[str], report: Report, why: BaseException
    ) -> None:
        """A group load that failed: no rank may stay loaded on any member."""
        what = "met a taken ring port" if isinstance(why, RingPortTaken) else "failed"
        log.info("group load of %s %s: unloading it from %s", model_id, what, ", ".join(nodes))

        async def one(node: str) -> None:
            with contextlib.suppress(ApiError):
                await self.unload(node, model_id)
            report(Gone(model_id, node))

        # Shielded: even a cancelled load (cortex stopping) takes its ranks down.
        await asyncio.shield(asyncio.gather(*(one(n) for n in nodes)))

    async def evict(self, node: str, model_id: str) -> None:
        """Unload an idle model to make room (the lifecycle runs it as that model's job)."""
        log.info("evicting idle %s from %s to make room", model_id, node)
        await self.unload(node, model_id)
        self.metrics.evictions.labels(self.metrics.model(model_id)).inc()

    async def unload(self, node: str, model_id: str) -> None:
        """POST /models/unload on `node` (a short timeout: one hung node must not stall
        a teardown or the reconciler); the caller records it."""
        url = self.fleet.node(node).url.rstrip("/") + "/models/unload"
        await self._post(node, url, {"model_id": model_id}, total_s=self.config.unload_timeout_s)

    def _requests(
        self, spec: ModelSpec, cand: Candidate, ring_port: int | None
    ) -> list[tuple[str, LoadRequest]]:
        # The catalogue's context is the serving limit: placement sized the KV for it.
        limit = spec.context_limit
        if len(cand.nodes) == 1:
            req = LoadRequest(
                model_id=spec.id,
                source=spec.source,
                context_limit=limit,
                peers=self._peers(spec, cand.nodes[0]),
                kind=spec.kind,
                # Checked when the catalogue was read; placement kept such a model on one node.
                options=spec.runner_options(),
            )
            return [(cand.nodes[0], req)]
        assert ring_port is not None  # the lifecycle takes a block for every group
        discs = [self.fleet.node(n).discovery for n in cand.nodes]
        groups = group_specs(spec, cand, [d for d in discs if d is not None], base_port=ring_port)
        return [
            (
                n,
                LoadRequest(
                    model_id=spec.id,
                    source=spec.source,
                    group=g,
                    context_limit=limit,
                    peers=self._peers(spec, n),
                    # A group takes no draft or adapters (the catalogue refuses them).
                    options=spec.runner_options(),
                ),
            )
            for n, g in zip(cand.nodes, groups, strict=True)
        ]

    def _peers(self, spec: ModelSpec, node: str) -> tuple[str, ...]:
        """Healthy nodes holding a staged copy, when `node` does not: it stages from them."""
        if spec.is_local:  # used in place on every node: nothing to copy
            return ()
        snap = self.fleet.snapshot()

        def holds(n: NodeState) -> bool:
            return spec.source in n.staged or spec.id in n.staged

        target = snap.node(node)
        if target is None or holds(target):
            return ()
        return tuple(n.url.rstrip("/") for n in snap.healthy if n.name != node and holds(n))

    async def stage(self, node: str, spec: ModelSpec) -> None:
        """POST /store/stage on `node` (a prefetch): the neuron runs it as its own job."""
        url = self.fleet.node(node).url.rstrip("/") + "/store/stage"
        body: dict[str, Any] = {"model_id": spec.id, "source": spec.source}
        peers = self._peers(spec, node)
        if peers:
            body["peers"] = list(peers)
        await self._post(node, url, body)

    async def _post_load(self, node: str, req: LoadRequest, report: Report) -> ModelStatus:
        url = self.fleet.node(node).url.rstrip("/") + "/models/load"
        body = await self._post(node, url, req.to_json())
        try:
            status = ModelStatus.from_json(body)
        except (KeyError, TypeError, ValueError) as exc:
            raise ColdLoadFailed(f"node {node} answered the load unreadably: {exc}") from exc
        # Recorded now so routing says model_loading (the memory was reserved at start).
        report(Recorded(req.model_id, node, NodeModel.merge(status, None)))
        return status

    async def _post(
        self, node: str, url: str, payload: dict[str, Any], *, total_s: float = 60.0
    ) -> Any:
        connect = self.config.connect_timeout_s
        timeout = aiohttp.ClientTimeout(total=max(total_s, connect), sock_connect=connect)
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

    async def _wait_ready(self, spec: ModelSpec, nodes: Sequence[str], report: Report) -> None:
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
                report(Recorded(spec.id, node, rec))
                if status.state == "ready":
                    pending.discard(node)


def group_specs(
    spec: ModelSpec, cand: Candidate, discs: Sequence[Discovery], *, base_port: int
) -> list[GroupSpec]:
    """One GroupSpec per member, in rank order (candidate order); rank i on base_port + i."""
    group_id = f"{spec.id}-{secrets.token_hex(4)}"
    port = base_port
    backend: Backend = "jaccl" if cand.backend == "jaccl" else "ring"
    sharding: Sharding = "pipeline" if cand.sharding == "pipeline" else "tensor"
    hosts = tuple(f"{d.ring_host}:{port + i}" for i, d in enumerate(discs))
    ibv = ibv_rows(discs) if backend == "jaccl" else ()
    out = []
    for rank in range(len(discs)):
        out.append(
            GroupSpec(
                group_id=group_id,
                rank=rank,
                world_size=len(discs),
                backend=backend,
                sharding=sharding,
                hosts=hosts if backend == "ring" else (),
                coordinator=hosts[0] if backend == "jaccl" else None,
                ibv_devices=ibv,
                layer_split=(cand.layer_split or ()) if sharding == "pipeline" else (),
            )
        )
    return out


def ibv_rows(discs: Sequence[Discovery]) -> tuple[tuple[str | None, ...], ...]:
    """The jaccl device matrix: row i, column j names rank i's device reaching rank j.

    Discovery does not say which port reaches which peer: the k-th active
    port of each member is taken to reach its k-th peer.
    """
    n = len(discs)
    rows = []
    for i, d in enumerate(discs):
        active = iter(p.device for p in d.rdma_ports if p.active)
        rows.append(tuple(None if j == i else next(active, None) for j in range(n)))
    return tuple(rows)


# Where the app keeps the loader.
LOADER = web.AppKey("loader", Loader)
