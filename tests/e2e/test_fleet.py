"""`make run`'s fleet: from nothing to an English first answer and a curl line, and a clean stop."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import wait_until
from tests.support.local import free_port_run, no_index_env, processes_of


def test_fleet_prints_a_curl_line_that_returns_tokens(tmp_path: Path) -> None:
    """The fleet comes up from nothing; smollm2-135m's first answer says Paris; its curl
    line answers; Ctrl-C leaves nothing behind."""
    base = free_port_run(3)
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
        first = next(i for i, line in enumerate(lines) if line.startswith("first answer"))
        assert "from smollm2-135m" in lines[first], "".join(lines)
        assert "Paris" in lines[first + 1], "".join(lines)
        start = next(i for i, line in enumerate(lines) if line.strip().startswith("curl "))
        curl = "".join(lines[start : start + 2]).replace("\\\n", " ")
        answer = subprocess.run(
            ["bash", "-c", curl], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        body = json.loads(answer)
        assert body["choices"][0]["message"]["content"]
        assert body["usage"]["completion_tokens"] > 0
        # The second curl line: demo-embed, loaded by that first request.
        start = next(i for i, line in enumerate(lines) if "/v1/embeddings" in line)
        curl = "".join(lines[start : start + 2]).replace("\\\n", " ")
        answer = subprocess.run(
            ["bash", "-c", curl], capture_output=True, text=True, timeout=120, check=True
        ).stdout
        assert [len(d["embedding"]) for d in json.loads(answer)["data"]] == [32, 32], answer
    finally:
        fleet.send_signal(signal.SIGINT)
        rest = fleet.communicate(timeout=60)[0]
    assert fleet.returncode == 0, rest
    assert "stopped." in rest
    wait_until(lambda: not processes_of(run_dir), 60, "no fleet process left")


def test_without_registry_or_cache_the_fleet_serves_demo_alone(tmp_path: Path) -> None:
    """No index, no cached wheel: one line says smollm2-135m is left out; demo answers."""
    base = free_port_run(3)
    env = no_index_env(CORTEX_NEURON_CACHE=str(tmp_path / "empty-cache"))
    argv = [str(Path(sys.executable).parent / "cortex"), "fleet", "--dir", str(tmp_path / "run")]
    argv += ["--port", str(base), "--neuron-port", str(base + 1), "--exit-after-check"]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    (left_out,) = [line for line in lines if "smollm2-135m" in line]
    assert left_out.startswith("smollm2-135m left out (") and "serving demo alone" in left_out
    assert "Traceback" not in done.stdout + done.stderr
    assert any(line.startswith("first answer through cortex, from demo") for line in lines)
    catalogue = (tmp_path / "run" / "models.toml").read_text()
    assert 'id = "demo"' in catalogue and "smollm2" not in catalogue
