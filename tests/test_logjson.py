"""`log_format = "json"` (shared.logjson): one object per line, with the request's id,
model and node on every line logged while it is served; both services wire it."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cortex.http.app import create_app as create_cortex
from cortex.http.proxy import request_id
from cortex.run.poller import POLLER
from neuron.config import NeuronConfig
from shared import logjson
from shared.config import ConfigError
from tests.conftest import NeuronProcess
from tests.cortex.fakes import catalogue, config, fleet, stop_all

log = logging.getLogger("tests.logjson")


@pytest.fixture
def lines(caplog: pytest.LogCaptureFixture) -> Iterator[io.StringIO]:
    """What the root logger writes at INFO, formatted as `cortex serve` would."""
    caplog.set_level(logging.INFO)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logjson.JsonFormatter("test", {"host": "h1"}))
    logging.getLogger().addHandler(handler)
    try:
        yield out
    finally:
        logging.getLogger().removeHandler(handler)


def parsed(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_line_outside_a_request_has_the_fields_and_its_traceback(lines: io.StringIO) -> None:
    log.info("plain %s", "line")
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        log.exception("failed")
    first, second = parsed(lines)
    assert first["message"] == "plain line" and first["level"] == "INFO"
    assert first["logger"] == "tests.logjson" and first["service"] == "test"
    assert first["host"] == "h1" and first["ts"].endswith("Z") and "request_id" not in first
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exc"]
    assert len(lines.getvalue().splitlines()) == 2  # a newline in a message stays escaped


async def test_every_line_of_a_request_has_its_id_and_model(lines: io.StringIO) -> None:
    """In the handler's task and in a thread it starts; not on the next request's."""

    async def handler(request: web.Request) -> web.Response:
        logjson.annotate(model="demo", node=None)  # unknown fields are left out
        log.info("in the task")
        await asyncio.to_thread(log.info, "in a thread")
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/x", handler)
    logjson.install(app, "json", logjson.header_request_id)
    async with TestClient(TestServer(app)) as client:
        await client.get("/x", headers={"X-Request-Id": "req-1"})
        await client.get("/x")  # no id given: none invented by the neuron's reader
    one, two, three, four = [x for x in parsed(lines) if x["logger"] == "tests.logjson"]
    assert [(x["request_id"], x["model"]) for x in (one, two)] == [("req-1", "demo")] * 2
    assert two["message"] == "in a thread" and "node" not in two
    assert "request_id" not in three and three["model"] == "demo" and "request_id" not in four


async def test_cortex_lines_carry_the_request_model_and_replica(lines: io.StringIO) -> None:
    """A real cortex, its first replica failing: the retry line names all three."""
    nodes = await fleet("a", "b")
    for n in nodes:
        n.add_model("m1")
        n.chat_error = (500, "internal_error")
    app = create_cortex(config(nodes), catalogue=catalogue(), background=False)
    logjson.install(app, "json", request_id)
    try:
        async with TestClient(TestServer(app)) as client:
            await app[POLLER].poll_once()
            resp = await client.post(
                "/v1/chat/completions",
                json={"model": "m1", "messages": [{"role": "user", "content": "hi"}]},
                headers={"X-Request-Id": "abc-123"},
            )
            assert resp.status >= 500
    finally:
        await stop_all(nodes)
    retry = next(x for x in parsed(lines) if "retrying on" in x["message"])
    assert retry["request_id"] == "abc-123" and retry["model"] == "m1"
    assert retry["node"] in ("a", "b") and retry["message"].endswith(retry["node"])


def test_log_format_is_checked_like_every_setting(tmp_path: Path) -> None:
    (tmp_path / "neuron.toml").write_text('log_format = "yaml"\n')
    with pytest.raises(ConfigError, match="log_format"):
        NeuronConfig.from_file(tmp_path / "neuron.toml")
    (tmp_path / "neuron.toml").write_text('log_format = "json"\n')
    assert NeuronConfig.from_file(tmp_path / "neuron.toml").log_format == "json"


def test_neuron_serve_writes_json_lines_only(neuron_factory: Any) -> None:
    """`neuron serve` with log_format = "json": every line of its output is an object,
    its banner included, each naming the node."""
    n: NeuronProcess = neuron_factory({"log_format": "json", "node_name": "studio-7"})
    n.stop()
    out = n.log().splitlines()
    objects = [json.loads(line) for line in out]
    print("\n".join(out[:3]))
    assert objects and all(o["node"] == "studio-7" and o["service"] == "neuron" for o in objects)
    assert any("Running on" in o["message"] for o in objects), out
