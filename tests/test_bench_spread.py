"""bench.spread (a target over a figure's runs) and the target lines bench.gateway and
bench.control build from it: pure functions over numbers, no processes."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import benchmarks_md, control, gateway, spread
from bench.gateway import Cell, Paced
from bench.spread import UNDECIDED, Target

OPS = st.sampled_from(["<=", "<", ">=", ">"])
FIGURES = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
RUNS = st.lists(FIGURES, min_size=1, max_size=9)


def test_the_issue_line() -> None:
    target = Target("cortex CPU/req non-streamed c=32", "<=", 250, "µs")
    verdict = spread.judge(target, [430, 400, 412])
    assert verdict.line() == (
        "- cortex CPU/req non-streamed c=32: 412 µs (<= 250): MISSED by 162; spread 30 over 3 runs"
    )
    assert not verdict.met and not verdict.undecided


def test_a_spread_wider_than_the_margin_is_flagged() -> None:
    target = Target("cortex/aiohttp req/s", ">=", 0.8, "x", ".3f")
    verdict = spread.judge(target, [0.79, 0.82, 0.85])
    assert verdict.met and verdict.undecided
    assert verdict.line() == (
        "- cortex/aiohttp req/s: 0.820x (>= 0.8x): met by 0.020; spread 0.060 over 3 runs: "
        + UNDECIDED
    )


def test_each_run_must_meet_it() -> None:
    target = Target("256 paced streams tok/s cortex/direct", ">=", 0.95, "x", ".3f", each=True)
    missed = spread.judge(target, [0.99, 0.94, 0.97])
    assert not missed.met and missed.figure == 0.94
    assert missed.line().startswith(
        "- 256 paced streams tok/s cortex/direct: 0.990x, 0.940x, 0.970x (>= 0.95x in each run):"
        " MISSED by 0.010 (worst run); spread 0.050 over 3 runs"
    )
    assert spread.judge(target, [0.96, 0.99, 0.97]).met


def test_one_run_has_no_spread_and_nothing_measured_says_so() -> None:
    target = Target("rss", "<", 150, "MB", ".1f", per="slice")
    assert spread.judge(target, [76.4]).line() == (
        "- rss: 76.4 MB (< 150): met by 73.6; 1 slice, no spread"
    )
    line, verdict = spread.line_for(target, [float("nan")])
    assert verdict is None and line == "- rss: not measured in this run"
    with pytest.raises(ValueError):
        spread.judge(target, [])


@given(op=OPS, limit=FIGURES, runs=RUNS)
def test_median_verdict(op: spread.Op, limit: float, runs: list[float]) -> None:
    v = spread.judge(Target("x", op, limit), runs)
    median = statistics.median(runs)
    meets = {"<=": median <= limit, "<": median < limit, ">=": median >= limit, ">": median > limit}
    assert v.met == meets[op]
    assert abs(v.margin) == pytest.approx(abs(median - limit))
    assert (v.margin > 0) == (median < limit if op in ("<=", "<") else median > limit)
    assert v.spread == max(runs) - min(runs) >= 0
    assert v.undecided == (len(runs) > 1 and v.spread > abs(v.margin))
    assert (UNDECIDED in v.line()) == v.undecided


@given(op=OPS, limit=FIGURES, runs=RUNS)
def test_each_verdict_is_the_worst_run(op: spread.Op, limit: float, runs: list[float]) -> None:
    target = Target("x", op, limit, each=True)
    v = spread.judge(target, runs)
    assert v.met == all(target.meets(r) for r in runs)
    assert v.margin == min(target.margin(r) for r in runs)


@given(runs=st.lists(st.lists(FIGURES, max_size=3), max_size=5))
def test_summary_counts(runs: list[list[float]]) -> None:
    """An empty list stands for a figure not measured."""
    target = Target("x", "<=", 0.0)
    judged = [spread.line_for(target, r)[1] for r in runs]
    text = spread.summary(judged)
    met = sum(v.met for v in judged if v is not None)
    undecided = sum(v.undecided for v in judged if v is not None)
    assert text.startswith(f"{met} of {len(runs)} targets met")
    assert ("not measured" in text) == any(not r for r in runs)
    assert ("not decided" in text) == (undecided > 0)


def _cell(arm: str, conc: int, run: int, rps: float, p50: float, cpu_us: float) -> Cell:
    n = 10_000
    return Cell(arm, "json", conc, n, rps, p50, p50 * 3, 0, cpu_us * n / 1e6, run)


def _paced(arm: str, run: int, tok_s: float, cpu_us: float) -> Paced:
    frames = 16_384
    return Paced(arm, 256, frames, frames / tok_s, 90.0, 0, cpu_us * frames / 1e6, run)


def test_gateway_targets_pair_runs_and_judge_issue_21() -> None:
    cells = []
    for run, (cortex_cpu, aio_rps) in enumerate([(240, 2000), (260, 1900), (250, 2100)]):
        cells += [
            _cell("direct", 1, run, 9000, 0.09, 0),
            _cell("cortex", 1, run, 4000, 0.3 + 0.01 * run, 100),
            _cell("aiohttp", 32, run, aio_rps, 6.0, 150),
            _cell("cortex", 32, run, 1700, 19.0, cortex_cpu),
            _cell("neuron", 32, run, 1000, 30.0, 900),
            _cell("litellm", 32, run, 25, 400.0, 15000),
        ]
    paced = []
    for run, ratio in enumerate([0.97, 0.94, 0.99]):
        paced += [
            _paced("direct", run, 4700, 0),
            _paced("cortex", run, 4700 * ratio, 25),
            _paced("neuron", run, 4600, 70),
        ]
    lines = gateway.targets(gateway.by_runs(cells), paced)
    text = "\n".join(lines)
    print(text)
    assert "- cortex CPU/req non-streamed c=32: 250 µs (<= 250): met by 0;" in text
    assert f"spread 20 over 3 runs: {UNDECIDED}" in text
    # Paired by run: 1700/2000, 1700/1900, 1700/2100; the median ratio is 0.850.
    assert "cortex req/s over aiohttp's non-streamed c=32: 0.850x (>= 0.8x): met" in text
    assert "cortex +p50 over direct non-streamed c=1: 0.220 ms (<= 0.3): met by 0.080" in text
    assert "cortex req/s over LiteLLM's non-streamed c=32: 68.0x (>= 60x): met" in text
    assert "- cortex CPU per paced frame: 25.0 µs (<= 30): met by 5.0" in text
    assert "- neuron CPU per paced frame: 70.0 µs (<= 30): MISSED by 40.0" in text
    assert "0.970x, 0.940x, 0.990x (>= 0.95x in each run): MISSED by 0.010 (worst run)" in text
    assert "- neuron CPU/req non-streamed c=32: 900 µs (<= 400): MISSED by 500" in text
    assert lines[-1].startswith("5 of 8 targets met")


def test_gateway_report_shows_medians_of_repeated_cells() -> None:
    runs = [
        _cell("cortex", 32, r, rps, 19.0, cpu)
        for r, (rps, cpu) in enumerate([(1, 9), (3, 5), (2, 7)])
    ]
    med = gateway.median_cell(runs)
    assert med.rps == 2 and gateway._cpu_per_req(med) == pytest.approx(7)
    paced = [
        _paced("cortex", r, tok, cpu) for r, (tok, cpu) in enumerate([(10, 3), (30, 1), (20, 2)])
    ]
    mp = gateway.median_paced(paced)
    assert mp.tok_s == pytest.approx(20) and gateway._cpu_per_frame(mp) == pytest.approx(2)


def test_control_targets_over_slices() -> None:
    status = {
        "round_s": [0.07, 0.12, 0.08],
        "cpu": [0.10, 0.24, 0.27],
        "rss_mb": [76.0, 76.5, 77.0],
        "nginx_cpu": [0.02, 0.02, 0.02],
    }
    text = "\n".join(control.verdicts(status, [40.0, 43.5, 60.0]))
    print(text)
    assert "- poll round wall time, /status: 0.080 s (<= 1): met by 0.920; spread 0.050" in text
    cpu = "cortex CPU, share of one core, /status: 0.240 (< 0.25): met by 0.010"
    assert f"{cpu}; spread 0.170 over 3 slices: {UNDECIDED}" in text
    assert (
        "- routing p99, snapshot + route: 43.5 µs (< 50): met by 6.5; spread 20.0 over 3 runs: "
        in text
    )
    assert text.endswith(
        "4 of 4 targets met; 2 not decided by this run (spread wider than margin)."
    )


def test_control_help() -> None:
    with pytest.raises(SystemExit) as exit_:
        control.main(["--help"])
    assert exit_.value.code == 0


def test_benchmarks_md_old_title_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(benchmarks_md.OLD_TITLES[0] + "\n<!-- x: begin -->\n## x\n<!-- x: end -->\n")
    benchmarks_md.update("bench-a", "make bench-a", "| a | 1 |", path)
    text = path.read_text()
    assert text.startswith(benchmarks_md.TITLE) and "ratios are from one run" not in text
    assert "## x" in text and "## bench-a" in text
