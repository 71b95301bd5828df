"""A runner's life as a table: the checked transitions, and the health record's verdicts.

No runner, no network: the supervisor is built with its real parts around a
store in a temporary directory and never started.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import get_args

import aiohttp
import pytest

from neuron.config import NeuronConfig, RunnerConfig
from neuron.metrics import NeuronMetrics
from neuron.runner.health import FailureKind, Pulse, RunnerHealth, answer_kind
from neuron.runner.states import TRANSITIONS, BadTransition, check_transition
from neuron.runner.supervisor import ModelSupervisor
from neuron.store.sources import Store
from neuron.store.staging import Stager
from shared.wire import MODEL_STATES, LoadRequest, ModelState

ALLOWED: list[tuple[ModelState, ModelState]] = [
    ("loading", "warming"),
    ("loading", "ready"),
    ("loading", "recovering"),
    ("loading", "failed"),
    ("loading", "unloading"),
    ("warming", "ready"),
    ("warming", "recovering"),
    ("warming", "failed"),
    ("warming", "unloading"),
    ("ready", "recovering"),
    ("ready", "failed"),
    ("ready", "unloading"),
    ("ready", "stalled"),
    ("stalled", "ready"),
    ("stalled", "recovering"),
    ("stalled", "failed"),
    ("stalled", "unloading"),
    ("recovering", "ready"),
    ("recovering", "failed"),
    ("recovering", "unloading"),
    ("failed", "unloading"),
]
STATES: tuple[ModelState, ...] = get_args(ModelState)
REFUSED = [(a, b) for a in STATES for b in STATES if (a, b) not in ALLOWED]


@pytest.fixture
async def model(tmp_path: Path) -> AsyncIterator[ModelSupervisor]:
    config = NeuronConfig(store_dir=str(tmp_path))
    store = Store(tmp_path)
    async with aiohttp.ClientSession() as session:
        yield ModelSupervisor.create(
            LoadRequest(model_id="m", source=str(tmp_path)),
            config,
            store,
            NeuronMetrics.create(),
            session,
            Stager(store=store, config=config),
        )
    store.close()


def test_table_names_every_wire_state() -> None:
    """The table has a row for every state the wire knows, and no other."""
    assert set(TRANSITIONS) == set(MODEL_STATES) == set(STATES)
    assert sorted((a, b) for a, tos in TRANSITIONS.items() for b in tos) == sorted(ALLOWED)


@pytest.mark.parametrize(("frm", "to"), ALLOWED)
async def test_every_allowed_transition(
    model: ModelSupervisor, frm: ModelState, to: ModelState
) -> None:
    """Each allowed change goes through; ready, failed and unloading are journalled."""
    model.state = frm  # a test's own setup: the supervisor never does this
    model._transition(to, "why")
    assert model.state == to
    events = [(e.kind, e.detail) for e in model.journal]
    expected = {"ready": "ready", "failed": "failed", "unloading": "stop"}.get(to)
    assert events == ([(expected, "why")] if expected else [])


@pytest.mark.parametrize(("frm", "to"), REFUSED)
async def test_refused_transition_raises(
    model: ModelSupervisor, frm: ModelState, to: ModelState
) -> None:
    """A change outside the table is a bug: raised, state and journal untouched."""
    model.state = frm
    with pytest.raises(BadTransition, match=f"{frm} -> {to}"):
        model._transition(to, "why")
    assert model.state == frm
    assert list(model.journal) == []


def test_check_transition_is_the_table() -> None:
    check_transition("loading", "warming")
    with pytest.raises(BadTransition):
        check_transition("unloading", "ready")


@pytest.mark.parametrize(
    ("status", "message", "kind"),
    [
        (500, "generation thread died", "thread_died"),
        (404, "Error: generation thread died", "thread_died"),
        (400, "bad roles", "refused"),
        (404, "template refused", "refused"),
        (500, "boom", "error_answer"),
        (503, "busy", "error_answer"),
        (422, "unprocessable", "error_answer"),
    ],
)
def test_answer_kind(status: int, message: str, kind: FailureKind) -> None:
    assert answer_kind(status, message) == kind


def _health(n: int = 3) -> RunnerHealth:
    return RunnerHealth.create(
        RunnerConfig(max_consecutive_errors=n, stall_timeout_s=3.0, group_stall_timeout_s=10.0)
    )


@pytest.mark.parametrize(
    ("reports", "verdicts"),
    [
        # (kind, alive) in order -> what each report says (None: not broken)
        ([("error_answer", True)] * 3, [None, None, "3 failed requests in a row; last: d2"]),
        ([("connection", True), ("cut_short", True), ("error_answer", True)], [None, None, "3"]),
        ([("refused", True)] * 5, [None] * 5),
        ([("connection", False)] * 5, [None] * 5),
        ([("thread_died", True)], ["d0"]),
        ([("error_answer", True), ("done", True), ("error_answer", True)], [None, None, None]),
        (
            [("error_answer", True)] * 2 + [("refused", True), ("error_answer", True)],
            [None] * 3 + ["3"],
        ),
    ],
)
def test_broken_is_decided_by_the_record(
    reports: list[tuple[str, bool]], verdicts: list[str | None]
) -> None:
    """Failures in a row break a runner; refusals and a dead runner's failures do not count."""
    h = _health()
    said: list[str | None] = []
    for i, (kind, alive) in enumerate(reports):
        if kind == "done":
            h.done()
            said.append(None)
            continue
        said.append(h.failed(kind, f"d{i}", alive=alive))  # type: ignore[arg-type]
    for got, want in zip(said, verdicts, strict=True):
        assert (got is None) == (want is None), (said, verdicts)
        if got is not None and want is not None:
            assert got.startswith(want), (got, want)


def test_first_broken_verdict_stands_and_renew_clears_it() -> None:
    h = _health(1)
    assert h.broke("one")
    assert not h.broke("two")
    assert h.broken == "one"
    h.failed("error_answer", "x")
    h.renew()
    assert h.broken is None and h.failures == 0


@pytest.mark.parametrize(
    ("silent_s", "in_flight", "hung"),
    [(5.0, 1, False), (11.0, 0, False), (11.0, 1, True), (30.0, 4, True)],
)
def test_group_hung_only_with_work_past_the_limit(
    silent_s: float, in_flight: int, hung: bool
) -> None:
    """A group's rank 0 is hung only when silent with work in flight past its limit."""
    h = _health()
    h.byte(100.0)
    got = h.hung_s(100.0 + silent_s, in_flight)
    assert (got is not None) == hung
    if got is not None:
        assert got == pytest.approx(silent_s)


@pytest.mark.parametrize(
    ("pulses", "verdicts"),
    [
        # (time, what the heartbeat saw) -> its verdict; stall_timeout_s is 3
        ([(0, "alive"), (1, "alive")], ["alive", "alive"]),
        (
            [(0, "stopped"), (1, "stopped"), (2.9, "stopped"), (3, "stopped")],
            ["stalled", "stalled", "stalled", "kill"],
        ),
        (
            [(0, "silent"), (2, "alive"), (3, "silent"), (5, "silent"), (6, "silent")],
            ["stalled", "revived", "stalled", "stalled", "kill"],
        ),
        ([(0, "silent"), (1, "stopped"), (3.5, "silent")], ["stalled", "stalled", "kill"]),
    ],
)
def test_heartbeat_stalls_at_once_and_kills_after_the_limit(
    pulses: list[tuple[float, Pulse]], verdicts: list[str]
) -> None:
    """One missed heartbeat stalls a runner; staying stalled for stall_timeout_s kills it."""
    h = _health()
    assert [h.beat(t, pulse) for t, pulse in pulses] == verdicts


def test_stall_reason_says_what_was_seen_and_renew_clears_it() -> None:
    h = _health()
    h.beat(10.0, "stopped")
    assert h.stall_reason(13.0) == "runner stalled: its process is stopped (3.0 s)"
    h.renew()
    assert h.stalled_since is None
    h.beat(20.0, "silent")
    assert "/health goes unanswered" in h.stall_reason(23.0)


def test_traffic_figures_follow_the_reports() -> None:
    """started, first_token, ended move the phase; an idle runner's clock restarts."""
    h = _health()
    h.byte(1.0)
    h.started(50.0)  # idle: the stall clock starts now
    assert (h.phase, h.last_byte_at) == ("prefill", 50.0)
    h.started(60.0)  # busy: a new request does not hide the silence
    assert h.last_byte_at == 50.0
    h.first_token(0.25)
    assert (h.prefilling, h.decoding, h.ttft_s) == (1, 1, 0.25)
    phases = [h.phase]
    h.ended(decoding=False)
    phases.append(h.phase)
    h.ended(decoding=True)
    phases.append(h.phase)
    assert phases == ["prefill", "decode", "idle"]
    h.tokens(7, None)
    h.tokens(3, 12.5)
    assert (h.completion_tokens, h.decode_tps) == (10, 12.5)
    h.used(123.0)
    assert h.last_used == 123.0
