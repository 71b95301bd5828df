"""Runner faults, with a fake runner: a tiny HTTP server that misbehaves on purpose.

`runner.python` names an executable script written here; the neuron starts it
as `SCRIPT -m neuron.runner.main --neuron-model-id ID ... --port P ...`, and it
serves GET /health and POST /v1/completions on that port in the way under
test.  Each start records its pid in `STATE/start-N`, so a test can tell
runners apart and check that one has really gone.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from neuron.config import RunnerConfig
from neuron.runner import supervisor
from neuron.runner.process import LINE_LIMIT
from neuron.runner.supervisor import describe
from tests.conftest import InProcessFactory
from tests.support.clock import SkewedTime
from tests.support.waiting import until

WAIT_S = 60.0  # an upper bound for waits, never a measured duration

FAKE_RUNNER = """\
#!{python}
import json, os, pathlib, signal, socket, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Like the real runner: die once the neuron's end of the watchdog pipe closes.
fd = int(os.environ["NEURON_WATCHDOG_FD"])
threading.Thread(target=lambda: os.read(fd, 1) or os._exit(1), daemon=True).start()

MODE = {mode!r}
STATE = pathlib.Path({state!r})
port = int(sys.argv[sys.argv.index("--port") + 1])
start = len(list(STATE.glob("start-*")))
(STATE / f"start-{{start}}").write_text(str(os.getpid()))

if MODE == "ignore_sigterm" and start == 0:  # its successor stops at once (teardown)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if MODE == "chatty":
    # A progress bar: \\r-separated updates, never a newline, far over 64 KiB.
    for i in range(16384):
        sys.stdout.write(f"\\rprogress {{i:>8}}")
    sys.stdout.flush()
    sys.stdout.write("\\nfake runner serving\\n")
    sys.stdout.flush()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def sse(self, events):
        # Like mlx_lm.server: no length, the end of the stream closes the connection.
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for e in events:
            self.wfile.write(b"data: " + json.dumps(e).encode() + b"\\n\\n")
        self.wfile.write(b"data: [DONE]\\n\\n")
        self.wfile.flush()
        self.close_connection = True

    def do_GET(self):
        if MODE == "health_dead" and (STATE / f"dead-{{start}}").exists():
            self.answer(503, {{"status": "unavailable"}})
            return
        self.answer(200, {{"status": "ok"}})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        warmup = body.get("prompt") == "hi" and body.get("max_tokens") == 1
        if MODE == "warmup_disconnect" and warmup and start == 0:
            # Break the connection unanswered, and stay alive.
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if MODE in ("warmup_disconnect", "thread_died") and warmup and start > 0:
            # A restarted runner holds its warmup until "go": `recovering` stays visible.
            while not (STATE / "go").exists():
                time.sleep(0.02)
        if not warmup and MODE == "slow":
            time.sleep({slow_s})
        if not warmup and body.get("prompt") == "die":
            os._exit(3)
        if not warmup and MODE == "thread_died":
            self.answer(404, {{"error": "generation thread died"}})
            return
        if not warmup and MODE == "error500":
            self.answer(500, {{"error": "something failed"}})
            return
        if not warmup and MODE == "health_dead":
            (STATE / f"dead-{{start}}").touch()
        (STATE / "bodies").open("a").write(json.dumps(body) + "\\n")
        head = {{"id": "fake", "object": "text_completion", "created": 1, "model": "default_model"}}
        text = {{**head, "choices": [{{"index": 0, "text": "x", "finish_reason": "length"}}]}}
        if body.get("stream"):
            usage = {{"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}}
            self.sse([text, {{**head, "choices": [], "usage": usage}}])
            return
        self.answer(200, text)


server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
server.daemon_threads = True
server.serve_forever()
"""


def fake_runner(tmp_path: Path, mode: str, slow_s: float = 0.0) -> tuple[Path, Path]:
    """(the script, its state folder)."""
    state = tmp_path / f"fake-{mode}"
    state.mkdir()
    script = tmp_path / f"fake-runner-{mode}"
    script.write_text(
        FAKE_RUNNER.format(python=sys.executable, mode=mode, state=str(state), slow_s=slow_s)
    )
    script.chmod(0o755)
    return script, state


def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text("{}")
    return d


def pid_of(state: Path, start: int) -> int:
    return int((state / f"start-{start}").read_text())


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Client:
    def __init__(self, server: TestServer, session: aiohttp.ClientSession) -> None:
        self.server = server
        self.session = session

    async def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        async with self.session.post(self.server.make_url(path), json=body) as r:
            return r.status, await r.json()

    async def model(self, model_id: str) -> dict[str, Any] | None:
        async with self.session.get(self.server.make_url("/models")) as r:
            models = (await r.json())["models"]
        return next((m for m in models if m["model_id"] == model_id), None)

    async def state_in(self, model_id: str, *states: str) -> str:
        async def check() -> str:
            m = await self.model(model_id)
            return str(m["state"]) if m is not None and m["state"] in states else ""

        return await until(check, timeout=WAIT_S, what=f"{model_id} to be {'/'.join(states)}")

    async def gone(self, model_id: str) -> None:
        async def check() -> bool:
            return await self.model(model_id) is None

        await until(check, timeout=WAIT_S, what=f"{model_id} to be removed")

    async def load(self, model_id: str, source: Path) -> None:
        status, body = await self.post(
            "/models/load", {"model_id": model_id, "source": str(source)}
        )
        assert status == 202, body

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with self.session.get(self.server.make_url("/metrics")) as r:
            text = await r.text()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }


async def neuron(factory: InProcessFactory, script: Path, **settings: Any) -> TestServer:
    runner = settings.pop("runner", {})
    return await factory(runner=RunnerConfig(python=str(script), **runner), **settings)


async def test_warmup_disconnect_restarts_the_runner(
    neuron_app_factory: InProcessFactory, tmp_path: Path
) -> None:
    """A runner that breaks the warmup connection is lost (restarted), not failed."""
    script, state = fake_runner(tmp_path, "warmup_disconnect")
    server = await neuron(neuron_app_factory, script)
    async with aiohttp.ClientSession() as session:
        c = Client(server, session)
        await c.load("m", model_dir(tmp_path))
        # The second runner holds its warmup until "go": `recovering` stays visible.
        assert await c.state_in("m", "recovering", "failed") == "recovering"
        await until((state / "start-1").exists, timeout=WAIT_S, what="the restarted runner")
        first = pid_of(state, 0)
        await until(lambda: not alive(first), timeout=WAIT_S, what="the lost runner's death")
        (state / "go").touch()
        assert await c.state_in("m", "ready", "failed") == "ready"
        assert alive(pid_of(state, 1))
        crashes = (await c.metrics())[("neuron_runner_crashes_total", (("model", "m"),))]
        assert crashes == 1


async def test_unload_survives_its_client_leaving_during_the_grace(
    neuron_app_factory: InProcessFactory, tmp_path: Path
) -> None:
    """A client that disconnects from an unload does not stop the SIGKILL."""
    script, state = fake_runner(tmp_path, "ignore_sigterm")
    # The grace is what the test has to see `unloading` and cancel in: generous, as the
    # test waits it out (the runner ignores SIGTERM; only the SIGKILL at its end works).
    server = await neuron(neuron_app_factory, script, runner={"stop_grace_s": 5.0})
    source = model_dir(tmp_path)
    async with aiohttp.ClientSession() as session:
        c = Client(server, session)
        await c.load("m", source)
        await c.state_in("m", "ready")
        first = pid_of(state, 0)
        unload = asyncio.create_task(c.post("/models/unload", {"model_id": "m"}))
        # The runner ignores SIGTERM: the unload waits out its grace...
        await c.state_in("m", "unloading")
        # ...and its client goes away meanwhile (the handler is cancelled).
        unload.cancel()
        await asyncio.gather(unload, return_exceptions=True)
        await until(lambda: not alive(first), timeout=WAIT_S, what="the runner's SIGKILL")
        await c.gone("m")
        # A new load starts a new runner.
        await c.load("m", source)
        assert await c.state_in("m", "ready", "failed") == "ready"
        assert alive(pid_of(state, 1))


async def test_runner_output_line_over_the_limit(
    neuron_app_factory: InProcessFactory, tmp_path: Path
) -> None:
    """200+ KB of output without a newline: the runner still loads and unloads."""
    script, state = fake_runner(tmp_path, "chatty")
    store = tmp_path / "store"
    server = await neuron(neuron_app_factory, script, store_dir=str(store))
    async with aiohttp.ClientSession() as session:
        c = Client(server, session)
        await c.load("m", model_dir(tmp_path))
        assert await c.state_in("m", "ready", "failed") == "ready"
        status, body = await c.post("/models/unload", {"model_id": "m"})
        assert status == 200, body
        assert not alive(pid_of(state, 0))
        assert await c.model("m") is None
    # The whole output reached the runner's log file.
    log = (store / "logs" / "m.log").read_bytes()
    assert len(log) > 3 * LINE_LIMIT
    assert log.rstrip().endswith(b"fake runner serving")


async def test_slow_unary_request_has_no_total_timeout(
    neuron_app_factory: InProcessFactory, tmp_path: Path
) -> None:
    """A non-streamed answer slower than many heartbeats from a healthy runner."""
    script, _ = fake_runner(tmp_path, "slow", slow_s=1.5)
    # 15 heartbeats of silence; the idle timeout, far beyond it, is not what is tested.
    server = await neuron(neuron_app_factory, script, heartbeat_s=0.1, idle_read_timeout_s=60)
    async with aiohttp.ClientSession() as session:
        c = Client(server, session)
        await c.load("m", model_dir(tmp_path))
        await c.state_in("m", "ready")
        status, body = await c.post("/v1/completions", {"model": "m", "prompt": "long"})
        assert status == 200, body
        assert body["choices"][0]["text"] == "x"
        counted = await c.metrics()
        assert counted[("neuron_requests_total", (("model", "m"), ("outcome", "ok")))] == 1


async def test_runner_lost_mid_request_counts_once(
    neuron_app_factory: InProcessFactory, tmp_path: Path
) -> None:
    """A runner dying under a request: 503 with a reason, counted as lost, not rejected."""
    script, _ = fake_runner(tmp_path, "die")
    server = await neuron(neuron_app_factory, script)
    async with aiohttp.ClientSession() as session:
        c = Client(server, session)
        await c.load("m", model_dir(tmp_path))
        await c.state_in("m", "ready")
        status, body = await c.post("/v1/completions", {"model": "m", "prompt": "die"})
        assert status == 503, body
        assert body["error"]["code"] == "upstream_unavailable"
        reason = body["error"]["message"].split(" lost: ", 1)[1]
        assert reason.strip(), body
        counted = await c.metrics()
        assert counted[("neuron_requests_total", (("model", "m"), ("outcome", "upstream_lost")))]
        rejected = {k: v for k, v in counted.items() if k[0] == "neuron_rejected_requests_total"}
        assert rejected and set(rejected.values()) == {0}, rejected


def test_describe_never_empty() -> None:
    assert describe(TimeoutError()) == "TimeoutError()"
    assert describe(ValueError("bad")) == "bad"


async def test_generation_thread_died_answer_restarts_the_runner(
    neuron_app_factory: InProcessFactory, tmp_path: Path
) -> None:
    """ "generation thread died": 502 naming a broken runner, restarted, reason in /models."""
    script, state = fake_runner(tmp_path, "thread_died")
    server = await neuron(neuron_app_factory, script)
    async with aiohttp.ClientSession() as session:
        c = Client(server, session)
        await c.load("m", model_dir(tmp_path))
        await c.state_in("m", "ready")
        status, body = await c.post("/v1/completions", {"model": "m", "prompt": "x"})
        assert status == 502, body
        assert body["error"]["code"] == "upstream_error"
        assert "broken" in body["error"]["message"]
        # The restarted runner holds its warmup until "go": `recovering` stays visible.
        assert await c.state_in("m", "recovering", "ready") == "recovering"
        m = await c.model("m")
        assert m is not None and "generation thread died" in m["error"], m
        async with session.get(server.make_url("/health")) as r:
            assert (await r.json())["status"] == "degraded"
        await until(
            lambda: not alive(pid_of(state, 0)), timeout=WAIT_S, what="the broken runner's death"
        )
        (state / "go").touch()
        assert await c.state_in("m", "ready", "failed") == "ready"
        assert alive(pid_of(state, 1))
        counted = await c.metrics()
        assert counted[("neuron_requests_total", (("model", "m"), ("outcome", "runner_broken")))]


async def test_consecutive_5xx_make_a_runner_broken(
    neuron_app_factory: InProcessFactory, tmp_path: Path
) -> None:
    """N failed answers in a row: the Nth is 502 'broken' and the runner is replaced."""
    script, state = fake_runner(tmp_path, "error500")
    server = await neuron(neuron_app_factory, script, runner={"max_consecutive_errors": 3})
    async with aiohttp.ClientSession() as session:
        c = Client(server, session)
        await c.load("m", model_dir(tmp_path))
        await c.state_in("m", "ready")
        for _ in range(2):
            status, body = await c.post("/v1/completions", {"model": "m", "prompt": "x"})
            assert status == 502 and "broken" not in body["error"]["message"], body
        assert alive(pid_of(state, 0))
        status, body = await c.post("/v1/completions", {"model": "m", "prompt": "x"})
        assert status == 502 and "broken" in body["error"]["message"], body
        await until(
            lambda: not alive(pid_of(state, 0)), timeout=WAIT_S, what="the broken runner's death"
        )
        m = await c.model("m")
        assert m is not None and "3 failed requests in a row" in (m["error"] or ""), m


async def test_health_503_restarts_the_runner(
    neuron_app_factory: InProcessFactory, tmp_path: Path
) -> None:
    """A runner whose /health turns 503 is found by the periodic read, and replaced."""
    script, state = fake_runner(tmp_path, "health_dead")
    server = await neuron(neuron_app_factory, script, runner={"health_check_interval_s": 0.2})
    async with aiohttp.ClientSession() as session:
        c = Client(server, session)
        await c.load("m", model_dir(tmp_path))
        await c.state_in("m", "ready")
        status, body = await c.post("/v1/completions", {"model": "m", "prompt": "x"})
        assert status == 200, body  # ...and from now on its /health says 503
        await until(
            lambda: not alive(pid_of(state, 0)), timeout=WAIT_S, what="the broken runner's death"
        )
        m = await c.model("m")
        assert m is not None and "/health" in (m["error"] or ""), m
        assert await c.state_in("m", "ready", "failed") == "ready"


async def test_runner_gets_only_allow_listed_fields(
    neuron_app_factory: InProcessFactory, tmp_path: Path
) -> None:
    """What reached the runner: checked fields, its own model name, stream with usage."""
    script, state = fake_runner(tmp_path, "record")
    server = await neuron(neuron_app_factory, script)
    async with aiohttp.ClientSession() as session:
        c = Client(server, session)
        await c.load("m", model_dir(tmp_path))
        await c.state_in("m", "ready")
        body = {"model": "m", "prompt": "x", "draft_model": "/a", "adapters": "/b", "n": 1}
        status, answer = await c.post("/v1/completions", body)
        assert status == 200, answer
        assert answer["choices"][0]["text"] == "x"
        assert answer["usage"]["completion_tokens"] == 1
    sent = [json.loads(line) for line in (state / "bodies").read_text().splitlines()]
    assert sent[-1] == {
        "model": "default_model",
        "prompt": "x",
        "max_tokens": 512,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_failed_records_are_bounded_and_expire(
    neuron_app_factory: InProcessFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Junk loads that fail: at most N listed, dropped after the TTL, series gone too."""
    # The TTL passes on the supervisor's clock, moved forward by the test: a real one
    # short enough to wait out could pass while the eight loads were still failing.
    clock = SkewedTime()
    monkeypatch.setattr(supervisor, "time", clock)
    server = await neuron_app_factory(
        runner=RunnerConfig(python=str(tmp_path / "no-such-python")),
        max_failed_records=3,
        failed_record_ttl_s=600.0,
    )
    source = model_dir(tmp_path)
    async with aiohttp.ClientSession() as session:
        c = Client(server, session)
        for i in range(8):
            await c.load(f"junk{i}", source)
            assert await c.state_in(f"junk{i}", "failed") == "failed"
        async with session.get(server.make_url("/models")) as r:
            listed = [m["model_id"] for m in (await r.json())["models"]]
        assert sorted(listed) == ["junk5", "junk6", "junk7"]
        models = {dict(k[1]).get("model") for k in await c.metrics()}
        assert "junk0" not in models and "junk7" in models
        clock.skew_s = 601.0
        await c.gone("junk7")
        models = {dict(k[1]).get("model") for k in await c.metrics()}
        assert not any(str(m).startswith("junk") for m in models), models


async def test_stalled_hub_downloads_leave_health_answering(
    neuron_factory: Any, monkeypatch: Any
) -> None:
    """More downloads than any default thread pool has threads, from a hub that never
    answers: /health still answers."""
    import concurrent.futures
    import socket
    import threading

    from neuron.store.sources import DOWNLOAD_WORKERS
    from tests.conftest import http_json, wait_until

    hub = socket.socket()
    hub.bind(("127.0.0.1", 0))
    hub.listen(64)
    held: list[socket.socket] = []

    def accept() -> None:  # connections are accepted, held, and never answered
        while True:
            try:
                held.append(hub.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.getsockname()[1]}")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        # The hub's reads never time out here: had /health to wait for a thread a
        # download holds, it would wait past its own 30 s timeout, not a moment.
        n = neuron_factory({"stage_read_timeout_s": 3600.0})
        # 40: more than the default pool's most threads (32), whatever the machine. At
        # once: each answer waits out the stage's plan wait (PLAN_WAIT_S).
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(40) as pool:
            answers = await asyncio.gather(
                *(
                    loop.run_in_executor(
                        pool, n.post, "/models/load", {"model_id": f"hub{i}", "source": f"org/m{i}"}
                    )
                    for i in range(40)
                )
            )
        assert {status for status, _ in answers} == {202}, answers
        # Every download thread is stalled at the hub before /health is asked.
        wait_until(lambda: len(held) >= DOWNLOAD_WORKERS, 60, "the downloads stalled at the hub")
        for _ in range(3):
            status, _ = await asyncio.to_thread(http_json, n.url + "/health", None, 30.0)
            assert status == 200
    finally:
        hub.shutdown(socket.SHUT_RDWR)
        hub.close()
        for conn in held:
            conn.close()
