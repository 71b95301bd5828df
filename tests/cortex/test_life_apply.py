"""`cortex.core.life.apply`: every event's transition, as a table (no network, no clock)."""

from __future__ import annotations

import attrs
import pytest

from cortex.core.life import (
    EMPTY,
    Accepted,
    Answered,
    Credit,
    Dropped,
    Failure,
    FailureForgotten,
    Held,
    Hold,
    JobState,
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
    Prefetched,
    Released,
    Settling,
    UnloadFinished,
    UnloadStarted,
    apply,
    describe,
)

LOADING = ModelLife(job=JobState("load", ("a",), 10.0, reserved={"a": 100}))
FAILED = ModelLife(failure=Failure("boom", False, 1, 5.0, 50.0))
HELD = ModelLife(hold=Hold("forced unload", 1.0))
SETTLING = ModelLife(settling={"a": Settling(100, 2, 99.0)})
CREDITED = ModelLife(credits={"a": Credit(64, 7.0)})
LOADING_AGAIN = attrs.evolve(LOADING, failure=FAILED.failure)

ROWS: list[tuple[str, ModelLife, LifeEvent, ModelLife]] = [
    ("held", EMPTY, Held("m", "forced unload", 1.0), HELD),
    ("released", HELD, Released("m"), EMPTY),
    ("released when not held", EMPTY, Released("m"), EMPTY),
    ("failure forgotten", FAILED, FailureForgotten("m"), EMPTY),
    (
        "load started: reserves, drops a settling promise and old keep_alive there",
        ModelLife(settling={"a": Settling(5, 1, 9.0)}, keep={"a": 0.0, "b": 3.0}),
        LoadStarted("m", ("a",), 10.0, {"a": 100}, "a request"),
        ModelLife(job=LOADING.job, keep={"b": 3.0}),
    ),
    (
        "ports taken",
        LOADING,
        PortsTaken("m", 47000),
        ModelLife(job=JobState("load", ("a",), 10.0, reserved={"a": 100}, ring_port=47000)),
    ),
    (
        "phase",
        LOADING,
        PhaseChanged("m", "posting"),
        ModelLife(job=JobState("load", ("a",), 10.0, phase="posting", reserved={"a": 100})),
    ),
    (
        "accepted: warming",
        LOADING,
        Accepted("m"),
        ModelLife(job=JobState("load", ("a",), 10.0, phase="warming", reserved={"a": 100})),
    ),
    ("phase without a job", EMPTY, PhaseChanged("m", "posting"), EMPTY),
    (
        "load succeeded: reservation settles, failure forgotten, idle clock starts",
        LOADING_AGAIN,
        LoadSucceeded("m", at=20.0, settle_until=30.0),
        ModelLife(settling={"a": Settling(100, 2, 30.0)}, touched={"a": 20.0}),
    ),
    (
        "first load failed: backoff of one unit",
        LOADING,
        LoadFailed("m", "boom", False, None, at=5.0, now=40.0, backoff_unit_s=5.0),
        ModelLife(failure=Failure("boom", False, 1, 5.0, 45.0)),
    ),
    (
        "second failure in a row: doubled",
        LOADING_AGAIN,
        LoadFailed("m", "boom", False, None, at=6.0, now=40.0, backoff_unit_s=5.0),
        ModelLife(failure=Failure("boom", False, 2, 6.0, 50.0)),
    ),
    (
        "needs an operator: six times longer",
        LOADING,
        LoadFailed("m", "no such dir", True, None, at=5.0, now=40.0, backoff_unit_s=5.0),
        ModelLife(failure=Failure("no such dir", True, 1, 5.0, 70.0)),
    ),
    ("load cancelled: reservation gone", LOADING, LoadCancelled("m"), EMPTY),
    (
        "unload started",
        EMPTY,
        UnloadStarted("m", "teardown", ("a", "b"), 3.0, "group broken"),
        ModelLife(job=JobState("teardown", ("a", "b"), 3.0, phase="posting", why="group broken")),
    ),
    (
        "unload finished: idle clocks of those nodes go",
        ModelLife(
            job=JobState("unload", ("a",), 3.0, phase="posting"),
            touched={"a": 1.0, "b": 2.0},
            keep={"a": 0.0},
        ),
        UnloadFinished("m", ("a",), {}),
        ModelLife(touched={"b": 2.0}),
    ),
    (
        "polled once: settling counts down",
        SETTLING,
        Polled("m", "a", 0.0),
        ModelLife(settling={"a": Settling(100, 1, 99.0)}),
    ),
    (
        "polled twice: settled",
        ModelLife(settling={"a": Settling(100, 1, 99.0)}),
        Polled("m", "a", 0.0),
        EMPTY,
    ),
    (
        "polled, not healthy: settling waits",
        SETTLING,
        Polled("m", "a", 0.0, settle=False),
        SETTLING,
    ),
    ("a poll from before the unload keeps the credit", CREDITED, Polled("m", "a", 6.0), CREDITED),
    ("a poll started after the unload ends it", CREDITED, Polled("m", "a", 7.0), EMPTY),
    ("another node's poll", CREDITED, Polled("m", "b", 9.0), CREDITED),
    (
        "answered with keep_alive",
        EMPTY,
        Answered("m", "a", 4.0, 0.0),
        ModelLife(touched={"a": 4.0}, keep={"a": 0.0}),
    ),
    ("answered", EMPTY, Answered("m", "a", 4.0, None), ModelLife(touched={"a": 4.0})),
    ("dropped: a credit", EMPTY, Dropped("m", "a", 64, 7.0), CREDITED),
    (
        "dropped again before a poll: credits add up",
        CREDITED,
        Dropped("m", "a", 36, 8.0),
        ModelLife(credits={"a": Credit(100, 8.0)}),
    ),
    ("dropped with no memory known", EMPTY, Dropped("m", "a", 0, 7.0), EMPTY),
    ("prefetched", EMPTY, Prefetched("m", "a", 2.0), ModelLife(prefetched={"a": 2.0})),
    ("noted: the log only", HELD, Noted("m", "evicted", "from a"), HELD),
]


@pytest.mark.parametrize(
    ("before", "event", "after"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS]
)
def test_apply(before: ModelLife, event: LifeEvent, after: ModelLife) -> None:
    """Each event changes the record exactly so, and nothing else."""
    assert apply(event, before) == after


JOURNAL: list[tuple[str, ModelLife, LifeEvent, list[tuple[str, str, str | None]]]] = [
    ("held", EMPTY, Held("m", "forced unload", 1.0), [("held", "forced unload", None)]),
    ("released", HELD, Released("m"), [("hold released", "forced unload", None)]),
    ("released, none held: silent", EMPTY, Released("m"), []),
    ("failure cleared", FAILED, FailureForgotten("m"), [("failure cleared", "boom", None)]),
    (
        "load started",
        EMPTY,
        LoadStarted("m", ("a", "b"), 1.0, {}, "wish"),
        [("load started", "on a, b (wish)", "a,b")],
    ),
    ("ready", LOADING, LoadSucceeded("m", 2.0, 3.0), [("ready", "on a", "a")]),
    (
        "load failed",
        LOADING,
        LoadFailed("m", "boom", False, None, 1.0, 1.0, 5.0),
        [("load failed", "boom; next try in 5 s", None)],
    ),
    ("phase: not logged", LOADING, PhaseChanged("m", "posting"), []),
    (
        "unload",
        EMPTY,
        UnloadStarted("m", "unload", ("a",), 1.0, "admin unload"),
        [("unload", "from a (admin unload)", "a")],
    ),
    (
        "unload half failed",
        EMPTY,
        UnloadFinished("m", ("a", "b"), {"b": "timeout"}),
        [("unloaded", "from a", "a"), ("unload failed", "b: timeout", None)],
    ),
    (
        "eviction started: said once done",
        EMPTY,
        UnloadStarted("m", "evict", ("a",), 1.0, "idle, to make room for n"),
        [],
    ),
    (
        "evicted",
        ModelLife(job=JobState("evict", ("a",), 1.0, why="idle, to make room for n")),
        UnloadFinished("m", ("a",), {}),
        [("evicted", "from a, idle, to make room for n", "a")],
    ),
]


@pytest.mark.parametrize(
    ("before", "event", "lines"), [r[1:] for r in JOURNAL], ids=[r[0] for r in JOURNAL]
)
def test_describe(
    before: ModelLife, event: LifeEvent, lines: list[tuple[str, str, str | None]]
) -> None:
    """Each transition's event-log lines keep the texts operators and tests know."""
    assert describe(event, before) == lines
