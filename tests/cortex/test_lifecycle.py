"""A model's life in cortex (cortex.run.lifecycle) against fake neurons: failure memory,
waits instead of errors, idle TTL and keep_alive, admin verbs that say what they did."""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from pathlib import Path
from typing import Any, Literal

import pytest

from cortex.cli import main as cli
from cortex.config import catalogue_problems
from cortex.run import lifecycle
from cortex.run.lifecycle import LIFECYCLE, RingPorts, parse_keep_alive
from cortex.run.poller import POLLER
from cortex.run.reconciler import RECONCILER
from shared.catalogue import GIB, ModelSpec
from shared.errors import InvalidRequest
from shared.wire import GroupSpec
from tests.cortex.fakes import catalogue, fleet, gateway, stop_all
from tests.support.clients import CHAT, chat
from tests.support.clock import SkewedTime
from tests.support.waiting import until

MISSING = (400, "invalid_model_path", "model path '/nowhere/broken' does not exist")


async def _error(resp: Any) -> tuple[int, str, str | None, str]:
    body = await resp.json()
    err = body["error"]
    return resp.status, err["code"], resp.headers.get("Retry-After"), err["message"]


# -- failure memory ---------------------------------------------------------------------


async def test_missing_source_is_one_load_per_backoff_window() -> None:
    """However many requests arrive, one load per backoff window; Retry-After counts down,
    the reason is said once, and /v1/models and /admin/state say it needs an operator."""
    (n1,) = await fleet("n1")
    n1.load_error = MISSING
    # An operator-kind failure waits 6 x load_backoff_s = 30 s the first time, on the
    # lifecycle's clock, which the test moves forward (a real window short enough to
    # wait out could end while the 20 requests were still being answered).
    skew = [0.0]
    async with gateway([n1], load_backoff_s=5.0, load_wait_s=5.0) as client:
        assert client.app is not None
        client.app[LIFECYCLE].clock = lambda: time.monotonic() + skew[0]
        resps = await asyncio.gather(*(client.post(CHAT, json=chat()) for _ in range(20)))
        answers = [await _error(r) for r in resps]
        assert {a[:2] for a in answers} == {(503, "cold_load_failed")}
        assert n1.calls["load"] == 1
        first = min(int(a[2] or 0) for a in answers)
        message = answers[0][3]
        assert message.count("failed") == 1 and "does not exist" in message
        assert "needs an operator" in message
        skew[0] += 10.0
        later = await _error(await client.post(CHAT, json=chat()))
        assert later[1] == "cold_load_failed" and int(later[2] or 0) < first
        assert n1.calls["load"] == 1

        models = (await (await client.get("/v1/models")).json())["data"]
        [m1] = [m for m in models if m["id"] == "m1"]
        assert m1["last_failure"]["needs_operator"] is True
        state = (await (await client.get("/admin/state")).json())["models"]
        [s1] = [m for m in state if m["id"] == "m1"]
        assert s1["why"].startswith("backing off after failure (needs an operator)")
        assert "next try in" in s1["why"]

        async def second_load() -> bool:
            await client.post(CHAT, json=chat())
            return n1.calls["load"] == 2

        skew[0] += 21.0
        await until(second_load)  # the window ended: exactly one more load
        assert n1.calls["load"] == 2
    await stop_all([n1])


async def test_transient_failure_does_not_ask_for_an_operator() -> None:
    """A neuron's 500 (may clear by itself): 503 with Retry-After, no operator hint."""
    (n1,) = await fleet("n1")
    n1.load_error = (500, "internal_error", "disk full")
    async with gateway([n1], load_wait_s=5.0) as client:
        status, code, retry, message = await _error(await client.post(CHAT, json=chat()))
        assert (status, code, retry) == (503, "cold_load_failed", "5")
        assert "operator" not in message and "disk full" in message
    await stop_all([n1])


# -- waits instead of errors --------------------------------------------------------------


async def test_burst_of_50_for_a_cold_model_makes_one_load_and_50_answers() -> None:
    """50 requests for a cold model wait for the one load and are all answered."""
    (n1,) = await fleet("n1")
    n1.load_gate = asyncio.Event()
    async with gateway([n1], load_wait_s=30.0) as client:
        assert client.app is not None
        life = client.app[LIFECYCLE]
        sent = [asyncio.ensure_future(client.post(CHAT, json=chat())) for _ in range(50)]

        async def all_waiting() -> bool:
            return life.waiting("m1") == 50

        await until(all_waiting)
        n1.load_gate.set()
        resps = await asyncio.gather(*sent)
        assert [r.status for r in resps] == [200] * 50
        assert n1.calls["load"] == 1 and life.waiting("m1") == 0
    await stop_all([n1])


async def test_waiting_is_bounded_and_a_client_that_leaves_frees_its_place() -> None:
    """Beyond max_waiting a request is told 503 at once; one that gives up stops waiting."""
    (n1,) = await fleet("n1")
    n1.load_gate = asyncio.Event()
    async with gateway([n1], load_wait_s=30.0, max_waiting=3) as client:
        assert client.app is not None
        life = client.app[LIFECYCLE]
        sent = [asyncio.ensure_future(client.post(CHAT, json=chat())) for _ in range(3)]

        async def three() -> bool:
            return life.waiting("m1") == 3

        await until(three)
        over = await _error(await client.post(CHAT, json=chat()))
        assert over[:3] == (503, "model_loading", "2") and "already wait" in over[3]
        for f in sent:
            f.cancel()
        await asyncio.gather(*sent, return_exceptions=True)

        async def freed() -> bool:
            return life.waiting("m1") == 0

        await until(freed)
        assert n1.calls["load"] == 1
        n1.load_gate.set()
    await stop_all([n1])


async def test_wait_past_load_wait_s_is_model_loading_with_the_phase() -> None:
    """A load longer than load_wait_s: 503 model_loading naming the node and phase."""
    (n1,) = await fleet("n1")
    n1.load_gate = asyncio.Event()
    async with gateway([n1], load_wait_s=0.1) as client:
        status, code, retry, message = await _error(await client.post(CHAT, json=chat()))
        assert (status, code, retry) == (503, "model_loading", "2")
        assert "n1" in message and "phase: warming" in message
        n1.load_gate.set()
    await stop_all([n1])


# -- reservations tied to the job -----------------------------------------------------------

# need = 5 GiB x 1.3 + 0.25 GiB = 6.75 GiB each: only one fits in 10 GiB.
TWO = (
    ModelSpec(id="a", source="org/a", memory_gb=5.0),
    ModelSpec(id="b", source="org/b", memory_gb=5.0),
)


async def test_neuron_restarted_during_a_load_double_books_nothing() -> None:
    """A restart seen by a poll while cortex still posts a load keeps the job's memory
    promised: a second model that would not fit beside it is not loaded there."""
    (n1,) = await fleet("n1")
    n1.memory_available_bytes = 10 * GIB
    n1.load_post_gate = asyncio.Event()
    async with gateway([n1], catalogue(*TWO), load_wait_s=0.1) as client:
        assert client.app is not None
        first = await _error(await client.post(CHAT, json=chat("a")))
        assert first[1] == "model_loading"
        n1.started_at += 1  # a new process, as /health tells it
        await client.app[POLLER].poll_once()
        node = client.app[LIFECYCLE].snapshot().node("n1")
        assert node is not None and node.reserved_bytes >= int(6.5 * GIB)
        second = await _error(await client.post(CHAT, json=chat("b")))
        assert second[:2] == (503, "cold_load_failed") and "no room" in second[3]
        assert [r["model_id"] for r in n1.load_requests] == ["a"]
        n1.load_post_gate.set()
    await stop_all([n1])


async def test_reservation_ends_with_the_job_even_if_the_model_vanishes() -> None:
    """A finished load's memory counts as the node's own after two polls, whatever they
    report (the model may be gone already): nothing stays reserved."""
    (n1,) = await fleet("n1")
    n1.memory_available_bytes = 10 * GIB
    async with gateway([n1], catalogue(*TWO), load_wait_s=30.0) as client:
        assert client.app is not None
        assert (await client.post(CHAT, json=chat("a"))).status == 200
        n1.models.clear()  # gone some other way (an operator on the node)
        for _ in range(2):
            await client.app[POLLER].poll_once()
        node = client.app[LIFECYCLE].snapshot().node("n1")
        assert node is not None and node.reserved_bytes == 0
        assert (await client.post(CHAT, json=chat("b"))).status == 200
    await stop_all([n1])


BIG = ModelSpec(
    id="big",
    source="org/big",
    memory_gb=60.0,
    kv_gb=0.5,
    min_nodes=2,
    backend="ring",
    heads=4,
    kv_heads=2,
    layers=8,
)


async def test_member_failing_mid_group_load_leaves_nothing_behind() -> None:
    """One member refuses: the other's post is cancelled or undone, no rank stays loaded
    on any member, no memory stays reserved, and nothing is written after the job."""
    n1, n2 = await fleet("n1", "n2", hostname="box.local")
    n1.load_post_gate = asyncio.Event()  # n1's answer is still in flight when n2 fails
    n2.load_error = (500, "internal_error", "runner could not start")
    async with gateway([n1, n2], catalogue(BIG), load_wait_s=5.0) as client:
        assert client.app is not None
        life = client.app[LIFECYCLE]
        status, code, _, message = await _error(await client.post(CHAT, json=chat("big")))
        assert (status, code) == (503, "cold_load_failed") and "could not start" in message
        assert life.job("big") is None
        n1.load_post_gate.set()

        async def undone() -> bool:  # n1's answer came, and its rank was unloaded again
            return "big" in n1.unload_requests and "big" not in n1.models

        await until(undone, timeout=120, what="the load undone")
        await client.app[POLLER].poll_once()
        snap = life.snapshot()
        assert snap.locations("big") == ()
        assert all(n.reserved_bytes <= 0 for n in snap.nodes)
        assert "big" in n1.unload_requests and "big" in n2.unload_requests
        assert "big" not in n1.models and "big" not in n2.models
    await stop_all([n1, n2])


def test_ring_ports_never_overlap_a_live_group() -> None:
    """Blocks for groups of different sizes never overlap each other or live groups' ports."""
    ports = RingPorts(base=47000, span=40)
    a = ports.allocate(2, live=())
    b = ports.allocate(3, live=())
    c = ports.allocate(4, live=range(b + 3, b + 10))
    blocks = [set(range(a, a + 2)), set(range(b, b + 3)), set(range(c, c + 4))]
    assert not (blocks[0] & blocks[1]) and not (blocks[1] & blocks[2])
    assert not (blocks[0] & blocks[2]) and not blocks[2] & set(range(b + 3, b + 10))
    assert all(47000 <= p < 47040 for blk in blocks for p in blk)
    # Round the span again and again: the blocks still held are always skipped.
    ports.free(a)
    again = []
    for _ in range(30):
        again.append(ports.allocate(2, live=()))
        ports.free(again[-1])
    assert any(later < earlier for earlier, later in itertools.pairwise(again))
    assert not any(set(range(f, f + 2)) & (blocks[1] | blocks[2]) for f in again)


# -- idle TTL and keep_alive ----------------------------------------------------------------


async def test_idle_model_unloads_after_its_ttl_and_a_kept_one_never(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model idle past idle_ttl_s is unloaded by the reconciler; a keep_loaded one with
    a zero TTL stays; /v1/models gives each location its expires_at."""
    # The TTL passes on the lifecycle's clock, moved forward by the test: a real one
    # short enough to wait out could pass before the first step on a slow machine.
    clock = SkewedTime()
    monkeypatch.setattr(lifecycle, "time", clock)
    n1, n2 = await fleet("n1", "n2")
    n1.add_model("m1", memory_bytes=GIB)
    n2.add_model("m2", memory_bytes=GIB)
    cat = catalogue(
        ModelSpec(id="m1", source="org/m1", memory_gb=1.0, idle_ttl_s=600.0),
        ModelSpec(id="m2", source="org/m2", memory_gb=1.0, keep_loaded=True, idle_ttl_s=0.0),
    )
    async with gateway([n1, n2], cat) as client:
        assert client.app is not None
        rec = client.app[RECONCILER]
        await rec.step()
        assert n1.unload_requests == []
        models = {m["id"]: m for m in (await (await client.get("/v1/models")).json())["data"]}
        [loc] = models["m1"]["locations"]
        assert time.time() < loc["expires_at"] <= time.time() + 600
        assert models["m2"]["locations"][0]["expires_at"] is None
        clock.skew_s = 601.0

        async def unloaded() -> bool:
            await rec.step()
            return n1.unload_requests == ["m1"]

        await until(unloaded)
        for _ in range(3):
            await rec.step()
        assert n2.unload_requests == [] and "m2" in n2.models
    await stop_all([n1, n2])


async def test_keep_alive_zero_unloads_after_the_answer() -> None:
    """keep_alive 0: the answer comes back, then the copy is unloaded; the neuron never sees
    keep_alive; a duration sets expires_at; nonsense is a 400."""
    (n1,) = await fleet("n1")
    n1.add_model("m1", memory_bytes=GIB)
    n1.add_model("m2", memory_bytes=GIB)
    async with gateway([n1]) as client:
        resp = await client.post(CHAT, json=chat("m2", keep_alive="5m"))
        assert resp.status == 200
        models = {m["id"]: m for m in (await (await client.get("/v1/models")).json())["data"]}
        assert abs(models["m2"]["locations"][0]["expires_at"] - (time.time() + 300)) < 30
        resp = await client.post(CHAT, json=chat(keep_alive=0))
        assert resp.status == 200 and (await resp.json())["choices"]

        async def unloaded() -> bool:
            return n1.unload_requests == ["m1"]

        await until(unloaded)
        assert all("keep_alive" not in b for b in n1.chat_bodies)
        bad = await _error(await client.post(CHAT, json=chat("m2", keep_alive="soon")))
        assert bad[:2] == (400, "invalid_request")
    await stop_all([n1])


def test_keep_alive_parses_like_ollama() -> None:
    """Durations and seconds; negative keeps forever; absent is None."""
    assert parse_keep_alive(None) is None
    assert parse_keep_alive("5m") == 300 and parse_keep_alive("30s") == 30
    assert parse_keep_alive(0) == 0 and parse_keep_alive("1h") == 3600
    assert parse_keep_alive(-1) == math.inf and parse_keep_alive("-1m") == math.inf
    for bad in ("later", True, [1]):
        with pytest.raises(InvalidRequest):
            parse_keep_alive(bad)


# -- admin verbs ------------------------------------------------------------------------


async def test_forced_unload_then_admin_load_restores_the_wished_replicas() -> None:
    """After a forced unload the model is held (and /admin/state says so); an admin load
    releases the hold, says so, and the reconciler brings back every wished replica."""
    n1, n2 = await fleet("n1", "n2")
    for n in (n1, n2):
        n.add_model("m1", memory_bytes=GIB)
    spec = ModelSpec(id="m1", source="org/m1", memory_gb=1.0, keep_loaded=True, replicas=2)
    async with gateway([n1, n2], catalogue(spec)) as client:
        assert client.app is not None
        rec = client.app[RECONCILER]
        resp = await client.post("/admin/models/m1/unload", json={"force": True})
        body = await resp.json()
        assert resp.status == 200 and sorted(body["unloaded"]) == ["n1", "n2"]
        assert any("held" in d for d in body["did"])
        await rec.step()
        assert n1.calls["load"] + n2.calls["load"] == 0
        state = (await (await client.get("/admin/state")).json())["models"][0]
        assert state["why"].startswith("held by operator since")
        resp = await client.post("/admin/models/m1/load")
        body = await resp.json()
        assert resp.status == 202 and any("released the hold" in d for d in body["did"])

        async def both() -> bool:
            await client.app[POLLER].poll_once()
            await rec.step()
            loaded = all(n.models.get("m1") is not None for n in (n1, n2))
            return loaded and client.app[LIFECYCLE].job("m1") is None

        await until(both)
        await client.app[POLLER].poll_once()
        state = (await (await client.get("/admin/state")).json())["models"][0]
        assert state["why"] == "2 wanted / 2 present: as wished"
    await stop_all([n1, n2])


async def test_why_explains_missing_replicas_with_the_arithmetic() -> None:
    """2 wanted, room for 1: /admin/state says so with the per-node numbers."""
    (n1,) = await fleet("n1")
    n1.add_model("m1", memory_bytes=GIB)
    spec = ModelSpec(id="m1", source="org/m1", memory_gb=1.0, keep_loaded=True, replicas=2)
    async with gateway([n1], catalogue(spec)) as client:
        state = (await (await client.get("/admin/state")).json())["models"][0]
        assert state["why"].startswith("2 wanted / 1 present: no room")
        assert "n1" in state["why"]
    await stop_all([n1])


async def test_forced_load_places_despite_a_refused_fit_with_the_token_only() -> None:
    """A load that does not fit now: 400 with the arithmetic; forced without an admin
    token, 403; forced with it, 202 and a warning carrying the arithmetic."""
    (n1,) = await fleet("n1")
    n1.memory_available_bytes = GIB // 2
    async with gateway([n1]) as client:
        assert (await client.post("/admin/models/m1/load")).status == 400
        resp = await client.post("/admin/models/m1/load", json={"force": True})
        assert resp.status == 403
    token = {"Authorization": "Bearer admin-secret"}
    async with gateway([n1], admin_token="admin-secret") as client:
        resp = await client.post("/admin/models/m1/load", json={"force": True}, headers=token)
        body = await resp.json()
        assert resp.status == 202 and body["nodes"] == ["n1"]
        assert "forced despite" in body["warning"] and "GiB" in body["warning"]
    assert n1.calls["load"] == 1
    await stop_all([n1])


class _Hanging(asyncio.Event):
    """An unload gate that counts the unload answers held at it right now."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = 0

    async def wait(self) -> Literal[True]:
        self.waiting += 1
        try:
            return await super().wait()
        finally:
            self.waiting -= 1


class _Noting(asyncio.Event):
    """An unload gate that notes, as each answer reaches it, how many `other` holds."""

    def __init__(self, other: _Hanging) -> None:
        super().__init__()
        self.other = other
        self.seen: list[int] = []

    async def wait(self) -> Literal[True]:
        self.seen.append(self.other.waiting)
        return await super().wait()


async def test_one_hung_member_does_not_stall_teardowns() -> None:
    """Two broken groups, one member's unload hangs: every other member is unloaded and
    the pass ends within the unload timeout."""
    n1, n2, n3 = await fleet("n1", "n2", "n3")
    for gid, model in (("g1", "x"), ("g2", "y")):
        group = GroupSpec(gid, 0, 2, "ring", "tensor", ("127.0.0.1:1", "127.0.0.1:2"))
        target = n1 if model == "x" else n2
        target.add_model(model, group=group.to_json())  # rank 1 is gone: broken
    hanging = _Hanging()
    n1.unload_gate = hanging  # never set: n1 hangs
    # n2 answers only once set; it notes whether n1 still hung when it was asked.
    noting = n2.unload_gate = _Noting(hanging)
    async with gateway([n1, n2, n3], unload_timeout_s=5.0) as client:
        assert client.app is not None
        step = asyncio.ensure_future(client.app[RECONCILER].step())
        await until(lambda: n1.unload_requests and n2.unload_requests, timeout=120)
        assert n1.unload_requests == ["x"] and n2.unload_requests == ["y"]
        # Both members are asked at once: one after the other, the second would be
        # asked only after the first's 5 s timeout had ended its wait.
        assert noting.seen == [1]
        noting.set()
        await asyncio.wait_for(step, timeout=60)  # n1 ends by its timeout, the pass ends
        assert "y" not in n2.models
        n1.unload_gate.set()
    await stop_all([n1, n2, n3])


def test_check_reports_a_missing_source_and_an_unknown_pinned_node(tmp_path: Path) -> None:
    """`cortex check` exits 1 naming a local source that does not exist and a pinned_on
    node the config does not name."""
    (tmp_path / "models.toml").write_text(
        '[[models]]\nid = "broken"\nsource = "/nowhere/broken"\n'
        '[[models]]\nid = "pinned"\nsource = "org/p"\npinned_on = ["zz"]\n'
    )
    conf = tmp_path / "cortex.toml"
    conf.write_text('[[neurons]]\nname = "a"\nurl = "http://127.0.0.1:9410"\n')
    assert cli.main(["check", "-c", str(conf)]) == 1
    problems = catalogue_problems(*cli._load(str(conf)))
    assert any("/nowhere/broken" in p and "does not exist" in p for p in problems)
    assert any("zz" in p and "not configured" in p for p in problems)


def test_transitions_journal_each_nodes_changes_once_and_only_its_own() -> None:
    """The poll listener keeps what it saw per node: a model going from one node is
    'gone' there only, a state seen again is not journalled twice, a node down once."""
    from cortex.config import CortexConfig
    from cortex.core.state import Fleet
    from cortex.run.lifecycle import Lifecycle
    from shared.catalogue import Catalogue
    from tests.cortex.test_router import node, rm

    life = Lifecycle(
        fleet=Fleet.of([("a", "http://a"), ("b", "http://b")], threshold=1),
        catalogue=Catalogue(models=()),
        config=CortexConfig(),
    )

    def seen() -> list[tuple[str | None, str | None, str, str]]:
        return [(e.node, e.model, e.kind, e.detail) for e in life.journal.since(0)]

    life.transitions(node("a", rm("m1", "loading")))
    life.transitions(node("b", rm("m1")))
    life.transitions(node("a", rm("m1")))
    life.transitions(node("a", rm("m1")))  # unchanged: nothing new
    life.transitions(node("a"))  # m1 left a; b still has it
    life.transitions(node("b", rm("m1")))
    life.transitions(node("b", rm("m1"), healthy=False))
    life.transitions(node("b", rm("m1"), healthy=False))
    assert seen() == [
        ("a", "m1", "loading", "absent -> loading"),
        ("b", "m1", "ready", "absent -> ready"),
        ("a", "m1", "ready", "loading -> ready"),
        ("a", "m1", "gone", "ready -> absent"),
        ("b", None, "node unhealthy", ""),
    ]
