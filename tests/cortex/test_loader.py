"""The lifecycle's bookkeeping of loads under way, against fake neurons."""

from __future__ import annotations

import asyncio
import contextlib

from cortex.core.placement import best
from cortex.core.router import node_infos
from cortex.run.lifecycle import LIFECYCLE
from cortex.run.loader import LOADER
from tests.cortex.fakes import catalogue, fleet, gateway, stop_all


async def test_a_finished_load_does_not_forget_the_next_one() -> None:
    """A failed load's clean-up leaves the record of a newer load of the same model alone,
    and the failure's backoff holds back a second load until an operator overrides it."""
    nodes = await fleet("n1")
    (n1,) = nodes
    n1.load_error = (500, "internal_error", "disk full")
    cat = catalogue()
    spec = cat.models[0]
    try:
        async with gateway(nodes, cat) as client:
            life = client.app[LIFECYCLE]
            loader = client.app[LOADER]
            snap = life.snapshot()
            cand = best(spec, loader.facts(spec), node_infos(snap, cat, loading=spec.id))
            assert cand is not None
            first = life.start_load(spec, cand, why="test")
            assert first.task is not None
            with contextlib.suppress(Exception):
                await first.task
            assert life.job(spec.id) is None and life.backing_off(spec.id) is not None
            n1.load_error = None
            n1.load_gate = asyncio.Event()  # the second load stays under way
            second = life.start_load(spec, cand, why="test", ignore_backoff=True)
            await asyncio.sleep(0.05)
            assert life.job(spec.id) is second
            n1.load_gate.set()
    finally:
        await stop_all(nodes)
