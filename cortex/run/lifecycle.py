"""Every model's life in cortex, in one owner.

`Lifecycle` holds one `cortex.core.life.ModelLife` per model (the hold, the one job
under way, the last failed load with its backoff, the memory reserved, the idle
clocks) and changes it only through `cortex.core.life.apply`, in `_apply`, which
also journals the transition and persists the holds. Decisions are the pure
`cortex.core.life.plan` (the reconciler's pass) and friends; the effects (loads,
unloads, stages) run through the loader, which is I/O and reports events back.
The poller only records what nodes say (`Fleet`); the router reads
`snapshot()`, which adds this owner's view to the fleet's; the proxy calls
`routed()` for a cold load or a wait. `why()` answers "why is model X (not)
where its wish says".

Every check-and-set here is synchronous (no await between the check and the
write), so under asyncio it acts as the per-model lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from aiohttp import web

from cortex.config import CortexConfig
from cortex.core.life import (
    EMPTY,
    Accepted,
    Answered,
    BrokenGroup,
    Catalogued,
    Clocks,
    Dropped,
    EnsureLoad,
    Failure,
    FailureForgotten,
    Held,
    Hold,
    IdleUnload,
    JobKind,
    LifeEvent,
    LoadCancelled,
    LoadFailed,
    LoadStarted,
    LoadSucceeded,
    ModelLife,
    Noted,
    PhaseChanged,
    Polled,
    PortsTaken,
    Prefetch,
    Prefetched,
    Released,
    Retired,
    RetireUnload,
    Teardown,
    UnloadFinished,
    UnloadStarted,
    admin_candidate,
    apply,
    describe,
    plan,
    replicas,
    wanted_replicas,
)
from cortex.core.life import expires_at as life_expires_at
from cortex.core.life import ttl_s as life_ttl_s
from cortex.core.placement import Candidate, PlacementPending, best, candidates, explain
from cortex.core.router import (
    ColdLoad,
    Decision,
    Route,
    eviction_order,
    load_failed,
    node_infos,
    plan_evictions,
)
from cortex.core.state import Fleet, FleetSnapshot, LoadFailure, NodeModel, NodeState
from cortex.run.loader import Gone, Loader, Recorded, Report
from shared.catalogue import Catalogue, ModelFacts, ModelSpec
from shared.errors import (
    ApiError,
    ColdLoadFailed,
    InvalidRequest,
    ModelLoading,
    RingPortTaken,
)
from shared.journal import Event, Journal

log = logging.getLogger(__name__)

__all__ = ["Failure", "Hold", "Job", "Lifecycle", "replicas", "wanted_replicas"]

# A prefetch asked of a node is asked again (if its copy is still missing) after this.
PREFETCH_AGAIN_S = 300.0
# Neuron codes that mean the load cannot succeed until someone changes something.
OPERATOR_CODES = frozenset({"invalid_model_path", "invalid_request", "placement_refused"})
STATE_VERSION = 1
# A ring port a member found taken is skipped this long; a group load tries at most
# this many blocks before it fails.
SHUN_S = 600.0
RING_BLOCK_TRIES = 5


@attrs.define(eq=False)
class Job:
    """The handle of a model's one job: its task, and for a load, `accepted`, which
    resolves once every member took it. Its data (phase, reservation) is the record's."""

    model_id: str
    kind: JobKind
    nodes: tuple[str, ...]
    started: float  # wall clock
    candidate: Candidate | None = None
    task: asyncio.Task[None] | None = None
    accepted: asyncio.Future[tuple[str, ...]] | None = None
    warning: str | None = None
    # An unload's outcome: the nodes that failed, with why.
    failed: dict[str, str] = attrs.Factory(dict)


@attrs.define
class RingPorts:
    """Port blocks for ring groups (per fleet), never overlapping a live group's, a job's
    under way, or a port a member lately found held by another process."""

    base: int
    span: int = 4000
    clock: Callable[[], float] = time.monotonic
    _next: int = 0
    _taken: dict[int, int] = attrs.Factory(dict)  # first port -> size, for jobs under way
    _shunned: dict[int, float] = attrs.Factory(dict)  # port -> until (clock)

    def allocate(self, n: int, live: Iterable[int]) -> int:
        if not 1 <= n <= self.span:
            raise ColdLoadFailed(f"a group of {n} ranks needs more than {self.span} ring ports")
        now = self.clock()
        self._shunned = {p: until for p, until in self._shunned.items() if until > now}
        used = set(live) | self._shunned.keys()
        for first, size in self._taken.items():
            used.update(range(first, first + size))
        for step in range(self.span):
            first = self.base + (self._next + step) % (self.span - n + 1)
            if not used.intersection(range(first, first + n)):
                # Next time start past this block: a restarted group never meets
                # its old sockets in TIME_WAIT.
                self._next = (first - self.base + n) % (self.span - n + 1)
                self._taken[first] = n
                return first
        raise ColdLoadFailed(f"no free block of {n} ring ports from {self.base}")

    def free(self, first: int | None) -> None:
        if first is not None:
            self._taken.pop(first, None)

    def shun(self, ports: Iterable[int], for_s: float = SHUN_S) -> None:
        """Skip `ports` for `for_s`: held by another process (a listener, an outgoing
        connection), they are likely held still."""
        until = self.clock() + for_s
        for p in ports:
            self._shunned[p] = until


def parse_keep_alive(value: Any) -> float | None:
    """Ollama's keep_alive: seconds or a duration ("5m", "30s", "1h"); negative = forever.

    Returns seconds (math.inf for forever) or None when absent.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidRequest("'keep_alive' must be a duration or seconds", param="keep_alive")
    if isinstance(value, int | float):
        try:
            secs = float(value)
        except OverflowError:
            raise InvalidRequest("'keep_alive' is out of range", param="keep_alive") from None
    elif isinstance(value, str):
        text = value.strip()
        units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
        unit = next((u for u in ("ms", "s", "m", "h") if text.endswith(u)), "")
        try:
            secs = float(text[: len(text) - len(unit)] if unit else text) * units.get(unit, 1.0)
        except (ValueError, OverflowError):
            raise InvalidRequest(
                f"'keep_alive' {value[:40]!r} is not a duration like '5m', '30s' or seconds",
                param="keep_alive",
            ) from None
    else:
        raise InvalidRequest("'keep_alive' must be a duration or seconds", param="keep_alive")
    if math.isnan(secs):
        raise InvalidRequest("'keep_alive' must be a number", param="keep_alive")
    return math.inf if secs < 0 else secs


def replica_counts(catalogue: Catalogue, snap: FleetSnapshot) -> list[tuple[str, int, int]]:
    """(model id, wanted, present) for every catalogue model: the metrics' view."""
    return [(s.id, wanted_replicas(s), replicas(snap, s.id)) for s in catalogue.models]


def load_failure(spec: ModelSpec, exc: BaseException) -> tuple[str, bool, dict[str, Any] | None]:
    """(reason, needs_operator, details) of a failed load, the reason said once."""
    if isinstance(exc, ApiError):
        reason = exc.message
        # A taken ring port (every block tried) is the fleet's moment, not its config.
        needs_operator = exc.code in OPERATOR_CODES or (
            400 <= exc.status < 500 and exc.code not in ("model_kept_loaded", RingPortTaken.code)
        )
        details = exc.details
    else:
        reason, needs_operator, details = repr(exc), False, None
    # Layers of wrapping (neuron, loader, router) each said "loading ... failed:".
    prefix = f"loading model {spec.id!r} failed: "
    while reason.startswith(prefix):
        reason = reason[len(prefix) :]
    return reason, needs_operator, details


@attrs.define
class Lifecycle:
    fleet: Fleet
    catalogue: Catalogue
    config: CortexConfig
    # The I/O of jobs (None only in tests that never start one).
    loader: Loader | None = None
    clock: Callable[[], float] = time.monotonic
    # The event log (GET /admin/events, the dashboard's recent events): every
    # transition of a model's life, and the nodes' model state changes the poller brings.
    journal: Journal[Event] = attrs.Factory(Journal[Event])
    # Where holds are kept across restarts (JSON); None: memory only.
    state_file: str | None = None
    # Every model's life; written only by `_apply`.
    _lives: dict[str, ModelLife] = attrs.Factory(dict)
    # The tasks of the jobs the records describe (one per model).
    _handles: dict[str, Job] = attrs.Factory(dict)
    _prefetching: set[asyncio.Task[None]] = attrs.Factory(set)
    # Requests waiting for a load, per model (not a model's life: a request's).
    _waiting: Counter[str] = attrs.Factory(Counter)
    # What transitions() last saw, per node: its health, and each model's state
    # (per node so one node's poll costs its own models, not the fleet's).
    _seen_health: dict[str, str] = attrs.Factory(dict)
    _seen_models: dict[str, dict[str, str]] = attrs.Factory(dict)
    _started_wall: float = attrs.Factory(time.time)
    ports: RingPorts = attrs.Factory(
        lambda self: RingPorts(
            self.config.ring_base_port, self.config.ring_port_span, clock=self.clock
        ),
        takes_self=True,
    )

    # -- the one writer ---------------------------------------------------------------

    def _apply(self, event: LifeEvent) -> ModelLife:
        """Apply one event to its model's record, journal it, persist holds."""
        mid = event.model_id
        before = self._lives.get(mid, EMPTY) if mid is not None else EMPTY
        after = apply(event, before)
        if mid is not None and after is not before:
            if after == EMPTY:
                self._lives.pop(mid, None)
            else:
                self._lives[mid] = after
        for kind, detail, node in describe(event, before):
            self.journal.append(Event(kind=kind, model=mid, node=node, detail=detail))
        if before.hold != after.hold:
            self._save()
        return after

    def life(self, model_id: str) -> ModelLife:
        return self._lives.get(model_id, EMPTY)

    def lives(self) -> Mapping[str, ModelLife]:
        return dict(self._lives)

    # -- holds kept across restarts -------------------------------------------------

    def restore(self) -> None:
        """Read the holds persisted by an earlier cortex: one log line and nothing held
        when the file is unreadable (a start must never fail on it)."""
        if self.state_file is None:
            return
        try:
            text = Path(self.state_file).read_text()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("state file %s unreadable, starting with no holds: %s", self.state_file, exc)
            return
        try:
            holds = _holds_from_json(json.loads(text))
        except (ValueError, TypeError, KeyError) as exc:
            log.error("state file %s corrupt, starting with no holds: %s", self.state_file, exc)
            return
        for mid, h in holds.items():
            self._apply(Held(mid, h.reason, h.since))

    def _save(self) -> None:
        if self.state_file is None:
            return
        holds = {m: life.hold.to_json() for m, life in sorted(self._lives.items()) if life.hold}
        data = json.dumps({"version": STATE_VERSION, "holds": holds}, indent=1)
        path = Path(self.state_file)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w") as f:
                f.write(data + "\n")
                f.flush()
                os.fsync(f.fileno())
            # Atomic: a crash leaves the old file or the new one, never half of one.
            os.replace(tmp, path)
        except OSError as exc:
            log.error("could not write state file %s (holds not kept): %s", path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    # -- the snapshot the router reads ----------------------------------------------

    def snapshot(self) -> FleetSnapshot:
        """The fleet's snapshot with this owner's view: loads, failures, reservations."""
        now = self.clock()
        reservations: dict[tuple[str, str], int] = {}
        per_node: dict[str, int] = {}  # a plain dict: a Counter per request cost more
        loading = set()
        busy = set()
        retired = set()
        failures = {}
        for mid, life in self._lives.items():
            if life.retired:
                retired.add(mid)
            if life.job is None and life.failure is None and not (life.settling or life.credits):
                continue  # only idle clocks or a hold: nothing the router needs
            if life.job is not None:
                busy.add(mid)
                if life.job.kind == "load":
                    loading.add(mid)
            if life.failure is not None:
                f = life.failure
                failures[mid] = LoadFailure(
                    f.reason, until=f.until, details=f.details, needs_operator=f.needs_operator
                )
            for node, nbytes in life.reserved(now).items():
                reservations[(node, mid)] = nbytes
                per_node[node] = per_node.get(node, 0) + nbytes
            for node, c in life.credits.items():
                per_node[node] = per_node.get(node, 0) - c.nbytes
        # Only while memory is reserved somewhere are node records rewritten (and the
        # fleet's model index, which holds the unreserved ones, set aside).
        per_node = {n: b for n, b in per_node.items() if b}
        snap = self.fleet.snapshot(
            loading=frozenset(loading),
            busy=frozenset(busy),
            retired=frozenset(retired),
            load_failures=failures,
            reservations=reservations,
            taken_at=now,
        )
        if not per_node:
            return snap
        nodes = tuple(
            attrs.evolve(n, reserved_bytes=n.reserved_bytes + per_node[n.name])
            if n.name in per_node
            else n
            for n in snap.nodes
        )
        return attrs.evolve(snap, nodes=nodes, by_model=None)

    def polled(self, node: NodeState) -> None:
        """Poller listener: a finished load's reservation ends two good polls later,
        an unload's credit at the first poll that started after it."""
        if node.health is None:
            return
        settle = node.healthy
        for mid, life in list(self._lives.items()):
            if (settle and node.name in life.settling) or node.name in life.credits:
                self._apply(Polled(mid, node.name, node.polled_from, settle=settle))

    # -- holds, failures, events ----------------------------------------------------

    def hold(self, model_id: str, reason: str) -> Hold:
        life = self._apply(Held(model_id, reason, time.time()))
        assert life.hold is not None
        return life.hold

    def release(self, model_id: str) -> Hold | None:
        h = self.life(model_id).hold
        self._apply(Released(model_id))
        return h

    def held(self, model_id: str) -> Hold | None:
        return self.life(model_id).hold

    def failure(self, model_id: str) -> Failure | None:
        return self.life(model_id).failure

    def backing_off(self, model_id: str) -> Failure | None:
        return self.life(model_id).backing_off(self.clock())

    def forget_failure(self, model_id: str) -> Failure | None:
        f = self.life(model_id).failure
        self._apply(FailureForgotten(model_id))
        return f

    def prefetch(self, spec: ModelSpec, nodes: Iterable[str]) -> None:
        """Ask `nodes` to stage `spec`'s files (each at most once per PREFETCH_AGAIN_S)."""
        if self.loader is None:
            return
        run = self.loader.stage
        now = self.clock()
        for node in nodes:
            if now - self.life(spec.id).prefetched.get(node, -math.inf) < PREFETCH_AGAIN_S:
                continue
            self._apply(Prefetched(spec.id, node, now))
            self.event(spec.id, "prefetch", f"staging its files on {node}", node)

            async def one(node: str = node) -> None:
                try:
                    await run(node, spec)
                except Exception as exc:  # the next pass after PREFETCH_AGAIN_S tries again
                    why = getattr(exc, "message", None) or repr(exc)
                    self.event(spec.id, "prefetch failed", f"on {node}: {why}", node)

            task = asyncio.get_running_loop().create_task(one(), name=f"prefetch {spec.id}")
            self._prefetching.add(task)
            task.add_done_callback(self._prefetching.discard)

    def event(
        self, model_id: str | None, what: str, detail: str = "", node: str | None = None
    ) -> None:
        """A transition that changes no record (evicted, a node recycling...): journalled."""
        self._apply(Noted(model_id, what, detail, node))

    def events(
        self,
        model_id: str | None = None,
        limit: int = 50,
        *,
        node: str | None = None,
        since: int = 0,
    ) -> list[Event]:
        """Oldest first, the last `limit` matching; `node` matches one of a list ("a,b")."""
        found = [
            e
            for e in self.journal.since(since)
            if (model_id is None or e.model == model_id)
            and (node is None or node in (e.node or "").split(","))
        ]
        return found[-limit:] if limit > 0 else []

    def transitions(self, node: NodeState) -> None:
        """Poller listener: journal each model state change a node reports (with its
        error: a crash's carries the runner's output tail), and a node going up or down."""
        if node.health is None:
            return
        health = "healthy" if node.healthy else "unhealthy"
        if self._seen_health.get(node.name, "healthy") != health:
            self.event(None, f"node {health}", node.last_error or "", node=node.name)
        self._seen_health[node.name] = health
        if not node.healthy:
            return
        seen = self._seen_models.setdefault(node.name, {})
        present = set()
        for m in node.models:
            present.add(m.model_id)
            old = seen.get(m.model_id)
            if old != m.state:
                detail = f"{old or 'absent'} -> {m.state}" + (f": {m.error}" if m.error else "")
                self.event(m.model_id, m.state, detail, node=node.name)
                seen[m.model_id] = m.state
        for model_id in [k for k in seen if k not in present]:
            self.event(model_id, "gone", f"{seen.pop(model_id)} -> absent", node=node.name)

    def job(self, model_id: str) -> Job | None:
        return self._handles.get(model_id)

    def cold_load_failed(self, model_id: str, f: Failure) -> ColdLoadFailed:
        """The 503 a request gets while a failed load backs off."""
        as_seen = LoadFailure(
            f.reason, until=f.until, details=f.details, needs_operator=f.needs_operator
        )
        return load_failed(model_id, as_seen, self.clock())

    # -- what the fleet says, recorded by this owner -----------------------------------

    def gone(self, node: str, model_id: str) -> None:
        """Cortex took `model_id` off `node` (an unload it made, a replica's 404): out of
        routing at once, and its memory counted free until a poll shows it."""
        state = self.fleet.node(node)
        m = state.model(model_id)
        self.fleet.drop_model(node, model_id)
        nbytes = m.memory_bytes if m is not None else 0
        self._apply(Dropped(model_id, node, nbytes, self.fleet.node(node).models_at))

    def _from_job(self, job: Job, event: LifeEvent | Recorded | Gone) -> None:
        """What a job's I/O reports. Only the job still under way writes records of its
        model: nothing is written after the job ended (a drop is always true)."""
        if isinstance(event, Gone):
            self.gone(event.node, event.model_id)
            return
        if self._handles.get(job.model_id) is not job and event.model_id == job.model_id:
            return
        if isinstance(event, Recorded):
            self.fleet.set_model(event.node, event.record)
            return
        self._apply(event)
        if isinstance(event, Accepted) and job.accepted is not None and not job.accepted.done():
            job.accepted.set_result(job.nodes)

    # -- loads ----------------------------------------------------------------------

    def start_load(
        self,
        spec: ModelSpec,
        cand: Candidate,
        *,
        why: str,
        ignore_backoff: bool = False,
        warning: str | None = None,
    ) -> Job:
        """Begin the one load of `spec` on `cand`: ModelLoading if a job is under way,
        ColdLoadFailed while a failed load backs off."""
        life = self.life(spec.id)
        if life.job is not None:
            raise ModelLoading(f"model {spec.id!r} is {life.job.kind}ing; retry shortly")
        f = life.backing_off(self.clock())
        if f is not None and not ignore_backoff:
            raise self.cold_load_failed(spec.id, f)
        if self.loader is None:
            raise RuntimeError("lifecycle has no loader")
        loop = asyncio.get_running_loop()
        job = Job(
            spec.id,
            "load",
            cand.nodes,
            time.time(),
            candidate=cand,
            accepted=loop.create_future(),
            warning=warning,
        )
        # Spoken for now, before any await: a second load placed meanwhile sees it taken.
        reserved = {fit.node: fit.need_bytes for fit in cand.fits}
        self._handles[spec.id] = job
        self._apply(LoadStarted(spec.id, cand.nodes, job.started, reserved, why, warning))
        job.task = loop.create_task(self._run_load(spec, cand, job), name=f"load {spec.id}")
        job.task.add_done_callback(_retrieve)
        log.info("loading %s on %s (%s)", spec.id, ", ".join(cand.nodes), why)
        return job

    async def _run_load(self, spec: ModelSpec, cand: Candidate, job: Job) -> None:
        assert self.loader is not None and job.accepted is not None
        ring_port: int | None = None
        ok = False
        try:
            if len(cand.nodes) > 1:
                # A block of ports no live group uses, from the fleet's table.
                ring_port = self.take_ports(len(cand.nodes))
                self._apply(PortsTaken(spec.id, ring_port))
            await self._make_room(spec, job)
            tries = iter(range(2, RING_BLOCK_TRIES + 1))

            def next_block(exc: RingPortTaken) -> int | None:
                nonlocal ring_port
                ring_port = self._next_block(spec, cand, ring_port, exc, next(tries, None))
                return ring_port

            await self.loader.load(
                spec, cand, ring_port, self._reporter(job), next_block=next_block
            )
            ok = True
        except asyncio.CancelledError:
            self._apply(LoadCancelled(spec.id))
            raise
        except Exception as exc:
            err = self._load_failed(spec, exc)
            if not job.accepted.done():
                job.accepted.set_exception(err)
                job.accepted.exception()
            raise err from exc
        finally:
            if not job.accepted.done():
                job.accepted.cancel()
            self.free_ports(ring_port)
            if self._handles.get(spec.id) is job:
                del self._handles[spec.id]
            if ok:
                cap = self.clock() + 3 * self.config.poll_interval_s + self.config.poll_timeout_s
                self._apply(LoadSucceeded(spec.id, time.time(), cap))

    async def _make_room(self, spec: ModelSpec, job: Job) -> None:
        """Evict, least recently used first, what the load of `spec` needs. Each eviction
        is the evicted model's own job: it never crosses that model's load or unload."""
        assert job.candidate is not None
        self._apply(PhaseChanged(spec.id, "evicting"))
        for node, model_id in plan_evictions(
            job.candidate, self.snapshot(), self.catalogue, keep=spec.id
        ):
            evicting = self._start_eviction(node, model_id, spec.id)
            assert evicting.task is not None
            # Shielded: a cancelled load does not leave the eviction half said.
            await asyncio.shield(evicting.task)
            if evicting.failed:
                raise ColdLoadFailed(
                    f"could not make room on {node}: unloading {model_id} failed:"
                    f" {evicting.failed[node]}"
                )

    def _start_eviction(self, node: str, model_id: str, for_model: str) -> Job:
        """Claim `model_id`'s one job to evict it from `node`, re-checked at the last
        moment (a request or a job of its own may have come since the plan)."""
        snap = self.snapshot()
        state = snap.node(node)
        evictable = state is not None and model_id in {
            m.model_id for m in eviction_order(state, self.catalogue, snap)
        }
        job = (
            self.start_unload(
                model_id,
                (node,),
                kind="evict",
                why=f"idle, to make room for {for_model}",
                forget_failed=False,
            )
            if evictable
            else None
        )
        if job is None:
            raise ColdLoadFailed(f"could not make room on {node}: {model_id} is in use again")
        return job

    def _reporter(self, job: Job) -> Report:
        def report(event: LifeEvent | Recorded | Gone) -> None:
            self._from_job(job, event)

        return report

    def _load_failed(self, spec: ModelSpec, exc: BaseException) -> ColdLoadFailed:
        reason, needs_operator, details = load_failure(spec, exc)
        unit = self.config.load_backoff_s
        life = self._apply(
            LoadFailed(spec.id, reason, needs_operator, details, time.time(), self.clock(), unit)
        )
        f = life.failure
        assert f is not None
        log.warning("loading %s failed (%d in a row): %s", spec.id, f.count, reason)
        return self.cold_load_failed(spec.id, f)

    def _next_block(
        self,
        spec: ModelSpec,
        cand: Candidate,
        first: int | None,
        exc: RingPortTaken,
        attempt: int | None,
    ) -> int | None:
        """A member found a port of block `first` taken (the loader undid the group's
        other ranks): shun that port, and take the next block, the `attempt`-th;
        None (attempt None: tries used up) fails the load. Not a failed load itself."""
        n = len(cand.nodes)
        details = exc.details or {}
        port, node = details.get("port"), details.get("node")
        held = [port] if isinstance(port, int) else range(first or 0, (first or 0) + n)
        self.ports.shun(held)
        self.free_ports(first)
        nxt = None if attempt is None else self.take_ports(n)
        if nxt is None:
            then = f"{RING_BLOCK_TRIES} blocks tried: the load fails"
        else:
            self._apply(PortsTaken(spec.id, nxt))
            then = f"trying ports {nxt}-{nxt + n - 1} (block {attempt} of {RING_BLOCK_TRIES})"
        detail = f"{exc.message}; {then}"
        log.info("%s: %s", spec.id, detail)
        self.event(spec.id, "ring port taken", detail, node if isinstance(node, str) else None)
        return nxt

    def take_ports(self, n: int) -> int:
        """A block of `n` ring ports no live group and no job under way uses."""
        return self.ports.allocate(n, live_ring_ports(self.snapshot()))

    def free_ports(self, first: int | None) -> None:
        self.ports.free(first)

    async def wait_job(self, job: Job, limit_s: float) -> None:
        """Wait for a job up to `limit_s` (it goes on if we stop waiting); a job ended
        by someone else (an admin unload ends a load) returns, for the caller to look again."""
        assert job.task is not None
        try:
            await asyncio.wait_for(asyncio.shield(job.task), timeout=limit_s)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if job.task.cancelled() and (me is None or not me.cancelling()):
                return
            raise

    async def routed(
        self,
        model_id: str,
        decide: Callable[[FleetSnapshot], Decision],
        on_wait: Callable[[], None] | None = None,
    ) -> Route:
        """Route a request, loading or waiting for the model up to load_wait_s.

        `decide` is the router on a snapshot. A cold model is loaded once however
        many ask; everyone waits for the same job, at most `max_waiting` per model.
        """
        deadline = self.clock() + self.config.load_wait_s
        waiting = False
        try:
            while True:
                found, job = self._decide(model_id, decide)
                if found is not None:
                    return found
                left = deadline - self.clock()
                if left <= 0:
                    raise self._still_loading(model_id)
                if not waiting:
                    self._join_waiters(model_id)
                    waiting = True
                    if on_wait is not None:
                        on_wait()  # the request's trace: this is a cold-load wait
                await self._wait_once(model_id, job, left)
        finally:
            if waiting:
                self._waiting[model_id] -= 1
                if self._waiting[model_id] <= 0:
                    del self._waiting[model_id]

    def _decide(
        self, model_id: str, decide: Callable[[FleetSnapshot], Decision]
    ) -> tuple[Route | None, Job | None]:
        """The route if there is one now, else the job to wait for (a cold load starts one)."""
        decision = decide(self.snapshot())
        if isinstance(decision, Route):
            return decision, None
        job = self._handles.get(model_id)
        if isinstance(decision, ColdLoad) and job is None:
            # No await between the routing decision and the claim: one load.
            job = self.start_load(decision.spec, decision.candidate, why="a request")
        return None, job

    def _join_waiters(self, model_id: str) -> None:
        if self._waiting[model_id] >= self.config.max_waiting:
            raise ModelLoading(
                f"model {model_id!r} is loading and {self._waiting[model_id]}"
                " requests already wait for it; retry shortly"
            )
        self._waiting[model_id] += 1

    async def _wait_once(self, model_id: str, job: Job | None, left: float) -> None:
        """Wait for `job` (up to `left` s), or a moment when none runs; then look again."""
        if job is None or job.task is None:
            # A node reports it loading (recovering, or a load cortex did not
            # start): look again shortly.
            await asyncio.sleep(min(left, max(0.05, self.config.load_poll_interval_s)))
            return
        try:
            await self.wait_job(job, left)
        except TimeoutError:
            raise self._still_loading(model_id) from None
        except ApiError:
            if job.kind == "load":
                raise

    def _still_loading(self, model_id: str) -> ModelLoading:
        job = self.life(model_id).job
        where = f" on {', '.join(job.nodes)} (phase: {job.phase})" if job is not None else ""
        return ModelLoading(
            f"model {model_id!r} is still loading{where} after"
            f" {self.config.load_wait_s:g} s; retry shortly"
        )

    def waiting(self, model_id: str) -> int:
        return self._waiting.get(model_id, 0)

    # -- unloads ----------------------------------------------------------------------

    async def _unload_nodes(
        self, model_id: str, nodes: Sequence[str], kind: JobKind
    ) -> dict[str, str]:
        """Unload `model_id` from `nodes` concurrently (short timeouts); failures by node."""
        if self.loader is None:
            raise RuntimeError("lifecycle has no loader")
        run = self.loader.evict if kind == "evict" else self.loader.unload
        results = await asyncio.gather(*(run(n, model_id) for n in nodes), return_exceptions=True)
        failed: dict[str, str] = {}
        for n, r in zip(nodes, results, strict=True):
            if isinstance(r, BaseException):
                if isinstance(r, asyncio.CancelledError):
                    raise r
                failed[n] = getattr(r, "message", None) or repr(r)
            else:
                self.gone(n, model_id)
        return failed

    def start_unload(
        self,
        model_id: str,
        nodes: Iterable[str],
        *,
        kind: JobKind,
        why: str,
        forget_failed: bool = True,
    ) -> Job | None:
        """Unload as the model's one job (an idle unload, a teardown, an admin unload);
        None if one runs. `forget_failed`: a node that did not answer loses the model from
        routing too (a lone rank left behind shows up as a broken group once it is back)."""
        if self.life(model_id).job is not None:
            return None
        job = Job(model_id, kind, tuple(nodes), time.time())
        self._handles[model_id] = job
        self._apply(UnloadStarted(model_id, kind, job.nodes, job.started, why))

        async def run() -> None:
            failed: dict[str, str] = {}
            try:
                failed = await self._unload_nodes(model_id, job.nodes, kind)
                job.failed = failed
                for node, reason in failed.items():
                    log.info("could not unload %s from %s: %s", model_id, node, reason)
                    if forget_failed:
                        self.gone(node, model_id)
            finally:
                if self._handles.get(model_id) is job:
                    del self._handles[model_id]
                self._apply(UnloadFinished(model_id, job.nodes, failed))

        job.task = asyncio.get_running_loop().create_task(run(), name=f"{kind} {model_id}")
        job.task.add_done_callback(_retrieve)
        return job

    def answered_unload(self, node: str, model_id: str) -> Job | None:
        """After an answer with keep_alive 0: unload that copy, unless the wish keeps it
        or another request is under way there."""
        spec = self.catalogue.get(model_id)
        snap = self.snapshot()
        if spec is None or snap.outstanding_on(node, model_id):
            return None
        if node in spec.pinned_on or replicas(snap, model_id) <= wanted_replicas(spec):
            return None
        state = snap.node(node)
        m = state.model(model_id) if state is not None else None
        # (m.load: work the node itself reports, e.g. a client talking to it directly.)
        if m is None or m.load or (m.group is not None and m.group.world_size > 1):
            return None
        return self.start_unload(model_id, (node,), kind="unload", why="keep_alive 0")

    # -- idle clocks --------------------------------------------------------------------

    def answered(self, node: str, model_id: str, keep_alive: float | None) -> None:
        """A request was answered on `node`: its idle clock restarts (with its keep_alive)."""
        keep = None if keep_alive is None else min(keep_alive, self.config.max_keep_alive_s)
        self._apply(Answered(model_id, node, time.time(), keep))
        if keep_alive == 0:
            self.answered_unload(node, model_id)

    def _clocks(self) -> Clocks:
        return Clocks(time.time(), self.clock(), self._started_wall, self.config.idle_ttl_s)

    def ttl_s(self, node: str, spec: ModelSpec) -> float:
        return life_ttl_s(spec, self.life(spec.id), node, self.config.idle_ttl_s)

    def expires_at(self, snap: FleetSnapshot, node: NodeState, m: NodeModel) -> float | None:
        """Wall time this copy will be unloaded if still idle; None when never."""
        spec = self.catalogue.get(m.model_id)
        if spec is None:
            return None
        return life_expires_at(snap, spec, self.life(spec.id), node.name, m, self._clocks())

    # -- the reconciler's pass -----------------------------------------------------------

    async def converge(
        self,
        catalogue: Catalogue | None = None,
        facts: Callable[[ModelSpec], ModelFacts] | None = None,
    ) -> None:
        """One pass of `plan`: teardowns first (awaited), then a fresh plan's loads,
        prefetches and idle unloads."""
        cat = catalogue if catalogue is not None else self.catalogue
        look = facts if facts is not None else self._facts
        effects = plan(self.snapshot(), self._lives, cat, self._clocks())
        teardowns = [e.group for e in effects if isinstance(e, Teardown)]
        if teardowns:
            await _settle([j for j in map(self._teardown, teardowns) if j is not None])
            effects = plan(self.snapshot(), self._lives, cat, self._clocks())
        idle: list[Job] = []
        for effect in effects:
            if isinstance(effect, EnsureLoad):
                self._ensure(effect, cat, look)
            elif isinstance(effect, Prefetch):
                self._prefetch(effect.spec, cat, look)
            elif isinstance(effect, IdleUnload | RetireUnload):
                job = self._unload_idle(effect)
                if job is not None:
                    idle.append(job)
        await _settle(idle)

    def _unload_idle(self, effect: IdleUnload | RetireUnload) -> Job | None:
        """Unload one idle copy: past its TTL, or of a model a reload removed."""
        if isinstance(effect, IdleUnload):
            model_id, why = effect.spec.id, "idle past its TTL"
        else:
            model_id, why = effect.model_id, "removed from the catalogue"
        log.info("%s on %s: %s, unloading", model_id, ", ".join(effect.nodes), why)
        return self.start_unload(model_id, effect.nodes, kind="unload", why=why)

    # -- a reload of the catalogue ------------------------------------------------------

    def reload_catalogue(self, new: Catalogue) -> tuple[list[str], list[str], list[str]]:
        """Take `new` as the catalogue: (added, removed, changed) model ids. A removed
        model takes no new request and each copy is unloaded once idle (`retiring`);
        a changed `replicas` or `pinned_on` converges through the next pass."""
        old = {m.id: m for m in self.catalogue.models}
        now = {m.id: m for m in new.models}
        added = sorted(now.keys() - old.keys())
        removed = sorted(old.keys() - now.keys())
        changed = sorted(k for k in old.keys() & now.keys() if old[k] != now[k])
        self.catalogue = new
        for mid in added:
            self._apply(Catalogued(mid, back=self.life(mid).retired))
        for mid in removed:
            self._apply(Retired(mid))
        return added, removed, changed

    def _facts(self, spec: ModelSpec) -> ModelFacts:
        return self.loader.facts(spec) if self.loader is not None else spec.facts()

    def _teardown(self, broken: BrokenGroup) -> Job | None:
        """Unload every remaining rank of a broken group, on every member at once."""
        log.warning(
            "group %s of %s broken (%s): tearing down on %s",
            broken.group_id,
            broken.model_id,
            broken.reason,
            ", ".join(broken.members),
        )
        return self.start_unload(
            broken.model_id, broken.members, kind="teardown", why=f"group broken: {broken.reason}"
        )

    def _ensure(
        self, e: EnsureLoad, cat: Catalogue, facts: Callable[[ModelSpec], ModelFacts]
    ) -> None:
        # A fresh snapshot each: it holds the memory the loads just started reserved.
        snap = self.snapshot()
        infos = node_infos(snap, cat, loading=e.spec.id)
        if e.soft:
            infos = [attrs.evolve(i, reclaimable_bytes=0) for i in infos]
        try:
            cand = best(e.spec, facts(e.spec), infos)
        except PlacementPending:
            return  # a node has not said what it is yet; next pass
        if cand is None:
            return  # nothing fits now (nodes down or busy); /admin/state says why
        kind = "default, memory free" if e.soft else "wish"
        with contextlib.suppress(ApiError):
            self.start_load(e.spec, cand, why=f"{kind}: {e.want} wanted / {e.have} present")

    def _prefetch(
        self, spec: ModelSpec, cat: Catalogue, facts: Callable[[ModelSpec], ModelFacts]
    ) -> None:
        """Stage a `prefetch` model's files on every healthy node that could hold it."""
        snap = self.snapshot()
        try:
            infos = node_infos(snap, cat, loading=spec.id)
            sets = candidates(spec, facts(spec), infos, now=False)
        except PlacementPending:
            return
        able = {n for c in sets if c.feasible for n in c.nodes}
        missing = [
            n.name
            for n in snap.healthy
            if n.name in able
            and spec.source not in n.staged
            and spec.id not in n.staged
            and n.model(spec.id) is None
        ]
        self.prefetch(spec, missing)

    # -- the admin verbs ---------------------------------------------------------------

    def admin_release(self, model_id: str) -> list[str]:
        """An admin load's word: the hold released, a failed load's backoff forgotten."""
        did: list[str] = []
        hold = self.release(model_id)
        if hold is not None:
            did.append(f"released the hold ({hold.reason})")
        failure = self.forget_failure(model_id)
        if failure is not None:
            did.append(f"forgot the failed load ({failure.reason})")
        return did

    async def place(
        self,
        spec: ModelSpec,
        *,
        nodes: Sequence[str] | None = None,
        exclude: Iterable[str] = (),
        force: bool = False,
    ) -> Job:
        """An explicit load (admin): the best set now, or a 400 with the arithmetic.

        `nodes` asks for exactly that node set (one placement: a node, or a
        group's members); `exclude` keeps nodes out of the choice; `force`
        places on a set that could ever hold the model even if it does not fit
        now (the job carries the arithmetic as a warning).
        """
        exclude = tuple(exclude)
        unknown = sorted((set(nodes or ()) | set(exclude)) - set(self.fleet.names))
        if unknown:
            raise InvalidRequest(f"unknown node(s): {', '.join(unknown)}", param="nodes")
        deadline = time.monotonic() + self.config.discovery_wait_s
        while any(n.healthy and n.discovery is None for n in self.fleet.snapshot().nodes):
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.1)
        snap = self.snapshot()
        cand, warning = admin_candidate(
            spec, self._facts(spec), snap, self.catalogue, nodes=nodes, exclude=exclude, force=force
        )
        job = self.start_load(spec, cand, why="admin load", ignore_backoff=True, warning=warning)
        assert job.accepted is not None and job.task is not None
        waiting: list[asyncio.Future[Any]] = [job.accepted, job.task]
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if job.task.done() and not job.task.cancelled():
            exc = job.task.exception()
            if exc is not None:
                raise exc
        return job

    async def admin_unload(
        self, model_id: str, nodes: Sequence[str], *, hold: str | None
    ) -> dict[str, str]:
        """An admin unload, as the model's one job: after an unload under way ends, and
        ending a load under way (the operator's word wins; its nodes are unloaded too).
        `hold`: keep it unloaded until the next admin load."""
        if hold is not None:
            self.hold(model_id, hold)
        targets = tuple(nodes)
        while (running := self._handles.get(model_id)) is not None:
            if running.kind == "load":
                targets += tuple(n for n in running.nodes if n not in targets)
                if running.task is not None:
                    running.task.cancel()
            if running.task is not None:
                await asyncio.wait([running.task])
        job = self.start_unload(
            model_id, targets, kind="unload", why="admin unload", forget_failed=False
        )
        assert job is not None and job.task is not None
        await job.task
        return job.failed

    # -- why -------------------------------------------------------------------------------

    def why(self, spec: ModelSpec, snap: FleetSnapshot, facts: ModelFacts) -> str:
        """One line: why the model is (not) where its wish says."""
        now = self.clock()
        want = wanted_replicas(spec)
        have = replicas(snap, spec.id)
        life = self.life(spec.id)
        job, hold, f = life.job, life.hold, life.failure
        if job is not None:
            return f"{job.kind}ing on {', '.join(job.nodes)} (phase: {job.phase})"
        if hold is not None:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(hold.since))
            return f"held by operator since {since}: {hold.reason}"
        if f is not None and f.until > now:
            who = " (needs an operator)" if f.needs_operator else ""
            return (
                f"backing off after failure{who}: {f.reason}, next try in"
                f" {math.ceil(f.left_s(now))} s"
            )
        if want and have < want:
            if snap.unheard:
                return f"{want} wanted / {have} present: waiting for nodes to report"
            return f"{want} wanted / {have} present: {self._no_room(spec, snap, facts)}"
        if want:
            return f"{want} wanted / {have} present: as wished"
        if have:
            return f"{have} loaded on demand; unloaded when idle past its TTL"
        return "not loaded: loads on the first request"

    def _no_room(self, spec: ModelSpec, snap: FleetSnapshot, facts: ModelFacts) -> str:
        """Why no more copies fit now: placement's per-node arithmetic, in a line."""
        try:
            infos = node_infos(snap, self.catalogue, loading=spec.id)
            cands = candidates(spec, facts, infos, now=True)
            if any(c.feasible for c in cands):
                return "a copy fits: the next reconciler pass loads it"
            return "no room: " + explain(spec, cands)
        except Exception as exc:  # a status answer must not fail during an incident
            return f"placement unknown ({type(exc).__name__}: {exc})"

    def to_json(self, spec: ModelSpec, snap: FleetSnapshot) -> dict[str, Any]:
        now = self.clock()
        life = self.life(spec.id)
        job, hold, f = life.job, life.hold, life.failure
        return {
            "wish": {
                "replicas": wanted_replicas(spec),
                "keep_loaded": spec.keep_loaded,
                "pinned_on": list(spec.pinned_on),
                "idle_ttl_s": spec.idle_ttl_s
                if spec.idle_ttl_s is not None
                else self.config.idle_ttl_s,
            },
            "present": replicas(snap, spec.id),
            "hold": None if hold is None else hold.to_json(),
            "job": None if job is None else job.to_json(),
            "failure": None if f is None else f.to_json(now),
            "waiting": self.waiting(spec.id),
            "events": [e.to_json() for e in self.events(spec.id, limit=10)],
        }

    async def close(self) -> None:
        """Stop jobs under way (cortex shutting down)."""
        tasks = [j.task for j in self._handles.values() if j.task is not None]
        tasks += list(self._prefetching)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t


def _retrieve(task: asyncio.Task[None]) -> None:
    # A job's outcome is recorded by the lifecycle; nobody else has to await it.
    if not task.cancelled():
        task.exception()


async def _settle(jobs: list[Job]) -> None:
    tasks = [j.task for j in jobs if j.task is not None]
    await asyncio.gather(*tasks, return_exceptions=True)


def _holds_from_json(data: Any) -> dict[str, Hold]:
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise ValueError(f"not a version {STATE_VERSION} cortex state")
    holds = data.get("holds", {})
    if not isinstance(holds, dict):
        raise ValueError("'holds' is not an object")
    return {str(mid): Hold.from_json(h) for mid, h in holds.items()}


def live_ring_ports(snap: FleetSnapshot) -> set[int]:
    """Ports that live groups' ranks listen on, from what nodes report."""
    out: set[int] = set()
    for n in snap.nodes:
        for m in n.models:
            if m.group is None:
                continue
            for h in m.group.hosts:
                with contextlib.suppress(ValueError):
                    out.add(int(h.rsplit(":", 1)[1]))
            if m.group.coordinator:
                with contextlib.suppress(ValueError):
                    out.add(int(m.group.coordinator.rsplit(":", 1)[1]))
    return out


# Where the app keeps the lifecycle.
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
