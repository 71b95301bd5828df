"""The README's "Try it" commands, as written, against the fleet `make run` starts.

The commands are read from README.md itself, so the README and this test cannot
drift: every command of the section's `sh` blocks runs with bash from a
directory laid out like the checkout (`run/` is the fleet's dir, `.venv/` this
interpreter's), with the fleet's ports put in for 9400/9411, and must exit 0
with an HTTP success (curl gets `--fail-with-body`, pipes `pipefail`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.blocking_http import request_json
from tests.conftest import wait_until
from tests.support.local import free_port_run, processes_of

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Try it"
# The ports the README names: cortex, and neuron a (b is the next one).
README_PORT, README_NEURON_PORT = 9400, 9411
REAL_MODEL = "smollm2-135m"
FLEET_START_S = 600.0  # the real model's first build fetches a wheel and converts it


def section(text: str, heading: str) -> str:
    """The lines under `heading` up to the next heading (a `#` line outside a code fence)."""
    lines = text.splitlines()
    start = lines.index(heading) + 1
    out: list[str] = []
    fenced = False
    for line in lines[start:]:
        if line.startswith("```"):
            fenced = not fenced
        elif line.startswith("#") and not fenced:
            break
        out.append(line)
    return "\n".join(out)


def sh_commands(text: str) -> list[str]:
    """Each command of the ```sh blocks: continuation lines joined, comment lines left out."""
    commands: list[str] = []
    for block in re.findall(r"^```sh\n(.*?)^```", text, flags=re.M | re.S):
        joined = block.replace("\\\n", " ")
        commands += [c for c in joined.splitlines() if c.strip() and not c.lstrip().startswith("#")]
    return commands


def localise(command: str, port: int, neuron_port: int) -> str:
    """The command against this test's fleet; an HTTP error fails curl (exit 22), body kept."""
    command = re.sub(rf"\b{README_PORT}\b", str(port), command)
    for i in range(2):
        command = re.sub(rf"\b{README_NEURON_PORT + i}\b", str(neuron_port + i), command)
    return command.replace("curl -s ", "curl -s --fail-with-body ")


def test_the_try_it_section_parses_into_commands() -> None:
    """Cheap and fleet-free: the section is found, multi-line commands come out whole."""
    commands = sh_commands(section(README.read_text(), SECTION))
    assert len(commands) >= 8, commands
    assert all(not c.rstrip().endswith("\\") for c in commands)
    discovery = next(c for c in commands if "/discovery" in c)
    assert "$(cat run/fleet-token)" in discovery and "| python3 -m json.tool" in discovery
    chat = localise(next(c for c in commands if "/v1/chat/completions" in c), 1234, 5678)
    assert "localhost:1234/v1/chat" in chat and "curl -s --fail-with-body " in chat
    assert '"max_tokens": 16}' in chat


def _settled(base: str) -> bool:
    """Every catalogued model the catalogue wishes loaded (keep_loaded or pinned) has
    its replicas ready (the README unloads one); one loaded on first use is not waited for."""
    status, state, _ = request_json("GET", f"{base}/admin/state", None, 10.0)
    if status != 200:
        return False
    for m in state["models"]:
        if not (m.get("keep_loaded") or m.get("pinned_on")):
            continue
        ready = [p for p in m["placements"] if p["state"] == "ready" and p.get("healthy")]
        if len(ready) < int(m.get("replicas") or 1):
            return False
    return True


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """`cortex fleet` in tmp_path/run (cortex port, first neuron port), stopped by SIGTERM."""
    base = free_port_run(3)
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "cortex"),
            "fleet",
            *("--dir", str(tmp_path / "run")),
            *("--port", str(base), "--neuron-port", str(base + 1)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    try:
        lines: list[str] = []
        deadline = time.monotonic() + FLEET_START_S
        while not any(line.startswith("cortex is at") for line in lines):
            assert time.monotonic() < deadline, "".join(lines)
            line = proc.stdout.readline()
            assert line, "fleet exited early:\n" + "".join(lines)
            lines.append(line)
        yield base, base + 1
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=90)[0]
    assert proc.returncode == 0, rest
    wait_until(lambda: not processes_of(tmp_path), 20, "no fleet process left")


@pytest.mark.timeout(FLEET_START_S + 600)
def test_every_try_it_command_works_as_written(fleet: tuple[int, int], tmp_path: Path) -> None:
    port, neuron_port = fleet
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: _settled(base), 300, "every model at its wished replicas")
    _, listing, _ = request_json("GET", f"{base}/v1/models")
    served = {m["id"] for m in listing["data"]}
    # Laid out like the checkout: the README's `.venv/bin/cortex` and `run/...`.
    (tmp_path / ".venv").symlink_to(sys.prefix)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")}
    ran = []
    for command in sh_commands(section(README.read_text(), SECTION)):
        if REAL_MODEL in command and REAL_MODEL not in served:
            print(f"skipped (the fleet was built without {REAL_MODEL}): {command}")
            continue
        local = localise(command, port, neuron_port)
        assert str(README_PORT) not in local, local
        done = subprocess.run(
            ["bash", "-o", "pipefail", "-c", local],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        said = f"{command}\n-> exit {done.returncode}\n{done.stdout}{done.stderr}"
        assert done.returncode == 0, said
        assert done.stdout.strip(), command
        ran.append((command, done.stdout))
    print(f"ran {len(ran)} README commands against {sorted(served)}")
    _check_outputs(dict(ran), served)


def _check_outputs(out: dict[str, str], served: set[str]) -> None:
    """A few answers say what the README says they do."""
    for command, text in out.items():
        if "/v1/models" in command:
            assert {m["id"] for m in json.loads(text)["data"]} == served
        if "cortex trace" in command:
            assert "runner's count; the neuron estimated" in text
        if "cortex preview" in command:
            assert " here " in text
        if "/models/demo/load" in command:
            assert json.loads(text)["nodes"] == ["b"]
