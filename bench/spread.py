"""A target judged over a figure's runs: met or missed, by how much, and whether the
runs spread wider than that margin (then this run does not decide it).

Pure: the benches measure, this only reads the numbers. A figure is judged on the
median of its runs (one slow run does not decide it), or with `each=True` on every
run (a target stated "in each of three runs"): then the worst run's margin counts.
The spread is max - min over the runs; when it is wider than the margin, another
run could land on the other side of the target, and the line says so.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Literal

import attrs

Op = Literal["<=", "<", ">=", ">"]
UNDECIDED = "spread wider than margin: not decided by this run"


@attrs.frozen
class Target:
    name: str
    op: Op
    limit: float
    # Printed after figures ("µs", "ms", "MB"); "x" is glued to the number (a ratio).
    unit: str = ""
    # Format spec of the figure, its margin and its spread.
    fmt: str = ",.0f"
    # Every run must meet it, not just the median.
    each: bool = False
    # What one value is (a "run", a "slice" of a window), for the line.
    per: str = "run"

    def show(self, value: float) -> str:
        text = format(value, self.fmt)
        if self.unit == "x":
            return text + "x"
        return f"{text} {self.unit}" if self.unit else text

    def margin(self, value: float) -> float:
        """How far `value` is inside the target (> 0) or outside it (< 0)."""
        return self.limit - value if self.op in ("<=", "<") else value - self.limit

    def meets(self, value: float) -> bool:
        m = self.margin(value)
        return m >= 0 if self.op in ("<=", ">=") else m > 0


@attrs.frozen
class Verdict:
    target: Target
    values: tuple[float, ...]
    # The median of the runs; with `each`, the worst run.
    figure: float
    met: bool
    # Signed distance of `figure` to the limit: > 0 met by that much, < 0 missed by.
    margin: float
    spread: float

    @property
    def undecided(self) -> bool:
        return len(self.values) > 1 and self.spread > abs(self.margin)

    def line(self) -> str:
        t = self.target
        if t.each:
            shown = ", ".join(t.show(v) for v in self.values)
            want = f"({t.op} {t.limit:g}{'x' if t.unit == 'x' else ''} in each {t.per})"
            how = f" (worst {t.per})" if len(self.values) > 1 else ""
        else:
            shown = t.show(statistics.median(self.values))
            want = f"({t.op} {t.limit:g}{'x' if t.unit == 'x' else ''})"
            how = ""
        state = "met" if self.met else "MISSED"
        out = f"- {t.name}: {shown} {want}: {state} by {format(abs(self.margin), t.fmt)}{how}"
        n = len(self.values)
        if n == 1:
            return out + f"; 1 {t.per}, no spread"
        out += f"; spread {format(self.spread, t.fmt)} over {n} {t.per}s"
        return out + (f": {UNDECIDED}" if self.undecided else "")


def judge(target: Target, values: Iterable[float]) -> Verdict:
    """`target` over the figure's `values` (one per run, at least one, all finite)."""
    runs = tuple(float(v) for v in values)
    if not runs or not all(math.isfinite(v) for v in runs):
        raise ValueError(f"{target.name}: need finite values, got {runs!r}")
    if target.each:
        figure = min(runs, key=target.margin)
        met = all(target.meets(v) for v in runs)
    else:
        figure = statistics.median(runs)
        met = target.meets(figure)
    return Verdict(target, runs, figure, met, target.margin(figure), max(runs) - min(runs))


def line_for(target: Target, values: Iterable[float]) -> tuple[str, Verdict | None]:
    """The report line of `target`; runs without a finite figure (nothing measured,
    a zero denominator) are left out, and with none left it says so."""
    runs = [v for v in values if math.isfinite(v)]
    if not runs:
        return f"- {target.name}: not measured in this run", None
    verdict = judge(target, runs)
    return verdict.line(), verdict


def summary(verdicts: Sequence[Verdict | None]) -> str:
    judged = [v for v in verdicts if v is not None]
    met = sum(v.met for v in judged)
    undecided = sum(v.undecided for v in judged)
    out = f"{met} of {len(verdicts)} targets met"
    if len(judged) < len(verdicts):
        out += f", {len(verdicts) - len(judged)} not measured"
    if undecided:
        out += f"; {undecided} not decided by this run (spread wider than margin)"
    return out + "."
