"""A model's life as data: the records, the events that change them, and the plan.

Pure: no I/O and no clock read here (times come in with the events and the
arguments), so every transition and every decision is a table test.
`cortex.run.lifecycle` owns the records: it applies events in one place, journals
each, and runs the plan's effects through the loader.

A record per model (`ModelLife`) holds the operator's hold, the one job under
way, the last failed load with its backoff, the memory reserved for it (one
home: a load's promise, a finished load's until the node's figures show it, an
unload's credit until a poll sees the memory free), and the idle clocks.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Literal

import attrs

from cortex.core.placement import (
    Candidate,
    NodeInfo,
    PlacementPending,
    best,
    candidates,
    explain,
    pending_nodes,
)
from cortex.core.router import node_infos
from cortex.core.state import (
    LOAD_STATES,
    LOADING_STATES,
    SERVING_STATES,
    FleetSnapshot,
    NodeModel,
    NodeState,
)
from shared.catalogue import Catalogue, ModelFacts, ModelSpec
from shared.errors import PlacementRefused
from shared.retry import LOAD_RETRY_WAIT, backoff_s

JobKind = Literal["load", "unload", "teardown", "evict"]
OPERATOR_WAIT_FACTOR = 6
OPERATOR_WAIT_MAX_S = 600.0


# -- the records ---------------------------------------------------------------------


@attrs.frozen
class Hold:
    """An operator's word: do not load this model by wish until the next admin load."""

    reason: str
    since: float  # wall clock

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "since": self.since}

    @classmethod
    def from_json(cls, d: Any) -> Hold:
        if not isinstance(d, dict) or not isinstance(d.get("reason"), str):
            raise ValueError(f"not a hold: {d!r}")
        return cls(d["reason"], float(d["since"]))


@attrs.frozen
class Failure:
    """The last failed load of a model and when the next may start."""

    reason: str
    # True when waiting will not help (a source missing, not a model directory).
    needs_operator: bool
    count: int
    at: float  # wall clock
    until: float  # monotonic
    details: dict[str, Any] | None = None

    def left_s(self, now: float) -> float:
        return max(0.0, self.until - now)

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "needs_operator": self.needs_operator,
            "failures_in_a_row": self.count,
            "at": self.at,
            "next_try_in_s": round(self.left_s(now), 1),
        }


@attrs.frozen
class JobState:
    """The one job under way for a model, as data (its task lives with the owner)."""

    kind: JobKind
    nodes: tuple[str, ...]
    started: float  # wall clock
    phase: str = "starting"
    warning: str | None = None
    # Memory promised on each node until the job ends.
    reserved: Mapping[str, int] = attrs.field(factory=dict)
    ring_port: int | None = None
    why: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "nodes": list(self.nodes),
            "phase": self.phase,
            "started": self.started,
            "warning": self.warning,
        }


@attrs.frozen
class Settling:
    """A finished load's reservation, kept until the node's own figures include it."""

    nbytes: int
    polls_left: int
    until: float  # monotonic cap, for a node that stops answering


@attrs.frozen
class Credit:
    """Memory an unload cortex made freed, counted free until a poll started after `at`."""

    nbytes: int
    at: float  # monotonic: when cortex wrote the node's record


@attrs.frozen
class ModelLife:
    hold: Hold | None = None
    job: JobState | None = None
    failure: Failure | None = None
    settling: Mapping[str, Settling] = attrs.field(factory=dict)
    credits: Mapping[str, Credit] = attrs.field(factory=dict)
    # Per node: when cortex last saw the model answer there (wall), and its keep_alive.
    touched: Mapping[str, float] = attrs.field(factory=dict)
    keep: Mapping[str, float] = attrs.field(factory=dict)
    # Per node: when its files were last asked to be staged (monotonic).
    prefetched: Mapping[str, float] = attrs.field(factory=dict)
    # Removed from the catalogue by a reload: no new request, each copy unloaded
    # once idle. Cleared if a later reload brings it back.
    retired: bool = False

    def reserved(self, now: float) -> dict[str, int]:
        """Memory promised per node: the job's, and finished loads' not yet seen."""
        out = dict(self.job.reserved) if self.job is not None else {}
        for node, s in self.settling.items():
            if s.until > now:
                out[node] = out.get(node, 0) + s.nbytes
        return out

    def backing_off(self, now: float) -> Failure | None:
        f = self.failure
        return f if f is not None and f.until > now else None


EMPTY = ModelLife()


# -- the events ----------------------------------------------------------------------


@attrs.frozen
class Held:
    model_id: str
    reason: str
    since: float


@attrs.frozen
class Released:
    model_id: str


@attrs.frozen
class FailureForgotten:
    model_id: str


@attrs.frozen
class LoadStarted:
    model_id: str
    nodes: tuple[str, ...]
    started: float
    reserved: Mapping[str, int]
    why: str
    warning: str | None = None


@attrs.frozen
class PortsTaken:
    model_id: str
    first: int


@attrs.frozen
class Accepted:
    """Every member took the load: it warms now."""

    model_id: str


@attrs.frozen
class PhaseChanged:
    model_id: str
    phase: str


@attrs.frozen
class LoadSucceeded:
    model_id: str
    at: float  # wall
    settle_until: float  # monotonic cap of the reservations kept until polls show them


@attrs.frozen
class LoadFailed:
    model_id: str
    reason: str
    needs_operator: bool
    details: dict[str, Any] | None
    at: float  # wall
    now: float  # monotonic
    backoff_unit_s: float


@attrs.frozen
class LoadCancelled:
    model_id: str


@attrs.frozen
class UnloadStarted:
    model_id: str
    kind: JobKind
    nodes: tuple[str, ...]
    started: float
    why: str


@attrs.frozen
class UnloadFinished:
    model_id: str
    nodes: tuple[str, ...]
    failed: Mapping[str, str]


@attrs.frozen
class Polled:
    """A good poll of `node`; `polled_from`: the start of the poll its models came from."""

    model_id: str
    node: str
    polled_from: float
    # Healthy with a /health read: a finished load's reservation counts this poll.
    settle: bool = True


@attrs.frozen
class Answered:
    model_id: str
    node: str
    at: float  # wall
    keep_alive: float | None  # already capped by max_keep_alive_s


@attrs.frozen
class Dropped:
    """Cortex took the model off `node`'s record (an unload it made, a 404)."""

    model_id: str
    node: str
    nbytes: int
    at: float  # monotonic


@attrs.frozen
class Prefetched:
    model_id: str
    node: str
    at: float  # monotonic


@attrs.frozen
class Retired:
    """A reload removed the model from the catalogue."""

    model_id: str


@attrs.frozen
class Catalogued:
    """A reload added the model to the catalogue (or brought a retired one back)."""

    model_id: str
    back: bool = False


@attrs.frozen
class Noted:
    """A transition that changes no record, only the event log (evicted, recycling...)."""

    model_id: str | None
    kind: str
    detail: str
    node: str | None = None


LifeEvent = (
    Held
    | Released
    | FailureForgotten
    | LoadStarted
    | PortsTaken
    | Accepted
    | PhaseChanged
    | LoadSucceeded
    | LoadFailed
    | LoadCancelled
    | UnloadStarted
    | UnloadFinished
    | Polled
    | Answered
    | Dropped
    | Prefetched
    | Retired
    | Catalogued
    | Noted
)


# -- apply -----------------------------------------------------------------------------


def _without(m: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    drop = set(keys)
    return {k: v for k, v in m.items() if k not in drop}


def failure_wait_s(before: ModelLife, e: LoadFailed) -> float:
    """The backoff a failed load earns: doubling per failure in a row, longer when an
    operator must act (waiting will not fix it: ask the nodes far less often)."""
    count = (before.failure.count if before.failure is not None else 0) + 1
    wait = backoff_s(LOAD_RETRY_WAIT, count) * e.backoff_unit_s
    if e.needs_operator:
        wait = min(wait * OPERATOR_WAIT_FACTOR, OPERATOR_WAIT_MAX_S)
    return wait


def _held(e: Held, life: ModelLife) -> ModelLife:
    return attrs.evolve(life, hold=Hold(e.reason, e.since))


def _released(e: Released, life: ModelLife) -> ModelLife:
    return attrs.evolve(life, hold=None)


def _forgotten(e: FailureForgotten, life: ModelLife) -> ModelLife:
    return attrs.evolve(life, failure=None)


def _load_started(e: LoadStarted, life: ModelLife) -> ModelLife:
    job = JobState("load", e.nodes, e.started, warning=e.warning, reserved=dict(e.reserved))
    return attrs.evolve(
        life,
        job=job,
        # The job's reservation replaces a settling one of an earlier copy there.
        settling=_without(life.settling, e.reserved),
        # A new copy starts with the catalogue's TTL, not an old request's keep_alive.
        keep=_without(life.keep, e.nodes),
    )


def _ports_taken(e: PortsTaken, life: ModelLife) -> ModelLife:
    if life.job is None:
        return life
    return attrs.evolve(life, job=attrs.evolve(life.job, ring_port=e.first))


def _phase(e: PhaseChanged, life: ModelLife) -> ModelLife:
    if life.job is None:
        return life
    return attrs.evolve(life, job=attrs.evolve(life.job, phase=e.phase))


def _accepted(e: Accepted, life: ModelLife) -> ModelLife:
    return _phase(PhaseChanged(e.model_id, "warming"), life)


def _load_succeeded(e: LoadSucceeded, life: ModelLife) -> ModelLife:
    job = life.job
    if job is None:
        return life
    # The node's own memory figure takes over once a poll has seen the model.
    settling = dict(life.settling)
    for node, nbytes in job.reserved.items():
        settling[node] = Settling(nbytes, 2, e.settle_until)
    touched = {**life.touched, **dict.fromkeys(job.nodes, e.at)}
    return attrs.evolve(life, job=None, failure=None, settling=settling, touched=touched)


def _load_failed(e: LoadFailed, life: ModelLife) -> ModelLife:
    count = (life.failure.count if life.failure is not None else 0) + 1
    f = Failure(e.reason, e.needs_operator, count, e.at, e.now + failure_wait_s(life, e), e.details)
    return attrs.evolve(life, job=None, failure=f)


def _job_ended(e: LoadCancelled, life: ModelLife) -> ModelLife:
    return attrs.evolve(life, job=None)


def _unload_started(e: UnloadStarted, life: ModelLife) -> ModelLife:
    job = JobState(e.kind, e.nodes, e.started, phase="posting", why=e.why)
    return attrs.evolve(life, job=job)


def _unload_finished(e: UnloadFinished, life: ModelLife) -> ModelLife:
    return attrs.evolve(
        life,
        job=None,
        touched=_without(life.touched, e.nodes),
        keep=_without(life.keep, e.nodes),
    )


def _polled(e: Polled, life: ModelLife) -> ModelLife:
    """Settling ends two good polls later (the second surely started after the load
    ended); a credit ends at the first poll that started after the unload."""
    settling = dict(life.settling)
    s = settling.get(e.node)
    if s is not None and e.settle:
        if s.polls_left <= 1:
            del settling[e.node]
        else:
            settling[e.node] = attrs.evolve(s, polls_left=s.polls_left - 1)
    credits = life.credits
    c = credits.get(e.node)
    if c is not None and c.at <= e.polled_from:
        credits = _without(credits, (e.node,))
    return attrs.evolve(life, settling=settling, credits=credits)


def _answered(e: Answered, life: ModelLife) -> ModelLife:
    keep = life.keep if e.keep_alive is None else {**life.keep, e.node: e.keep_alive}
    return attrs.evolve(life, touched={**life.touched, e.node: e.at}, keep=keep)


def _dropped(e: Dropped, life: ModelLife) -> ModelLife:
    old = life.credits.get(e.node)
    nbytes = e.nbytes + (old.nbytes if old is not None else 0)
    if not nbytes:
        return life
    return attrs.evolve(life, credits={**life.credits, e.node: Credit(nbytes, e.at)})


def _prefetched(e: Prefetched, life: ModelLife) -> ModelLife:
    return attrs.evolve(life, prefetched={**life.prefetched, e.node: e.at})


def _retired(e: Retired, life: ModelLife) -> ModelLife:
    return attrs.evolve(life, retired=True)


def _catalogued(e: Catalogued, life: ModelLife) -> ModelLife:
    return attrs.evolve(life, retired=False) if life.retired else life


def _noted(e: Noted, life: ModelLife) -> ModelLife:
    return life


_APPLY: Mapping[type[Any], Callable[[Any, ModelLife], ModelLife]] = {
    Held: _held,
    Released: _released,
    FailureForgotten: _forgotten,
    LoadStarted: _load_started,
    PortsTaken: _ports_taken,
    Accepted: _accepted,
    PhaseChanged: _phase,
    LoadSucceeded: _load_succeeded,
    LoadFailed: _load_failed,
    LoadCancelled: _job_ended,
    UnloadStarted: _unload_started,
    UnloadFinished: _unload_finished,
    Polled: _polled,
    Answered: _answered,
    Dropped: _dropped,
    Prefetched: _prefetched,
    Retired: _retired,
    Catalogued: _catalogued,
    Noted: _noted,
}


def apply(event: LifeEvent, life: ModelLife) -> ModelLife:
    """The one way a model's life changes."""
    return _APPLY[type(event)](event, life)


def describe(event: LifeEvent, before: ModelLife) -> list[tuple[str, str, str | None]]:
    """The event log's lines for a transition: (kind, detail, node)."""
    match event:
        case Held() | Released() | FailureForgotten():
            return _operator_lines(event, before)
        case Retired() | Catalogued():
            return [_catalogue_line(event)]
        case LoadStarted(nodes=nodes, why=why):
            return [("load started", f"on {', '.join(nodes)} ({why})", ",".join(nodes))]
        case LoadSucceeded():
            nodes = before.job.nodes if before.job is not None else ()
            return [("ready", f"on {', '.join(nodes)}", ",".join(nodes))]
        case LoadFailed(reason=reason):
            wait = failure_wait_s(before, event)
            return [("load failed", f"{reason}; next try in {wait:.0f} s", None)]
        case LoadCancelled():
            return [("load cancelled", "cortex stopping", None)]
        case UnloadStarted(kind="evict"):
            return []  # said once it is done ("evicted")
        case UnloadStarted(nodes=nodes, why=why):
            return [("unload", f"from {', '.join(nodes)} ({why})", ",".join(nodes))]
        case UnloadFinished():
            return _unload_lines(event, before.job)
        case Noted(kind=kind, detail=detail, node=node):
            return [(kind, detail, node)]
    return []


def _operator_lines(
    e: Held | Released | FailureForgotten, before: ModelLife
) -> list[tuple[str, str, str | None]]:
    if isinstance(e, Held):
        return [("held", e.reason, None)]
    if isinstance(e, Released):
        return [] if before.hold is None else [("hold released", before.hold.reason, None)]
    f = before.failure
    return [] if f is None else [("failure cleared", f.reason, None)]


def _catalogue_line(e: Retired | Catalogued) -> tuple[str, str, str | None]:
    if isinstance(e, Retired):
        return ("retired", "removed from the catalogue by a reload: unloaded once idle", None)
    return ("catalogued", "back in the catalogue" if e.back else "new in the catalogue", None)


def _unload_lines(e: UnloadFinished, job: JobState | None) -> list[tuple[str, str, str | None]]:
    out: list[tuple[str, str, str | None]] = []
    done = [n for n in e.nodes if n not in e.failed]
    if done and job is not None and job.kind == "evict":
        out.append(("evicted", f"from {', '.join(done)}, {job.why}", ",".join(done)))
    elif done:
        out.append(("unloaded", f"from {', '.join(done)}", ",".join(done)))
    if e.failed:
        out.append(("unload failed", "; ".join(f"{n}: {r}" for n, r in e.failed.items()), None))
    return out


# -- what the fleet shows: the one answer to "is it loading", replicas ----------------


def loading(snap: FleetSnapshot, model_id: str) -> bool:
    """Is a load of the model under way: one cortex runs, or a serving rank a healthy
    node reports loading or warming (a recovering runner crashed: not a load)."""
    if model_id in snap.loading:
        return True
    return any(
        n.healthy and m.serves_http and m.state in LOAD_STATES for n, m in snap.locations(model_id)
    )


def wanted_replicas(spec: ModelSpec) -> int:
    """How many copies the catalogue asks to keep without any request."""
    return spec.replicas if (spec.keep_loaded or spec.pinned_on) else 0


def replicas(snap: FleetSnapshot, model_id: str, on: Collection[str] = ()) -> int:
    """Copies loaded or on their way, on healthy nodes (of `on`, if given); a group
    counts once, at rank 0.

    A recycling node's copies count: it comes back in moments, and a copy loaded
    elsewhere meanwhile (maybe evicting another model) would be one too many.
    """
    count = 0
    for node, m in snap.locations(model_id):
        if not (node.healthy or node.recycling) or m.state not in SERVING_STATES | LOADING_STATES:
            continue
        if on and node.name not in on:
            continue
        if m.group is None or m.group.world_size == 1 or m.group.rank == 0:
            count += 1
    return count


def wish(spec: ModelSpec, life: ModelLife) -> int:
    """Copies the wish keeps now: the catalogue's, or none while an operator holds it."""
    return wanted_replicas(spec) if life.hold is None else 0


# -- the plan --------------------------------------------------------------------------


@attrs.frozen
class BrokenGroup:
    group_id: str
    model_id: str
    members: tuple[str, ...]  # nodes still holding a rank
    reason: str


@attrs.frozen
class Teardown:
    group: BrokenGroup


@attrs.frozen
class EnsureLoad:
    """Load one more copy where it fits; `soft`: only into free memory, never evicting."""

    spec: ModelSpec
    want: int
    have: int
    soft: bool = False


@attrs.frozen
class Prefetch:
    spec: ModelSpec


@attrs.frozen
class IdleUnload:
    spec: ModelSpec
    nodes: tuple[str, ...]  # the members of one copy


@attrs.frozen
class RetireUnload:
    """A copy of a model a reload removed from the catalogue, idle now: unload it."""

    model_id: str
    nodes: tuple[str, ...]  # the members of one copy


Effect = Teardown | EnsureLoad | Prefetch | IdleUnload | RetireUnload


@attrs.frozen
class Clocks:
    """The moment a plan is made for, and the idle-TTL facts of this cortex."""

    wall: float
    mono: float
    started_wall: float  # a copy never answered since cortex started is idle since then
    idle_ttl_s: float | None = None


def plan(
    snap: FleetSnapshot,
    lives: Mapping[str, ModelLife],
    catalogue: Catalogue,
    clocks: Clocks,
) -> list[Effect]:
    """What to do now: tear down broken groups, load what the wish lacks (and stage
    prefetch models' files), unload copies idle past their TTL. Nothing while a node
    has not been heard from: what it holds is unknown."""
    if snap.unheard:
        return []
    out: list[Effect] = [
        Teardown(b) for b in broken_groups(snap) if _life(lives, b.model_id).job is None
    ]
    for spec in catalogue.models:
        life = _life(lives, spec.id)
        ensure = _ensure(snap, spec, life, clocks.mono)
        if ensure is not None:
            out.append(ensure)
        if spec.prefetch and not spec.is_local:  # a local directory is used in place
            out.append(Prefetch(spec))
    out += expired(snap, lives, catalogue, clocks)
    out += retiring(snap, lives)
    return out


def retiring(snap: FleetSnapshot, lives: Mapping[str, ModelLife]) -> list[Effect]:
    """Idle copies of models a reload removed: one unload per copy. A copy with
    requests in flight (the streams a reload must not cut) waits for them to end."""
    out: list[Effect] = []
    for model_id, life in sorted(lives.items()):
        if not life.retired or life.job is not None:
            continue
        seen: set[str] = set()
        for node, m in snap.locations(model_id):
            if node.name in seen or not node.healthy:
                continue
            if m.load or snap.outstanding_on(node.name, model_id):
                continue
            members = copy_members(snap, model_id, node.name, m)
            seen.update(members)
            out.append(RetireUnload(model_id, members))
    return out


def _life(lives: Mapping[str, ModelLife], model_id: str) -> ModelLife:
    return lives.get(model_id, EMPTY)


def _ensure(snap: FleetSnapshot, spec: ModelSpec, life: ModelLife, now: float) -> Effect | None:
    want = wanted_replicas(spec)
    # A default model is loaded only into memory that is free: it never evicts.
    soft = want == 0 and spec.default
    if soft:
        want = spec.replicas
    if want == 0 or life.hold is not None or life.job is not None:
        return None
    # A pinned model's copies count where it is pinned: one left elsewhere by a reload
    # that moved the pin is not what the wish asks (it goes once idle past its TTL).
    have = replicas(snap, spec.id, on=spec.pinned_on)
    if have >= want or life.backing_off(now) is not None:
        return None
    return EnsureLoad(spec, want, have, soft)


def ttl_s(spec: ModelSpec, life: ModelLife, node: str, default: float | None) -> float:
    keep = life.keep.get(node)
    if keep is not None:
        return keep
    ttl = spec.idle_ttl_s if spec.idle_ttl_s is not None else default
    return math.inf if ttl is None or ttl < 0 else ttl


def idle_since(life: ModelLife, node: str, m: NodeModel, started_wall: float) -> float:
    return max(m.last_used, life.touched.get(node, started_wall))


def expires_at(
    snap: FleetSnapshot, spec: ModelSpec, life: ModelLife, node: str, m: NodeModel, clocks: Clocks
) -> float | None:
    """Wall time this copy will be unloaded if still idle; None when never (the wish
    keeps it: pinned here, or no more copies than the wish asks)."""
    if node in spec.pinned_on:
        return None
    want = wish(spec, life)
    if want and replicas(snap, spec.id) <= want:
        return None
    ttl = ttl_s(spec, life, node, clocks.idle_ttl_s)
    if math.isinf(ttl):
        return None
    return idle_since(life, node, m, clocks.started_wall) + ttl


def expired(
    snap: FleetSnapshot, lives: Mapping[str, ModelLife], catalogue: Catalogue, clocks: Clocks
) -> list[Effect]:
    """Copies idle past their TTL that the wish lets go, one effect per copy."""
    out: list[Effect] = []
    for spec in catalogue.models:
        life = _life(lives, spec.id)
        if life.job is not None:
            continue
        want, have = wish(spec, life), replicas(snap, spec.id)
        for node, m in snap.locations(spec.id):
            if have <= want:
                break
            if not _idle_copy(snap, node, m):
                continue
            exp = expires_at(snap, spec, life, node.name, m, clocks)
            if exp is None or exp > clocks.wall:
                continue
            out.append(IdleUnload(spec, copy_members(snap, spec.id, node.name, m)))
            have -= 1
    return out


def _idle_copy(snap: FleetSnapshot, node: NodeState, m: NodeModel) -> bool:
    if m.state != "ready" or not m.serves_http or not node.healthy:
        return False
    return not (m.load or snap.outstanding_on(node.name, m.model_id))


def copy_members(snap: FleetSnapshot, model_id: str, node: str, m: NodeModel) -> tuple[str, ...]:
    """The nodes of the copy whose rank (or single copy) is on `node`."""
    if m.group is None or m.group.world_size <= 1:
        return (node,)
    gid = m.group.group_id
    return tuple(
        n.name
        for n, mm in snap.locations(model_id)
        if mm.group is not None and mm.group.group_id == gid
    )


def broken_groups(snap: FleetSnapshot) -> list[BrokenGroup]:
    """Multi-rank groups that can no longer serve, with the reason."""
    members: dict[tuple[str, str], list[tuple[str, int, str, bool]]] = defaultdict(list)
    world: dict[tuple[str, str], int] = {}
    for node in snap.nodes:
        for m in node.models:
            if m.group is None or m.group.world_size < 2:
                continue
            key = (m.group.group_id, m.model_id)
            members[key].append((node.name, m.group.rank, m.state, node.healthy))
            world[key] = m.group.world_size
    out = []
    for (gid, model_id), ranks in sorted(members.items()):
        if model_id in snap.loading:
            continue  # members appear one by one while cortex loads the group
        reason = _broken(ranks, world[(gid, model_id)], bool(snap.unheard))
        if reason is not None:
            nodes = tuple(sorted(n for n, *_ in ranks))
            out.append(BrokenGroup(gid, model_id, nodes, reason))
    return out


def _broken(ranks: list[tuple[str, int, str, bool]], world: int, unheard: bool) -> str | None:
    failed = [f"rank {r} on {n}" for n, r, state, _ in ranks if state == "failed"]
    if failed:
        return f"{', '.join(failed)} failed"
    down = [n for n, _, _, healthy in ranks if not healthy]
    if down:
        return f"member node(s) {', '.join(down)} unhealthy"
    present = {r for _, r, _, _ in ranks}
    if len(present) < world and not unheard:
        # (A rank on a node not heard from yet is not known to be gone.)
        missing = sorted(set(range(world)) - present)
        return f"rank(s) {missing} gone (a member restarted or unloaded)"
    return None


# -- the admin verbs' decisions -----------------------------------------------------


def where_now(snap: FleetSnapshot, model_id: str) -> tuple[str, list[str]] | None:
    """An admin load without a body: ("ready", nodes) or ("loading", nodes) when the
    model is already (on its way) there, else None: place it."""
    locs = [(n, m) for n, m in snap.locations(model_id) if n.healthy]
    ready = [n.name for n, m in locs if m.state == "ready"]
    if ready:
        return "ready", ready
    on_way = [n.name for n, m in locs if m.state in LOADING_STATES]
    if on_way:
        return "loading", on_way
    return None


def unload_targets(snap: FleetSnapshot, model_id: str, only: Iterable[str]) -> list[str]:
    """The nodes an admin unload takes the model from: all, or `only` with the other
    ranks of their groups (one rank alone can never serve)."""
    only = set(only)
    locs = snap.locations(model_id)
    nodes = [n.name for n, _ in locs if not only or n.name in only]
    groups = {m.group.group_id for n, m in locs if n.name in nodes and m.group is not None}
    nodes += [
        n.name for n, m in locs if n.name not in nodes and m.group and m.group.group_id in groups
    ]
    return nodes


def admin_candidate(
    spec: ModelSpec,
    facts: ModelFacts,
    snap: FleetSnapshot,
    catalogue: Catalogue,
    *,
    nodes: Sequence[str] | None,
    exclude: Collection[str],
    force: bool,
) -> tuple[Candidate, str | None]:
    """Where an admin load goes, with a warning when forced; PlacementRefused with the
    arithmetic when nowhere (PlacementPending while a chosen node is silent)."""
    infos = node_infos(snap, catalogue, loading=spec.id)
    if nodes:
        return _exactly(spec, facts, [i for i in infos if i.name in nodes], nodes, force)
    cand = best(spec, facts, infos, exclude=exclude, now=True)
    if cand is not None:
        return cand, None
    rest = [i for i in infos if i.name not in exclude]
    cands = candidates(spec, facts, rest)
    refusal = _excluded(spec, infos, exclude) or explain(spec, cands)
    ever_best = best(spec, facts, rest, now=False) if force else None
    if ever_best is None:
        raise PlacementRefused(refusal, details={"candidates": [c.to_json() for c in cands[:10]]})
    return ever_best, f"forced despite: {refusal}"


def _excluded(spec: ModelSpec, infos: Sequence[NodeInfo], exclude: Collection[str]) -> str | None:
    """The refusal when the exclusions, not the fleet, left no node to consider (every
    node known, or every node of `pinned_on`, excluded); None otherwise."""
    allowed = [i.name for i in infos if not spec.pinned_on or i.name in spec.pinned_on]
    if not allowed or any(name not in exclude for name in allowed):
        return None
    where = "every pinned_on node" if spec.pinned_on else "every node known"
    return (
        f"no node can hold model {spec.id}: your exclusions removed every candidate"
        f" (excluded: {', '.join(sorted(allowed))}: {where})"
    )


def _exactly(
    spec: ModelSpec, facts: ModelFacts, chosen: list[NodeInfo], nodes: Sequence[str], force: bool
) -> tuple[Candidate, str | None]:
    silent = pending_nodes(chosen, now=True)
    if silent:
        raise PlacementPending(silent)
    cands = [c for c in candidates(spec, facts, chosen) if set(c.nodes) == set(nodes)]
    if cands and cands[0].feasible:
        return cands[0], None
    size = f"{spec.min_nodes}+" if spec.min_nodes > 1 else "1"
    refusal = (
        f"cannot place {spec.id} on exactly [{', '.join(nodes)}] "
        f"(it places on {size} node(s)): " + explain(spec, cands or candidates(spec, facts, chosen))
    )
    ever = [
        c
        for c in candidates(spec, facts, chosen, now=False)
        if set(c.nodes) == set(nodes) and c.feasible
    ]
    if not (force and ever):
        raise PlacementRefused(refusal, details={"candidates": [c.to_json() for c in cands[:10]]})
    return ever[0], f"forced despite: {refusal}"
