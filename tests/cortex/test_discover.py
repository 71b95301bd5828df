"""Discovery's pure parts (TXT, conflicts, names, the proof's verdicts, join codes) and
the proof, the poll set and strangers against real in-process neurons (no multicast:
tests/e2e/test_discovery.py has that)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from cortex.config import CortexConfig, NeuronRef
from cortex.core.join_codes import JoinCodes, JoinRefused
from cortex.core.state import Fleet, NodeModel
from cortex.run import discover
from cortex.run.discover import Discoverer, Known, choose_name, claimed, judge, prove
from cortex.run.poller import Poller
from neuron import announce
from neuron.config import NeuronConfig
from neuron.http.app import create_app
from shared.fleet_discovery import Announcement, parse_txt, proof, txt_record
from tests.conftest import TEST_ROOT
from tests.support.clock import SkewedTime

TOKEN = "fleet-token-0123456789"
OTHER = "other-token-9876543210"
NODE_ID = "5d0c8a52-7f0e-4a6c-9d0e-0c6b1f2a3b4c"


def _txt(**over: str) -> dict[bytes, bytes | None]:
    fields = txt_record(node_id=NODE_ID, name="studio 1", version="0.1.0", port=9410)
    fields.update(over)
    return {k.encode(): v.encode() for k, v in fields.items()}


# -- TXT ---------------------------------------------------------------------------------


def test_txt_round_trip_and_what_is_refused() -> None:
    ann = parse_txt("s1", _txt(), port=9410, addresses=("127.0.0.1", "10.0.0.7"))
    assert isinstance(ann, Announcement)
    # The name keeps to the node-name charset; loopback is no address to dial.
    assert (ann.node_id, ann.name, ann.version) == (NODE_ID, "studio-1", "0.1.0")
    assert ann.urls == ("http://10.0.0.7:9410",)
    # No SRV port: the TXT one stands in.
    got = parse_txt("s1", _txt(port="9555"), port=None, addresses=("10.0.0.7",))
    assert isinstance(got, Announcement) and got.port == 9555
    refused = {
        "txtvers": parse_txt("s", _txt(txtvers="2"), port=1, addresses=("10.0.0.7",)),
        "node_id": parse_txt("s", _txt(node_id="a b/c"), port=1, addresses=("10.0.0.7",)),
        "port": parse_txt("s", _txt(port="x"), port=None, addresses=("10.0.0.7",)),
        "address": parse_txt("s", _txt(), port=1, addresses=("127.0.0.1", "::1", "0.0.0.0")),
    }
    for what, got_ in refused.items():
        assert isinstance(got_, str), what


# -- the poll set: configured nodes win; names never change hands ---------------------


def _ann(node_id: str = NODE_ID, address: str = "10.0.0.7", name: str = "a") -> Announcement:
    return Announcement("svc", node_id, name, "0.1.0", 9410, (address,))


def test_configured_nodes_win_by_node_id_or_address() -> None:
    known = [Known("a", "http://10.0.0.9:9410", NODE_ID), Known("b", "http://10.0.0.8:9410/", None)]
    assert claimed(_ann(), known) == known[0]  # same node id, another address
    assert claimed(_ann("x", "10.0.0.8"), known) == known[1]  # same address, id unknown yet
    assert claimed(_ann("x", "10.0.0.5"), known) is None


def test_names_taken_get_the_node_id() -> None:
    assert choose_name("a", NODE_ID, {"b"}) == "a"
    assert choose_name("a", NODE_ID, {"a", "b"}) == "a-5d0c8a"


# -- the proof ---------------------------------------------------------------------------

NONCE = "ab" * 16
URL = "http://10.0.0.7:9410"


def _answer(token: str | None, *, host: str = "10.0.0.7", node_id: str = NODE_ID) -> Any:
    body: dict[str, Any] = {"node_id": node_id, "token": token is not None}
    if token is not None:
        body["proof"] = proof(token, nonce=NONCE, node_id=node_id, host=host, port=9410)
    return body


@pytest.mark.parametrize(
    ("cortex", "status", "body", "kind", "says"),
    [
        (TOKEN, 200, _answer(TOKEN), "member", ""),
        (TOKEN, 200, _answer(OTHER), "stranger", "another fleet token"),
        (TOKEN, 200, _answer(None), "stranger", "no fleet token"),
        # A real neuron's answer relayed by an impostor signs the real one's address.
        (TOKEN, 200, _answer(TOKEN, host="10.0.0.99"), "stranger", "another fleet token"),
        (TOKEN, 200, _answer(TOKEN, node_id="someone-else"), "stranger", "answers as node"),
        (TOKEN, 404, None, "stranger", "older neuron"),
        (TOKEN, 502, None, "unreachable", "HTTP 502"),
        (None, 200, _answer(None), "member", ""),
        (None, 200, _answer(OTHER), "stranger", "this cortex has none"),
    ],
)
def test_proof_verdicts(cortex: str | None, status: int, body: Any, kind: str, says: str) -> None:
    v = judge(status, body, token=cortex, nonce=NONCE, node_id=NODE_ID, url=URL)
    assert (v.kind, v.url) == (kind, URL)
    assert says in v.reason


# -- join codes ----------------------------------------------------------------------------


def test_join_code_admits_once_then_refuses_used_expired_and_wrong() -> None:
    now = [1000.0]
    codes = JoinCodes(ttl_s=600.0, clock=lambda: now[0])
    code, life = codes.mint()
    assert life == 600.0 and len(code) == 23 and codes.outstanding == 1
    # As typed by hand: any case, dashes or not.
    codes.redeem(code.lower().replace("-", ""), by="n1")
    with pytest.raises(JoinRefused) as used:
        codes.redeem(code, by="n2")
    assert used.value.why == "used" and codes.outstanding == 0
    with pytest.raises(JoinRefused) as wrong:
        codes.redeem("AAAAA-AAAAA-AAAAA-AAAAA", by="n3")
    assert wrong.value.why == "unknown"
    # --ttl shortens a code's life, never lengthens it past the setting.
    short, short_life = codes.mint(ttl_s=30.0)
    assert codes.mint(ttl_s=10_000.0)[1] == 600.0
    now[0] += short_life
    with pytest.raises(JoinRefused) as expired:
        codes.redeem(short, by="n4")
    assert expired.value.why == "expired"
    # Kept one more TTL past its expiry (to say "expired"), then forgotten.
    now[0] += 2 * 600.0
    with pytest.raises(JoinRefused) as gone:
        codes.redeem(short, by="n4")
    assert gone.value.why == "unknown"
    with pytest.raises(ValueError):
        codes.mint(ttl_s=0)


# -- the fleet: strangers and nodes that come and go -------------------------------------


def test_fleet_adds_and_removes_nodes_and_a_stranger_holds_nothing() -> None:
    fleet = Fleet.of([("a", "http://a:1")], threshold=3)
    fleet.add_node("b", "http://b:1")
    assert list(fleet.names) == ["a", "b"]
    fleet.set_model("b", NodeModel(model_id="m", state="ready"))
    assert [n.name for n, _ in fleet.snapshot().locations("m")] == ["b"]
    refused = fleet.poll_refused("b", "refuses this cortex's fleet token (HTTP 401)")
    assert refused.stranger and not refused.healthy and refused.models == ()
    assert refused.to_json()["status"] == "stranger"
    assert fleet.snapshot().locations("m") == ()
    fleet.set_model("b", NodeModel(model_id="m", state="ready"))
    fleet.remove_node("b")
    assert list(fleet.names) == ["a"] and fleet.snapshot().locations("m") == ()
    fleet.remove_node("b")  # gone already: nothing to do


# -- against real neurons (in-process, no runners) -----------------------------------------

Start = Callable[..., Awaitable[TestServer]]


@pytest.fixture
async def neuron(tmp_path: Path) -> AsyncIterator[Start]:
    """`await start(token)`: a real neuron app with GET /fleet/proof, on 127.0.0.1:0."""
    servers: list[TestServer] = []

    async def start(token: str | None) -> TestServer:
        config = NeuronConfig(
            port=0,
            store_dir=str(tmp_path / f"store{len(servers)}"),
            model_roots=tuple(str(r) for r in TEST_ROOT),
            fleet_token=token,
        )
        app = create_app(config)
        announce.setup(app, config)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        servers.append(server)
        return server

    yield start
    for s in reversed(servers):
        await s.close()


def _announced(server: TestServer, name: str) -> Announcement:
    node_id = (Path(server.app[announce._CONFIG].store_dir) / "node_id").read_text().strip()
    # A neuron announces no loopback address; the test dials it there all the same.
    return Announcement(f"{name}.svc", node_id, name, "0.1.0", server.port or 0, ("127.0.0.1",))


async def test_proof_against_real_neurons(neuron: Start) -> None:
    ours, theirs, open_ = await neuron(TOKEN), await neuron(OTHER), await neuron(None)
    async with aiohttp.ClientSession() as s:
        for server in (ours, theirs, open_):  # the node id is written at startup
            async with s.get(f"http://127.0.0.1:{server.port}/health") as r:
                assert r.status == 200
        got = {
            name: await prove(s, _announced(server, name), TOKEN, 5.0)
            for name, server in (("ours", ours), ("theirs", theirs), ("open", open_))
        }
    assert got["ours"].kind == "member", got["ours"]
    assert got["theirs"].kind == "stranger" and "another fleet token" in got["theirs"].reason
    assert got["open"].kind == "stranger" and "no fleet token" in got["open"].reason


async def test_configured_node_with_another_token_is_a_stranger(neuron: Start) -> None:
    """A [[neurons]] entry that refuses the token: listed stranger, not healthy, no models."""
    theirs = await neuron(OTHER)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as s:
        poller = Poller(
            fleet=Fleet.of([("x", f"http://127.0.0.1:{theirs.port}")], threshold=3), session=s
        )
        await poller.poll_once()
        await poller.poll_once()
        poller.close()
    x = poller.fleet.node("x")
    assert x.stranger and not x.healthy and x.failures == 0 and x.models == ()
    assert "fleet token (HTTP 401)" in (x.last_error or "")


async def test_discoverer_admits_the_proven_lists_strangers_and_forgets_the_gone(
    neuron: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, theirs = await neuron(TOKEN), await neuron(OTHER)
    configured = await neuron(TOKEN)
    config = CortexConfig(
        fleet_token=TOKEN,
        discover=True,
        discover_forget_s=30.0,
        neurons=(NeuronRef("fixed", f"http://127.0.0.1:{configured.port}"),),
    )
    clock = SkewedTime()
    monkeypatch.setattr(discover, "time", clock)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as polls, aiohttp.ClientSession() as bare:
        fleet = Fleet.of([("fixed", config.neurons[0].url)], threshold=3)
        poller = Poller(fleet=fleet, session=polls)
        d = Discoverer(fleet=fleet, poller=poller, config=lambda: config, session=bare)
        d.heard(_announced(ours, "ours"))
        d.heard(_announced(theirs, "theirs"))
        # The configured node announces too: its [[neurons]] entry wins.
        d.heard(_announced(configured, "fixed"))
        await d.step()
        # Until the configured node's id is known, any announcement could be it.
        assert list(fleet.names) == ["fixed"] and d.outsiders == {}
        await poller.poll_once()
        await d.step()
        assert list(fleet.names) == ["fixed", "ours"]
        assert fleet.node("ours").healthy, "polled at once on joining"
        listed = {n["name"]: n for n in d.outsiders_json()}
        assert list(listed) == ["theirs"] and listed["theirs"]["status"] == "stranger"
        assert listed["theirs"]["stranger"] and listed["theirs"]["discovered"]
        # Gone (it stops answering), and still gone past discover_forget_s: dropped.
        await ours.close()
        for _ in range(3):  # failure_threshold polls: unhealthy
            await poller.poll_once()
        await d.step()
        assert "ours" in fleet.names, "down, but not for discover_forget_s yet"
        clock.skew_s = 31.0
        await d.step()
        assert list(fleet.names) == ["fixed"]
        poller.close()
