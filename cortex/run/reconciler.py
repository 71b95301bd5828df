"""The reconciler: the loop that runs `cortex.core.life.plan` through the lifecycle.

Every pass (`Lifecycle.converge`) (1) tears down multi-rank groups that lost a
member (a rank died, a member node went unhealthy or restarted): one rank alone
can never serve, and its peers spin on a dead link; every group at once, each
POST with a short timeout, so one hung member stalls nothing; then (2) loads
models whose `keep_loaded` or `pinned_on` asks for more replicas than the fleet
has, unless an operator holds them or a failed load still backs off; then (3)
unloads copies idle past their TTL that the wish lets go. No pass acts while a
node has not been heard from yet (after a cortex restart, say) and is not given
up on: what it holds is unknown. The decisions are all in `plan`.
"""

from __future__ import annotations

import asyncio
import logging

import attrs
from aiohttp import web

from cortex.core.life import BrokenGroup, broken_groups, replicas, wanted_replicas
from cortex.run.lifecycle import Lifecycle
from cortex.run.loader import Loader

log = logging.getLogger(__name__)

__all__ = ["BrokenGroup", "Reconciler", "broken_groups", "replicas", "wanted_replicas"]


@attrs.define
class Reconciler:
    # Converges to the lifecycle's catalogue (the one a reload replaces).
    life: Lifecycle
    # Each model's shape (read from its files once) for placement.
    loader: Loader
    interval_s: float = 2.0

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except Exception:  # one bad pass must not end reconciling
                log.exception("reconciler pass failed")
            await asyncio.sleep(self.interval_s)

    async def step(self) -> None:
        await self.life.converge(facts=self.loader.facts)


# Where the app keeps the reconciler.
RECONCILER = web.AppKey("reconciler", Reconciler)
