"""The reconciler: the loop that asks the lifecycle to make the wishes true.

Every pass it (1) tears down multi-rank groups that lost a member (a rank died,
a member node went unhealthy or restarted): one rank alone can never serve, and
its peers spin on a dead link; every group at once, each POST with a short
timeout, so one hung member stalls nothing; then (2) loads models whose
`keep_loaded` or `pinned_on` asks for more replicas than the fleet has, unless
an operator holds them or a failed load still backs off (cortex.lifecycle);
then (3) unloads copies idle past their TTL that the wish lets go.
No pass acts while a node has not been heard from yet (after a cortex restart,
say) and is not given up on: what it holds is unknown.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict

import attrs

from cortex.lifecycle import Job, Lifecycle, replicas, wanted_replicas
from cortex.loader import Loader
from cortex.placement import PlacementPending, best, candidates
from cortex.router import node_infos
from cortex.state import FleetSnapshot
from shared.catalogue import Catalogue, ModelSpec
from shared.errors import ApiError

log = logging.getLogger(__name__)

__all__ = ["BrokenGroup", "Reconciler", "broken_groups", "replicas", "wanted_replicas"]


@attrs.frozen
class BrokenGroup:
    group_id: str
    model_id: str
    members: tuple[str, ...]  # nodes still holding a rank
    reason: str


def broken_groups(snap: FleetSnapshot) -> list[BrokenGroup]:
    """Multi-rank groups that can no longer serve, with the reason."""
    members: dict[tuple[str, str], list[tuple[str, int, str, bool]]] = defaultdict(list)
    world: dict[tuple[str, str], int] = {}
    for node in snap.nodes:
        for m in node.models:
            if m.group is None or m.group.world_size < 2:
                continue
            key = (m.group.group_id, m.model_id)
            members[key].append((node.name, m.group.rank, m.state, node.healthy))
            world[key] = m.group.world_size
    out = []
    for (gid, model_id), ranks in sorted(members.items()):
        if model_id in snap.loading:
            continue  # members appear one by one while cortex loads the group
        nodes = tuple(sorted(n for n, *_ in ranks))
        reason = None
        failed = [f"rank {r} on {n}" for n, r, state, _ in ranks if state == "failed"]
        down = [n for n, _, _, healthy in ranks if not healthy]
        present = {r for _, r, _, _ in ranks}
        if failed:
            reason = f"{', '.join(failed)} failed"
        elif down:
            reason = f"member node(s) {', '.join(down)} unhealthy"
        elif len(present) < world[(gid, model_id)] and not snap.unheard:
            # (A rank on a node not heard from yet is not known to be gone.)
            missing = sorted(set(range(world[(gid, model_id)])) - present)
            reason = f"rank(s) {missing} gone (a member restarted or unloaded)"
        if reason is not None:
            out.append(BrokenGroup(gid, model_id, nodes, reason))
    return out


@attrs.define
class Reconciler:
    life: Lifecycle
    catalogue: Catalogue
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
        if self.life.snapshot().unheard:
            # After a restart every node starts unseen: until each has answered (or
            # been given up on), a missing rank or copy may just not be reported yet.
            return
        jobs = [self.teardown(b) for b in broken_groups(self.life.snapshot())]
        await asyncio.gather(*jobs)
        for spec in self.catalogue.models:
            # A fresh snapshot each: it holds the memory the loads just started reserved.
            self._ensure(self.life.snapshot(), spec)
            self._prefetch(self.life.snapshot(), spec)
        idle: list[Job] = []
        for spec, nodes in self.life.expired(self.life.snapshot()):
            log.info("%s idle past its TTL on %s: unloading", spec.id, ", ".join(nodes))
            job = self.life.start_unload(spec.id, nodes, kind="unload", why="idle past its TTL")
            if job is not None:
                idle.append(job)
        await _settle(idle)

    async def teardown(self, broken: BrokenGroup) -> None:
        """Unload every remaining rank of a broken group, on every member at once."""
        log.warning(
            "group %s of %s broken (%s): tearing down on %s",
            broken.group_id,
            broken.model_id,
            broken.reason,
            ", ".join(broken.members),
        )
        job = self.life.start_unload(
            broken.model_id, broken.members, kind="teardown", why=f"group broken: {broken.reason}"
        )
        if job is not None:
            await _settle([job])

    def _ensure(self, snap: FleetSnapshot, spec: ModelSpec) -> None:
        want = wanted_replicas(spec)
        # A default model is loaded only into memory that is free: it never evicts.
        soft = want == 0 and spec.default
        if soft:
            want = spec.replicas
        if want == 0 or self.life.held(spec.id) or self.life.job(spec.id) is not None:
            return
        have = replicas(snap, spec.id)
        if have >= want or self.life.backing_off(spec.id):
            return
        infos = node_infos(snap, self.catalogue, loading=spec.id)
        if soft:
            infos = [attrs.evolve(i, reclaimable_bytes=0) for i in infos]
        try:
            cand = best(spec, self.loader.facts(spec), infos)
        except PlacementPending:
            return  # a node has not said what it is yet; next pass
        if cand is None:
            return  # nothing fits now (nodes down or busy); /admin/state says why
        kind = "default, memory free" if soft else "wish"
        try:
            self.life.start_load(spec, cand, why=f"{kind}: {want} wanted / {have} present")
        except ApiError:
            return

    def _prefetch(self, snap: FleetSnapshot, spec: ModelSpec) -> None:
        """Stage a `prefetch` model's files on every healthy node that could hold it."""
        if not spec.prefetch or spec.is_local:  # a local directory is used in place
            return
        try:
            infos = node_infos(snap, self.catalogue, loading=spec.id)
            sets = candidates(spec, self.loader.facts(spec), infos, now=False)
        except PlacementPending:
            return
        able = {n for c in sets if c.feasible for n in c.nodes}
        missing = [
            n.name
            for n in snap.healthy
            if n.name in able
            and spec.source not in n.staged
            and spec.id not in n.staged
            and n.model(spec.id) is None
        ]
        self.life.prefetch(spec, missing)


async def _settle(jobs: list[Job]) -> None:
    tasks = [j.task for j in jobs if j.task is not None]
    await asyncio.gather(*tasks, return_exceptions=True)
