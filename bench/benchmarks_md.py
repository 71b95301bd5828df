"""BENCHMARKS.md at the repository root: one section per bench, replaced on each run.

A section sits between `<!-- NAME start -->` and `<!-- NAME end -->` and holds
the date, the machine (nproc and CPU model) and the command beside its table,
so a rerun updates its own figures and leaves the other benches' alone.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

PATH = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\nEach section is written by its bench (`make bench-NAME`); rerun it to"
    " update. Ratios compare arms measured in the same run.\n"
)


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores (nproc), {model}"


def write_section(name: str, title: str, command: str, table: str, path: Path = PATH) -> None:
    start, end = f"<!-- {name} start -->", f"<!-- {name} end -->"
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = (
        f"{start}\n## {title} (`make {name}`)\n\n"
        f"{when}; machine: {machine()}; command: `{command}`\n\n{table}\n{end}"
    )
    text = path.read_text() if path.exists() else HEADER
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        text = head + body + tail
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text)
