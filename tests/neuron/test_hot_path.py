"""Hot-path levers: the runner admits late requests mid-batch; serve runs on uvloop
with no access log unless asked."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.serve import new_event_loop
from tests.conftest import NeuronProcess
from tests.support.clients import chat
from tests.support.waiting import wait_until

WAIT_S = 120.0  # an upper bound for the whole exchange, never a measured duration
EOS = 1  # the demo model's eos_token_id (neuron/store/demo_model.py)


def _body(text: str, max_tokens: int) -> dict[str, Any]:
    return chat(
        "default_model",
        stream=True,
        text=text,
        max_tokens=max_tokens,
        temperature=0.0,
        # Never stop early: the long request must outlast the late one.
        logit_bias={str(EOS): -1000.0},
    )


def _token(line: bytes) -> bool:
    return line.startswith(b"data: {") and b'"content"' in line


def test_the_shim_cuts_mlx_lm_s_admission_budget_to_about_a_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the end-to-end test below measures, as the mechanism: mlx_lm's batch loop
    looks at its queue after `TimeBudget` of steps, 0.5 s of its own, ADMIT_EVERY_S
    through the shim (a single process; a distributed group keeps mlx_lm's)."""
    from mlx_lm import server

    from neuron.runner.main import ADMIT_EVERY_S, admit_promptly

    monkeypatch.setattr(server, "TimeBudget", server.TimeBudget)  # put back afterwards
    mlx_lm_own: Any = server.TimeBudget  # (mlx_lm is untyped)
    assert mlx_lm_own()._budget == 0.5
    admit_promptly(server)
    shimmed: Any = server.TimeBudget
    patched = shimmed()
    assert patched._budget == ADMIT_EVERY_S <= 0.005
    assert not patched._is_distributed


async def test_runner_admits_a_request_that_arrives_mid_batch(
    neuron_factory: Any, demo_model: Path
) -> None:
    """mlx_lm.server alone serves a late request only after 0.5 s of batch steps
    (or once its batch drains); through our shim it joins the batch at the next step.
    The late request must be served mid-stream; how many long-stream tokens it waited
    is printed beside what 0.5 s of steps is on this machine in this run."""
    n: NeuronProcess = neuron_factory({"runner": {"max_tokens": 4000}})
    port = n.load_ready("demo", demo_model)["port"]
    url = f"http://127.0.0.1:{port}"
    body = json.dumps(_body("a late one", 4)).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body
    long_frames, late_frames = [0], [0]
    at: dict[str, int] = {}
    late_socket: list[socket.socket] = []
    sent = asyncio.Event()
    stamps: list[float] = []  # when each long-stream frame arrived: its rate, for scale

    def long_frame() -> None:
        if long_frames[0] == 5:
            # Sent from here, synchronously, once the long request is decoding (i.e.
            # mid-batch): no task to wait for its turn, no request to build. The
            # count is then exact on this side, whatever the machine's speed.
            sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
            sock.sendall(request)
            at["sent"] = long_frames[0]
            late_socket.append(sock)
            sent.set()

    async def long() -> None:
        async with session.post(url + "/v1/chat/completions", json=_body("a long one", 3000)) as r:
            assert r.status == 200, await r.text()
            async for line in r.content:
                if _token(line):
                    long_frames[0] += 1
                    stamps.append(time.monotonic())
                    long_frame()
                    # One frame at a time: the late stream's reader has its turn between
                    # two, so it counts the long stream's frames as they arrive, not
                    # after a backlog read in one go (a starved client reads in bursts).
                    await asyncio.sleep(0)

    async def late() -> None:
        await sent.wait()
        (sock,) = late_socket
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            status = await reader.readline()
            assert b" 200 " in status, status
            while line := await reader.readline():
                if _token(line):
                    late_frames[0] += 1
                    at.setdefault("first", long_frames[0])
        finally:
            writer.close()

    async with aiohttp.ClientSession() as session:
        await asyncio.wait_for(asyncio.gather(long(), late()), WAIT_S)
    # Unpatched, the late one waits out (nearly) 0.5 s of steps: that many long-stream
    # tokens, ~165 on a quiet 2-core machine. Through the shim the gap is a few tokens;
    # but how many depends on how starved the machine is (the runner's own thread that
    # reads the request can take a scheduler slice), so the figure is printed, not
    # asserted: the mechanism is checked above without a clock, and
    # `python -m bench.proxy_overhead` times the TTFT it buys.
    assert late_frames[0] >= 1, at
    budget = 0.5 * (len(stamps) - 1) / (stamps[-1] - stamps[0])
    gap = at["first"] - at["sent"]
    print(f"\nlate request: first token {gap} long-stream tokens after it was sent;")
    print(f"mlx_lm's own 0.5 s budget is {budget:.0f} of them here")


def _access_lines(n: NeuronProcess) -> list[str]:
    return [line for line in n.log().splitlines() if "aiohttp.access" in line]


@pytest.mark.parametrize("access_log", [False, True])
def test_serve_logs_requests_only_when_asked(neuron_factory: Any, access_log: bool) -> None:
    n: NeuronProcess = neuron_factory({"access_log": access_log} if access_log else None)
    for _ in range(3):
        assert n.get("/health")[0] == 200
    if access_log:  # log lines are written as each request ends; give the last one a moment
        wait_until(lambda: len(_access_lines(n)) >= 3, WAIT_S, "three access log lines")
    assert (len(_access_lines(n)) >= 3) is access_log


def test_serve_loop_is_uvloop_where_installed() -> None:
    uvloop = pytest.importorskip("uvloop")
    loop = new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_cortex_config_access_log_key(tmp_path: Path) -> None:
    from cortex.config import CortexConfig

    assert CortexConfig().access_log is False
    cfg = tmp_path / "cortex.toml"
    cfg.write_text("access_log = true\n")
    assert CortexConfig.from_file(str(cfg)).access_log is True
