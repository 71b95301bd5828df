"""Routing: a pure function from one fleet snapshot and one request to a decision.

`route` answers a `Route` (a ready replica), a `ColdLoad` (catalogued, placeable,
loaded nowhere: the caller loads it), a `Loading` (a replica or a job is loading
it: the caller waits, then asks again), or raises the typed error of DESIGN's
error table for what waiting cannot fix. Nothing here does I/O, so every row is unit-testable.

Replica choice: the least loaded ready replica, where load is in_flight +
queue_depth from the last poll, or cortex's own count of requests in flight
there if higher (fresher between polls). Prefix affinity: a request whose
conversation prefix was seen before goes back to the replica that served it
(its prompt cache holds the prefix) unless that replica's load exceeds the
least-loaded one's by more than `margin`. `policy` (config `routing`) may turn
affinity off ("least_loaded") or pick replicas in turn ignoring load
("round_robin", a baseline for benches).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal, NoReturn

import attrs

from cortex.core.placement import (
    Candidate,
    NodeInfo,
    PlacementPending,
    best,
    candidates,
    explain,
)
from cortex.core.state import LOADING_STATES, FleetSnapshot, LoadFailure, NodeModel, NodeState
from shared.catalogue import Catalogue, ModelFacts, ModelSpec
from shared.errors import (
    ColdLoadFailed,
    FeasibleNodeUnhealthy,
    InvalidRequest,
    ModelLoading,
    ModelNotFound,
    NoFeasibleNode,
    NoHealthyNodes,
    QueueFull,
    ServiceUnavailable,
    UpstreamUnavailable,
)
from shared.model_id import UNSHOWN
from shared.model_id import is_valid as is_model_id

FactsOf = Callable[[ModelSpec], ModelFacts]
Policy = Literal["affinity", "least_loaded", "round_robin"]

# Prompt-cache affinity for /v1/completions: prefixes at these character steps.
PROMPT_BLOCK_CHARS = 256
MAX_PREFIX_KEYS = 32


@attrs.frozen
class Route:
    """Send the request to `node`, which holds `model_id` ready."""

    model_id: str
    node: str
    url: str
    reason: Literal["affinity", "least_loaded", "round_robin", "pinned"]
    load: int


@attrs.frozen
class ColdLoad:
    """Load `spec` first (on `candidate`, making room if needed), then route again."""

    spec: ModelSpec
    candidate: Candidate


@attrs.frozen
class Loading:
    """A replica of `model_id` (or cortex's own job) is loading: wait, then route again.

    Returned, not raised: waiting is the caller's decision (the lifecycle waits up
    to load_wait_s); `error()` is the 503 model_loading for a caller that cannot wait.
    """

    model_id: str
    why: str

    def error(self) -> ModelLoading:
        return ModelLoading(self.why)


Decision = Route | ColdLoad | Loading


def route(
    snap: FleetSnapshot,
    catalogue: Catalogue,
    model: str,
    *,
    facts: FactsOf = ModelSpec.facts,
    prefix: Sequence[str] = (),
    affinity: Mapping[str, str] | None = None,
    exclude: Collection[str] = (),
    full: Collection[str] = (),
    margin: int = 4,
    rotation: int = 0,
    node: str | None = None,
    policy: Policy = "affinity",
) -> Decision:
    """Where a request for `model` goes now, or the typed reason it cannot.

    `prefix` are the request's affinity keys, longest prefix first; `affinity`
    maps a key to the node that last served it. `exclude` are nodes that failed
    this request before its first byte, `full` those that answered queue_full.
    `rotation` spreads ties: equally loaded replicas take turns as it changes
    (the proxy passes a counter), and a fixed value keeps tests deterministic.
    `node` pins the request to that node's replica (an operator's X-Cortex-Node):
    no other replica, no cold load.
    """
    spec = catalogue.resolve(model)
    model_id = spec.id if spec is not None else model
    if spec is None and model in snap.retired:
        raise ModelNotFound(f"model {model!r} was removed from the catalogue")
    locs = snap.locations(model_id)
    if spec is None and not locs:
        _unknown(snap, model)
    if node is not None:
        return _pinned(snap, model_id, node, locs, exclude, full)

    # A node this request already tried may have just been marked down (passive
    # health); it still counts as a replica that failed, not as no replica at all.
    serving = [
        (n, m)
        for n, m in locs
        if (n.healthy or n.name in exclude) and (m.group is None or m.group.rank == 0)
    ]
    ready = [(n, m) for n, m in serving if m.state == "ready"]
    if ready:
        if policy != "affinity":
            prefix = ()
        return _pick(
            snap, model_id, ready, prefix, affinity or {}, exclude, full, margin, rotation, policy
        )
    loading = _not_ready(snap, model_id, serving)
    if loading is not None:
        return loading
    if spec is None:
        raise FeasibleNodeUnhealthy(
            f"model {model_id!r} is loaded only on unhealthy node(s):"
            f" {', '.join(n.name for n, _ in locs)}"
        )
    # A node not heard from yet may hold a copy: no second one loaded beside it.
    _wait_for_unheard(snap, model_id)
    return _cold_load(snap, catalogue, spec, facts(spec))


def _unknown(snap: FleetSnapshot, model: str) -> NoReturn:
    """A model neither catalogued nor loaded: 404, unless a node we cannot see may have it."""
    if not is_model_id(model):  # no node can hold it (loads check the charset), nor echo it
        raise ModelNotFound(f"model {UNSHOWN} is not in the catalogue and loaded nowhere")
    if not snap.healthy and any(not n.seen for n in snap.nodes):
        # We cannot know what an unseen node has loaded: transient, never 404.
        raise NoHealthyNodes(f"no healthy node to serve model {model!r} (none answered yet)")
    _wait_for_unheard(snap, model)
    raise ModelNotFound(f"model {model!r} is not in the catalogue and loaded nowhere")


def _not_ready(
    snap: FleetSnapshot, model_id: str, serving: Sequence[tuple[NodeState, NodeModel]]
) -> Loading | None:
    """No replica is ready: Loading if one is loading, raises if its load failed, else None."""
    if model_id in snap.loading or any(m.state in LOADING_STATES for _, m in serving):
        return Loading(model_id, f"model {model_id!r} is loading; retry shortly")
    failure = snap.failure(model_id)
    if failure is not None:
        raise load_failed(model_id, failure, snap.taken_at)
    failed = [m for _, m in serving if m.state == "failed"]
    if failed:
        reason = failed[0].error or "its runner failed"
        raise ColdLoadFailed(f"model {model_id!r} failed on its node: {reason}")
    return None


def _pinned(
    snap: FleetSnapshot,
    model_id: str,
    node: str,
    locs: Sequence[tuple[NodeState, NodeModel]],
    exclude: Collection[str],
    full: Collection[str],
) -> Route | Loading:
    """The replica on `node`, or why it cannot take the request now."""
    if snap.node(node) is None:
        raise InvalidRequest(
            f"X-Cortex-Node: no node {node!r} in this fleet", param="X-Cortex-Node"
        )
    here = [(n, m) for n, m in locs if n.name == node and m.serves_http]
    if not here:
        raise ServiceUnavailable(f"model {model_id!r} is not loaded on node {node}")
    n, m = here[0]
    if not n.healthy and node not in exclude:
        raise ServiceUnavailable(f"node {node} is not healthy ({n.last_error or 'not heard from'})")
    if m.state in LOADING_STATES:
        return Loading(model_id, f"model {model_id!r} is {m.state} on node {node}; retry shortly")
    if m.state != "ready":
        raise ServiceUnavailable(f"model {model_id!r} is {m.state} on node {node}")
    if node in full:
        raise QueueFull(f"the replica of model {model_id!r} on {node} has a full queue")
    if node in exclude:
        raise UpstreamUnavailable(f"node {node} failed before answering")
    return Route(model_id, node, n.url, "pinned", max(m.load, snap.outstanding_on(node, model_id)))


def load_failed(model_id: str, failure: LoadFailure, now: float) -> ColdLoadFailed:
    """503 cold_load_failed while a failed load backs off: the reason, said once, and
    Retry-After = the time left (capped at 60 by the error)."""
    left = max(1, math.ceil(failure.until - now))
    hint = " (needs an operator: fix the source or the catalogue)" if failure.needs_operator else ""
    return ColdLoadFailed(
        f"loading model {model_id!r} failed: {failure.message}{hint}; next try in {left} s",
        retry_after=left,
        details=failure.details,
    )


def _wait_for_unheard(snap: FleetSnapshot, model: str) -> None:
    """503 while a node not heard from yet may serve `model`: we cannot know, so never 404."""
    unheard = snap.unheard
    if not unheard:
        return
    names = ", ".join(n.name for n in unheard)
    if not snap.healthy:
        raise NoHealthyNodes(
            f"no healthy node to serve model {model!r} ({names} not heard from yet)"
        )
    raise FeasibleNodeUnhealthy(
        f"model {model!r} may be on {names}, not heard from yet; retry shortly"
    )


def _pick(
    snap: FleetSnapshot,
    model_id: str,
    ready: list[tuple[NodeState, NodeModel]],
    prefix: Sequence[str],
    affinity: Mapping[str, str],
    exclude: Collection[str],
    full: Collection[str],
    margin: int,
    rotation: int,
    policy: Policy = "affinity",
) -> Route:
    usable = (
        [(n, m) for n, m in ready if n.name not in exclude and n.name not in full]
        if exclude or full
        else ready
    )
    if not usable:
        names = ", ".join(n.name for n, _ in ready)
        if any(n.name in full for n, _ in ready):
            raise QueueFull(f"every replica of model {model_id!r} has a full queue ({names})")
        raise UpstreamUnavailable(
            f"every replica of model {model_id!r} failed before answering ({names})"
        )
    out = snap.outstanding.get  # hot: one dict lookup per replica, no method calls
    loads = {
        n.name: max(m.in_flight + m.queue_depth, out((n.name, model_id), 0)) for n, m in usable
    }
    if policy == "round_robin":
        turn = sorted((n for n, _ in usable), key=lambda n: n.name)[rotation % len(usable)]
        return Route(model_id, turn.name, turn.url, "round_robin", loads[turn.name])
    least = min(loads.values())
    for key in prefix:
        node = affinity.get(key)
        if node is None:
            continue
        if node in loads and loads[node] <= least + margin:
            url = next(n.url for n, _ in usable if n.name == node)
            return Route(model_id, node, url, "affinity", loads[node])
        # The longest remembered prefix decides; its replica is gone or too busy.
        break

    # Ties go to the node with less work overall (any model, polled or cortex's own
    # count), then take turns: breaking them by name sent every idle-fleet request
    # to one node.
    # (Overall work summed only for the least loaded: the rest cannot win.)
    least_nodes = [n for n, _ in usable if loads[n.name] == least]
    work = {n.name: max(n.load, snap.node_outstanding(n.name)) for n in least_nodes}
    top = min(work.values())
    tied = sorted((n for n in least_nodes if work[n.name] == top), key=lambda n: n.name)
    n = tied[rotation % len(tied)]
    return Route(model_id, n.name, n.url, "least_loaded", loads[n.name])


def _cold_load(
    snap: FleetSnapshot, catalogue: Catalogue, spec: ModelSpec, facts: ModelFacts
) -> ColdLoad:
    infos = node_infos(snap, catalogue, loading=spec.id)
    try:
        ever = best(spec, facts, infos, now=False)
    except PlacementPending as exc:
        # Nothing known fits, but an unseen node might: transient, never a 404.
        if not snap.healthy:
            raise NoHealthyNodes("no healthy node in the fleet") from exc
        raise FeasibleNodeUnhealthy(
            f"no reported node can hold model {spec.id!r}; waiting for"
            f" {', '.join(exc.nodes)} to report"
        ) from exc
    if ever is None:
        raise NoFeasibleNode(explain(spec, candidates(spec, facts, infos, now=False)))
    if not snap.healthy:
        raise NoHealthyNodes(f"no healthy node in the fleet to load model {spec.id!r}")
    try:
        cand = best(spec, facts, infos, now=True)
    except PlacementPending as exc:
        # A healthy node without discovery yet: place among the others if we can,
        # else 503 placement_info_pending (it will report within a poll cycle).
        cand = best(spec, facts, infos, exclude=exc.nodes, now=True)
        if cand is None:
            raise
    if cand is not None:
        return ColdLoad(spec, cand)
    healthy = {n.name for n in snap.healthy}
    sets = [c for c in candidates(spec, facts, infos, now=False) if c.feasible]
    if not any(set(c.nodes) <= healthy for c in sets):
        down = sorted({n for c in sets for n in c.nodes} - healthy)
        raise FeasibleNodeUnhealthy(
            f"model {spec.id!r} fits only on node(s) that are unhealthy now: {', '.join(down)}"
        )
    now = candidates(spec, facts, infos, now=True)
    raise ColdLoadFailed(
        f"no room for model {spec.id!r} right now (models in use cannot be evicted): "
        + explain(spec, now),
        details={"candidates": [c.to_json() for c in now[:5]]},
    )


# -- what placement and the loader see of a node ---------------------------------


def pinned_here(catalogue: Catalogue, node: str, model_id: str) -> bool:
    spec = catalogue.get(model_id)
    return spec is not None and (spec.keep_loaded or node in spec.pinned_on)


def eviction_order(
    node: NodeState, catalogue: Catalogue, snap: FleetSnapshot, *, keep: str | None = None
) -> tuple[NodeModel, ...]:
    """Models cortex may unload from `node` to make room, least recently used first.

    Only idle ones (nothing in flight or queued, by the poll or by cortex's own
    count), never a pinned or keep_loaded one, never one mid-load or with a job of
    its own under way (one job per model), and never a member of a multi-node group
    (unloading one rank would kill the whole group).
    """
    out = [
        m
        for m in node.models
        if m.model_id != keep
        and m.state in ("ready", "failed")
        and m.load == 0
        and snap.outstanding_on(node.name, m.model_id) == 0
        and (m.group is None or m.group.world_size == 1)
        and m.model_id not in snap.busy
        and not pinned_here(catalogue, node.name, m.model_id)
    ]
    return tuple(sorted(out, key=lambda m: (m.last_used, m.model_id)))


def node_infos(
    snap: FleetSnapshot, catalogue: Catalogue, *, loading: str | None = None
) -> list[NodeInfo]:
    """Placement's view of every node, with what eviction could free on each."""
    out = []
    for n in snap.nodes:
        here = {m.model_id for m in n.models}
        staged = {s.id for s in catalogue.models if s.source in n.staged or s.id in here}
        out.append(
            NodeInfo(
                name=n.name,
                healthy=n.healthy,
                discovery=n.discovery,
                memory_available_bytes=n.memory_available_bytes,
                reclaimable_bytes=sum(
                    m.memory_bytes for m in eviction_order(n, catalogue, snap, keep=loading)
                ),
                staged=frozenset(staged),
                loaded=frozenset(m.model_id for m in n.models if m.state != "failed"),
            )
        )
    return out


def plan_evictions(
    cand: Candidate, snap: FleetSnapshot, catalogue: Catalogue, *, keep: str
) -> list[tuple[str, str]]:
    """(node, model) pairs to unload, LRU first, until each member has room."""
    plan: list[tuple[str, str]] = []
    for fit in cand.fits:
        node = snap.node(fit.node)
        if node is None:
            continue
        cap = int(fit.total_bytes * fit.cap_fraction)
        # This load's own reservation is the room being made, not a competitor.
        free = node.memory_available_bytes + snap.reservations.get((node.name, keep), 0)
        freed = 0
        for m in eviction_order(node, catalogue, snap, keep=keep):
            if fit.need_bytes < min(free + freed, cap):
                break
            plan.append((node.name, m.model_id))
            freed += m.memory_bytes
    return plan


# -- affinity keys -----------------------------------------------------------------


def prefix_keys(body: Mapping[str, Any]) -> tuple[str, ...]:
    """Affinity keys of a request body, longest prefix first.

    Chat: one key per message boundary from the first non-system message on, so
    turn two of a conversation ([sys, u1, a1, u2]) finds turn one ([sys, u1]).
    Completions: one key per block of the prompt.
    """
    model = str(body.get("model", ""))
    messages = body.get("messages")
    keys: list[str] = []
    if isinstance(messages, list) and messages:
        h = hashlib.sha256(model.encode(errors="surrogatepass"))
        start = next((i for i, m in enumerate(messages) if not _is_system(m)), len(messages) - 1)
        for i, msg in enumerate(messages):
            h.update(json.dumps(msg, sort_keys=True, separators=(",", ":")).encode())
            h.update(b"\x1e")
            if i >= start:
                keys.append(h.copy().hexdigest()[:32])
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            prompt = json.dumps(prompt, sort_keys=True) if prompt is not None else ""
        if prompt:
            keys = _prompt_keys(model, prompt)
    keys.reverse()
    return tuple(keys[:MAX_PREFIX_KEYS])


def _prompt_keys(model: str, prompt: str) -> list[str]:
    """sha256(model, 0x1e, prompt[:end]) at every block end and at the prompt's end.

    One running hash over the prompt, copied at the block ends whose keys are
    kept (only the last MAX_PREFIX_KEYS): linear in the prompt, where hashing
    every prefix from scratch was quadratic (minutes near the body limit).
    """
    ends = [*range(PROMPT_BLOCK_CHARS, len(prompt), PROMPT_BLOCK_CHARS), len(prompt)]
    kept = set(ends[-MAX_PREFIX_KEYS:])
    h = hashlib.sha256(f"{model}\x1e".encode(errors="surrogatepass"))
    keys = []
    start = 0
    for end in ends:
        # A lone surrogate cannot be UTF-8: hash it as itself, not fail the request.
        h.update(prompt[start:end].encode(errors="surrogatepass"))
        start = end
        if end in kept:
            keys.append(h.copy().hexdigest()[:32])
    return keys


def _is_system(message: Any) -> bool:
    return isinstance(message, dict) and message.get("role") in ("system", "developer")
