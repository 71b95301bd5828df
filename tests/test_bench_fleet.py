"""bench.fleet's reading of guidellm's JSON report (guidellm itself never runs in tests:
it lives in .venv/guidellm, installed by `make bench-fleet` only)."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import pytest

from bench.fleet import Load, loads_for
from bench.fleet_report import combine, overlap, parse_report


def bench(
    strategy: dict[str, Any],
    totals: tuple[int, int, int],
    ttft: tuple[float, int],
    itl: tuple[float, int],
    tps: float,
    tokens: float,
    span: tuple[float, float],
) -> dict[str, Any]:
    """One benchmark as guidellm 0.8.1 writes it, trimmed to the keys the bench reads
    (figures from a real run against the real model)."""
    ok, errored, incomplete = totals
    return {
        "config": {"strategy": strategy},
        "metrics": {
            "request_totals": {
                "successful": ok,
                "errored": errored,
                "incomplete": incomplete,
                "total": ok + errored + incomplete,
            },
            "time_to_first_token_ms": {"successful": {"median": ttft[0], "count": ttft[1]}},
            "inter_token_latency_ms": {"successful": {"median": itl[0], "count": itl[1]}},
            "output_tokens_per_second": {"total": {"mean": tps}},
            "output_token_count": {"total": {"total_sum": tokens}},
        },
        "start_time": span[0],
        "end_time": span[1],
    }


SYNC = {"type_": "synchronous", "worker_count": 1, "max_concurrency": 1}
C4 = {"type_": "concurrent", "worker_count": 4, "max_concurrency": 4, "streams": 4}
REPORT = {
    "metadata": {},
    "benchmarks": [
        bench(SYNC, (2, 0, 0), (1186.73, 2), (187.48, 6), 2.1926, 8.0, (100.0, 103.6)),
        bench(C4, (8, 0, 0), (4843.37, 8), (397.30, 224), 7.0735, 232.0, (110.0, 142.7)),
    ],
}


def test_parse_report_reads_each_benchmark() -> None:
    sync, c4 = parse_report(REPORT)
    assert (sync.strategy, sync.streams, sync.ok) == ("synchronous", 1, 2)
    assert sync.ttft_p50_ms == pytest.approx(1186.73)
    assert sync.itl_p50_ms == pytest.approx(187.48)
    assert sync.output_tps == pytest.approx(2.1926)
    assert (c4.strategy, c4.streams, c4.ok, c4.output_tokens) == ("concurrent", 4, 8, 232.0)
    assert (c4.start, c4.end) == (110.0, 142.7)


def test_no_completed_request_gives_nan_latencies() -> None:
    doc = {"benchmarks": [bench(C4, (0, 3, 1), (0.0, 0), (0.0, 0), 0.0, 0.0, (0.0, 1.0))]}
    (run,) = parse_report(doc)
    assert (run.ok, run.errored, run.incomplete) == (0, 3, 1)
    assert math.isnan(run.ttft_p50_ms) and math.isnan(run.itl_p50_ms)
    assert parse_report({"benchmarks": []}) == []


def test_split_halves_combine() -> None:
    a = bench(C4, (8, 0, 0), (4000.0, 8), (400.0, 100), 7.0, 200.0, (10.0, 40.0))
    b = bench(C4, (7, 1, 0), (5000.0, 7), (300.0, 90), 6.0, 180.0, (15.0, 50.0))
    halves = [parse_report({"benchmarks": [x]})[0] for x in (a, b)]
    both = combine(halves)
    assert (both.streams, both.ok, both.errored) == (8, 15, 1)
    assert both.output_tps == pytest.approx(13.0)
    assert both.ttft_p50_ms == pytest.approx(4500.0)
    assert (both.start, both.end) == (10.0, 50.0)
    assert overlap(halves) == pytest.approx(25.0 / 40.0)


def test_loads_and_help() -> None:
    assert loads_for("1,4,16", None, quick=False) == [Load(1, 12), Load(4, 16), Load(16, 32)]
    assert [load.name for load in loads_for("1,4", "3,5", quick=False)] == ["sync", "c=4"]
    out = subprocess.run(
        [sys.executable, "-m", "bench.fleet", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "guidellm" in out.stdout
