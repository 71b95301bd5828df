"""Ring port blocks: the arithmetic (cortex.run.lifecycle.RingPorts, the config check),
and a group load that skips a block a member finds taken, against fake neurons."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import attrs
import pytest
from aiohttp import web

from cortex.config import CortexConfig
from cortex.run.lifecycle import LIFECYCLE, RING_BLOCK_TRIES, SHUN_S, RingPorts
from shared.catalogue import ModelSpec
from tests.cortex.fakes import FakeNeuron, catalogue, gateway, stop_all
from tests.support.clients import CHAT, chat
from tests.support.waiting import until

# -- the arithmetic ---------------------------------------------------------------------


def test_default_ring_ports_lie_below_every_ephemeral_range() -> None:
    """The default block range ends below 32768 (Linux's ephemeral ports start there,
    macOS's at 49152); the check names both keys and the range."""
    cfg = CortexConfig()
    assert cfg.ring_base_port >= 1024
    assert cfg.ring_base_port + cfg.ring_port_span - 1 < 32768
    assert CortexConfig(ring_base_port=65535 - 99, ring_port_span=100).ring_port_span == 100
    bad_ones: list[dict[str, Any]] = [
        {"ring_base_port": 65000},
        {"ring_base_port": 80},
        {"ring_port_span": 1},
    ]
    for bad in bad_ones:
        with pytest.raises(ValueError, match="ring_base_port") as info:
            CortexConfig(**bad)
        print(info.value)


def test_shunned_port_is_skipped_until_its_time_is_up() -> None:
    """A shunned port keeps every block holding it out, for SHUN_S on the clock."""
    now = [0.0]
    ports = RingPorts(base=28000, span=8, clock=lambda: now[0])
    ports.shun([28001])
    first = ports.allocate(2, live=())
    assert not {28001} & set(range(first, first + 2))
    ports.free(first)
    # Round the whole span: no block that holds 28001 is ever given.
    given = []
    for _ in range(10):
        given.append(ports.allocate(2, live=()))
        ports.free(given[-1])
    assert all(28001 not in range(f, f + 2) for f in given), given
    now[0] += SHUN_S + 1
    again = []
    for _ in range(10):
        again.append(ports.allocate(2, live=()))
        ports.free(again[-1])
    assert any(28001 in range(f, f + 2) for f in again), again


def test_a_group_larger_than_the_span_or_a_full_span_is_refused() -> None:
    """cold_load_failed, not an arithmetic error, when no block can be given."""
    ports = RingPorts(base=28000, span=4)
    with pytest.raises(Exception, match="more than 4 ring ports"):
        ports.allocate(5, live=())
    ports.shun([28001, 28003])
    with pytest.raises(Exception, match="no free block of 2 ring ports"):
        ports.allocate(2, live=())


# -- a group load against fakes -----------------------------------------------------------

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


@attrs.define
class PortHolder(FakeNeuron):
    """A fake neuron on which some ring ports are held: a group load whose rank would
    bind one is refused as a neuron refuses it (409 ring_port_taken, the port named)."""

    holds: Callable[[int], bool] = lambda port: False
    refused: list[int] = attrs.Factory(list)
    # Ports of the group loads it took and answered (202): a rank started.
    started: list[int] = attrs.Factory(list)

    async def _load(self, request: web.Request) -> web.Response:
        body = await request.json()
        group = body.get("group")
        if group is not None:
            host, _, port = group["hosts"][group["rank"]].rpartition(":")
            if self.holds(int(port)):
                self.refused.append(int(port))
                self.load_requests.append(body)
                err = {
                    "message": f"ring port {port} on {host} is taken by another process",
                    "type": "invalid_request_error",
                    "code": "ring_port_taken",
                    "param": "group.hosts",
                    "details": {"host": host, "port": int(port)},
                }
                return web.json_response({"error": err}, status=409)
        resp = await super()._load(request)
        if group is not None and resp.status == 202:
            self.started.append(int(group["hosts"][group["rank"]].rsplit(":", 1)[1]))
        return resp


def _ports(n: FakeNeuron) -> list[int]:
    """The ring port each load posted to `n` asked its rank to bind."""
    out = []
    for body in n.load_requests:
        g = body["group"]
        out.append(int(g["hosts"][g["rank"]].rsplit(":", 1)[1]))
    return out


async def _failed_loads(client: Any) -> float:
    text = await (await client.get("/metrics")).text()
    found = re.findall(r'^cortex_cold_loads_total\{[^}]*result="failed"[^}]*\} (\S+)$', text, re.M)
    return sum(float(v) for v in found)


async def test_taken_block_is_skipped_once_the_other_post_has_answered() -> None:
    """n2 holds its port of the first block while n1's post is still in flight: cortex
    waits for n1's answer, unloads that rank, and loads both on the next block; the
    request is answered, with no failed load and the skip journalled."""
    n1 = PortHolder(name="n1", hostname="box.local")
    n2 = PortHolder(name="n2", hostname="box.local")
    for n in (n1, n2):
        await n.start()
    n1.load_post_gate = asyncio.Event()
    held: list[int] = []

    def first_only(port: int) -> bool:
        """The first port n2 is asked for is held; none after it."""
        if held:
            return False
        held.append(port)
        return True

    n2.holds = first_only
    async with gateway([n1, n2], catalogue(BIG), load_wait_s=30.0) as client:
        assert client.app is not None
        answer = asyncio.ensure_future(client.post(CHAT, json=chat("big")))
        await until(lambda: n2.refused, timeout=30, what="n2 to refuse the first block")
        n1.load_post_gate.set()
        resp = await answer
        assert resp.status == 200, await resp.text()
        first, second = _ports(n1)
        assert n2.refused == held and _ports(n2) == [held[0], second + 1]
        assert second - first == 2, "the next block, at once"
        # n1's post was not cut off: its rank of the first block started, then undone.
        assert n1.started == [first, second]
        assert n1.unload_requests == ["big"]
        assert await _failed_loads(client) == 0
        life = client.app[LIFECYCLE]
        assert life.failure("big") is None
        [skip] = [e for e in life.events("big") if e.kind == "ring port taken"]
        assert skip.node == "n2" and f"ring port {held[0]} " in skip.detail, skip
        print(skip.detail)
    await stop_all([n1, n2])


async def test_taken_ports_everywhere_fail_the_load_after_a_bounded_number_of_blocks() -> None:
    """Every block taken: RING_BLOCK_TRIES blocks, then one failed load (an ordinary
    backoff, not 'needs an operator'), each skip journalled."""
    n1 = PortHolder(name="n1", hostname="box.local")
    n2 = PortHolder(name="n2", hostname="box.local", holds=lambda port: True)
    for n in (n1, n2):
        await n.start()
    async with gateway([n1, n2], catalogue(BIG), load_wait_s=30.0) as client:
        assert client.app is not None
        resp = await client.post(CHAT, json=chat("big"))
        body = await resp.json()
        assert (resp.status, body["error"]["code"]) == (503, "cold_load_failed"), body
        print(body["error"]["message"])
        assert "taken by another process" in body["error"]["message"]
        assert len(n2.refused) == RING_BLOCK_TRIES == len(set(n2.refused))
        assert await _failed_loads(client) == 1
        life = client.app[LIFECYCLE]
        f = life.failure("big")
        assert f is not None and not f.needs_operator
        skips = [e for e in life.events("big") if e.kind == "ring port taken"]
        assert len(skips) == RING_BLOCK_TRIES
        assert "the load fails" in skips[-1].detail
    await stop_all([n1, n2])
