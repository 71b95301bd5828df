"""`cortex load`: place a model through a running cortex and follow it to ready."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from cortex.cli.load import _line
from tests.conftest import NeuronProcess, wait_until
from tests.e2e.conftest import CortexProcess


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cortex.cli", "load", *args],
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_load_follows_a_model_to_ready_and_says_where(
    neuron_factory: Any, cortex_factory: Any, demo_model: Path, model_id: str
) -> None:
    """The model is loaded, the command ends when it is ready (exit 0) naming the node;
    a model cortex does not know is one line on stderr and exit 2."""
    a: NeuronProcess = neuron_factory(name="a")
    c: CortexProcess = cortex_factory([("a", a)], [{"id": model_id, "source": str(demo_model)}])
    wait_until(lambda: c.get("/health")[1]["nodes"]["healthy"] == 1, 30, "the node healthy")
    done = _cli(model_id, "--url", c.url)
    assert done.returncode == 0, done.stderr
    assert f"{model_id} ready on a" in done.stdout
    assert "\r" not in done.stdout  # not a terminal: plain lines
    assert a.model(model_id) is not None and a.model(model_id)["state"] == "ready"  # type: ignore[index]
    unknown = _cli("no-such-model", "--url", c.url)
    assert unknown.returncode == 2
    assert len(unknown.stderr.strip().splitlines()) == 1 and "404" in unknown.stderr
    gone = _cli(model_id, "--url", "http://127.0.0.1:9")
    assert gone.returncode == 2 and "cannot reach cortex" in gone.stderr


def test_progress_line_shows_each_node_and_its_stage() -> None:
    stage = {"state": "fetching", "bytes_done": 750_000_000, "bytes_total": 2_000_000_000}
    places: list[dict[str, Any]] = [
        {"node": "a", "state": "loading", "staging": stage},
        {"node": "b", "state": "ready"},
    ]
    line = _line("m", {"why": "loading"}, places)
    assert line.startswith("m  a: loading (staging 750.0 MB / 2.00 GB  38%")
    assert line.endswith("; b: ready")
