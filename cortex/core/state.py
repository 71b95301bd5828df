"""What cortex knows of its fleet: frozen snapshots, and the one place that changes them.

The poller and the lifecycle write through `Fleet` (what nodes say, and what
cortex itself changed on them), the proxy its own request counts; the router
only ever sees a `FleetSnapshot`, to which `cortex.run.lifecycle` adds its view
(loads under way, failures, memory reserved), so routing is a pure function of
one moment.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import attrs

from shared.kinds import ModelKind
from shared.progress import StageProgress
from shared.wire import (
    Discovery,
    GroupSpec,
    ModelHealth,
    ModelState,
    ModelStatus,
    NodeHealth,
    Phase,
)

SERVING_STATES: frozenset[str] = frozenset({"ready"})
# A draining node's last_error: why it is not routed to, though it answers.
DRAINING = "draining: no new requests; those in flight finish"
# What a client is told to retry shortly for (503 model_loading). A stalled runner
# (it missed its heartbeat) is ready again within seconds or killed and replaced.
LOADING_STATES: frozenset[str] = frozenset({"loading", "warming", "stalled", "recovering"})
# A load under way on a node. A recovering runner is not one: it crashed, and until
# it is back /health names the model as without a working replica.
LOAD_STATES: frozenset[str] = frozenset({"loading", "warming"})


@attrs.frozen
class NodeModel:
    """One model on one node: /models (what and where) merged with /health (how busy)."""

    model_id: str
    state: ModelState
    in_flight: int = 0
    queue_depth: int = 0
    last_used: float = 0.0
    memory_bytes: int = 0
    group: GroupSpec | None = None
    error: str | None = None
    decode_tps: float | None = None
    # A stage of the model's weights under way (or just failed) on this node.
    staging: StageProgress | None = None
    # From /health: what the runner is doing now, and its completion-token counter
    # (the dashboard's tok/s is the counter's rate between two polls).
    phase: Phase = "idle"
    completion_tokens: int = 0
    # Runner restarts the neuron made since this load, and when the last one was.
    restarts: int = 0
    restarted_at: float | None = None
    # "embedding": its runner is an encoder (POST /v1/embeddings only).
    kind: ModelKind = "chat"
    # The neuron's admission limits and median queue wait (None: not reported).
    max_in_flight: int | None = None
    queue_max: int | None = None
    queue_wait_p50_s: float | None = None

    @property
    def load(self) -> int:
        return self.in_flight + self.queue_depth

    @property
    def serves_http(self) -> bool:
        """Only rank 0 of a multi-rank group listens for requests."""
        return self.group is None or self.group.rank == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "state": self.state,
            "in_flight": self.in_flight,
            "queue_depth": self.queue_depth,
            "last_used": self.last_used,
            "memory_bytes": self.memory_bytes,
            "group": None if self.group is None else self.group.to_json(),
            "error": self.error,
            "decode_tps": self.decode_tps,
            "staging": None if self.staging is None else self.staging.to_json(),
            "phase": self.phase,
            "completion_tokens": self.completion_tokens,
            "restarts": self.restarts,
            "restarted_at": self.restarted_at,
            "kind": self.kind,
            "max_in_flight": self.max_in_flight,
            "queue_max": self.queue_max,
            "queue_wait_p50_s": self.queue_wait_p50_s,
        }

    @classmethod
    def merge(cls, status: ModelStatus | None, health: ModelHealth | None) -> NodeModel:
        """One record from whichever of the two views we have (at least one)."""
        if status is None and health is None:
            raise ValueError("merge needs a status or a health record")
        model_id = status.model_id if status is not None else health.model_id  # type: ignore[union-attr]
        state = health.state if health is not None else status.state  # type: ignore[union-attr]
        return cls(
            model_id=model_id,
            state=state,
            in_flight=health.in_flight if health is not None else 0,
            queue_depth=health.queue_depth if health is not None else 0,
            last_used=max(
                status.last_used if status is not None else 0.0,
                health.last_used if health is not None else 0.0,
            ),
            memory_bytes=status.memory_bytes if status is not None else 0,
            group=status.group if status is not None else None,
            error=status.error if status is not None else None,
            decode_tps=health.decode_tps if health is not None else None,
            staging=StageProgress.from_json(status.staging) if status is not None else None,
            phase=health.phase if health is not None else "idle",
            completion_tokens=health.completion_tokens if health is not None else 0,
            restarts=status.restarts if status is not None else 0,
            restarted_at=status.restarted_at if status is not None else None,
            kind=status.kind if status is not None else "chat",
            # /health's are the fresher (it is polled as often, and read for load).
            **_admission(health if health is not None else status),
        )


def _admission(view: ModelStatus | ModelHealth | None) -> dict[str, Any]:
    if view is None:
        return {}
    return {
        "max_in_flight": view.max_in_flight,
        "queue_max": view.queue_max,
        "queue_wait_p50_s": view.queue_wait_p50_s,
    }


def merge_models(
    statuses: Iterable[ModelStatus] | None, health: NodeHealth | None
) -> tuple[NodeModel, ...]:
    by_status = {s.model_id: s for s in statuses or ()}
    by_health = {h.model_id: h for h in (health.models if health is not None else ())}
    ids = sorted(set(by_status) | set(by_health))
    return tuple(NodeModel.merge(by_status.get(i), by_health.get(i)) for i in ids)


@attrs.frozen
class NodeState:
    name: str
    url: str
    # A node nobody has heard from yet is not routed to.
    healthy: bool = False
    failures: int = 0
    seen: bool = False
    discovery: Discovery | None = None
    health: NodeHealth | None = None
    models: tuple[NodeModel, ...] = ()
    staged: frozenset[str] = frozenset()
    last_ok: float | None = None
    last_error: str | None = None
    # Memory promised to loads, less memory freed by unloads the last /health may not
    # show yet: the lifecycle's (one home), added in its snapshot; 0 in the fleet's.
    reserved_bytes: int = 0
    # Monotonic time cortex last wrote `models` itself (a load or unload it made);
    # a poll that started before then must not overwrite the fresher record.
    models_at: float = 0.0
    # Monotonic: `models` is what nodes said as of then (the start of the poll they
    # came from, or later); an unload's memory credit ends once this passes it.
    polled_from: float = 0.0
    # An operator's restart under way (POST /admin/nodes/{name}/restart): not routed
    # to until the node answers as a new process, or this monotonic deadline passes.
    recycling_until: float | None = None
    # The node says it drains (SIGTERM, a restart): not routed to, but its streams
    # go on; over once it answers otherwise or is gone (its polls fail).
    draining: bool = False
    # It answers, but refuses cortex's fleet token (401/403) or cannot show it holds
    # it: not cortex's node. Never routed to nor loaded; `last_error` says why.
    stranger: bool = False

    @property
    def recycling(self) -> bool:
        return self.recycling_until is not None

    @property
    def leaving(self) -> bool:
        """Out of routing on purpose, not lost: the requests it holds may finish."""
        return self.draining or self.recycling

    def model(self, model_id: str) -> NodeModel | None:
        for m in self.models:
            if m.model_id == model_id:
                return m
        return None

    @property
    def memory_available_bytes(self) -> int:
        if self.health is not None:
            free = self.health.memory_available_bytes
        elif self.discovery is not None:
            free = self.discovery.memory_available_bytes
        else:
            free = 0
        return max(0, free - self.reserved_bytes)

    @property
    def load(self) -> int:
        return sum(m.load for m in self.models)

    @property
    def status(self) -> str | None:
        """What the node says of itself (/health's status), or `stranger`."""
        if self.stranger:
            return "stranger"
        return None if self.health is None else self.health.status

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "healthy": self.healthy,
            "failures": self.failures,
            "seen": self.seen,
            "status": self.status,
            "node_id": None if self.discovery is None else self.discovery.node_id,
            "discovery": None if self.discovery is None else self.discovery.to_json(),
            "memory_available_bytes": self.memory_available_bytes,
            "load": self.load,
            "models": [m.to_json() for m in self.models],
            "staged": sorted(self.staged),
            "last_ok": self.last_ok,
            "last_error": self.last_error,
            "recycling": self.recycling,
            "draining": self.draining,
            "stranger": self.stranger,
        }


@attrs.frozen
class LoadFailure:
    message: str
    # Monotonic deadline: until then a request for the model is told the load failed
    # instead of starting another one.
    until: float
    details: dict[str, Any] | None = None
    # Waiting will not help (a source missing, not a model): an operator must act.
    needs_operator: bool = False


@attrs.frozen
class FleetSnapshot:
    nodes: tuple[NodeState, ...]
    # Requests cortex has in flight right now, per (node, model): fresher than a poll
    # (Fleet.snapshot gives a live read-only view of its counts).
    outstanding: Mapping[tuple[str, str], int] = attrs.field(factory=dict)
    loading: frozenset[str] = frozenset()
    # Models with a job under way (load, unload, eviction): no other job touches them.
    busy: frozenset[str] = frozenset()
    # Models a reload removed from the catalogue: copies still loaded serve the
    # requests they have, and get no new one (404).
    retired: frozenset[str] = frozenset()
    load_failures: Mapping[str, LoadFailure] = attrs.field(factory=dict)
    # Memory promised to loads under way, per (node, model).
    reservations: Mapping[tuple[str, str], int] = attrs.field(factory=dict)
    taken_at: float = 0.0
    # Failed polls after which a never-seen node is given up on (Fleet.threshold).
    threshold: int = 3
    # model id -> its (node, model) pairs in node order, kept by Fleet as nodes change
    # so routing is not a scan of the fleet; None: `locations` scans `nodes`.
    by_model: Mapping[str, tuple[tuple[NodeState, NodeModel], ...]] | None = attrs.field(
        default=None, eq=False, repr=False
    )
    # `outstanding` summed per node (None: summed when asked).
    per_node: Mapping[str, int] | None = attrs.field(default=None, eq=False, repr=False)

    def node(self, name: str) -> NodeState | None:
        for n in self.nodes:
            if n.name == name:
                return n
        return None

    @property
    def healthy(self) -> tuple[NodeState, ...]:
        return tuple(n for n in self.nodes if n.healthy)

    @property
    def unheard(self) -> tuple[NodeState, ...]:
        """Nodes not heard from yet and not given up on: they may hold any model."""
        return tuple(n for n in self.nodes if not n.seen and n.failures < self.threshold)

    def outstanding_on(self, node: str, model_id: str) -> int:
        return self.outstanding.get((node, model_id), 0)

    def node_outstanding(self, node: str) -> int:
        if self.per_node is not None:
            return self.per_node.get(node, 0)
        return sum(v for (n, _), v in self.outstanding.items() if n == node)

    def locations(self, model_id: str) -> tuple[tuple[NodeState, NodeModel], ...]:
        if self.by_model is not None:
            return self.by_model.get(model_id, ())
        out = []
        for n in self.nodes:
            m = n.model(model_id)
            if m is not None:
                out.append((n, m))
        return tuple(out)

    def failure(self, model_id: str) -> LoadFailure | None:
        f = self.load_failures.get(model_id)
        return f if f is not None and f.until > self.taken_at else None


@attrs.define
class Fleet:
    """The live state behind the snapshots; every change goes through a method here."""

    threshold: int
    _nodes: dict[str, NodeState]
    _outstanding: Counter[tuple[str, str]] = attrs.field(factory=Counter)
    _per_node: Counter[str] = attrs.field(factory=Counter, init=False)
    # Snapshots' `by_model`, updated per node write; copied before a write once a
    # snapshot holds it (snapshots never change under a router).
    _by_model: dict[str, tuple[tuple[NodeState, NodeModel], ...]] = attrs.field(
        factory=dict, init=False
    )
    _shared: bool = attrs.field(default=False, init=False)
    _nodes_t: tuple[NodeState, ...] | None = attrs.field(default=None, init=False)
    _order: dict[str, int] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        self._order = {name: i for i, name in enumerate(self._nodes)}
        for node in list(self._nodes.values()):
            self._put(node.name, node)

    @classmethod
    def of(cls, nodes: Iterable[tuple[str, str]], *, threshold: int) -> Fleet:
        """A fleet of (name, url) nodes, none of them seen yet."""
        return cls(threshold=threshold, nodes={n: NodeState(name=n, url=u) for n, u in nodes})

    def snapshot(self, **view: Any) -> FleetSnapshot:
        """What nodes say; `Lifecycle.snapshot()` adds loads, failures and reservations
        (as `view`, the snapshot's other fields: one record built per routed request)."""
        if self._nodes_t is None:
            self._nodes_t = tuple(self._nodes.values())
        self._shared = True
        view.setdefault("taken_at", time.monotonic())
        return FleetSnapshot(
            nodes=self._nodes_t,
            # Live, read-only: copying every request in flight per routed request
            # cost more than the routing (a route never awaits, so it sees one moment).
            outstanding=MappingProxyType(self._outstanding),
            threshold=self.threshold,
            by_model=self._by_model,
            per_node=MappingProxyType(self._per_node),
            **view,
        )

    def _put(self, name: str, new: NodeState) -> None:
        """The one write of a node's record: the model index follows it."""
        old = self._nodes[name]
        self._nodes[name] = new
        self._nodes_t = None
        if self._shared:
            self._by_model = dict(self._by_model)
            self._shared = False
        index = self._by_model
        order = self._order
        for mid in {m.model_id for m in old.models} | {m.model_id for m in new.models}:
            pairs = [p for p in index.get(mid, ()) if p[0].name != name]
            m = new.model(mid)
            if m is not None:
                pairs.append((new, m))
                pairs.sort(key=lambda p: order[p[0].name])
            if pairs:
                index[mid] = tuple(pairs)
            else:
                index.pop(mid, None)

    def node(self, name: str) -> NodeState:
        return self._nodes[name]

    def add_node(self, name: str, url: str) -> NodeState:
        """A node joins the poll set (discovered), not seen yet; a known name is kept."""
        if name not in self._nodes:
            self._nodes[name] = NodeState(name=name, url=url)
            self._order[name] = max(self._order.values(), default=-1) + 1
            self._nodes_t = None
        return self._nodes[name]

    def remove_node(self, name: str) -> None:
        """A node leaves the poll set: its models leave routing with it."""
        if name not in self._nodes:
            return
        self._put(name, attrs.evolve(self._nodes[name], models=()))
        del self._nodes[name]
        del self._order[name]
        self._nodes_t = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._nodes)

    # -- health ---------------------------------------------------------------

    def poll_succeeded(
        self,
        name: str,
        health: NodeHealth,
        *,
        started: float,
        statuses: Iterable[ModelStatus] | None = None,
        discovery: Discovery | None = None,
        staged: frozenset[str] | None = None,
    ) -> NodeState:
        """One good /health read: healthy at once, failures forgotten."""
        old = self._nodes[name]
        restarted = old.health is not None and (
            old.health.node_id != health.node_id or old.health.started_at != health.started_at
        )
        if restarted:
            # A new process: nothing of the old model list, nor its loads, survives.
            models = merge_models(statuses, health)
            polled_from = max(started, old.models_at)
        elif started >= old.models_at:
            polled_from = started
            if statuses is not None:
                models = merge_models(statuses, health)
            else:
                # No fresh /models: keep what we knew, updated with the live figures.
                models = _refresh_load(old.models, health, states=True)
        else:
            # Cortex wrote fresher model states during this poll: take only the load.
            models = _refresh_load(old.models, health, states=False)
            polled_from = old.polled_from
        # A recycling node answering as its old self says `draining` (or is about to,
        # its restart just asked): not routed to until a new process answers.
        recycling = old.recycling_until
        if recycling is not None and (restarted or time.monotonic() >= recycling):
            recycling = None
        draining = health.status == "draining"
        new = attrs.evolve(
            old,
            healthy=recycling is None and not draining,
            recycling_until=recycling,
            draining=draining,
            failures=0,
            seen=True,
            health=health,
            # After a restart the old discovery may be wrong; none beats stale.
            discovery=discovery if discovery is not None or restarted else old.discovery,
            models=models,
            polled_from=polled_from,
            staged=staged if staged is not None else old.staged,
            last_ok=time.time(),
            last_error=DRAINING if draining else None,
            stranger=False,
        )
        self._put(name, new)
        return new

    def poll_unchanged(
        self,
        name: str,
        health: NodeHealth,
        *,
        started: float,
        read_at: float,
        statuses: Iterable[ModelStatus] | None,
        staged: frozenset[str] | None,
    ) -> NodeState:
        """A 304: the node says what it said in the poll started at `read_at`.

        When that answer is still what we hold (healthy, nothing cortex wrote
        since, so no unload's credit pending either), only last_ok moves.
        """
        old = self._nodes[name]
        if old.healthy and old.failures == 0 and old.health is health and old.models_at <= read_at:
            new = attrs.evolve(old, last_ok=time.time())
            self._put(name, new)
            return new
        return self.poll_succeeded(name, health, started=started, statuses=statuses, staged=staged)

    def poll_failed(self, name: str, reason: str) -> NodeState:
        """One failed poll; only `threshold` of them in a row take a node out."""
        old = self._nodes[name]
        failures = old.failures + 1
        healthy = old.healthy and failures < self.threshold
        # A draining node that stops answering is gone: its drain is over, or it died.
        draining = old.draining and failures < self.threshold
        new = attrs.evolve(
            old,
            failures=failures,
            healthy=healthy,
            draining=draining,
            stranger=old.stranger and failures < self.threshold,
            last_error=reason,
        )
        self._put(name, new)
        return new

    def poll_refused(self, name: str, reason: str) -> NodeState:
        """It answered, refusing the fleet token: a stranger, out of routing and
        placement at once, with nothing of what it held (no request would reach it)."""
        old = self._nodes[name]
        new = attrs.evolve(
            old,
            healthy=False,
            failures=0,
            seen=True,
            draining=False,
            stranger=True,
            models=(),
            last_error=reason,
        )
        self._put(name, new)
        return new

    def passive_failure(self, name: str, reason: str, *, fatal: bool) -> NodeState:
        """A proxied request failed: a refused connection takes the node out at once."""
        if not fatal:
            return self.poll_failed(name, reason)
        old = self._nodes[name]
        new = attrs.evolve(
            old,
            failures=max(old.failures + 1, self.threshold),
            healthy=False,
            draining=False,
            last_error=reason,
        )
        self._put(name, new)
        return new

    def begin_recycle(
        self, name: str, timeout_s: float, why: str = "restart requested"
    ) -> NodeState:
        """An operator restarts (or reboots) the node: out of routing at once, until it
        is back."""
        old = self._nodes[name]
        new = attrs.evolve(
            old,
            healthy=False,
            recycling_until=time.monotonic() + timeout_s,
            last_error=f"recycling ({why})",
        )
        self._put(name, new)
        return new

    def end_recycle(self, name: str) -> None:
        """The restart did not happen (the node refused it): the next poll judges."""
        self._put(name, attrs.evolve(self._nodes[name], recycling_until=None))

    # -- models cortex changed itself (recorded at once, not at the next poll) --

    def set_model(self, name: str, model: NodeModel) -> None:
        old = self._nodes[name]
        models = (*(m for m in old.models if m.model_id != model.model_id), model)
        self._put(
            name,
            attrs.evolve(
                old,
                models=tuple(sorted(models, key=lambda m: m.model_id)),
                models_at=time.monotonic(),
            ),
        )

    def drop_model(self, name: str, model_id: str) -> None:
        """An unload cortex made: gone from routing at once (the lifecycle counts its
        memory free until a poll shows it)."""
        old = self._nodes[name]
        self._put(
            name,
            attrs.evolve(
                old,
                models=tuple(m for m in old.models if m.model_id != model_id),
                models_at=time.monotonic(),
            ),
        )

    # -- requests in flight ------------------------------------------

    def begin_request(self, node: str, model_id: str) -> None:
        self._outstanding[(node, model_id)] += 1
        self._per_node[node] += 1

    def end_request(self, node: str, model_id: str) -> None:
        key = (node, model_id)
        self._outstanding[key] -= 1
        if self._outstanding[key] <= 0:
            del self._outstanding[key]
        self._per_node[node] -= 1
        if self._per_node[node] <= 0:
            del self._per_node[node]


def _refresh_load(
    models: tuple[NodeModel, ...], health: NodeHealth, *, states: bool
) -> tuple[NodeModel, ...]:
    live = {h.model_id: h for h in health.models}
    out = []
    for m in models:
        h = live.get(m.model_id)
        if h is None:
            out.append(m)
        else:
            out.append(
                attrs.evolve(
                    m,
                    state=h.state if states else m.state,
                    in_flight=h.in_flight,
                    queue_depth=h.queue_depth,
                    last_used=max(m.last_used, h.last_used),
                    decode_tps=h.decode_tps,
                    phase=h.phase,
                    completion_tokens=h.completion_tokens,
                )
            )
    if states:
        known = {m.model_id for m in models}
        out.extend(NodeModel.merge(None, h) for h in health.models if h.model_id not in known)
    return tuple(sorted(out, key=lambda m: m.model_id))


@attrs.define
class AffinityTable:
    """Prefix key -> node that last served it; bounded, least recently used dropped."""

    capacity: int = 8192
    _entries: OrderedDict[str, str] = attrs.field(factory=OrderedDict)

    def view(self) -> Mapping[str, str]:
        return self._entries

    def remember(self, keys: Iterable[str], node: str) -> None:
        for key in keys:
            self._entries[key] = node
            self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
