"""Every model's life in cortex, in one owner.

`Lifecycle` holds, per model: the wish (the catalogue's keep_loaded, replicas,
pinned_on and idle TTL, an operator's hold with its reason), the one job under
way (load, unload, teardown: phase, nodes, since when), the last failed load
with its backoff, the memory reserved for the job, the idle clocks, and a
bounded list of events. The poller only records what nodes say (`Fleet`); the
router reads `snapshot()`, which adds this owner's view to the fleet's; the
reconciler calls `converge()`; the proxy calls `routed()` for a cold load or a
wait. `why()` answers "why is model X (not) where its wish says".

Every check-and-set here is synchronous (no await between the check and the
write), so under asyncio it acts as the per-model lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal

import attrs

from cortex.config import CortexConfig
from cortex.placement import Candidate, candidates, explain
from cortex.router import ColdLoad, Route, load_failed, node_infos
from cortex.state import (
    LOADING_STATES,
    SERVING_STATES,
    Fleet,
    FleetSnapshot,
    LoadFailure,
    NodeModel,
    NodeState,
)
from shared.catalogue import Catalogue, ModelFacts, ModelSpec
from shared.errors import ApiError, ColdLoadFailed, InvalidRequest, ModelLoading
from shared.journal import Event, Journal
from shared.retry import LOAD_RETRY_WAIT, backoff_s

log = logging.getLogger(__name__)

JobKind = Literal["load", "unload", "teardown"]
# A prefetch asked of a node is asked again (if its copy is still missing) after this.
PREFETCH_AGAIN_S = 300.0
OPERATOR_WAIT_FACTOR = 6
OPERATOR_WAIT_MAX_S = 600.0
# Neuron codes that mean the load cannot succeed until someone changes something.
OPERATOR_CODES = frozenset({"invalid_model_path", "invalid_request", "placement_refused"})


@attrs.frozen
class Hold:
    """An operator's word: do not load this model by wish until the next admin load."""

    reason: str
    since: float  # wall clock

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "since": self.since}


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


@attrs.define(eq=False)
class Job:
    """The one thing under way for a model; `accepted` resolves once every member took it."""

    model_id: str
    kind: JobKind
    nodes: tuple[str, ...]
    started: float  # wall clock
    phase: str = "starting"
    candidate: Candidate | None = None
    task: asyncio.Task[None] | None = None
    accepted: asyncio.Future[tuple[str, ...]] | None = None
    # Memory promised on each node, released when the job ends.
    reserved: dict[str, int] = attrs.Factory(dict)
    ring_port: int | None = None
    warning: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "nodes": list(self.nodes),
            "phase": self.phase,
            "started": self.started,
            "warning": self.warning,
        }


@attrs.frozen
class _Settling:
    """A finished load's reservation, kept until the node's own figures include it."""

    nbytes: int
    polls_left: int
    until: float  # monotonic cap, for a node that stops answering


# The executor of jobs (cortex.loader.Loader): I/O only, no state of its own.
LoadRunner = Callable[[ModelSpec, Candidate, Job], Awaitable[None]]
UnloadRunner = Callable[[str, str], Awaitable[None]]
StageRunner = Callable[[str, ModelSpec], Awaitable[None]]


@attrs.define
class RingPorts:
    """Port blocks for ring groups, never overlapping a live group's (per fleet)."""

    base: int
    span: int = 16000
    _next: int = 0
    _taken: dict[int, int] = attrs.Factory(dict)  # first port -> size, for jobs under way

    def allocate(self, n: int, live: Iterable[int]) -> int:
        used = set(live)
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


def wanted_replicas(spec: ModelSpec) -> int:
    """How many copies the catalogue asks to keep without any request."""
    return spec.replicas if (spec.keep_loaded or spec.pinned_on) else 0


def replicas(snap: FleetSnapshot, model_id: str) -> int:
    """Copies loaded or on their way, on healthy nodes; a group counts once, at rank 0.

    A recycling node's copies count: it comes back in moments, and a copy loaded
    elsewhere meanwhile (maybe evicting another model) would be one too many.
    """
    count = 0
    for node, m in snap.locations(model_id):
        if not (node.healthy or node.recycling) or m.state not in SERVING_STATES | LOADING_STATES:
            continue
        if m.group is None or m.group.world_size == 1 or m.group.rank == 0:
            count += 1
    return count


def replica_counts(catalogue: Catalogue, snap: FleetSnapshot) -> list[tuple[str, int, int]]:
    """(model id, wanted, present) for every catalogue model: the metrics' view."""
    return [(s.id, wanted_replicas(s), replicas(snap, s.id)) for s in catalogue.models]


def load_failure(spec: ModelSpec, exc: BaseException) -> tuple[str, bool, dict[str, Any] | None]:
    """(reason, needs_operator, details) of a failed load, the reason said once."""
    if isinstance(exc, ApiError):
        reason = exc.message
        needs_operator = exc.code in OPERATOR_CODES or (
            400 <= exc.status < 500 and exc.code != "model_kept_loaded"
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
    run_load: LoadRunner | None = None
    run_unload: UnloadRunner | None = None
    run_stage: StageRunner | None = None
    clock: Callable[[], float] = time.monotonic
    # Prefetches asked of (node, model), by clock time: asked again only after a while.
    _prefetched: dict[tuple[str, str], float] = attrs.Factory(dict)
    _prefetching: set[asyncio.Task[None]] = attrs.Factory(set)
    _holds: dict[str, Hold] = attrs.Factory(dict)
    _jobs: dict[str, Job] = attrs.Factory(dict)
    _failures: dict[str, Failure] = attrs.Factory(dict)
    _settling: dict[tuple[str, str], _Settling] = attrs.Factory(dict)
    _waiting: Counter[str] = attrs.Factory(Counter)
    # Per (node, model): when cortex last saw it answer (wall) and its keep_alive.
    _touched: dict[tuple[str, str], float] = attrs.Factory(dict)
    _keep: dict[tuple[str, str], float] = attrs.Factory(dict)
    # The event log (GET /admin/events, the dashboard's recent events): this owner's
    # journal, and the nodes' model state transitions the poller brings.
    journal: Journal[Event] = attrs.Factory(Journal[Event])
    # What transitions() last saw, per node: its health, and each model's state
    # (per node so one node's poll costs its own models, not the fleet's).
    _seen_health: dict[str, str] = attrs.Factory(dict)
    _seen_models: dict[str, dict[str, str]] = attrs.Factory(dict)
    _started_wall: float = attrs.Factory(time.time)
    ports: RingPorts = attrs.Factory(
        lambda self: RingPorts(self.config.ring_base_port), takes_self=True
    )

    # -- the snapshot the router reads ----------------------------------------------

    def snapshot(self) -> FleetSnapshot:
        """The fleet's snapshot with this owner's view: loads, failures, reservations."""
        snap = self.fleet.snapshot()
        now = self.clock()
        reservations: dict[tuple[str, str], int] = {}
        for job in self._jobs.values():
            for node, nbytes in job.reserved.items():
                reservations[(node, job.model_id)] = nbytes
        for key, s in list(self._settling.items()):
            if s.until <= now:
                del self._settling[key]
            else:
                reservations[key] = reservations.get(key, 0) + s.nbytes
        per_node = Counter[str]()
        for (node, _), nbytes in reservations.items():
            per_node[node] += nbytes
        # Only while memory is reserved somewhere are node records rewritten (and the
        # fleet's model index, which holds the unreserved ones, set aside).
        nodes = (
            tuple(
                attrs.evolve(n, reserved_bytes=n.reserved_bytes + per_node[n.name])
                if per_node[n.name]
                else n
                for n in snap.nodes
            )
            if per_node
            else snap.nodes
        )
        return attrs.evolve(
            snap,
            nodes=nodes,
            by_model=None if per_node else snap.by_model,
            loading=frozenset(m for m, j in self._jobs.items() if j.kind == "load"),
            load_failures={
                m: LoadFailure(
                    f.reason, until=f.until, details=f.details, needs_operator=f.needs_operator
                )
                for m, f in self._failures.items()
            },
            reservations=reservations,
            taken_at=now,
        )

    def polled(self, node: NodeState) -> None:
        """Poller listener: a finished load's reservation ends two good polls later
        (the second one surely started after the load ended), or at a restart."""
        if not node.healthy or node.health is None:
            return
        for key, s in list(self._settling.items()):
            if key[0] != node.name:
                continue
            if s.polls_left <= 1:
                del self._settling[key]
            else:
                self._settling[key] = attrs.evolve(s, polls_left=s.polls_left - 1)

    # -- holds, failures, events ----------------------------------------------------

    def hold(self, model_id: str, reason: str) -> Hold:
        h = Hold(reason, time.time())
        self._holds[model_id] = h
        self.event(model_id, "held", reason)
        return h

    def release(self, model_id: str) -> Hold | None:
        h = self._holds.pop(model_id, None)
        if h is not None:
            self.event(model_id, "hold released", h.reason)
        return h

    def held(self, model_id: str) -> Hold | None:
        return self._holds.get(model_id)

    def failure(self, model_id: str) -> Failure | None:
        return self._failures.get(model_id)

    def backing_off(self, model_id: str) -> Failure | None:
        f = self._failures.get(model_id)
        return f if f is not None and f.until > self.clock() else None

    def forget_failure(self, model_id: str) -> Failure | None:
        f = self._failures.pop(model_id, None)
        if f is not None:
            self.event(model_id, "failure cleared", f.reason)
        return f

    def prefetch(self, spec: ModelSpec, nodes: Iterable[str]) -> None:
        """Ask `nodes` to stage `spec`'s files (each at most once per PREFETCH_AGAIN_S)."""
        if self.run_stage is None:
            return
        run = self.run_stage
        now = self.clock()
        for node in nodes:
            key = (node, spec.id)
            if now - self._prefetched.get(key, -math.inf) < PREFETCH_AGAIN_S:
                continue
            self._prefetched[key] = now
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
        self.journal.append(Event(kind=what, model=model_id, node=node, detail=detail))

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
        return self._jobs.get(model_id)

    def cold_load_failed(self, model_id: str, f: Failure) -> ColdLoadFailed:
        """The 503 a request gets while a failed load backs off."""
        as_seen = LoadFailure(
            f.reason, until=f.until, details=f.details, needs_operator=f.needs_operator
        )
        return load_failed(model_id, as_seen, self.clock())

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
        if spec.id in self._jobs:
            raise ModelLoading(f"model {spec.id!r} is {self._jobs[spec.id].kind}ing; retry shortly")
        f = self.backing_off(spec.id)
        if f is not None and not ignore_backoff:
            raise self.cold_load_failed(spec.id, f)
        if self.run_load is None:
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
        job.reserved = {fit.node: fit.need_bytes for fit in cand.fits}
        for fit in cand.fits:
            self._settling.pop((fit.node, spec.id), None)
        for node in cand.nodes:
            # A new copy starts with the catalogue's TTL, not an old request's keep_alive.
            self._keep.pop((node, spec.id), None)
        self._jobs[spec.id] = job
        job.task = loop.create_task(self._run_load(spec, cand, job), name=f"load {spec.id}")
        job.task.add_done_callback(_retrieve)
        self.event(
            spec.id, "load started", f"on {', '.join(cand.nodes)} ({why})", ",".join(cand.nodes)
        )
        log.info("loading %s on %s (%s)", spec.id, ", ".join(cand.nodes), why)
        return job

    async def _run_load(self, spec: ModelSpec, cand: Candidate, job: Job) -> None:
        assert self.run_load is not None and job.accepted is not None
        ok = False
        try:
            await self.run_load(spec, cand, job)
            ok = True
        except asyncio.CancelledError:
            self.event(spec.id, "load cancelled", "cortex stopping")
            raise
        except Exception as exc:
            reason, needs_operator, details = load_failure(spec, exc)
            prev = self._failures.get(spec.id)
            count = (prev.count if prev is not None else 0) + 1
            wait = backoff_s(LOAD_RETRY_WAIT, count) * self.config.load_backoff_s
            if needs_operator:
                # Waiting will not fix it: ask the nodes far less often.
                wait = min(wait * OPERATOR_WAIT_FACTOR, OPERATOR_WAIT_MAX_S)
            f = Failure(reason, needs_operator, count, time.time(), self.clock() + wait, details)
            self._failures[spec.id] = f
            self.event(spec.id, "load failed", f"{reason}; next try in {wait:.0f} s")
            log.warning("loading %s failed (%d in a row): %s", spec.id, count, reason)
            err = self.cold_load_failed(spec.id, f)
            if not job.accepted.done():
                job.accepted.set_exception(err)
                job.accepted.exception()
            raise err from exc
        finally:
            if not job.accepted.done():
                job.accepted.cancel()
            self.ports.free(job.ring_port)
            if self._jobs.get(spec.id) is job:
                del self._jobs[spec.id]
            if ok:
                self._failures.pop(spec.id, None)
                for node in cand.nodes:
                    self._touched[(node, spec.id)] = time.time()
                # The node's own memory figure takes over once a poll has seen the model.
                cap = self.clock() + 3 * self.config.poll_interval_s + self.config.poll_timeout_s
                for node, nbytes in job.reserved.items():
                    self._settling[(node, spec.id)] = _Settling(nbytes, 2, cap)
                self.event(spec.id, "ready", f"on {', '.join(cand.nodes)}", ",".join(cand.nodes))
            job.reserved = {}

    async def wait_job(self, job: Job, limit_s: float) -> None:
        """Wait for a job up to `limit_s` (it goes on if we stop waiting)."""
        assert job.task is not None
        await asyncio.wait_for(asyncio.shield(job.task), timeout=limit_s)

    async def routed(
        self,
        model_id: str,
        decide: Callable[[FleetSnapshot], Route | ColdLoad],
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
                try:
                    decision = decide(self.snapshot())
                except ModelLoading:
                    decision = None
                if isinstance(decision, Route):
                    return decision
                job = self._jobs.get(model_id)
                if isinstance(decision, ColdLoad) and job is None:
                    # No await between the routing decision and the claim: one load.
                    job = self.start_load(decision.spec, decision.candidate, why="a request")
                left = deadline - self.clock()
                if left <= 0:
                    raise self._still_loading(model_id)
                if not waiting:
                    if self._waiting[model_id] >= self.config.max_waiting:
                        raise ModelLoading(
                            f"model {model_id!r} is loading and {self._waiting[model_id]}"
                            " requests already wait for it; retry shortly"
                        )
                    self._waiting[model_id] += 1
                    waiting = True
                    if on_wait is not None:
                        on_wait()  # the request's trace: this is a cold-load wait
                if job is not None and job.task is not None:
                    try:
                        await self.wait_job(job, left)
                    except TimeoutError:
                        raise self._still_loading(model_id) from None
                    except ApiError:
                        if job.kind == "load":
                            raise
                else:
                    # A node reports it loading (recovering, or a load cortex did not
                    # start): look again shortly.
                    await asyncio.sleep(min(left, max(0.05, self.config.load_poll_interval_s)))
        finally:
            if waiting:
                self._waiting[model_id] -= 1
                if self._waiting[model_id] <= 0:
                    del self._waiting[model_id]

    def _still_loading(self, model_id: str) -> ModelLoading:
        job = self._jobs.get(model_id)
        where = f" on {', '.join(job.nodes)} (phase: {job.phase})" if job is not None else ""
        return ModelLoading(
            f"model {model_id!r} is still loading{where} after"
            f" {self.config.load_wait_s:g} s; retry shortly"
        )

    def waiting(self, model_id: str) -> int:
        return self._waiting.get(model_id, 0)

    # -- unloads ----------------------------------------------------------------------

    async def unload(self, model_id: str, nodes: Iterable[str], *, why: str) -> dict[str, str]:
        """Unload `model_id` from `nodes` concurrently (short timeouts); failures by node."""
        nodes = tuple(nodes)
        if self.run_unload is None:
            raise RuntimeError("lifecycle has no loader")
        run = self.run_unload
        self.event(model_id, "unload", f"from {', '.join(nodes)} ({why})", ",".join(nodes))
        results = await asyncio.gather(*(run(n, model_id) for n in nodes), return_exceptions=True)
        failed: dict[str, str] = {}
        for n, r in zip(nodes, results, strict=True):
            if isinstance(r, BaseException):
                if isinstance(r, asyncio.CancelledError):
                    raise r
                failed[n] = getattr(r, "message", None) or repr(r)
        for n in nodes:
            self._touched.pop((n, model_id), None)
            self._keep.pop((n, model_id), None)
        return failed

    def start_unload(
        self, model_id: str, nodes: Iterable[str], *, kind: JobKind, why: str
    ) -> Job | None:
        """Unload as the model's one job (an idle unload, a teardown); None if one runs."""
        if model_id in self._jobs:
            return None
        job = Job(model_id, kind, tuple(nodes), time.time(), phase="posting")
        self._jobs[model_id] = job

        async def run() -> None:
            try:
                failed = await self.unload(model_id, job.nodes, why=why)
                for node, reason in failed.items():
                    log.info("could not unload %s from %s: %s", model_id, node, reason)
                    # Unreachable now: out of routing; a lone rank left behind shows
                    # up as a broken group again once its node is back.
                    self.fleet.drop_model(node, model_id)
                done = [n for n in job.nodes if n not in failed]
                if done:
                    self.event(model_id, "unloaded", f"from {', '.join(done)}", ",".join(done))
                if failed:
                    self.event(
                        model_id, "unload failed", "; ".join(f"{n}: {r}" for n, r in failed.items())
                    )
            finally:
                if self._jobs.get(model_id) is job:
                    del self._jobs[model_id]

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
        self._touched[(node, model_id)] = time.time()
        if keep_alive is not None:
            self._keep[(node, model_id)] = min(keep_alive, self.config.max_keep_alive_s)
            if keep_alive == 0:
                self.answered_unload(node, model_id)

    def ttl_s(self, node: str, spec: ModelSpec) -> float:
        keep = self._keep.get((node, spec.id))
        if keep is not None:
            return keep
        ttl = spec.idle_ttl_s if spec.idle_ttl_s is not None else self.config.idle_ttl_s
        return math.inf if ttl is None or ttl < 0 else ttl

    def idle_since(self, node: NodeState, m: NodeModel) -> float:
        return max(m.last_used, self._touched.get((node.name, m.model_id), self._started_wall))

    def expires_at(self, snap: FleetSnapshot, node: NodeState, m: NodeModel) -> float | None:
        """Wall time this copy will be unloaded if still idle; None when never (the wish
        keeps it: pinned here, or no more copies than the wish asks)."""
        spec = self.catalogue.get(m.model_id)
        if spec is None or self._kept_here(spec, node.name):
            return None
        want = wanted_replicas(spec) if spec.id not in self._holds else 0
        if want and replicas(snap, spec.id) <= want:
            return None
        ttl = self.ttl_s(node.name, spec)
        if math.isinf(ttl):
            return None
        return self.idle_since(node, m) + ttl

    def _kept_here(self, spec: ModelSpec, node: str) -> bool:
        return node in spec.pinned_on

    def expired(self, snap: FleetSnapshot) -> list[tuple[ModelSpec, tuple[str, ...]]]:
        """Copies idle past their TTL that the wish lets go: (model, nodes of one copy)."""
        now = time.time()
        out = []
        for spec in self.catalogue.models:
            if spec.id in self._jobs:
                continue
            want = wanted_replicas(spec) if spec.id not in self._holds else 0
            have = replicas(snap, spec.id)
            for node, m in snap.locations(spec.id):
                if have <= want:
                    break
                if m.state != "ready" or not m.serves_http or not node.healthy:
                    continue
                if m.load or snap.outstanding_on(node.name, spec.id):
                    continue
                exp = self.expires_at(snap, node, m)
                if exp is None or exp > now:
                    continue
                members: tuple[str, ...] = (node.name,)
                if m.group is not None and m.group.world_size > 1:
                    gid = m.group.group_id
                    members = tuple(
                        n.name
                        for n, mm in snap.locations(spec.id)
                        if mm.group is not None and mm.group.group_id == gid
                    )
                out.append((spec, members))
                have -= 1
        return out

    # -- why -------------------------------------------------------------------------------

    def why(self, spec: ModelSpec, snap: FleetSnapshot, facts: ModelFacts) -> str:
        """One line: why the model is (not) where its wish says."""
        now = self.clock()
        want = wanted_replicas(spec)
        have = replicas(snap, spec.id)
        job = self._jobs.get(spec.id)
        hold = self._holds.get(spec.id)
        f = self._failures.get(spec.id)
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
        job = self._jobs.get(spec.id)
        hold = self._holds.get(spec.id)
        f = self._failures.get(spec.id)
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
        tasks = [j.task for j in self._jobs.values() if j.task is not None]
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
