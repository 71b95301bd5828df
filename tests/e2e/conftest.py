"""End-to-end fixtures: a real `cortex serve` in front of real neurons and runners."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
import tomli_w

from tests.conftest import NeuronProcess, free_port, http_json, wait_until


@attrs.define
class CortexProcess:
    """A `cortex serve -c cortex.toml` child process on a free port."""

    dir: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def write(
        cls,
        dir: Path,
        neurons: Sequence[tuple[str, NeuronProcess]],
        models: Sequence[dict[str, Any]],
        **settings: Any,
    ) -> CortexProcess:
        dir.mkdir(parents=True, exist_ok=True)
        (dir / "models.toml").write_text(tomli_w.dumps({"models": list(models)}))
        port = free_port()
        config = {
            "port": port,
            "catalogue": "models.toml",
            "poll_interval_s": 0.5,
            **settings,
            "neurons": [{"name": name, "url": n.url} for name, n in neurons],
        }
        (dir / "cortex.toml").write_text(tomli_w.dumps(config))
        return cls(dir=dir, port=port)

    def start(self) -> CortexProcess:
        log = (self.dir / "cortex.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cortex.cli", "serve", "-c", str(self.dir / "cortex.toml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
        )
        log.close()
        wait_until(self._up, timeout=60, what="cortex to answer /health")
        return self

    def _up(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"cortex exited early:\n{self.log()}")
        try:
            return http_json(self.url + "/health", timeout=2)[0] in (200, 503)
        except OSError:
            return False

    def log(self) -> str:
        return (self.dir / "cortex.log").read_text(errors="replace")

    def get(self, path: str) -> tuple[int, Any]:
        return http_json(self.url + path)

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        return http_json(self.url + path, body, timeout=60)

    def model(self, model_id: str) -> dict[str, Any]:
        _, body = self.get("/v1/models")
        for m in body["data"]:
            if m["id"] == model_id:
                return dict(m)
        raise AssertionError(f"{model_id} not in /v1/models: {body}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def cortex_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[CortexProcess] = []

    def make(
        neurons: Sequence[tuple[str, NeuronProcess]],
        models: Sequence[dict[str, Any]],
        **settings: Any,
    ) -> CortexProcess:
        c = CortexProcess.write(tmp_path / f"cortex{len(started)}", neurons, models, **settings)
        started.append(c)
        return c.start()

    yield make
    for c in started:
        c.stop()


@pytest.fixture
def model_id() -> str:
    """A model id no other test or session on this machine uses."""
    return f"e2e-{uuid.uuid4().hex[:8]}"
