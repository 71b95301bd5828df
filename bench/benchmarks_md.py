"""BENCHMARKS.md: one section per bench, replaced in place on every run."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

FILE = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
TITLE = (
    "# Benchmarks\n\n"
    "Each section is written by its bench (`make bench-NAME`). A target judged over\n"
    "several runs gives the median, its margin to the target and the runs' spread\n"
    "(max - min), flagged when the spread is wider than the margin (bench/spread.py).\n"
)
# The title before targets were judged over runs: replaced on the next write.
OLD_TITLES = (
    "# Benchmarks\n\n"
    "Each section is written by its bench (`make bench-NAME`); ratios are from one run.\n",
)


def machine() -> str:
    """nproc and the CPU model name, as /proc/cpuinfo gives it."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs, {model}"


def update(name: str, command: str, body: str, path: Path = FILE) -> None:
    """Write (or replace) the section of bench `name` with `body` (markdown)."""
    start, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = f"{start}\n## {name}\n\n{stamp}; {machine()}; `{command}`\n\n{body.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else TITLE
    for old in OLD_TITLES:
        if text.startswith(old):
            text = TITLE + text[len(old) :]
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        text = before + section + ("\n" + after if after else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
