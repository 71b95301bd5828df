"""`cortex.core.life.plan` and the life's one-answer questions, as tables (no network)."""

from __future__ import annotations

import attrs
import pytest

from cortex.core.life import (
    EMPTY,
    BrokenGroup,
    Clocks,
    Effect,
    EnsureLoad,
    Failure,
    Hold,
    IdleUnload,
    JobState,
    ModelLife,
    Prefetch,
    RetireUnload,
    Teardown,
    loading,
    plan,
    unload_targets,
    where_now,
)
from cortex.core.state import FleetSnapshot, NodeModel, NodeState
from shared.catalogue import Catalogue, ModelSpec
from shared.wire import GroupSpec
from tests.cortex.test_router import node, rm, snap

KEPT = ModelSpec(id="kept", source="org/kept", keep_loaded=True)
PINNED = ModelSpec(id="pinned", source="org/pinned", pinned_on=("a",), idle_ttl_s=10.0)
ON_DEMAND = ModelSpec(id="od", source="org/od", idle_ttl_s=10.0)
DEFAULT = ModelSpec(id="dflt", source="org/dflt", default=True)
PREFETCH = ModelSpec(id="pf", source="org/pf", prefetch=True)
GROUPED = ModelSpec(id="g", source="org/g", min_nodes=2)
# Wall 1000 s, monotonic 500 s; cortex started at wall 0 (so an untouched copy is idle).
NOW = Clocks(wall=1000.0, mono=500.0, started_wall=0.0)
BACKING_OFF = ModelLife(failure=Failure("boom", False, 1, 900.0, until=501.0))
BACKED_OFF = ModelLife(failure=Failure("boom", False, 1, 900.0, until=499.0))
LOADING_JOB = ModelLife(job=JobState("load", ("a",), 990.0))


def rank(model_id: str, r: int, state: str = "ready", gid: str = "g1") -> NodeModel:
    group = GroupSpec(group_id=gid, rank=r, world_size=2, backend="ring", sharding="tensor")
    return attrs.evolve(rm(model_id, state), group=group)  # type: ignore[arg-type]


def unseen(name: str) -> NodeState:
    return node(name, seen=False)


ROWS: list[tuple[str, FleetSnapshot, tuple[ModelSpec, ...], dict[str, ModelLife], list[Effect]]] = [
    ("a node not heard from yet: nothing", snap(unseen("a")), (KEPT,), {}, []),
    ("keep_loaded, absent: load", snap(node("a")), (KEPT,), {}, [EnsureLoad(KEPT, 1, 0)]),
    ("keep_loaded, present: nothing", snap(node("a", rm("kept"))), (KEPT,), {}, []),
    (
        "keep_loaded, loading on a node: nothing",
        snap(node("a", rm("kept", "loading"))),
        (KEPT,),
        {},
        [],
    ),
    ("held: nothing", snap(node("a")), (KEPT,), {"kept": ModelLife(hold=Hold("x", 1.0))}, []),
    ("a job under way: nothing", snap(node("a")), (KEPT,), {"kept": LOADING_JOB}, []),
    ("backing off: nothing", snap(node("a")), (KEPT,), {"kept": BACKING_OFF}, []),
    (
        "backoff over: load",
        snap(node("a")),
        (KEPT,),
        {"kept": BACKED_OFF},
        [EnsureLoad(KEPT, 1, 0)],
    ),
    (
        "a default model: soft load",
        snap(node("a")),
        (DEFAULT,),
        {},
        [EnsureLoad(DEFAULT, 1, 0, True)],
    ),
    ("prefetch: stage", snap(node("a")), (PREFETCH,), {}, [Prefetch(PREFETCH)]),
    (
        "a copy idle past its TTL: unload",
        snap(node("a", rm("od"))),
        (ON_DEMAND,),
        {},
        [IdleUnload(ON_DEMAND, ("a",))],
    ),
    (
        "answered within its TTL: kept",
        snap(node("a", rm("od"))),
        (ON_DEMAND,),
        {"od": ModelLife(touched={"a": 995.0})},
        [],
    ),
    (
        "keep_alive 0 from the last answer: unload",
        snap(node("a", rm("od"))),
        (ON_DEMAND,),
        {"od": ModelLife(touched={"a": 999.0}, keep={"a": 0.0})},
        [IdleUnload(ON_DEMAND, ("a",))],
    ),
    ("work in flight: kept", snap(node("a", rm("od", in_flight=1))), (ON_DEMAND,), {}, []),
    ("pinned here: kept however idle", snap(node("a", rm("pinned"))), (PINNED,), {}, []),
    (
        "held and idle: let go",
        snap(node("a", rm("od"))),
        (ON_DEMAND,),
        {"od": ModelLife(hold=Hold("x", 1.0))},
        [IdleUnload(ON_DEMAND, ("a",))],
    ),
    (
        "a group with a failed rank: torn down",
        snap(node("a", rank("g", 0)), node("b", rank("g", 1, "failed"))),
        (),
        {},
        [Teardown(BrokenGroup("g1", "g", ("a", "b"), "rank 1 on b failed"))],
    ),
    (
        "a group whose rank left: torn down",
        snap(node("a", rank("g", 0)), node("b")),
        (),
        {},
        [
            Teardown(
                BrokenGroup("g1", "g", ("a",), "rank(s) [1] gone (a member restarted or unloaded)")
            )
        ],
    ),
    (
        "a group being loaded: left alone",
        snap(node("a", rank("g", 0)), node("b"), loading=("g",)),
        (),
        {},
        [],
    ),
    (
        "a broken group with a job under way: left to it",
        snap(node("a", rank("g", 0)), node("b", rank("g", 1, "failed"))),
        (),
        {"g": ModelLife(job=JobState("teardown", ("a", "b"), 1.0))},
        [],
    ),
    (
        "a pin moved off a node (a reload): load where it is pinned now",
        snap(node("a", rm("pinned")), node("b")),
        (attrs.evolve(PINNED, pinned_on=("b",)),),
        {},
        [EnsureLoad(attrs.evolve(PINNED, pinned_on=("b",)), 1, 0)],
    ),
    (
        "removed by a reload: idle copies unloaded, busy ones wait for their requests",
        snap(node("a", rm("gone")), node("b", rm("gone", in_flight=2))),
        (),
        {"gone": ModelLife(retired=True)},
        [RetireUnload("gone", ("a",))],
    ),
    (
        "removed by a reload, a job under way: nothing yet",
        snap(node("a", rm("gone"))),
        (),
        {"gone": ModelLife(retired=True, job=JobState("unload", ("a",), 990.0))},
        [],
    ),
]


@pytest.mark.parametrize(
    ("s", "specs", "lives", "effects"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS]
)
def test_plan(
    s: FleetSnapshot,
    specs: tuple[ModelSpec, ...],
    lives: dict[str, ModelLife],
    effects: list[Effect],
) -> None:
    """What one reconciler pass does, from the fleet and the lives alone."""
    assert plan(s, lives, Catalogue(models=specs), attrs.evolve(NOW, idle_ttl_s=None)) == effects


LOADING_ROWS = [
    ("a load cortex runs", snap(node("a"), loading=("m",)), True),
    ("a node loading it", snap(node("a", rm("m", "loading"))), True),
    ("a node warming it", snap(node("a", rm("m", "warming"))), True),
    ("recovering is not a load", snap(node("a", rm("m", "recovering"))), False),
    ("loading on an unhealthy node", snap(node("a", rm("m", "loading"), healthy=False)), False),
    ("ready", snap(node("a", rm("m"))), False),
    ("rank 1 of a group loading", snap(node("a", rank("m", 1, "loading"))), False),
]


@pytest.mark.parametrize(
    ("s", "answer"), [r[1:] for r in LOADING_ROWS], ids=[r[0] for r in LOADING_ROWS]
)
def test_loading_has_one_answer(s: FleetSnapshot, answer: bool) -> None:
    """'Is a load of this model under way', asked by /health and the doctor alike."""
    assert loading(s, "m") is answer


def test_where_now_tells_ready_from_on_its_way() -> None:
    """An admin load without a body answers ready or loading where the model already is."""
    assert where_now(snap(node("a", rm("m")), node("b", rm("m", "loading"))), "m") == (
        "ready",
        ["a"],
    )
    assert where_now(snap(node("b", rm("m", "recovering"))), "m") == ("loading", ["b"])
    assert where_now(snap(node("a", rm("m"), healthy=False)), "m") is None


def test_unload_targets_take_a_groups_other_ranks() -> None:
    """Unloading one member of a group takes every rank: one alone can never serve."""
    s = snap(node("a", rank("m", 0)), node("b", rank("m", 1)), node("c", rm("m")))
    assert unload_targets(s, "m", ["b"]) == ["b", "a"]
    assert unload_targets(s, "m", []) == ["a", "b", "c"]
    assert unload_targets(s, "m", ["c"]) == ["c"]
    assert ModelLife() == EMPTY
