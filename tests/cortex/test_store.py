"""Cortex and the neurons' stores: peers named in a load, purge broadcast, disk in placement."""

from __future__ import annotations

from cortex.core.placement import candidates
from shared.catalogue import GIB, ModelSpec
from tests.cortex.fakes import FakeNeuron, fleet, gateway, stop_all
from tests.cortex.records import node
from tests.support.waiting import until

ADMIN = {"Authorization": "Bearer admin-secret"}


async def test_load_on_a_node_without_the_copy_names_the_peers_that_hold_it() -> None:
    """Placed where the files are not: the LoadRequest names the nodes holding a copy."""
    holder = FakeNeuron(name="holder", memory_available_bytes=1 * GIB, staged=["org/m1"])
    empty = FakeNeuron(name="empty")
    nodes = [await holder.start(), await empty.start()]
    try:
        async with gateway(nodes, admin_token="admin-secret") as client:
            r = await client.post("/admin/models/m1/load", json={}, headers=ADMIN)
            assert r.status in (200, 202), await r.text()
            await until(lambda: any(n.load_requests for n in nodes), what="a load request")
            assert [b.get("peers") for b in empty.load_requests] == [[holder.url]]
            assert holder.load_requests == []
    finally:
        await stop_all(nodes)


async def test_load_on_a_node_with_the_copy_names_no_peers() -> None:
    """A node that holds the copy stages nothing: no peers field at all."""
    nodes = await fleet("a", "b", staged=["org/m1"])
    try:
        async with gateway(nodes, admin_token="admin-secret") as client:
            r = await client.post("/admin/models/m1/load", json={}, headers=ADMIN)
            assert r.status in (200, 202), await r.text()
            await until(lambda: any(n.load_requests for n in nodes), what="a load request")
            sent = [b for n in nodes for b in n.load_requests]
            assert len(sent) == 1 and "peers" not in sent[0]
    finally:
        await stop_all(nodes)


async def test_admin_store_purge_broadcasts_and_narrows_to_a_model() -> None:
    """POST /admin/store/purge reaches every node; a model_id is sent as its source."""
    nodes = await fleet("a", "b")
    try:
        async with gateway(nodes, admin_token="admin-secret") as client:
            r = await client.post("/admin/store/purge", json={}, headers=ADMIN)
            assert r.status == 200
            body = await r.json()
            assert body["freed_bytes"] == 2000 and body["failed"] == []
            r = await client.post("/admin/store/purge", json={"model_id": "one"}, headers=ADMIN)
            assert r.status == 200
            assert [n.purge_requests for n in nodes] == [[{}, {"model_id": "org/m1"}]] * 2
            await nodes[1].stop()
            r = await client.post("/admin/store/purge", json={}, headers=ADMIN)
            assert r.status == 502
            assert (await r.json())["failed"] == ["b"]
            r = await client.post("/admin/store/purge", json={"nodes": 1}, headers=ADMIN)
            assert r.status == 400
    finally:
        await stop_all(nodes)


def test_placement_accounts_the_disk_a_stage_needs() -> None:
    """A node without the copy and without the disk for it is refused, with the numbers;
    one that holds the copy needs no disk; a local source never does."""
    spec = ModelSpec(id="m", source="org/m", memory_gb=8.0, kv_gb=0.1)
    facts = spec.facts()
    nodes = [node("tight", disk_gib=4), node("holder", disk_gib=4, staged=("m",))]
    by = {c.nodes: c for c in candidates(spec, facts, nodes)}
    tight = by[("tight",)]
    assert not tight.feasible
    assert any("node tight lacks the disk: staging m needs 8.00 GiB" in r for r in tight.reasons)
    assert "4.00 GiB free" in " ".join(tight.reasons)
    assert tight.fits[0].disk_need_bytes == 8 * GIB
    assert by[("holder",)].feasible and by[("holder",)].fits[0].disk_need_bytes == 0
    local = ModelSpec(id="m", source="/models/m", memory_gb=8.0, kv_gb=0.1)
    assert all(c.feasible for c in candidates(local, local.facts(), nodes[:1]))


async def test_admin_placements_says_a_node_lacks_the_disk() -> None:
    """/admin/placements shows the refusal for a node whose store is too full."""
    nodes = [await FakeNeuron(name="full", disk_free_bytes=GIB // 2).start()]
    try:
        async with gateway(nodes, admin_token="admin-secret") as client:
            r = await client.get("/admin/placements?model_id=m1", headers=ADMIN)
            assert r.status == 200
            text = await r.text()
            assert "node full lacks the disk: staging m1 needs 1.00 GiB" in text
    finally:
        await stop_all(nodes)
