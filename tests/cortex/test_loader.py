"""The loader against fake neurons: its bookkeeping of loads under way."""

from __future__ import annotations

import asyncio

from cortex.keys import FLEET, LOADER
from cortex.placement import best
from cortex.router import node_infos
from tests.cortex.fakes import catalogue, fleet, gateway, stop_all


async def test_a_finished_load_does_not_forget_the_next_one() -> None:
    """A failed load's clean-up, run after a new load of the same model began, leaves the
    new one's record in place."""
    nodes = await fleet("n1")
    (n1,) = nodes
    n1.load_error = (500, "internal_error", "disk full")
    cat = catalogue()
    spec = cat.models[0]
    try:
        async with gateway(nodes, cat) as client:
            loader = client.app[LOADER]
            snap = client.app[FLEET].snapshot()
            cand = best(spec, loader.facts(spec), node_infos(snap, cat, loading=spec.id))
            assert cand is not None
            first = loader.start(spec, cand)
            # Step the loop until the load ended but its done-callback has not run yet.
            for _ in range(100_000):
                if first.task.done():
                    break
                await asyncio.sleep(0)
            assert first.task.done() and loader.job(spec.id) is first
            n1.load_error = None
            n1.load_gate = asyncio.Event()  # the second load stays under way
            second = loader.start(spec, cand)
            await asyncio.sleep(0.05)
            assert loader.job(spec.id) is second
            n1.load_gate.set()
    finally:
        await stop_all(nodes)
