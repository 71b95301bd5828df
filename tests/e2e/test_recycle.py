"""Recycle: `cortex restart NODE --wait` over real neurons, runners and cortex."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.conftest import (
    LONG_STREAM,
    NeuronProcess,
    http_json,
    kill_pid,
    runner_pids,
    wait_until,
)
from tests.e2e.conftest import CortexProcess
from tests.e2e.test_shutdown import NO_STALL

TOKEN = "recycle-admin-token"


def _restart(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cortex.cli", "restart", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CORTEX_ADMIN_TOKEN": TOKEN},
    )


def _stream(url: str, model_id: str) -> tuple[int, str]:
    body = (
        b'{"model": "%s", "stream": true, "max_tokens": 8, '
        b'"messages": [{"role": "user", "content": "hi"}]}' % model_id.encode()
    )
    req = urllib.request.Request(
        url + "/v1/chat/completions", body, {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def test_restart_brings_the_model_back_and_no_client_sees_an_error(
    neuron_factory: Any, cortex_factory: Any, demo_model: Path, model_id: str
) -> None:
    """Both nodes serve the model; `cortex restart a --wait` returns once a serves it
    again, as the same process and node id but a new start; every request sent through
    cortex meanwhile (plain and streamed) is a 200 with no error frame; no runner is
    left without its neuron."""
    # a's runner is frozen a moment (below): never taken for stalled meanwhile.
    a: NeuronProcess = neuron_factory(name="a", settings={"drain_s": 60.0, "runner": NO_STALL})
    b: NeuronProcess = neuron_factory(name="b")
    c: CortexProcess = cortex_factory(
        [("a", a), ("b", b)],
        [{"id": model_id, "source": str(demo_model), "keep_loaded": True, "replicas": 2}],
        admin_token=TOKEN,
    )
    a.wait_state(model_id, "ready")
    b.wait_state(model_id, "ready")
    wait_until(lambda: len(c.model(model_id)["locations"]) == 2, 30, "two replicas in cortex")
    node_id = a.get("/discovery")[1]["node_id"]
    started_at = http_json(a.url + "/health")[1]["started_at"]
    old_runner = runner_pids(model_id, parent=a.process.pid)
    assert len(old_runner) == 1

    results: list[tuple[str, int, str]] = []
    stop = threading.Event()

    ask = {"model": model_id, "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}

    def plain() -> None:
        while not stop.is_set():
            status, body = http_json(c.url + "/v1/chat/completions", ask, timeout=60)
            results.append(("plain", status, str(body)[:300]))

    def streamed() -> None:
        while not stop.is_set():
            status, text = _stream(c.url, model_id)
            results.append(("stream", status, text[-300:]))

    # One long stream on a itself when the restart begins: a's drain must let it end.
    long_body = {
        "model": model_id,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "go on"}],
        **LONG_STREAM,
        "max_tokens": 3000,
    }
    long_started = threading.Event()
    long_result: list[str] = []
    long_ended: list[float] = []

    def long_stream() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", c.port, timeout=120)
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps(long_body),
            {
                "Content-Type": "application/json",
                "Authorization": f"Bearer {TOKEN}",
                "X-Cortex-Node": "a",
            },
        )
        resp = conn.getresponse()
        text = []
        for line in resp:
            if not long_started.is_set():
                # Frozen as soon as it has begun, a's runner cannot end the stream
                # before a's drain has begun (3000 tokens can take less time than
                # `cortex restart` takes to start, on a fast machine).
                os.kill(old_runner[0], signal.SIGSTOP)
                long_started.set()
            text.append(line.decode(errors="replace"))
        long_result.append(f"{resp.status}\n" + "".join(text))
        long_ended.append(time.monotonic())
        conn.close()

    def draining(n: NeuronProcess) -> bool:
        return bool(http_json(n.url + "/health")[1]["status"] == "draining")

    restarts: list[subprocess.CompletedProcess[str]] = []
    threads = [threading.Thread(target=plain), threading.Thread(target=streamed)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(results) >= 4, 60, "requests flowing")
        threads.append(threading.Thread(target=long_stream))
        threads[-1].start()
        try:
            wait_until(long_started.is_set, 60, "the long stream on a begun")
            restart_began = time.monotonic()
            restart = threading.Thread(
                target=lambda: restarts.append(
                    _restart("a", "--url", c.url, "--wait", "--timeout", "240")
                )
            )
            restart.start()
            # a drains, still listening and saying so, with the long stream on it.
            wait_until(lambda: draining(a), 120, "a to say it drains")
            # Cortex reads that: a is out of routing, and shown draining.
            wait_until(lambda: _node(c, "a")["draining"], 60, "cortex to show a draining")
        finally:
            kill_pid(old_runner[0], signal.SIGCONT)
        restart.join(300)
        (done,) = restarts
        print(done.stdout, done.stderr)
        assert done.returncode == 0, done.stdout + done.stderr
        # A few more after the node is back (it may take requests again).
        seen = len(results)
        wait_until(lambda: len(results) >= seen + 4, 60, "requests after the restart")
    finally:
        stop.set()
        for t in threads:
            t.join(90)

    assert "a: restarting" in done.stdout
    assert "a: draining, " in done.stdout
    assert f"{model_id}: ready on a again" in done.stdout
    assert done.stdout.rstrip().endswith("a: restarted and serving")
    bad = [r for r in results if r[1] != 200 or '"error"' in r[2]]
    assert not bad, bad
    (long_text,) = long_result
    assert long_text.startswith("200\n") and '"error"' not in long_text, long_text[-500:]
    assert '"completion_tokens": 3000' in long_text and long_text.rstrip().endswith("[DONE]")
    # It was still streaming when the restart began (else this proves nothing).
    assert long_ended[0] > restart_began
    # The same process (exec keeps the PID) and node id, a new start.
    assert a.process.poll() is None
    assert a.get("/discovery")[1]["node_id"] == node_id
    assert http_json(a.url + "/health")[1]["started_at"] != started_at
    assert a.model(model_id)["state"] == "ready"  # type: ignore[index]
    # One runner per neuron, each the child of its neuron: the old one is gone.
    new_runner = runner_pids(model_id, parent=a.process.pid)
    assert len(new_runner) == 1 and new_runner != old_runner
    assert sorted(runner_pids(model_id)) == sorted(
        new_runner + runner_pids(model_id, parent=b.process.pid)
    )
    assert "re-executing" in a.log()


def _node(c: CortexProcess, name: str) -> dict[str, Any]:
    _, state = http_json(c.url + "/admin/state", token=TOKEN)
    return dict(next(n for n in state["nodes"] if n["name"] == name))


def test_restart_of_an_unknown_node_is_a_404_and_exit_2(
    neuron_factory: Any, cortex_factory: Any, demo_model: Path, model_id: str
) -> None:
    a: NeuronProcess = neuron_factory(name="a")
    c: CortexProcess = cortex_factory(
        [("a", a)], [{"id": model_id, "source": str(demo_model)}], admin_token=TOKEN
    )
    done = _restart("nosuch", "--url", c.url)
    assert done.returncode == 2 and "404" in done.stderr and "no node 'nosuch'" in done.stderr
    # Only with the admin token.
    status, _ = http_json(c.url + "/admin/nodes/a/restart", {})
    assert status == 401
    assert a.process.poll() is None
