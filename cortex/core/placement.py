"""Placement: which node sets could hold a model, and why the others cannot.

A pure function of a snapshot (the caller builds `NodeInfo`s from poller
state), so the router, the loader and `/admin/placements` share one answer.

The arithmetic (DESIGN, "Placement arithmetic") is per node, never summed::

    need   = share * 1.3 + kv + 256 MiB         (need < usable, strictly)
    usable = min(available + reclaimable, 0.75 * total)   unified memory, now
           = 0.75 * total                                 unified memory, ever
           = min(available + reclaimable, total)          other memory, now
           = total                                        other memory, ever

Tensor sharding gives each of n nodes `weights / n` and `kv / n` (and needs
both head counts to divide by n); pipeline sharding splits whole layers in
proportion to usable memory, each node's weights and KV following its layers.

Choices worth knowing:

- Set sizes grow from `min_nodes` only as far as needed: sizes are tried in
  order and enumeration stops after the first size at which some set could
  *ever* hold the model (empty, healthy nodes).  A model that fits one node
  therefore never gets sharded because that node is busy or down right now:
  the caller answers 503 and retries, rather than spreading it over the wire.
  Nodes already holding the model do not count towards that first size, so a
  second replica of a big model may become a multi-node set; but sizes stop
  growing once too few nodes without a copy are left to form a bigger set (a
  model on every node gets no multi-node sets, which could only say "no").
- `pinned_on` restricts candidates to the pinned nodes (names unknown to the
  fleet are ignored); an empty pin list means every node.
- jaccl's "full RDMA mesh" is modelled from what discovery tells us: every
  member reports the `jaccl` backend and has at least n-1 *active* RDMA ports
  (one Thunderbolt cable per peer).  Discovery does not say which port reaches
  which peer, so a missing link shows up as a member with too few active ports.
- ring needs `ring` in every member's backends and a `ring_host`; a loopback
  `ring_host` is only reachable from members on the same hostname.
- `auto` picks jaccl when the whole set supports it, else ring.
- Enumeration is capped at `MAX_SETS` sets; nodes are pre-sorted by
  preference so the sets tried first are the promising ones.
- `now=False` asks "could this ever fit": every node is taken as empty and
  healthy, so health, current memory and `loaded` are all ignored.
- A node whose discovery is missing makes every set containing it infeasible
  (and marks it `pending`); `candidates` never raises, `best` raises
  `PlacementPending` (see there).
"""

from __future__ import annotations

import ipaddress
import itertools
import math
from collections.abc import Collection, Iterable, Sequence
from typing import Any

import attrs

from shared.catalogue import GIB, ModelFacts, ModelSpec
from shared.errors import PlacementInfoPending
from shared.wire import Discovery

__all__ = [
    "MAX_SETS",
    "OVERHEAD_FACTOR",
    "RESERVE_BYTES",
    "UNIFIED_CAP",
    "Candidate",
    "NodeFit",
    "NodeInfo",
    "PlacementPending",
    "best",
    "candidates",
    "explain",
    "pending_nodes",
    "split_layers",
    "usable_bytes",
]

MIB = 1024**2
OVERHEAD_FACTOR = 1.3
RESERVE_BYTES = 256 * MIB
# macOS lets the GPU wire about three quarters of unified memory.
UNIFIED_CAP = 0.75
# Enough for every subset of a dozen nodes; beyond that the best-first
# pre-sort keeps the sets we do look at the sensible ones.
MAX_SETS = 4096


def gib(n: int | float) -> str:
    """Bytes as GiB with two decimals, the unit of every refusal."""
    return f"{n / GIB:.2f} GiB"


@attrs.frozen
class NodeInfo:
    """What placement knows of one node, built by the caller from poller state."""

    name: str
    healthy: bool
    discovery: Discovery | None  # None: has not reported yet
    memory_available_bytes: int  # latest /health figure
    reclaimable_bytes: int = 0  # idle, unpinned models the loader could evict here
    staged: frozenset[str] = frozenset()  # model ids whose files this node holds
    loaded: frozenset[str] = frozenset()  # model ids loaded (or loading) here


class PlacementPending(PlacementInfoPending):
    """Some node that matters has not reported discovery yet; retry shortly.

    A subclass of the wire error, so letting it escape a handler renders
    503 `placement_info_pending` with Retry-After.
    """

    def __init__(self, nodes: Sequence[str], *, retry_after: int | None = None) -> None:
        self.nodes = tuple(nodes)
        super().__init__(
            f"placement waits for discovery from node(s) {', '.join(self.nodes)}",
            retry_after=retry_after,
            details={"pending_nodes": list(self.nodes)},
        )


@attrs.frozen
class NodeFit:
    """One node's share of a candidate set, with the arithmetic shown."""

    node: str
    share_bytes: int
    kv_bytes: int
    overhead_factor: float
    reserve_bytes: int
    need_bytes: int
    usable_bytes: int
    ok: bool
    reason: str | None
    # The inputs of `usable`, so operators can check it by hand.
    available_bytes: int = 0
    reclaimable_bytes: int = 0
    total_bytes: int = 0
    cap_fraction: float = 1.0
    # False: the "could it ever fit" view of an empty node (usable is the cap).
    now: bool = True
    # Pipeline sharding: how many layers this node runs.
    layers: int | None = None
    # The disk a stage of the model's files needs here (0: a copy is here, or the
    # source is a local path), against the free disk discovery reported.
    disk_need_bytes: int = 0
    disk_free_bytes: int | None = None
    # A draft model (speculative decoding) on this node: its weights, under the same
    # overhead factor, and its KV cache.
    draft_bytes: int = 0
    draft_kv_bytes: int = 0

    @property
    def headroom_bytes(self) -> int:
        return self.usable_bytes - self.need_bytes

    def arithmetic(self) -> str:
        share = f"share {gib(self.share_bytes)}"
        kv = f"kv {gib(self.kv_bytes)}"
        if self.draft_bytes or self.draft_kv_bytes:
            share = f"({share} + draft {gib(self.draft_bytes)})"
            kv += f" + draft kv {gib(self.draft_kv_bytes)}"
        need = (
            f"need {gib(self.need_bytes)} = {share} x {self.overhead_factor:g} + {kv}"
            f" + reserve {gib(self.reserve_bytes)}"
        )
        if self.layers is not None:
            need += f" ({self.layers} layers)"
        return f"{need}; {self._usable_text()}"

    def _usable_text(self) -> str:
        cap = f"{self.cap_fraction:g} x total {gib(self.total_bytes)}"
        if self.now:
            return (
                f"usable {gib(self.usable_bytes)} = min(available"
                f" {gib(self.available_bytes)} + reclaimable {gib(self.reclaimable_bytes)},"
                f" {cap})"
            )
        return f"usable {gib(self.usable_bytes)} = {cap}"

    def to_json(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d["headroom_bytes"] = self.headroom_bytes
        d["arithmetic"] = self.arithmetic()
        return d


@attrs.frozen
class Candidate:
    """One node set for a model: feasible or not, and every reason why not."""

    nodes: tuple[str, ...]
    feasible: bool
    reasons: tuple[str, ...]
    fits: tuple[NodeFit, ...]
    backend: str | None  # "ring" / "jaccl"; None for a single node
    sharding: str | None  # "tensor" / "pipeline"; None for a single node
    pending: tuple[str, ...] = ()  # members whose discovery is missing
    staged: int = 0  # members already holding the files
    pinned: int = 0  # members among the model's pinned_on
    # Members with a copy loaded (or loading) now: every member for the set that
    # serves it, so a preview tells "here already" from "does not fit".
    holding: tuple[str, ...] = ()

    @property
    def headroom_bytes(self) -> int | None:
        """The smallest spare memory over the members, once the model is in."""
        # No members (every pinned node excluded): no figure, not a ValueError.
        if not self.fits or len(self.fits) != len(self.nodes):
            return None
        return min(f.headroom_bytes for f in self.fits)

    @property
    def layer_split(self) -> tuple[int, ...] | None:
        """Layers per member, in `nodes` order, for pipeline sharding."""
        if self.sharding != "pipeline" or len(self.fits) != len(self.nodes):
            return None
        out = tuple(f.layers for f in self.fits if f.layers is not None)
        return out if len(out) == len(self.fits) else None

    def to_json(self) -> dict[str, Any]:
        return {
            "nodes": list(self.nodes),
            "feasible": self.feasible,
            "reasons": list(self.reasons),
            "fits": [f.to_json() for f in self.fits],
            "backend": self.backend,
            "sharding": self.sharding,
            "pending": list(self.pending),
            "staged": self.staged,
            "pinned": self.pinned,
            "holding": list(self.holding),
            "headroom_bytes": self.headroom_bytes,
            "layer_split": None if self.layer_split is None else list(self.layer_split),
        }


def usable_bytes(node: NodeInfo, *, now: bool = True) -> int | None:
    """The memory a model may use on `node`; None before discovery."""
    d = node.discovery
    if d is None:
        return None
    cap_fraction = UNIFIED_CAP if d.unified_memory else 1.0
    cap = int(d.memory_total_bytes * cap_fraction)
    if not now:
        return cap
    return max(0, min(node.memory_available_bytes + node.reclaimable_bytes, cap))


def pending_nodes(nodes: Iterable[NodeInfo], *, now: bool = True) -> tuple[str, ...]:
    """Nodes whose missing discovery could change the answer.

    Now, only healthy ones: a never-seen node that stays down must not block
    placement forever.  Ever, all of them: we cannot rule out what we never saw.
    """
    return tuple(n.name for n in nodes if n.discovery is None and (n.healthy or not now))


def split_layers(layers: int, weights: Sequence[int]) -> tuple[int, ...]:
    """Whole layers in proportion to `weights`, by largest remainder, at least 1 each.

    Needs `layers >= len(weights)`.  Equal weights (or all zero) split evenly,
    earlier members taking the remainder.
    """
    n = len(weights)
    if n == 0 or layers < n:
        raise ValueError(f"cannot split {layers} layers over {n} nodes")
    total = sum(max(0, w) for w in weights)
    ws = [max(0, w) for w in weights] if total > 0 else [1] * n
    total = sum(ws)
    base = [layers * w // total for w in ws]
    rems = [layers * w % total for w in ws]
    order = sorted(range(n), key=lambda i: (-rems[i], -ws[i], i))
    for i in order[: layers - sum(base)]:
        base[i] += 1
    # Every rank must run something: take from the largest for any empty one.
    for i in range(n):
        if base[i] == 0:
            j = max(range(n), key=lambda k: (base[k], ws[k]))
            base[j] -= 1
            base[i] = 1
    return tuple(base)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ring_refusals(members: Sequence[NodeInfo], discs: Sequence[Discovery]) -> list[str]:
    out: list[str] = []
    for m, d in zip(members, discs, strict=True):
        if "ring" not in d.backends:
            have = ", ".join(d.backends) or "none"
            out.append(f"node {m.name} does not offer the ring backend (has: {have})")
        elif not d.ring_host:
            out.append(f"node {m.name} reports no ring_host for TCP peers to reach")
    for m, d in zip(members, discs, strict=True):
        if d.ring_host and _is_loopback(d.ring_host):
            far = [
                o.name
                for o, od in zip(members, discs, strict=True)
                if o is not m and od.hostname != d.hostname
            ]
            if far:
                out.append(
                    f"node {m.name}'s ring_host {d.ring_host} is loopback, unreachable"
                    f" from {', '.join(far)} on other hosts"
                )
    return out


def _jaccl_refusals(members: Sequence[NodeInfo], discs: Sequence[Discovery]) -> list[str]:
    out: list[str] = []
    n = len(members)
    for m, d in zip(members, discs, strict=True):
        if "jaccl" not in d.backends:
            have = ", ".join(d.backends) or "none"
            out.append(f"node {m.name} does not offer the jaccl backend (has: {have})")
            continue
        active = [p for p in d.rdma_ports if p.active]
        if len(active) < n - 1:
            peers = ", ".join(o.name for o in members if o is not m)
            devs = ", ".join(p.device for p in active) or "none"
            out.append(
                f"jaccl needs a full RDMA mesh: node {m.name} has {len(active)} active"
                f" RDMA port(s) ({devs}), needs {n - 1} to reach {peers}"
            )
    return out


def _backend(
    spec: ModelSpec, members: Sequence[NodeInfo], discs: Sequence[Discovery]
) -> tuple[str, list[str]]:
    if spec.backend == "ring":
        return "ring", _ring_refusals(members, discs)
    jaccl = _jaccl_refusals(members, discs)
    if spec.backend == "jaccl" or not jaccl:
        return "jaccl", jaccl
    return "ring", _ring_refusals(members, discs)


def disk_need(spec: ModelSpec, facts: ModelFacts, node: NodeInfo) -> int:
    """Bytes a stage of `spec` would write on `node`: its weights, unless a copy is there."""
    if spec.is_local or spec.id in node.staged:
        return 0
    return facts.weights_bytes


def _evaluate(
    spec: ModelSpec, facts: ModelFacts, members: Sequence[NodeInfo], *, now: bool
) -> Candidate:
    names = tuple(m.name for m in members)
    sharding: str | None = spec.sharding if len(members) > 1 else None
    staged = sum(spec.id in m.staged for m in members)
    pinned = sum(m.name in spec.pinned_on for m in members)
    holding = tuple(m.name for m in members if spec.id in m.loaded) if now else ()

    pending = tuple(m.name for m in members if m.discovery is None)
    if pending:
        reasons = [f"node {p} has not reported discovery yet" for p in pending]
        if now:
            reasons.extend(_unhealthy(members))
        return Candidate(
            nodes=names,
            feasible=False,
            reasons=tuple(reasons),
            fits=(),
            backend=None,
            sharding=sharding,
            pending=pending,
            staged=staged,
            pinned=pinned,
            holding=holding,
        )
    discs = [m.discovery for m in members if m.discovery is not None]
    backend, reasons = _refusals(spec, members, discs, now=now)
    fits, fit_reasons = _fits(spec, facts, members, discs, sharding, now=now)
    reasons.extend(fit_reasons)
    return Candidate(
        nodes=names,
        feasible=not reasons,
        reasons=tuple(reasons),
        fits=tuple(fits),
        backend=backend,
        sharding=sharding,
        staged=staged,
        pinned=pinned,
        holding=holding,
    )


def _unhealthy(members: Sequence[NodeInfo]) -> Iterable[str]:
    return (f"node {m.name} is unhealthy" for m in members if not m.healthy)


def _refusals(
    spec: ModelSpec, members: Sequence[NodeInfo], discs: Sequence[Discovery], *, now: bool
) -> tuple[str | None, list[str]]:
    """The backend a group of `members` would use, and what refuses the set before memory."""
    backend: str | None = None
    reasons: list[str] = []
    if len(members) > 1:
        backend, refusals = _backend(spec, members, discs)
        reasons.extend(refusals)
    if now:
        reasons.extend(_unhealthy(members))
        reasons.extend(
            f"node {m.name} already holds model {spec.id}" for m in members if spec.id in m.loaded
        )
    return backend, reasons


@attrs.frozen
class _Split:
    """Each member's share of the weights and KV cache, its layers (pipeline), and
    why the model cannot be split this way."""

    shares: list[int]
    kvs: list[int]
    layers: list[int | None]
    reasons: list[str] = attrs.Factory(list)


def _even_split(facts: ModelFacts, n: int, reasons: list[str]) -> _Split:
    return _Split(
        shares=[_ceil_div(facts.weights_bytes, n)] * n,
        kvs=[_ceil_div(facts.kv_bytes, n)] * n,
        layers=[None] * n,
        reasons=reasons,
    )


def _split(spec: ModelSpec, facts: ModelFacts, usable: Sequence[int]) -> _Split:
    n = len(usable)
    if n == 1:
        return _Split([facts.weights_bytes], [facts.kv_bytes], [facts.layers])
    if spec.sharding == "tensor":
        return _even_split(facts, n, _tensor_refusals(spec, facts, n))
    total_layers = facts.layers
    # Short of layers: show the even split anyway so the memory picture stays visible.
    if total_layers is None:
        return _even_split(
            facts,
            n,
            [
                f"pipeline sharding needs the model's layer count"
                f" (set layers for {spec.id} in the catalogue)"
            ],
        )
    if total_layers < n:
        return _even_split(
            facts,
            n,
            [
                f"pipeline sharding over {n} nodes needs at least {n} layers:"
                f" model has {total_layers}"
            ],
        )
    split = split_layers(total_layers, usable)
    return _Split(
        shares=[_ceil_div(facts.weights_bytes * k, total_layers) for k in split],
        kvs=[_ceil_div(facts.kv_bytes * k, total_layers) for k in split],
        layers=list(split),
    )


def _tensor_refusals(spec: ModelSpec, facts: ModelFacts, n: int) -> list[str]:
    heads, kv_heads = facts.heads, facts.kv_heads
    if heads is None or kv_heads is None:
        return [
            f"tensor sharding over {n} nodes needs the model's head counts"
            f" (set heads and kv_heads for {spec.id} in the catalogue)"
        ]
    if heads % n or kv_heads % n:
        return [
            f"tensor sharding over {n} nodes needs head counts divisible by {n}:"
            f" model has {heads} attention heads and {kv_heads} KV heads"
        ]
    return []


def _fits(
    spec: ModelSpec,
    facts: ModelFacts,
    members: Sequence[NodeInfo],
    discs: Sequence[Discovery],
    sharding: str | None,
    *,
    now: bool,
) -> tuple[list[NodeFit], list[str]]:
    """Each member's memory fit under the split, and every reason one does not fit."""
    usable = [usable_bytes(m, now=now) or 0 for m in members]
    split = _split(spec, facts, usable)
    reasons = list(split.reasons)
    fits: list[NodeFit] = []
    for m, d, share, kv, use, layers in zip(
        members, discs, split.shares, split.kvs, usable, split.layers, strict=True
    ):
        fit = _fit(
            spec, facts, m, d, share, kv, use, layers if sharding == "pipeline" else None, now=now
        )
        if fit.disk_need_bytes and fit.disk_need_bytes >= d.disk_free_bytes:
            # Every member stages the whole model (each rank opens every file).
            reasons.append(
                f"node {m.name} lacks the disk: staging {spec.id} needs"
                f" {gib(fit.disk_need_bytes)}, its store has {gib(d.disk_free_bytes)} free"
            )
        if fit.reason is not None:
            reasons.append(fit.reason)
        fits.append(fit)
    return fits, reasons


def _fit(
    spec: ModelSpec,
    facts: ModelFacts,
    m: NodeInfo,
    d: Discovery,
    share: int,
    kv: int,
    use: int,
    layers: int | None,
    *,
    now: bool,
) -> NodeFit:
    """`m`'s fit for its share; `reason` says why it does not fit, if it does not."""
    # A draft model runs in the same runner: its weights and cache count here too.
    draft, draft_kv = facts.draft_weights_bytes, facts.draft_kv_bytes
    need = math.ceil((share + draft) * OVERHEAD_FACTOR) + kv + draft_kv + RESERVE_BYTES
    fit = NodeFit(
        node=m.name,
        share_bytes=share,
        kv_bytes=kv,
        overhead_factor=OVERHEAD_FACTOR,
        reserve_bytes=RESERVE_BYTES,
        need_bytes=need,
        usable_bytes=use,
        ok=need < use,
        reason=None,
        available_bytes=m.memory_available_bytes if now else 0,
        reclaimable_bytes=m.reclaimable_bytes if now else 0,
        total_bytes=d.memory_total_bytes,
        cap_fraction=UNIFIED_CAP if d.unified_memory else 1.0,
        now=now,
        layers=layers,
        disk_need_bytes=disk_need(spec, facts, m) if now else 0,
        disk_free_bytes=d.disk_free_bytes,
        draft_bytes=draft,
        draft_kv_bytes=draft_kv,
    )
    if fit.ok:
        return fit
    verdict = (
        "exactly its usable memory (need must be strictly less)"
        if need == use
        else f"more than its usable {gib(use)}"
    )
    return attrs.evolve(
        fit, reason=f"node {m.name}: needs {gib(need)}, {verdict}: {fit.arithmetic()}"
    )


def _pool(spec: ModelSpec, nodes: Sequence[NodeInfo]) -> list[NodeInfo]:
    pool = [n for n in nodes if n.name in spec.pinned_on] if spec.pinned_on else list(nodes)

    # Best nodes first so capped enumeration looks at the promising sets.
    def key(n: NodeInfo) -> tuple[bool, bool, int, str]:
        return (
            n.name not in spec.pinned_on,
            spec.id not in n.staged,
            -(usable_bytes(n) or 0),
            n.name,
        )

    return sorted(pool, key=key)


def _sort_key(c: Candidate) -> tuple[bool, int, int, int, float, tuple[str, ...]]:
    headroom = c.headroom_bytes
    return (
        not c.feasible,
        -c.pinned,
        len(c.nodes),
        -c.staged,
        -(headroom if headroom is not None else -math.inf),
        c.nodes,
    )


def candidates(
    spec: ModelSpec, facts: ModelFacts, nodes: Sequence[NodeInfo], *, now: bool = True
) -> list[Candidate]:
    """Every candidate node set for `spec`, feasible or not, best first.

    Set sizes run from `spec.min_nodes` up to the first size at which some set
    could ever hold the model (see the module docstring).  Never raises for
    missing discovery: such sets come back infeasible with `pending` set.
    """
    if not nodes:
        return []
    pool = _pool(spec, nodes)
    if len(pool) < spec.min_nodes:
        where = ", ".join(n.name for n in pool) or "none"
        scope = "pinned nodes" if spec.pinned_on else "nodes"
        pins = f" (pinned_on: {', '.join(spec.pinned_on)})" if spec.pinned_on else ""
        return [
            Candidate(
                nodes=tuple(n.name for n in pool),
                feasible=False,
                reasons=(
                    f"model {spec.id} needs at least {spec.min_nodes} node(s);"
                    f" {len(pool)} {scope} known ({where}){pins}",
                ),
                fits=(),
                backend=None,
                sharding=None,
            )
        ]

    out: list[Candidate] = []
    # Only nodes without a copy can form a new one ("ever" ignores what is loaded).
    free = [n for n in pool if not now or spec.id not in n.loaded]
    # The embedding runner has no distributed mode: an encoder gets one node or none.
    # Neither can a runner with a draft model or adapters (mlx_lm refuses them there).
    largest = 1 if spec.single_node else len(pool)
    for size in range(spec.min_nodes, largest + 1):
        fits, fits_free = _size_could_fit(spec, facts, pool, size, now, out)
        # Stop at the first size some set of free nodes could hold it; or once some set
        # could and too few free nodes are left to make any bigger set a new copy.
        if fits_free or (fits and len(free) <= size) or len(out) >= MAX_SETS:
            break
    out.sort(key=_sort_key)
    return out


def _size_could_fit(
    spec: ModelSpec,
    facts: ModelFacts,
    pool: Sequence[NodeInfo],
    size: int,
    now: bool,
    out: list[Candidate],
) -> tuple[bool, bool]:
    """Evaluate every set of `size` into `out` (up to MAX_SETS); say whether some set
    could ever hold the model, and whether some set of nodes without a copy could."""
    fits = fits_free = False
    for combo in itertools.combinations(pool, size):
        if len(out) >= MAX_SETS:
            break
        cand = _evaluate(spec, facts, combo, now=now)
        out.append(cand)
        ever = _evaluate(spec, facts, combo, now=False) if now else cand
        fits = fits or ever.feasible
        free = not now or not any(spec.id in m.loaded for m in combo)
        fits_free = fits_free or (ever.feasible and free)
    return fits, fits_free


def best(
    spec: ModelSpec,
    facts: ModelFacts,
    nodes: Sequence[NodeInfo],
    *,
    exclude: Collection[str] = (),
    now: bool = True,
) -> Candidate | None:
    """The best feasible set, or None.

    Raises `PlacementPending` when missing discovery could change the answer:
    now, when any healthy node in play has not reported (it will within a poll
    cycle); ever, when nothing known fits and some node has not reported, so
    the caller must not conclude a permanent 404.
    """
    considered = [n for n in nodes if n.name not in exclude]
    if spec.pinned_on:
        considered = [n for n in considered if n.name in spec.pinned_on]
    waiting = pending_nodes(considered, now=now)
    if now and waiting:
        raise PlacementPending(waiting)
    for c in candidates(spec, facts, considered, now=now):
        if c.feasible:
            return c
    if waiting:
        raise PlacementPending(waiting)
    return None


def explain(spec: ModelSpec, cands: Sequence[Candidate], *, limit: int = 5) -> str:
    """A one-paragraph refusal for a 400/404 message: the best sets' reasons."""
    if not cands:
        return f"no node can hold model {spec.id}: no nodes known"
    parts = [f"[{', '.join(c.nodes)}] " + "; ".join(c.reasons) for c in cands[:limit]]
    more = f" (and {len(cands) - limit} more sets)" if len(cands) > limit else ""
    return f"no node set can hold model {spec.id}: " + " | ".join(parts) + more
