"""guidellm's JSON report, read: the few figures `bench.fleet` prints, per benchmark.

Pure functions (no guidellm import: it lives in a venv of its own), unit-tested on
a trimmed report of the shape guidellm 0.8.1 writes with `--output kind=json`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import attrs


@attrs.frozen
class Run:
    """One guidellm benchmark (one strategy) against one target."""

    strategy: str  # "synchronous" or "concurrent"
    streams: int  # 1 for synchronous
    ok: int
    errored: int
    incomplete: int
    ttft_p50_ms: float  # NaN when no request completed
    itl_p50_ms: float
    output_tps: float  # guidellm's output tokens/s over the benchmark (all requests)
    output_tokens: float
    start: float  # epoch seconds
    end: float
    # CPU the runner processes used over the benchmark's span, in cores (measured
    # by bench.fleet from /proc, not by guidellm).
    runner_cores: float = math.nan


def _median(metric: Mapping[str, Any]) -> float:
    ok = metric.get("successful") or {}
    if not ok.get("count"):
        return math.nan
    return float(ok["median"])


def parse_benchmark(bench: Mapping[str, Any]) -> Run:
    strategy = bench["config"]["strategy"]
    kind = str(strategy["type_"])
    metrics = bench["metrics"]
    totals = metrics["request_totals"]
    return Run(
        strategy=kind,
        streams=int(strategy.get("streams") or 1),
        ok=int(totals["successful"]),
        errored=int(totals["errored"]),
        incomplete=int(totals["incomplete"]),
        ttft_p50_ms=_median(metrics["time_to_first_token_ms"]),
        itl_p50_ms=_median(metrics["inter_token_latency_ms"]),
        output_tps=float(metrics["output_tokens_per_second"]["total"]["mean"]),
        output_tokens=float(metrics["output_token_count"]["total"]["total_sum"]),
        start=float(bench["start_time"]),
        end=float(bench["end_time"]),
    )


def parse_report(doc: Mapping[str, Any]) -> list[Run]:
    """Every benchmark of one `guidellm run`, in the order it ran them."""
    return [parse_benchmark(b) for b in doc.get("benchmarks") or ()]


def combine(halves: Sequence[Run]) -> Run:
    """Runs sent at once to separate replicas, as one: tok/s added up (each half's own
    rate over its own span: where the halves did not overlap in time this favours
    them), requests added up, latency p50s averaged (an approximation of the pooled
    median, which guidellm's report does not give)."""

    def mean(values: list[float]) -> float:
        real = [v for v in values if not math.isnan(v)]
        return statistics.fmean(real) if real else math.nan

    return Run(
        strategy=halves[0].strategy,
        streams=sum(h.streams for h in halves),
        ok=sum(h.ok for h in halves),
        errored=sum(h.errored for h in halves),
        incomplete=sum(h.incomplete for h in halves),
        ttft_p50_ms=mean([h.ttft_p50_ms for h in halves]),
        itl_p50_ms=mean([h.itl_p50_ms for h in halves]),
        output_tps=sum(h.output_tps for h in halves),
        output_tokens=sum(h.output_tokens for h in halves),
        start=min(h.start for h in halves),
        end=max(h.end for h in halves),
    )


def overlap(halves: Sequence[Run]) -> float:
    """The share of the halves' whole span during which all of them ran."""
    span = max(h.end for h in halves) - min(h.start for h in halves)
    common = min(h.end for h in halves) - max(h.start for h in halves)
    return max(0.0, common) / span if span > 0 else 1.0
