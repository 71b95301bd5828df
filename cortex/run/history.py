"""The last minutes of the fleet, per node and per model, for the dashboard's charts.

Every `step_s` the sampler reads the fleet as the poller left it and the traces
finished since the last point, and keeps one point: per node and per model, the
decode rate (tok/s), TTFT p50 and p95, requests in flight and queued, and memory.
A ring of `span_s / step_s` points lives in memory only, so a page opened now
draws the last minutes at once instead of starting empty; a restart starts over.

- tok/s is the growth of each runner's completion-token counter (GET /health)
  between two polls of its node, over the time between those polls. A counter
  that went down (a runner or neuron restarted) counts from zero; a model new on
  a node counts from zero (it was loaded since); a node seen for the first time
  only sets the baseline.
- TTFT percentiles are over the requests that finished in the last
  `ttft_window_s` (rolling, so a quiet step does not blank the line), from
  cortex's own traces: per model, and per node that answered.
- A node that is unhealthy has no figures at that point (a gap in its lines).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from cortex.core.state import FleetSnapshot, NodeState
from cortex.core.tracing import Trace

log = logging.getLogger(__name__)

# The figures of one series at one point, in the order of `Sample`'s fields.
FIELDS = (
    "tok_s",
    "ttft_p50_s",
    "ttft_p95_s",
    "in_flight",
    "queued",
    "memory_bytes",
    "memory_total_bytes",
)


@attrs.frozen
class Sample:
    """One node's or one model's figures at one point."""

    tok_s: float | None
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    in_flight: int
    queued: int
    # A node: memory in use (total less available); a model: its runners' memory.
    memory_bytes: int | None
    # A node's total memory; None for a model.
    memory_total_bytes: int | None = None


@attrs.frozen
class Point:
    ts: float  # wall clock
    nodes: Mapping[str, Sample]
    models: Mapping[str, Sample]


@attrs.frozen
class _Counted:
    """A node's completion-token counters as of one of its polls."""

    polled_at: float  # the node's last_ok (wall clock)
    counts: Mapping[str, int]


@attrs.frozen
class _Ttft:
    seen_at: float  # monotonic
    model: str | None
    node: str | None
    ttft_s: float


@attrs.define
class History:
    step_s: float = 5.0
    span_s: float = 600.0
    ttft_window_s: float = 30.0
    _points: collections.deque[Point] = attrs.field(init=False)
    _counted: dict[str, _Counted] = attrs.field(factory=dict, init=False)
    _ttfts: collections.deque[_Ttft] = attrs.field(factory=collections.deque, init=False)
    _last_seq: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        self._points = collections.deque(maxlen=max(1, round(self.span_s / self.step_s)))

    @property
    def points(self) -> tuple[Point, ...]:
        return tuple(self._points)

    def sample(
        self,
        snap: FleetSnapshot,
        traces: Iterable[Trace],
        *,
        wall: float | None = None,
        now: float | None = None,
    ) -> Point:
        """Keep and return the point for `snap` and the traces finished since the last one."""
        wall = time.time() if wall is None else wall
        now = time.monotonic() if now is None else now
        self._take_ttfts(traces, now)
        node_ttft = _percentiles(self._ttfts, lambda t: t.node)
        model_ttft = _percentiles(self._ttfts, lambda t: t.model)
        nodes: dict[str, Sample] = {}
        model_rates: dict[str, float] = collections.defaultdict(float)
        for node in snap.nodes:
            rates = self._rates(node)
            if not node.healthy or node.health is None:
                continue
            for mid, rate in (rates or {}).items():
                model_rates[mid] += rate
            p50, p95 = node_ttft.get(node.name, (None, None))
            total = node.discovery.memory_total_bytes if node.discovery is not None else None
            nodes[node.name] = Sample(
                tok_s=None if rates is None else round(sum(rates.values()), 3),
                ttft_p50_s=p50,
                ttft_p95_s=p95,
                in_flight=sum(m.in_flight for m in node.models),
                queued=sum(m.queue_depth for m in node.models),
                memory_bytes=None if total is None else total - node.health.memory_available_bytes,
                memory_total_bytes=total,
            )
        point = Point(
            ts=wall, nodes=nodes, models=_models(snap, model_rates, model_ttft, rated=nodes)
        )
        self._points.append(point)
        return point

    def _take_ttfts(self, traces: Iterable[Trace], now: float) -> None:
        for t in traces:
            if t.seq <= self._last_seq:
                continue
            self._last_seq = t.seq
            if t.ttft_s is not None:
                self._ttfts.append(_Ttft(now, t.model, t.node, t.ttft_s))
        while self._ttfts and self._ttfts[0].seen_at < now - self.ttft_window_s:
            self._ttfts.popleft()

    def _rates(self, node: NodeState) -> dict[str, float] | None:
        """tok/s per model on `node` since its previous counted poll; None when unknown."""
        if not node.healthy or node.last_ok is None:
            return None
        counts = {m.model_id: m.completion_tokens for m in node.models if m.serves_http}
        prev = self._counted.get(node.name)
        self._counted[node.name] = _Counted(node.last_ok, counts)
        if prev is None:
            return None  # the first sight of this node: a baseline only
        span = node.last_ok - prev.polled_at
        if span <= 0:
            # No poll since the last point: the figures are the same.
            self._counted[node.name] = prev
            return None
        rates = {}
        for mid, c in counts.items():
            before = prev.counts.get(mid, 0)
            # Lower than before: the counter restarted from zero (a runner restart).
            rates[mid] = (c - before if c >= before else c) / span
        return rates

    def since(self, ts: float | None) -> list[Point]:
        """Points newer than wall clock `ts` (every point kept when None), oldest first."""
        return [p for p in self._points if ts is None or p.ts > ts]

    def to_json(self, since: float | None = None) -> dict[str, Any]:
        """Column-wise: `ts`, then per node and per model one list per field (null where a
        series had no figure at that point), aligned with `ts`."""
        points = self.since(since)
        return {
            "step_s": self.step_s,
            "span_s": self.span_s,
            "ttft_window_s": self.ttft_window_s,
            "fields": list(FIELDS),
            "ts": [round(p.ts, 3) for p in points],
            "nodes": _columns(points, lambda p: p.nodes),
            "models": _columns(points, lambda p: p.models),
        }

    async def run(self, read: Callable[[], tuple[FleetSnapshot, Iterable[Trace]]]) -> None:
        """Sample every `step_s` for ever: `read()` gives (snapshot, traces)."""
        while True:
            started = time.monotonic()
            try:
                snap, traces = read()
                self.sample(snap, traces)
            except Exception:  # one odd snapshot must not end the charts
                log.exception("history sample failed")
            await asyncio.sleep(max(0.0, self.step_s - (time.monotonic() - started)))


def _models(
    snap: FleetSnapshot,
    rates: Mapping[str, float],
    ttft: Mapping[str | None, tuple[float | None, float | None]],
    *,
    rated: Mapping[str, Sample],
) -> dict[str, Sample]:
    """Per model: its replicas on healthy nodes summed (a group's ranks count once for
    load and tok/s, every rank's memory)."""
    out: dict[str, Sample] = {}
    ids = sorted({m.model_id for n in snap.nodes if n.name in rated for m in n.models})
    for mid in ids:
        locs = [(n, m) for n, m in snap.locations(mid) if n.name in rated]
        heads = [m for _, m in locs if m.serves_http]
        p50, p95 = ttft.get(mid, (None, None))
        any_rate = any(rated[n.name].tok_s is not None for n, _ in locs)
        out[mid] = Sample(
            tok_s=round(rates.get(mid, 0.0), 3) if any_rate else None,
            ttft_p50_s=p50,
            ttft_p95_s=p95,
            in_flight=sum(m.in_flight for m in heads),
            queued=sum(m.queue_depth for m in heads),
            memory_bytes=sum(m.memory_bytes for _, m in locs),
        )
    return out


def _percentiles(ttfts: Iterable[_Ttft], key: Any) -> dict[Any, tuple[float | None, float | None]]:
    groups: dict[Any, list[float]] = collections.defaultdict(list)
    for t in ttfts:
        k = key(t)
        if k is not None:
            groups[k].append(t.ttft_s)
    return {k: (_rank(v, 0.5), _rank(v, 0.95)) for k, v in groups.items()}


def _rank(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile (a value that was measured, never an interpolation)."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 4)


def _columns(points: list[Point], pick: Any) -> dict[str, dict[str, list[Any]]]:
    names = sorted({name for p in points for name in pick(p)})
    out: dict[str, dict[str, list[Any]]] = {n: {f: [] for f in FIELDS} for n in names}
    for p in points:
        series = pick(p)
        for n in names:
            s = series.get(n)
            for f in FIELDS:
                out[n][f].append(None if s is None else getattr(s, f))
    return out
