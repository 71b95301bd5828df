"""POST /admin/linktest: an `mx.distributed` all-reduce over chosen nodes, as a group.

The group forms the way a model group does (no SSH): cortex takes a block of
ring ports from the fleet's table, gives every member its rank's GroupSpec,
and posts POST /linktest to all of them at once. Each rank times all_sum of
every size, round by round. When one member fails (unreachable, an error, a
rank that died) the others are told to stop at once, so nothing waits on a
peer that will never come; the whole test is bounded by `timeout_s`.

Bandwidth is nccl-tests' convention: algbw = bytes / seconds of the slowest
rank in the round; busbw = algbw * 2(n-1)/n, what each link carried in a ring
all-reduce (comparable across world sizes).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import statistics
from collections.abc import Sequence
from typing import Any

import aiohttp
import attrs
from aiohttp import web

from cortex.run.lifecycle import LIFECYCLE
from cortex.run.loader import LOADER, ibv_rows
from cortex.run.poller import FLEET
from shared.errors import (
    ApiError,
    InvalidRequest,
    PlacementInfoPending,
    read_json_object,
    reject_unknown,
)
from shared.wire import Backend, Discovery, GroupSpec

FORMULA = "algbw = size_bytes / max_rank_seconds; busbw = algbw * 2(n-1)/n"
DEFAULT_SIZES = (1024, 1 << 20, 16 << 20)
# Beyond the ranks' own deadline: time for their answers to arrive.
ANSWER_GRACE_S = 10.0
# MLX's ring says this when a rank cannot listen on its port (errno 98, in use).
BIND_ERROR = "Couldn't bind socket"
BIND_ATTEMPTS = 3


@attrs.frozen
class LinkTestPlan:
    nodes: tuple[str, ...]
    backend: Backend
    sizes: tuple[int, ...]
    rounds: int
    warmup: int
    timeout_s: float

    @classmethod
    def from_json(cls, body: dict[str, Any], healthy: Sequence[str]) -> LinkTestPlan:
        reject_unknown(body, {"nodes", "backend", "sizes", "rounds", "warmup", "timeout_s"})
        nodes = body.get("nodes") or list(healthy)
        if not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes):
            raise InvalidRequest("'nodes' must be an array of node names", param="nodes")
        if len(set(nodes)) != len(nodes):
            raise InvalidRequest("'nodes' names a node twice", param="nodes")
        if len(nodes) < 2:
            raise InvalidRequest(
                f"a link test needs 2 or more nodes (healthy now: {', '.join(healthy) or 'none'})",
                param="nodes",
            )
        backend = body.get("backend", "ring")
        if backend not in ("ring", "jaccl"):
            raise InvalidRequest("'backend' must be ring or jaccl", param="backend")
        sizes = body.get("sizes", list(DEFAULT_SIZES))
        if not isinstance(sizes, list) or not sizes:
            raise InvalidRequest("'sizes' must be a non-empty array of byte counts", param="sizes")
        rounds, warmup = body.get("rounds", 5), body.get("warmup", 1)
        timeout = body.get("timeout_s", 60.0)
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise InvalidRequest("'timeout_s' must be a positive number", param="timeout_s")
        # The neuron checks the ranges of sizes, rounds and warmup (one place).
        return cls(
            nodes=tuple(nodes),
            backend=backend,
            sizes=tuple(sizes),
            rounds=rounds,
            warmup=warmup,
            timeout_s=float(timeout),
        )


def link_groups(
    discs: Sequence[Discovery], backend: Backend, base_port: int, test_id: str
) -> list[GroupSpec]:
    """Every member's GroupSpec, rank i on base_port + i (as a model group's)."""
    hosts = tuple(f"{d.ring_host}:{base_port + i}" for i, d in enumerate(discs))
    ibv = ibv_rows(discs) if backend == "jaccl" else ()
    return [
        GroupSpec(
            group_id=f"linktest-{test_id}",
            rank=rank,
            world_size=len(discs),
            backend=backend,
            sharding="tensor",
            hosts=hosts if backend == "ring" else (),
            coordinator=hosts[0] if backend == "jaccl" else None,
            ibv_devices=ibv,
        )
        for rank in range(len(discs))
    ]


def _pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence (p50s are medians)."""
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))]


def summarize(plan: LinkTestPlan, answers: Sequence[dict[str, Any] | str]) -> dict[str, Any]:
    """The report: per size, each round's slowest rank, bandwidth, latency, jitter, failures.

    `answers[i]` is rank i's answer, or a string saying why it has none.
    """
    n = len(plan.nodes)
    ranks, failures = _ranks(plan, answers)
    # A rank that failed as a whole is said once (in `failures`), not again per round.
    rank_failed = any(f.get("rank") is not None for f in failures)
    sizes = []
    for size in plan.sizes:
        rounds = []
        for r in range(plan.rounds):
            entry, bad_result = _round(plan, answers, size, r)
            if not entry["ok"] and (not rank_failed or bad_result):
                failures.append({"size": size, "round": r, "error": entry["error"]})
            rounds.append(entry)
        sizes.append(_size_summary(size, rounds, n))
    ok = not failures and all(r["ok"] for r in ranks)
    return {
        "ok": ok,
        "backend": plan.backend,
        "nodes": list(plan.nodes),
        "world_size": n,
        "formula": FORMULA,
        "sizes": sizes,
        "ranks": ranks,
        "failures": failures,
    }


def _ranks(
    plan: LinkTestPlan, answers: Sequence[dict[str, Any] | str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each rank's own verdict, and the failures of ranks as a whole."""
    failures: list[dict[str, Any]] = []
    ranks = []
    for i, (node, a) in enumerate(zip(plan.nodes, answers, strict=True)):
        if isinstance(a, str):
            failures.append({"node": node, "rank": i, "error": a})
            ranks.append({"node": node, "rank": i, "ok": False, "error": a})
            continue
        ranks.append(
            {
                "node": node,
                "rank": i,
                "ok": bool(a.get("ok")),
                "error": a.get("error"),
                "join_s": (a.get("joined") or {}).get("join_s"),
                "stderr_tail": a.get("stderr_tail", [])[-5:],
            }
        )
        if a.get("error"):
            failures.append({"node": node, "rank": i, "error": a["error"]})
    return ranks, failures


def _round(
    plan: LinkTestPlan, answers: Sequence[dict[str, Any] | str], size: int, r: int
) -> tuple[dict[str, Any], bool]:
    """Round `r` of `size` over every rank: its slowest time and bandwidth, or its
    errors; and whether a rank ran it and reported a failure."""
    n = len(plan.nodes)
    seen: list[float] = []
    errors: list[str] = []
    bad_result = False
    for node, a in zip(plan.nodes, answers, strict=True):
        if isinstance(a, str):
            errors.append(f"{node}: no answer")
            continue
        got = [x for x in a.get("rounds", []) if x["size"] == size and x["round"] == r]
        if not got:
            errors.append(f"{node}: did not run it")
            continue
        seen.append(float(got[0]["seconds"]))
        if not got[0].get("ok"):
            bad_result = True
            errors.append(f"{node}: {got[0].get('error')}")
    if errors or len(seen) != n:
        return {"round": r, "ok": False, "error": "; ".join(errors)}, bad_result
    secs = max(seen)
    algbw = size / secs if secs > 0 else math.inf
    entry = {
        "round": r,
        "ok": True,
        "seconds": secs,
        "algbw_Bps": algbw,
        "busbw_Bps": algbw * 2 * (n - 1) / n,
    }
    return entry, bad_result


def _size_summary(size: int, rounds: list[dict[str, Any]], n: int) -> dict[str, Any]:
    good = [x["seconds"] for x in rounds if x["ok"]]
    summary: dict[str, Any] = {"size_bytes": size, "rounds": rounds, "ok": len(good)}
    if not good:
        return summary
    bw = [x["algbw_Bps"] for x in rounds if x["ok"]]
    summary.update(
        latency_s={
            "min": min(good),
            "p50": statistics.median(good),
            "p99": _pct(good, 99),
            "max": max(good),
            "mean": statistics.fmean(good),
        },
        algbw_Bps={"p50": statistics.median(bw), "max": max(bw)},
        busbw_Bps={"p50": statistics.median(bw) * 2 * (n - 1) / n},
        jitter_s={
            "stdev": statistics.pstdev(good),
            "p99_minus_p50": _pct(good, 99) - statistics.median(good),
        },
    )
    return summary


async def run(app: web.Application, plan: LinkTestPlan) -> dict[str, Any]:
    """Start every rank at once, stop the others on the first failure, gather, summarize."""
    fleet, life = app[FLEET], app[LIFECYCLE]
    session = app[LOADER].session
    known = set(fleet.names)
    unknown = [n for n in plan.nodes if n not in known]
    if unknown:
        raise InvalidRequest(f"unknown node(s): {', '.join(unknown)}", param="nodes")
    discs = []
    for name in plan.nodes:
        d = fleet.node(name).discovery
        if d is None:
            raise PlacementInfoPending(f"node {name} has not reported its discovery yet")
        if plan.backend not in d.backends:
            raise InvalidRequest(
                f"node {name} has no {plan.backend} backend (it has: {', '.join(d.backends)})",
                param="backend",
            )
        discs.append(d)
    blocks: list[int] = []
    retried: list[str] = []
    try:
        while True:
            test_id = secrets.token_hex(6)
            first = life.take_ports(len(plan.nodes))
            blocks.append(first)
            groups = link_groups(discs, plan.backend, first, test_id)
            answers = await _gather(app, session, plan, groups, test_id)
            # A port still in TIME_WAIT (a group that just ended, before a cortex
            # restart) or taken by another program: the next block may be free.
            if len(blocks) >= BIND_ATTEMPTS or not any(_bind_failed(a) for a in answers):
                break
            retried.append(f"ports {first}..{first + len(plan.nodes) - 1} could not be bound")
    finally:
        for b in blocks:
            life.free_ports(b)
    report = summarize(plan, answers)
    report["test_id"] = test_id
    report["base_port"] = first
    report["retried"] = retried
    return report


def _bind_failed(answer: dict[str, Any] | str) -> bool:
    if isinstance(answer, str):
        return False
    return any(BIND_ERROR in line for line in answer.get("stderr_tail", []))


async def _gather(
    app: web.Application,
    session: aiohttp.ClientSession,
    plan: LinkTestPlan,
    groups: Sequence[GroupSpec],
    test_id: str,
) -> list[dict[str, Any] | str]:
    """Every rank's answer; the first to fail stops the ranks still running."""
    fleet = app[FLEET]
    timeout = aiohttp.ClientTimeout(total=plan.timeout_s + ANSWER_GRACE_S, sock_connect=5.0)
    results: dict[str, dict[str, Any] | str] = {}
    stopped = False

    async def rank(node: str, group: GroupSpec) -> None:
        nonlocal stopped
        body = {
            "test_id": test_id,
            "group": group.to_json(),
            "sizes": list(plan.sizes),
            "rounds": plan.rounds,
            "warmup": plan.warmup,
            "timeout_s": plan.timeout_s,
        }
        answer = results[node] = await _ask(session, fleet.node(node).url, node, body, timeout)
        failed = isinstance(answer, str) or not answer.get("ok")
        pending = [p for p in plan.nodes if p not in results]
        if failed and pending and not stopped:
            # A peer that failed never comes: the others would wait for it.
            stopped = True
            reason = f"{node} failed"
            await asyncio.gather(
                *(_stop(session, fleet.node(p).url, test_id, reason) for p in pending)
            )

    async with asyncio.TaskGroup() as tg:
        for n, g in zip(plan.nodes, groups, strict=True):
            tg.create_task(rank(n, g))
    return [results[n] for n in plan.nodes]


async def _ask(
    session: aiohttp.ClientSession,
    base_url: str,
    node: str,
    body: dict[str, Any],
    limit: aiohttp.ClientTimeout,
) -> dict[str, Any] | str:
    """`node`'s answer to the test, or a string saying why there is none."""
    url = base_url.rstrip("/") + "/linktest"
    try:
        async with session.post(url, json=body, timeout=limit) as resp:
            answer = await resp.json(content_type=None)
    except aiohttp.ClientConnectorError as exc:
        return f"node {node} is unreachable: {exc}"
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return f"node {node} did not answer: {exc!r}"
    if resp.status != 200 or not isinstance(answer, dict):
        err = ApiError.from_envelope(resp.status, answer, None)
        return f"node {node} refused the test: {resp.status} {err.message}"
    return answer


async def _stop(session: aiohttp.ClientSession, base_url: str, test_id: str, reason: str) -> None:
    url = base_url.rstrip("/") + "/linktest/stop"
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
        async with session.post(
            url,
            json={"test_id": test_id, "reason": reason},
            timeout=aiohttp.ClientTimeout(total=5.0),
        ) as resp:
            await resp.read()


async def post_admin_linktest(request: web.Request) -> web.Response:
    app = request.app
    body = await read_json_object(request) if request.can_read_body else {}
    healthy = [n.name for n in app[FLEET].snapshot().healthy]
    plan = LinkTestPlan.from_json(body, healthy)
    return web.json_response(await run(app, plan))


def setup(app: web.Application) -> None:
    app.router.add_post("/admin/linktest", post_admin_linktest)
