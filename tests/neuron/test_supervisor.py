"""Runner lifecycles: neuron shutdown, neuron death, crash loops, warmup deadlines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from neuron.runner.main import WATCHDOG_ENV
from neuron.runner.process import free_port
from shared.sse import HEARTBEAT
from tests.conftest import LONG_STREAM, NeuronProcess, read_until, runner_pids, wait_until

Factory = Callable[..., NeuronProcess]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_neuron_shutdown_leaves_no_runner(
    neuron_factory: Factory, demo_model: Path, sig: signal.Signals
) -> None:
    """SIGTERM or SIGKILL of `neuron serve` takes its runners with it."""
    model_id = unique("shutdown")
    n = neuron_factory({"load": [{"model_id": model_id, "source": str(demo_model)}]})
    n.wait_state(model_id, "ready")
    assert len(runner_pids(model_id)) == 1
    code = n.stop(sig)
    if sig == signal.SIGTERM:
        assert code == 0, n.log()
        # A clean shutdown stops and reaps its runners before exiting.
        assert runner_pids(model_id) == []
    else:
        wait_until(lambda: runner_pids(model_id) == [], timeout=15, what="runner death")


def test_watchdog_pipe_eof_kills_runner(demo_model: Path, tmp_path: Path) -> None:
    """A runner whose watchdog pipe closes kills itself, parent alive or not."""
    read_fd, write_fd = os.pipe()
    model_id = unique("watchdog")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "neuron.runner.main",
            "--neuron-model-id",
            model_id,
            "--model",
            str(demo_model),
            "--port",
            str(free_port()),
        ],
        env={**os.environ, WATCHDOG_ENV: str(read_fd)},
        pass_fds=(read_fd,),
        start_new_session=True,  # it kills its own process group, not ours
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(read_fd)
    try:
        wait_until(lambda: runner_pids(model_id), timeout=30, what="runner start")
        os.close(write_fd)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


async def test_idle_read_timeout_ends_a_silent_stream(
    neuron_factory: Factory, demo_model: Path
) -> None:
    """A runner silent past idle_read_timeout_s: heartbeats, then an error frame."""
    model_id = unique("idle")
    n = neuron_factory({"idle_read_timeout_s": 1.0, "heartbeat_s": 0.2})
    n.load_ready(model_id, demo_model)
    [pid] = runner_pids(model_id)
    body = {"model": model_id, "prompt": "tick", "stream": True, **LONG_STREAM}
    async with (
        aiohttp.ClientSession() as s,
        s.post(n.url + "/v1/completions", json=body) as r,
    ):
        await read_until(r, b"data: {")
        os.kill(pid, signal.SIGSTOP)
        try:
            rest = await r.content.read()
        finally:
            os.kill(pid, signal.SIGCONT)
    events = [e for e in rest.split(b"\n\n") if e]
    assert HEARTBEAT.strip() in events
    assert events[-1] == b"data: [DONE]"
    assert b"silent for 1 s" in events[-2]
    n.wait_state(model_id, "ready")


def _broken_model(demo_model: Path, dest: Path) -> Path:
    dest.mkdir()
    (dest / "config.json").write_bytes((demo_model / "config.json").read_bytes())
    (dest / "tokenizer.json").write_bytes((demo_model / "tokenizer.json").read_bytes())
    (dest / "model.safetensors").write_bytes(b"this is not a safetensors file")
    return dest


def test_crash_loop_and_warmup_deadline_end_failed(
    neuron_factory: Factory, demo_model: Path, tmp_path: Path
) -> None:
    """Repeated runner failures leave the model failed with the reason and stderr tail."""
    n = neuron_factory({"restart": {"max_crashes": 2, "crash_window_s": 600.0}})

    broken = unique("broken")
    n.load(broken, _broken_model(demo_model, tmp_path / "broken"))
    m = n.wait_state(broken, "failed")
    assert "runner failures" in m["error"]
    assert "runner output tail" in m["error"]
    assert "load_safetensors" in m["error"]  # the runner's own reason, from its stderr
    assert runner_pids(broken) == []
    # The event log has each start and crash, with the runner's stderr tail, then the end.
    events = n.get(f"/events?model={broken}")[1]["events"]
    kinds = [e["kind"] for e in events]
    assert kinds == ["runner start", "crash", "runner start", "crash", "failed"], kinds
    crash = next(e for e in events if e["kind"] == "crash")
    assert "runner output tail" in crash["detail"] and "load_safetensors" in crash["detail"]

    slow = unique("slow")
    n.load(slow, demo_model, warmup_deadline_s=0.05)
    m = n.wait_state(slow, "failed")
    assert "not ready within 0.05 s" in m["error"]
    assert runner_pids(slow) == []

    status, body = n.post("/v1/chat/completions", {"model": slow, "messages": []})
    assert status == 503
    assert body["error"]["code"] == "model_failed"

    _, h = n.get("/health")
    assert h["status"] == "degraded"

    # A failed model may be loaded again (here: with a generous deadline).
    answer: dict[str, Any] = n.load(slow, demo_model)
    assert answer["state"] == "loading"
    n.wait_state(slow, "ready")
