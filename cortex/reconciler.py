"""The reconciler: the catalogue's wishes come back true by themselves.

Every pass it (1) tears down multi-rank groups that lost a member (a rank died,
a member node went unhealthy or restarted): one rank alone can never serve, and
its peers spin on a dead link; then (2) loads models whose `keep_loaded` or
`pinned_on` asks for more replicas than the fleet has. A model whose load fails
waits longer each time (shared.retry.RECONCILE_WAIT) so it cannot thrash the fleet.
No pass acts while a node has not been heard from yet (after a cortex restart,
say) and is not given up on: what it holds is unknown. An operator's forced
unload holds a model back until the next admin load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict

import attrs

from cortex.loader import Loader
from cortex.placement import PlacementPending, best
from cortex.router import node_infos
from cortex.state import LOADING_STATES, SERVING_STATES, Fleet, FleetSnapshot
from shared.catalogue import Catalogue, ModelSpec
from shared.errors import ApiError
from shared.retry import RECONCILE_WAIT, backoff_s

log = logging.getLogger(__name__)


@attrs.frozen
class BrokenGroup:
    group_id: str
    model_id: str
    members: tuple[str, ...]  # nodes still holding a rank
    reason: str


def wanted_replicas(spec: ModelSpec) -> int:
    """How many copies the catalogue asks to keep without any request."""
    return spec.replicas if (spec.keep_loaded or spec.pinned_on) else 0


def replicas(snap: FleetSnapshot, model_id: str) -> int:
    """Copies loaded or on their way, on healthy nodes; a group counts once, at rank 0."""
    count = 0
    for node, m in snap.locations(model_id):
        if not node.healthy or m.state not in SERVING_STATES | LOADING_STATES:
            continue
        if m.group is None or m.group.world_size == 1 or m.group.rank == 0:
            count += 1
    return count


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
    fleet: Fleet
    catalogue: Catalogue
    loader: Loader
    interval_s: float = 2.0
    _failures: dict[str, int] = attrs.field(factory=dict)
    _not_before: dict[str, float] = attrs.field(factory=dict)
    _tasks: set[asyncio.Task[None]] = attrs.field(factory=set)
    # Models an operator force-unloaded: not loaded again until an admin load.
    _held: set[str] = attrs.field(factory=set)

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except Exception:  # one bad pass must not end reconciling
                log.exception("reconciler pass failed")
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t

    async def step(self) -> None:
        if self.fleet.snapshot().unheard:
            # After a restart every node starts unseen: until each has answered (or
            # been given up on), a missing rank or copy may just not be reported yet.
            return
        for broken in broken_groups(self.fleet.snapshot()):
            await self.teardown(broken)
        snap = self.fleet.snapshot()
        for spec in self.catalogue.models:
            self._ensure(snap, spec)

    def hold(self, model_id: str) -> None:
        self._held.add(model_id)

    def release(self, model_id: str) -> None:
        self._held.discard(model_id)

    async def teardown(self, broken: BrokenGroup) -> None:
        """Unload every remaining rank of a broken group, on every member."""
        log.warning(
            "group %s of %s broken (%s): tearing down on %s",
            broken.group_id,
            broken.model_id,
            broken.reason,
            ", ".join(broken.members),
        )
        await asyncio.gather(*(self._unload_member(node, broken) for node in broken.members))

    async def _unload_member(self, node: str, broken: BrokenGroup) -> None:
        try:
            await self.loader.unload(node, broken.model_id)
        except ApiError as exc:
            # Unreachable now: drop it from routing; when the node is back, its
            # lone rank shows up as a broken group again and is unloaded then.
            log.info("could not unload %s from %s: %s", broken.model_id, node, exc.message)
            self.fleet.drop_model(node, broken.model_id)

    def _ensure(self, snap: FleetSnapshot, spec: ModelSpec) -> None:
        want = wanted_replicas(spec)
        if want == 0 or spec.id in self._held or spec.id in snap.loading:
            return
        if self.loader.job(spec.id) is not None:
            return
        if replicas(snap, spec.id) >= want:
            return
        if time.monotonic() < self._not_before.get(spec.id, 0.0):
            return
        try:
            cand = best(
                spec, self.loader.facts(spec), node_infos(snap, self.catalogue, loading=spec.id)
            )
        except PlacementPending:
            return  # a node has not said what it is yet; next pass
        if cand is None:
            return  # nothing fits now (nodes down or busy); no penalty, try next pass
        try:
            job = self.loader.start(spec, cand)
        except ApiError:
            return
        log.info("reconciler: loading %s on %s", spec.id, ", ".join(cand.nodes))
        task = asyncio.get_running_loop().create_task(self._follow(spec.id, job.task))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _follow(self, model_id: str, load: asyncio.Task[None]) -> None:
        try:
            await asyncio.shield(load)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            n = self._failures.get(model_id, 0) + 1
            self._failures[model_id] = n
            wait = backoff_s(RECONCILE_WAIT, n)
            self._not_before[model_id] = time.monotonic() + wait
            log.warning(
                "reconciler: %s failed to load (%d in a row): %s; next try in %.0f s",
                model_id,
                n,
                exc,
                wait,
            )
        else:
            self._failures.pop(model_id, None)
            self._not_before.pop(model_id, None)

    def backoff(self) -> dict[str, float]:
        """Seconds until each backed-off model is tried again (for /admin/state)."""
        now = time.monotonic()
        return {m: round(t - now, 1) for m, t in self._not_before.items() if t > now}
