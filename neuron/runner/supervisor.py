"""Runner supervision: one state machine per local model.

    loading -> warming -> ready -> (crash) recovering -> ready ...
                                \\-> failed  (too many crashes in the window,
                                             or any loss of a group rank)
    any -> unloading (then gone)

Every change of state goes through `ModelSupervisor._transition`, checked
against the table in neuron.runner.states.

A model is ready only after one real 1-token request has been answered (rank 0
of a group answers only once every rank has joined; other ranks serve no HTTP
and are ready once started).  A crash is noticed by the exit of the runner
process; streams in flight watch the same `exited` future, so they fail at
once, and the runner is restarted with exponential backoff
(shared.retry.RUNNER_RESTART_WAIT).  A rank of a multi-rank group is never
restarted: alone it can never rejoin its ring, so it goes to `failed` and
cortex tears the whole group down.  A heartbeat looks at every runner each
second, idle or busy: one whose process is stopped or whose /health goes
unanswered is `stalled` (not routable) at once and killed if it stays so
(`stall_timeout_s`); a group's rank 0 silent with work in flight is a hung
group, killed too.  A killed runner goes the same way as a crash.  So does a
broken runner: one alive but failing the requests it should serve
("generation thread died" in an answer or a 503 from its /health, or N failed
requests in a row).
What the proxy sees of the runner goes to its RunnerHealth record
(neuron.runner.health), which alone decides "broken", "stalled" and "hung".
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import attrs

from neuron.config import NeuronConfig
from neuron.metrics import NeuronMetrics
from neuron.runner import model_options
from neuron.runner.admission import Admission
from neuron.runner.embed_request import EmbedLimits
from neuron.runner.health import FailureKind, Pulse, RunnerHealth
from neuron.runner.model_options import LocalOptions
from neuron.runner.process import RunnerProcess
from neuron.runner.rdma_quirk import classify as classify_rdma
from neuron.runner.request_check import ModelInfo
from neuron.runner.states import ENDED, BadTransition, check_transition
from neuron.store.sources import Store, copy_name, is_local_source
from neuron.store.staging import PLAN_WAIT_S, StageJob, Stager
from shared.errors import InvalidRequest, ModelFailed, ModelLoading, ModelNotFound
from shared.journal import MB, Event, Journal
from shared.kinds import EMBEDDINGS_PATH, ModelKind
from shared.retry import RUNNER_RESTART_WAIT, backoff_s
from shared.runner_options import RunnerOptions
from shared.wire import GroupSpec, LoadRequest, ModelHealth, ModelState, ModelStatus

log = logging.getLogger(__name__)
T = TypeVar("T")

WARMUP_BODY = json.dumps({"model": "default_model", "prompt": "hi", "max_tokens": 1}).encode()
# An embedding runner's warmup: one real (tiny) batch through the encoder.
WARMUP_EMBED_BODY = json.dumps({"model": "default_model", "input": "hi"}).encode()
POLL_S = 0.2
# The journal's event for entering these states (the others have none).
_JOURNALLED: dict[ModelState, str] = {"ready": "ready", "failed": "failed", "unloading": "stop"}


class _RunnerLost(Exception):
    """The runner died or missed its deadline; worth a restart."""


class _GiveUp(Exception):
    """Too many crashes in the window, or a source that cannot be resolved."""


def describe(exc: BaseException) -> str:
    """`str(exc)`, or its repr when that is empty (a bare TimeoutError...)."""
    return str(exc) or repr(exc)


async def race_exit(
    aw: Awaitable[T], runner: RunnerProcess, lost: Callable[[str], Exception] = _RunnerLost
) -> T:
    """Await `aw`, unless the runner exits first (then `lost`, _RunnerLost by default)."""
    task: asyncio.Future[T] = asyncio.ensure_future(aw)
    watched: set[asyncio.Future[Any]] = {task, runner.exited}
    try:
        await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if task.cancelled() or not task.done():
        raise lost(f"runner exited with code {runner.exited.result()}")
    return task.result()


@attrs.define(eq=False)
class ModelSupervisor:
    model_id: str
    source: str
    group: GroupSpec | None
    warmup_deadline_s: float
    config: NeuronConfig
    store: Store
    metrics: NeuronMetrics
    session: aiohttp.ClientSession
    admission: Admission
    stager: Stager
    peers: tuple[str, ...] = ()
    # Which runner serves it: mlx_lm.server (chat) or the embedding runner.
    kind: ModelKind = "chat"
    # An embedding model's bounds (dimensions, vocabulary, tokens per input), read
    # with its files; None for a chat model.
    embed_limits: EmbedLimits | None = None
    # The catalogue's runner options (draft, adapters, template, max_tokens, flags),
    # and the same with their files found here once the model's directory is known.
    options: RunnerOptions = attrs.Factory(RunnerOptions)
    local_options: LocalOptions | None = None
    # The stage this load waits for (a hub source), while it is under way.
    stage: StageJob | None = None
    # What the proxy saw of the runner; it alone decides "broken" and "stalled".
    runner_health: RunnerHealth = attrs.Factory(
        lambda self: RunnerHealth.create(self.config.runner), takes_self=True
    )
    # Changed only by `_transition`.
    state: ModelState = "loading"
    error: str | None = None
    runner: RunnerProcess | None = None
    model_dir: Path | None = None
    load_seconds: float | None = None
    context_limit: int | None = None
    # Context, vocabulary and tokenizer, read once the model directory is known.
    info: ModelInfo = attrs.Factory(ModelInfo)
    # time.monotonic() of turning failed: the record is dropped some time later.
    failed_at: float | None = None
    # Wall time of the last runner restart (doctor warns of recent ones).
    restarted_at: float | None = None
    # Wall clock (s) this load began: OpenAI's `created` for the model.
    created: int = attrs.Factory(lambda: int(time.time()))
    _starts: int = 0
    _crashes: collections.deque[float] = attrs.Factory(collections.deque)
    _task: asyncio.Task[None] | None = None
    _stop_task: asyncio.Task[None] | None = None
    # The node's event log (GET /events): this model's runner starts, crashes, stops.
    journal: Journal[Event] = attrs.Factory(Journal[Event])

    @classmethod
    def create(
        cls,
        req: LoadRequest,
        config: NeuronConfig,
        store: Store,
        metrics: NeuronMetrics,
        session: aiohttp.ClientSession,
        stager: Stager,
        journal: Journal[Event] | None = None,
    ) -> ModelSupervisor:
        a = config.admission
        return cls(
            model_id=req.model_id,
            source=req.source,
            group=req.group,
            warmup_deadline_s=req.warmup_deadline_s or _default_deadline(req, config),
            config=config,
            store=store,
            metrics=metrics,
            session=session,
            admission=Admission(a.max_in_flight, a.max_queue, a.queue_timeout_s),
            context_limit=req.context_limit,
            stager=stager,
            peers=req.peers,
            kind=req.kind,
            options=req.options,
            journal=journal if journal is not None else Journal[Event](),
        )

    # --- views ------------------------------------------------------------

    @property
    def is_rank0(self) -> bool:
        return self.group is None or self.group.rank == 0

    @property
    def in_group(self) -> bool:
        """One rank of a multi-rank group (never restarted alone)."""
        return self.group is not None and self.group.world_size > 1

    def status(self) -> ModelStatus:
        return ModelStatus(
            model_id=self.model_id,
            state=self.state,
            source=self.source,
            group=self.group,
            port=self.runner.port if self.runner is not None and self.runner.alive else None,
            memory_bytes=self._memory_bytes(),
            last_used=self.runner_health.last_used,
            error=self.error,
            staging=None if self.stage is None or not self.stage.active else self.stage.to_json(),
            restarts=max(0, self._starts - 1),
            restarted_at=self.restarted_at,
            kind=self.kind,
            **self._admission_figures(),
        )

    def _admission_figures(self) -> dict[str, Any]:
        a = self.admission
        return {
            "max_in_flight": a.max_in_flight,
            "queue_max": a.max_queue,
            "queue_wait_p50_s": a.wait_p50_s,
        }

    def health(self) -> ModelHealth:
        seen = self.runner_health
        return ModelHealth(
            model_id=self.model_id,
            state=self.state,
            in_flight=self.admission.in_flight,
            queue_depth=self.admission.queue_depth,
            phase=seen.phase,
            decode_tps=seen.decode_tps,
            ttft_s=seen.ttft_s,
            last_used=seen.last_used,
            completion_tokens=seen.completion_tokens,
            **self._admission_figures(),
        )

    def serving_runner(self) -> RunnerProcess:
        """The runner that takes this model's requests now; else why none does (typed)."""
        if self.state == "failed":
            raise ModelFailed(f"model {self.model_id!r} failed: {self.error}")
        if self.state == "unloading":
            raise ModelLoading(f"model {self.model_id!r} is unloading")
        if self.state == "stalled":
            raise ModelLoading(f"model {self.model_id!r}: its runner is stalled; retry shortly")
        if self.state != "ready" or self.runner is None or not self.runner.alive:
            raise ModelLoading(f"model {self.model_id!r} is {self.state}")
        if not self.is_rank0:
            raise InvalidRequest(f"model {self.model_id!r}: this node is not rank 0 of its group")
        return self.runner

    def _memory_bytes(self) -> int:
        # Resident set of the runner (Linux); the weights' size elsewhere.
        r = self.runner
        if r is not None and r.alive:
            try:
                for line in Path(f"/proc/{r.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
            except (OSError, ValueError, IndexError):
                pass
        if self.model_dir is not None:
            return sum(f.stat().st_size for f in self.model_dir.glob("*.safetensors"))
        return 0

    # --- lifecycle --------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"supervise {self.model_id}")

    async def _run(self) -> None:
        try:
            if is_local_source(self.source):
                self.model_dir = self.store.local_model_dir(self.source)  # used in place
            else:
                # Every load of a hub source stages first (from peers, else the hub).
                self.stage = self.stager.stage(self.model_id, self.source, self.peers)
                self.model_dir = await self.stager.wait(self.stage)
            self.store.touch(self.model_dir)
            # A draft's tokenizer is checked against the model's: files, off the loop.
            self.local_options = await asyncio.to_thread(
                model_options.resolve, self.store, self.options, self.model_dir
            )
            # A tokenizer takes a moment to read: off the event loop.
            self.info = await asyncio.to_thread(
                ModelInfo.load, self.model_dir, self.context_limit, self.options
            )
            if self.kind == "embedding":
                self.embed_limits = await asyncio.to_thread(
                    EmbedLimits.load, self.model_dir, self.context_limit
                )
            while True:
                try:
                    await self._run_once()
                except _RunnerLost:
                    # Back off by the crashes still inside the window, so a runner
                    # that ran well for a long time restarts at once after a crash.
                    await asyncio.sleep(backoff_s(RUNNER_RESTART_WAIT, len(self._crashes)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # _GiveUp, a failed download, anything unforeseen
            log.warning("model %s failed: %s", self.model_id, describe(exc))
            if self.runner is not None:
                self.runner.kill_now()  # a failed model keeps no runner
            self.error = describe(exc)
            self.failed_at = time.monotonic()
            self._transition("failed", self.error)

    async def _run_once(self) -> None:
        # In `loading` (the first start) or `recovering` (set by `_crashed`).
        if self._starts:
            self.restarted_at = time.time()
        self._starts += 1
        assert self.model_dir is not None
        t0 = time.monotonic()
        runner = await RunnerProcess.start(
            self.config.runner,
            model_id=self.model_id,
            model_dir=self.model_dir,
            log_dir=self.store.logs_dir,
            group=self.group,
            kind=self.kind,
            context_limit=self.context_limit,
            options=self.local_options,
            # The journals' floor holds for runner logs too (one setting for the disk).
            log_min_free_bytes=int(self.config.journal_min_free_mb * MB),
        )
        self.runner = runner
        # Names and values the neuron set beyond its own environment (group, catalogue
        # `env`, plumbing), never the whole of it: "which settings did this run with".
        env = runner.env_shown()
        self.event("runner start", f"pid {runner.pid} port {runner.port} ({self.state}) env {env}")
        try:
            async with asyncio.timeout(self.warmup_deadline_s):
                await self._bring_up(runner)
        except TimeoutError:
            await runner.stop(0.5)
            self._crashed(runner, f"runner not ready within {self.warmup_deadline_s:g} s")
        except _RunnerLost as exc:
            self._crashed(runner, str(exc))
        self.load_seconds = time.monotonic() - t0
        self.metrics.load_seconds.labels(self.model_id).observe(self.load_seconds)
        # After a restart, why it happened stays readable in /models (its first line).
        last = (self.error or "").split("\n", 1)[0].removeprefix("recovered from: ")
        self.error = f"recovered from: {last}" if self._starts > 1 and last else None
        log.info(
            "model %s ready in %.2f s on port %d", self.model_id, self.load_seconds, runner.port
        )
        ready = f"in {self.load_seconds:.2f} s, pid {runner.pid} port {runner.port}"
        self._transition("ready", ready)
        self._crashed(runner, await self._watch(runner))

    async def _watch(self, runner: RunnerProcess) -> str:
        """Wait for the runner to exit, killing it if it stalls, hangs or breaks; the reason.

        Every heartbeat, idle or busy: a runner that misses one is `stalled` (not
        routable) at once, ready again if it answers, killed if it stays stalled.
        """
        every = self.config.runner.health_check_interval_s
        while True:
            await asyncio.wait({runner.exited}, timeout=every)
            if runner.exited.done():
                if self.runner_health.broken is not None:
                    return f"runner broken: {self.runner_health.broken}"
                return f"runner exited with code {runner.exited.result()}"
            reason = await self._heartbeat(runner)
            if reason is not None:
                # Killing it ends the streams in flight (they watch `exited`).
                log.warning("model %s: %s; killing it", self.model_id, reason)
                runner.kill_now()
                await asyncio.shield(runner.exited)
                return reason

    async def _heartbeat(self, runner: RunnerProcess) -> str | None:
        """One heartbeat: stall or revive the model; the reason to kill its runner, if any."""
        seen = self.runner_health
        g = self.group
        if g is not None and self.in_group and self.is_rank0:
            hung = seen.hung_s(time.monotonic(), self.admission.in_flight)
            if hung is not None:
                return (
                    f"group {g.group_id} hung: no token from its rank 0 for {hung:.0f} s "
                    f"with {self.admission.in_flight} request(s) in flight"
                )
        pulse = await self._pulse(runner)
        verdict = seen.beat(time.monotonic(), pulse)
        if verdict == "kill":
            return seen.stall_reason(time.monotonic())
        if verdict == "stalled" and self.state == "ready":
            self._transition("stalled", seen.stall_reason(time.monotonic()))
            log.warning("model %s: runner stalled (%s); not routed to", self.model_id, pulse)
        elif verdict == "revived" and self.state == "stalled":
            self._transition("ready", "its runner answers again")
        return None

    async def _pulse(self, runner: RunnerProcess) -> Pulse:
        """What one heartbeat sees of the runner: stopped, silent, or alive."""
        if runner.stopped():
            return "stopped"
        if not self.is_rank0:
            return "alive"  # no HTTP: its process state is all there is to see
        within_s = self.config.runner.health_probe_timeout_s
        started = time.monotonic()
        try:
            answered = await race_exit(self._answers(runner, within_s), runner)
        except _RunnerLost:  # it exited (the watch sees it), or /health answered 503
            if runner.alive:
                dead = "its /health reports the generation thread dead"
                self.runner_failed(runner, "thread_died", dead)
            return "alive"
        # A timeout that fired long after it was due: this neuron itself was not running
        # (paused, a VM suspended, swapping), so the silence says nothing of the runner.
        late = time.monotonic() - started > within_s + 1.0
        return "alive" if answered or late else "silent"

    # --- what the proxy saw of the runner's answers ---------------------------

    def runner_failed(self, runner: RunnerProcess, kind: FailureKind, detail: str) -> bool:
        """A failed request, told to the health record; True when it makes the runner broken."""
        if self.runner is not runner:
            return False  # news of a runner already replaced
        reason = self.runner_health.failed(kind, detail, alive=runner.alive)
        if reason is None:
            return False
        self._break(runner, reason)
        return True

    def runner_answered(self, runner: RunnerProcess) -> None:
        if self.runner is runner:
            self.runner_health.done()

    def _break(self, runner: RunnerProcess, reason: str) -> None:
        """The runner can serve no more: kill it, and `_watch` restarts it like a crash."""
        if not runner.alive or not self.runner_health.broke(reason):
            return
        log.warning("model %s: runner broken (%s); restarting it", self.model_id, reason)
        # Not ready from this moment: new requests wait for the replacement.
        if self.state in ("ready", "stalled"):
            self.error = f"runner broken: {reason}"
            self._transition("recovering", self.error)
        runner.kill_now()

    async def _bring_up(self, runner: RunnerProcess) -> None:
        if not self.is_rank0:
            # Only rank 0 serves HTTP; the other ranks are ready once they run.
            return
        while not await race_exit(self._answers(runner), runner):
            await race_exit(asyncio.sleep(POLL_S), runner)
        if self.state == "loading":
            self._transition("warming", "answers /health; warmup request next")
        while True:
            status, text = await race_exit(self._warmup(runner), runner)
            if status == 200:
                return
            if status >= 500 or status == 404:
                raise _RunnerLost(f"warmup request answered {status}: {text[:500]}")
            await race_exit(asyncio.sleep(POLL_S), runner)

    async def _answers(self, runner: RunnerProcess, within_s: float = 2.0) -> bool:
        try:
            async with self.session.get(
                runner.base_url + "/health", timeout=aiohttp.ClientTimeout(total=within_s)
            ) as r:
                await r.read()
                # 503: the runner's generation thread died (bad weights...).
                if r.status == 503:
                    raise _RunnerLost("runner reports its generation thread dead")
                return True
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _warmup(self, runner: RunnerProcess) -> tuple[int, str]:
        # A runner dying mid-request breaks the connection before its exit is
        # noticed: that is a lost runner (restarted), not a failed model.
        path, body = (
            (EMBEDDINGS_PATH, WARMUP_EMBED_BODY)
            if self.kind == "embedding"
            else ("/v1/completions", WARMUP_BODY)
        )
        try:
            async with self.session.post(
                runner.base_url + path, data=body, headers={"Content-Type": "application/json"}
            ) as r:
                return r.status, await r.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _RunnerLost(f"warmup request failed: {describe(exc)}") from exc

    def _crashed(self, runner: RunnerProcess, reason: str) -> None:
        """Account for a lost runner; raise _GiveUp or _RunnerLost."""
        runner.kill_now()
        self.runner_health.renew()
        self.metrics.runner_crashes.labels(self.model_id).inc()
        now = time.monotonic()
        self._crashes.append(now)
        window = self.config.restart.crash_window_s
        while self._crashes and now - self._crashes[0] > window:
            self._crashes.popleft()
        g = self.group
        if g is not None and g.world_size > 1:
            reason = (
                f"rank {g.rank} of group {g.group_id} (world size {g.world_size}) lost, "
                f"not restarted alone: {reason}"
            )
        tail = runner.tail()
        if g is not None and (advice := classify_rdma(g.backend, g.rank, tail)):
            reason = f"{advice}; {reason}"
        self.error = f"{reason}; runner output tail:\n{tail}" if tail else reason
        log.warning("model %s: %s", self.model_id, reason)
        self.event("crash", self.error)
        if self.in_group:
            raise _GiveUp(self.error)
        if len(self._crashes) >= self.config.restart.max_crashes:
            raise _GiveUp(
                f"{len(self._crashes)} runner failures within {window:g} s; last: {self.error}"
            )
        if self.state != "recovering":  # already, if it broke while ready
            self._transition("recovering", reason)
        raise _RunnerLost(reason)

    def _transition(self, to: ModelState, why: str) -> None:
        """The one place a model's state changes: checked against the table, journalled."""
        try:
            check_transition(self.state, to)
        except BadTransition:
            log.error("model %s: bug: %s -> %s refused (%s)", self.model_id, self.state, to, why)
            raise
        log.debug("model %s: %s -> %s (%s)", self.model_id, self.state, to, why)
        self.state = to
        kind = _JOURNALLED.get(to)
        if kind is not None:
            self.event(kind, why)

    def event(self, kind: str, detail: str = "") -> None:
        self.journal.append(
            Event(kind=kind, model=self.model_id, node=self.config.node_name, detail=detail)
        )

    def stop(self) -> asyncio.Task[None]:
        """Unload: stop supervising, SIGTERM then SIGKILL the runner (idempotent).

        One task shared by every caller: await it through `asyncio.shield`, so a
        caller that is cancelled (its client went away) does not cancel the stop.
        """
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._stop(), name=f"stop {self.model_id}")
        return self._stop_task

    async def _stop(self) -> None:
        self._transition("unloading", "" if self.runner is None else f"pid {self.runner.pid}")
        try:
            if self.stage is not None:
                # An unload of a model being staged cancels its stage (resumable later).
                self.stager.cancel_job(self.stage)
            if self._task is not None:
                self._task.cancel()
                await asyncio.wait({self._task})  # its outcome is not ours to raise
        finally:
            if self.runner is not None:
                try:
                    code = await self.runner.stop(self.config.runner.stop_grace_s)
                    self.event("stopped", f"pid {self.runner.pid} exited with code {code}")
                except BaseException:
                    self.runner.kill_now()  # interrupted: no grace left
                    raise


def _default_deadline(req: LoadRequest, config: NeuronConfig) -> float:
    if req.group is not None and req.group.world_size > 1:
        return config.runner.group_connect_deadline_s
    return config.runner.warmup_deadline_s


@attrs.define
class Supervisor:
    """Every local model of this neuron."""

    config: NeuronConfig
    store: Store
    metrics: NeuronMetrics
    stager: Stager
    models: dict[str, ModelSupervisor] = attrs.Factory(dict)
    # Prompts are tokenized here, two at a time: never in the default pool that
    # /health and /discovery use, and never more than two cores next to the runners.
    tokenizing: concurrent.futures.ThreadPoolExecutor = attrs.Factory(
        lambda: concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="tokenize")
    )
    _session: aiohttp.ClientSession | None = None
    _lock: asyncio.Lock = attrs.Factory(asyncio.Lock)
    # Loads of jaccl-group ranks since this neuron started (the reload budget).
    jaccl_loads: int = 0
    journal: Journal[Event] = attrs.Factory(Journal[Event])

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Supervisor.open() first"
        return self._session

    async def open(self) -> None:
        self.store.ensure()
        await self.stager.open()
        # No total timeout: streams may run long; the proxy times idle reads itself.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            auto_decompress=False,
        )

    async def close(self) -> None:
        await self.stop_all()
        if self._session is not None:
            await self._session.close()
        await self.stager.close()
        self.store.close()
        self.tokenizing.shutdown(wait=False, cancel_futures=True)

    async def load(self, req: LoadRequest, *, refuse_floor: bool = False) -> ModelSupervisor:
        """Start loading `req`, or return the model already loading/loaded (one load).

        With `refuse_floor` (POST /models/load), a hub source with no copy here
        starts its stage first and a floor refusal of it is raised (507) at once.
        """
        # 400 now (outside the roots, not a model), rather than a failed load later.
        self.store.check_source(req.source)
        if refuse_floor:
            await self._refuse_if_floor(req)
        async with self._lock:
            current = self.models.get(req.model_id)
            if current is not None and current.state not in ENDED:
                return current
            if current is not None:
                await asyncio.shield(current.stop())
            m = ModelSupervisor.create(
                req, self.config, self.store, self.metrics, self.session, self.stager, self.journal
            )
            self.models[req.model_id] = m
            if req.group is not None and req.group.backend == "jaccl":
                self.jaccl_loads += 1
            self.metrics.model_added(m.model_id)
            m.start()
            self._prune_failed()
            return m

    async def _refuse_if_floor(self, req: LoadRequest) -> None:
        """Start the stage a hub load needs and raise its floor refusal (507) if it has one."""
        if is_local_source(req.source) or self.store.has_copy(copy_name(req.source)):
            return
        current = self.models.get(req.model_id)
        if current is not None and current.state not in ENDED:
            return  # this load joins the one under way
        job = self.stager.stage(req.model_id, req.source, req.peers)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PLAN_WAIT_S):
                await job.planned.wait()
        if job.refusal is not None:
            raise job.refusal

    def get(self, model_id: str) -> ModelSupervisor | None:
        return self.models.get(model_id)

    async def unload(self, model_id: str) -> ModelSupervisor:
        m = self.models.get(model_id)
        if m is None:
            raise ModelNotFound(f"model {model_id!r} is not loaded on this node", param="model_id")
        stopping = m.stop()
        # Forgotten once stopped, even if this caller is cancelled meanwhile.
        stopping.add_done_callback(lambda _: self._forget(m))
        await asyncio.shield(stopping)
        return m

    def _forget(self, m: ModelSupervisor) -> None:
        if self.models.get(m.model_id) is m:
            del self.models[m.model_id]
        # A runner stopped: its copy may now be beyond the budget.
        self.stager.evict_soon(self.protected_copies(), self.in_use_dirs())

    async def stop_all(self) -> None:
        models = list(self.models.values())
        await asyncio.gather(*(asyncio.shield(m.stop()) for m in models), return_exceptions=True)
        self.models.clear()

    def in_use_dirs(self) -> list[Path]:
        return [m.model_dir for m in self.models.values() if m.model_dir is not None]

    def protected_copies(self) -> set[str]:
        """Copy names no purge may touch: those of every model here (staging or loaded)."""
        return {
            copy_name(m.source)
            for m in self.models.values()
            if m.state != "failed" and not is_local_source(m.source)
        }

    def _prune_failed(self) -> None:
        """Failed records stay a while for operators to read, but never pile up."""
        now = time.monotonic()
        ttl = self.config.failed_record_ttl_s
        failed = sorted(
            (m for m in self.models.values() if m.state == "failed" and m.failed_at is not None),
            key=lambda m: m.failed_at or 0.0,
            reverse=True,
        )
        for i, m in enumerate(failed):
            if i >= self.config.max_failed_records or now - (m.failed_at or now) > ttl:
                del self.models[m.model_id]
                self.metrics.model_removed(m.model_id)

    def health(self) -> list[ModelHealth]:
        self._prune_failed()
        return [m.health() for m in self.models.values()]

    def statuses(self) -> list[ModelStatus]:
        self._prune_failed()
        return [m.status() for m in self.models.values()]
