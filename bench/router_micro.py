"""What cortex's routing rules cost per request, against trivial pickers in the same run.

`python -m bench.router_micro [--nodes 16] [--models-per-node 8] [--calls 20000]`

A synthetic fleet: `--nodes` healthy nodes, each holding `--models-per-node` ready
models out of a catalogue of twice as many (so every model has replicas on
half the fleet), with seeded random loads and some requests of cortex's own in
flight. The same request stream (model name, prefix keys) goes to:

  min-load      `min(replicas, key=load)` over precomputed replicas: the pick alone
  lookup+min    resolve the name in the catalogue, find the ready replicas in the
                snapshot, pick the least loaded: the least any router must do
  route         cortex.core.router.route, no affinity table
  route+aff     cortex.core.router.route with a full affinity table (8192 keys)

plus, for scale, the other per-request work cortex's proxy does around `route`:
`Fleet.snapshot()` and `prefix_keys(body)`. Each variant runs `--repeat`
times interleaved; the best run counts (as timeit does), since noise only adds.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from cortex.core.router import Route, prefix_keys, route
from cortex.core.state import AffinityTable, Fleet, FleetSnapshot
from shared.catalogue import Catalogue, ModelSpec
from shared.wire import ModelHealth, ModelStatus, NodeHealth


def build(
    nodes: int, per_node: int, seed: int, catalogued: int | None = None
) -> tuple[Fleet, FleetSnapshot, Catalogue, list[str]]:
    """A fleet where node i holds models i*per_node.. (per_node of them, mod the catalogue size,
    2*per_node unless `catalogued` says)."""
    rng = random.Random(seed)
    n_models = catalogued or 2 * per_node
    ids = [f"model-{j:03d}" for j in range(n_models)]
    catalogue = Catalogue(
        models=tuple(
            ModelSpec(id=mid, source=f"org/{mid}", aliases=(f"alias-{mid}",), memory_gb=2.0)
            for mid in ids
        )
    )
    fleet = Fleet.of(
        ((f"node-{i:04d}", f"http://10.0.{i // 250}.{i % 250 + 1}:9410") for i in range(nodes)),
        threshold=3,
    )
    for i in range(nodes):
        name = f"node-{i:04d}"
        held = [ids[(i * per_node + k) % n_models] for k in range(per_node)]
        statuses = [
            ModelStatus(
                model_id=mid,
                state="ready",
                source=f"org/{mid}",
                group=None,
                port=50000 + k,
                memory_bytes=2 << 30,
                last_used=rng.random(),
            )
            for k, mid in enumerate(held)
        ]
        health = NodeHealth(
            status="busy",
            node_id=f"id-{i:04d}",
            started_at=0.0,
            uptime_s=100.0,
            memory_available_bytes=64 << 30,
            models=tuple(
                ModelHealth(
                    model_id=mid,
                    state="ready",
                    in_flight=rng.randint(0, 6),
                    queue_depth=rng.randint(0, 3),
                    phase="decode",
                    decode_tps=50.0,
                    ttft_s=0.1,
                    last_used=0.0,
                )
                for mid in held
            ),
        )
        # The same path a good poll takes: healthy, models merged from /models + /health.
        fleet.poll_succeeded(name, health, started=time.monotonic(), statuses=statuses)
        for mid in held:
            for _ in range(rng.randint(0, 2)):
                fleet.begin_request(name, mid)
    return fleet, fleet.snapshot(), catalogue, ids


def requests(ids: Sequence[str], count: int, seed: int) -> list[tuple[str, tuple[str, ...]]]:
    """(model name, prefix keys) per request; a quarter of the names are aliases."""
    rng = random.Random(seed + 1)
    out = []
    for i in range(count):
        mid = rng.choice(ids)
        name = f"alias-{mid}" if i % 4 == 0 else mid
        body = _body(mid, i % 64)
        out.append((name, prefix_keys(body)))
    return out


def _body(model: str, conv: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": f"conversation {conv}: tell me about lighthouses"},
            {"role": "assistant", "content": "Lighthouses guide ships. " * 8},
            {"role": "user", "content": "and storms?"},
        ],
    }


def affinity_table(
    snap: FleetSnapshot, reqs: Sequence[tuple[str, tuple[str, ...]]], seed: int
) -> AffinityTable:
    """Every request's keys remembered on a random node holding its model, plus filler."""
    rng = random.Random(seed + 2)
    table = AffinityTable(capacity=8192)
    for i in range(8192):
        table.remember([f"filler-{i:05d}"], f"node-{rng.randrange(len(snap.nodes)):04d}")
    for name, keys in reqs:
        mid = name.removeprefix("alias-")
        holders = [n.name for n, _ in snap.locations(mid)]
        table.remember(keys[1:2], rng.choice(holders))
    return table


def time_ns(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - start) / calls


def _baselines(
    snap: Any, cat: Any, reqs: list[tuple[str, Any]], replicas: dict[str, list[Any]]
) -> list[tuple[str, Callable[[], None]]]:
    """The trivial pickers the router is held against."""
    plain = [(name.removeprefix("alias-"), keys) for name, keys in reqs]

    def min_load() -> None:
        for mid, _ in plain:
            min(replicas[mid], key=lambda nm: nm[1].load)

    def lookup_min() -> None:
        for name, _ in reqs:
            spec = cat.resolve(name)
            assert spec is not None
            ready = [(n, m) for n, m in snap.locations(spec.id) if n.healthy and m.state == "ready"]
            min(ready, key=lambda nm: nm[1].load)

    return [("min-load", min_load), ("lookup+min", lookup_min)]


def _router_calls(
    fleet: Any, snap: Any, cat: Any, reqs: list[tuple[str, Any]], aff: Any, body: dict[str, Any]
) -> list[tuple[str, Callable[[], None]]]:
    """The router with and without affinity, and the per-request work around it."""

    def route_plain() -> None:
        for name, keys in reqs:
            route(snap, cat, name, prefix=keys)

    def route_aff() -> None:
        for name, keys in reqs:
            route(snap, cat, name, prefix=keys, affinity=aff)

    def snapshots() -> None:
        for _ in reqs:
            fleet.snapshot()

    def keys() -> None:
        for _ in reqs:
            prefix_keys(body)

    return [
        ("route", route_plain),
        ("route+aff", route_aff),
        ("snapshot()", snapshots),
        ("prefix_keys", keys),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.router_micro",
        description="Microseconds per cortex.core.router.route call vs trivial pickers.",
    )
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--models-per-node", type=int, default=8)
    parser.add_argument("--calls", type=int, default=20000, help="routed requests per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs per variant; best counts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.nodes, args.models_per_node, args.calls, args.repeat) < 1:
        parser.error("every count must be >= 1")

    fleet, snap, cat, ids = build(args.nodes, args.models_per_node, args.seed)
    reqs = requests(ids, args.calls, args.seed)
    aff = affinity_table(snap, reqs, args.seed).view()
    replicas = {
        mid: [(n, m) for n, m in snap.locations(mid) if n.healthy and m.state == "ready"]
        for mid in ids
    }
    variants = _baselines(snap, cat, reqs, replicas) + _router_calls(
        fleet, snap, cat, reqs, aff, _body(ids[0], 0)
    )

    # Sanity: the router does answer Routes, and affinity does change some picks.
    picks = [route(snap, cat, n, prefix=k, affinity=aff) for n, k in reqs[:200]]
    assert all(isinstance(p, Route) for p in picks)
    by_aff = sum(1 for p in picks if isinstance(p, Route) and p.reason == "affinity")

    best = {name: float("inf") for name, _ in variants}
    for r in range(args.repeat):
        # Rotate the order each run so no variant always runs on a cold cache.
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        for name, fn in order:
            best[name] = min(best[name], time_ns(fn, len(reqs)))

    replicas_per_model = sum(len(v) for v in replicas.values()) / len(replicas)
    print(
        f"fleet: {args.nodes} nodes x {args.models_per_node} ready models "
        f"({len(ids)} catalogued, {replicas_per_model:.0f} replicas each); "
        f"{args.calls} requests per run, best of {args.repeat}; "
        f"{by_aff}/200 sampled picks went by affinity\n"
    )
    print(f"{'variant':<12} {'µs/call':>9} {'vs min-load':>12} {'vs lookup+min':>14}")
    print("-" * 50)
    for name, _ in variants:
        us = best[name] / 1e3
        print(
            f"{name:<12} {us:>9.2f} {best[name] / best['min-load']:>11.1f}x"
            f" {best[name] / best['lookup+min']:>13.2f}x"
        )
    route_us = best["route+aff"] / 1e3
    per_req = (best["route+aff"] + best["snapshot()"] + best["prefix_keys"]) / 1e3
    print(
        f"\nper proxied request cortex spends ~{per_req:.1f} µs deciding "
        f"(snapshot + prefix_keys + route with affinity; route alone {route_us:.1f} µs), "
        f"i.e. {1e6 / per_req:,.0f} decisions/s on one core"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
