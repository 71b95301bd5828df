"""`make run`'s fleet: from nothing to a curl line that returns tokens, and a clean stop."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import wait_until


def _free_run(count: int) -> int:
    """A base port with `count` free ports after it."""
    for _ in range(50):
        base = random.randrange(20000, 40000)
        try:
            for p in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return base
    raise AssertionError("no run of free ports")


def _procs_mentioning(needle: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if needle in cmd and state != "Z":
                out.append(int(entry.name))
    return out


def test_fleet_prints_a_curl_line_that_returns_tokens(tmp_path: Path) -> None:
    """The fleet comes up from nothing; its curl line answers; Ctrl-C leaves nothing behind."""
    base = _free_run(3)
    run_dir = tmp_path / "run"
    fleet = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "cortex"),
            "fleet",
            "--dir",
            str(run_dir),
            "--port",
            str(base),
            "--neuron-port",
            str(base + 1),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert fleet.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 300
        while not any(line.startswith("Ctrl-C") for line in lines):
            assert time.monotonic() < deadline, "".join(lines)
            line = fleet.stdout.readline()
            assert line, "fleet exited early:\n" + "".join(lines)
            lines.append(line)
        start = next(i for i, line in enumerate(lines) if line.strip().startswith("curl "))
        curl = "".join(lines[start : start + 2]).replace("\\\n", " ")
        answer = subprocess.run(
            ["bash", "-c", curl], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        body = json.loads(answer)
        assert body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] > 0
    finally:
        fleet.send_signal(signal.SIGINT)
        rest = fleet.communicate(timeout=60)[0]
    assert fleet.returncode == 0, rest
    assert "stopped." in rest
    wait_until(lambda: not _procs_mentioning(str(run_dir)), 10, "no fleet process left")
