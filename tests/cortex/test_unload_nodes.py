"""`cortex unload MODEL --nodes b`: only the copies there go (a group's ranks together)."""

from __future__ import annotations

import argparse
import asyncio
import io

from cortex.cli import ops as ops_cli
from tests.cortex.fakes import fleet, gateway, stop_all


async def test_unload_from_named_nodes_leaves_the_other_copies() -> None:
    nodes = await fleet("a", "b", "c")
    for n in nodes[:2]:
        n.add_model("m1")
    group = {"group_id": "g1", "world_size": 2, "backend": "ring", "sharding": "tensor"}
    nodes[1].add_model("m2", group={**group, "rank": 0, "hosts": ["h:1", "h:2"]})
    nodes[2].add_model("m2", group={**group, "rank": 1, "hosts": ["h:1", "h:2"]})
    try:
        async with gateway(nodes) as client:
            url = str(client.make_url("")).rstrip("/")

            def cli(*argv: str) -> tuple[int, str]:
                args = argparse.Namespace(
                    url=url, token=None, config=None, json=False, force=False, nodes=None
                )
                args.model, rest = argv[0], list(argv[1:])
                if rest[:1] == ["--nodes"]:
                    args.nodes = rest[1]
                out = io.StringIO()
                return ops_cli.unload_main(args, out), out.getvalue()

            rc, text = await asyncio.to_thread(cli, "m1", "--nodes", "b")
            assert rc == 0 and "m1 unloaded from b" in text
            assert nodes[1].unload_requests == ["m1"] and nodes[0].unload_requests == []
            # One rank named: the whole group goes.
            rc, text = await asyncio.to_thread(cli, "m2", "--nodes", "c")
            assert rc == 0 and "m2 unloaded from c, b" in text
            assert nodes[1].unload_requests == ["m1", "m2"]
            rc, _ = await asyncio.to_thread(cli, "m1", "--nodes", "c")
            assert rc == 2  # 404: not loaded there
            assert nodes[0].unload_requests == []
    finally:
        await stop_all(nodes)
