"""Discovery and join, with real processes on a real (virtual) LAN.

Cortex and two neurons each run in a network namespace of their own, joined by
a bridge this test creates (tests/support/netns.py), so mDNS multicast goes
from host to host as on a LAN switch. Cortex has no [[neurons]] at all:

- neuron `a` holds the fleet token: it is found, proven, polled, loaded and
  serving within seconds of `neuron serve` (the figure is printed);
- neuron `b` holds another token: listed `stranger` (in /admin/state and
  `cortex status`), never loaded or routed to;
- a join code turns `b` into a member: `neuron join` writes the token (0600),
  and `b`, restarted, is polled and serves; the code is refused when used again,
  and a wrong or an expired one is refused too.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from cortex.cli.ops import render_status, status_rc
from neuron.cli.main import main as neuron_main
from tests.conftest import NeuronProcess, http_json, stop_quietly, wait_until
from tests.e2e.conftest import CortexProcess
from tests.support import netns
from tests.support.clients import post_chat
from tests.support.waiting import until

TOKEN = "discovery-fleet-token-0123456789"
OTHER = "someone-elses-token-9876543210"
ADMIN = "admin-token-for-join"
NEURON_PORT = 9410
Wrap = Callable[[list[str]], list[str]]


@attrs.define
class NsCortex(CortexProcess):
    """`cortex serve` inside a namespace, reached at its address there."""

    host: str = "127.0.0.1"
    wrap: Wrap | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> NsCortex:
        argv = [sys.executable, "-m", "cortex.cli", "serve", "-c", str(self.dir / "cortex.toml")]
        with (self.dir / "cortex.log").open("ab") as log:
            self.process = subprocess.Popen(
                self.wrap(argv) if self.wrap else argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )
        wait_until(self._up, timeout=60, what="cortex to answer /health")
        return self

    def admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        from shared.blocking_http import request_json

        headers = {"Authorization": f"Bearer {ADMIN}"}
        status, answer, _ = request_json(method, self.url + path, body, 30.0, headers=headers)
        return status, answer


@pytest.fixture
def lan() -> Iterator[list[netns.TestHost]]:
    if not netns.available():
        pytest.skip("needs root and iproute2: namespaces joined by a bridge carry the multicast")
    with netns.hosts(3) as hosts:
        yield hosts


def _neuron(
    into: list[NeuronProcess], root: Path, name: str, host: netns.TestHost, token_file: Path
) -> NeuronProcess:
    """Start neuron `name` on `host`, listed in `into` once up (to be stopped)."""
    settings = {
        "host": host.address,
        "port": NEURON_PORT,
        "node_name": name,
        "fleet_token_file": str(token_file),
    }
    n = NeuronProcess.start(root / name, settings, wrap=host.wrap)
    into.append(n)
    return n


def _node(c: NsCortex, name: str) -> dict[str, Any] | None:
    status, state = c.admin("GET", "/admin/state")
    assert status == 200, state
    return next((n for n in state["nodes"] if n["name"] == name), None)


async def _neuron_cli(argv: list[str]) -> tuple[int, str, str]:
    """`neuron ARGV` (its main, off the loop): exit status, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return neuron_main(argv)

    rc = await asyncio.to_thread(run)
    return rc, out.getvalue(), err.getvalue()


async def _first_answer(c: NsCortex, model: str) -> tuple[int, Any]:
    seen: list[Any] = []

    async def answered() -> tuple[int, Any] | None:
        status, body = await asyncio.to_thread(
            post_chat, c.url, model, timeout=60, max_tokens=4, temperature=0
        )
        seen[:] = [status, body]
        return (status, body) if status == 200 else None  # 503 until a node serves it

    got = await until(
        answered, timeout=120, interval=0.1, what=f"{model} answered", seen=lambda: seen
    )
    assert got is not None
    return got[0], got[1]


async def test_discovered_node_serves_stranger_unused_join_code_once(
    lan: list[netns.TestHost], tmp_path: Path, demo_model: Path, model_id: str
) -> None:
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "ours").write_text(TOKEN)
    (tokens / "theirs").write_text(OTHER)
    cortex_host, host_a, host_b = lan
    written = CortexProcess.write(
        tmp_path / "cortex",
        [],
        [{"id": model_id, "source": str(demo_model)}],
        host=cortex_host.address,
        discover=True,
        fleet_token_file=str(tokens / "ours"),
        admin_token=ADMIN,
        poll_interval_s=0.5,
    )
    c = NsCortex(written.dir, written.port, host=cortex_host.address, wrap=cortex_host.wrap)
    neurons: list[NeuronProcess] = []
    b_task: asyncio.Task[NeuronProcess] | None = None
    try:
        c.start()
        # b starts alongside (it shares these 2 cores with a, as a busy LAN would).
        b_up = asyncio.to_thread(_neuron, neurons, tmp_path, "b", host_b, tokens / "theirs")
        b_task = asyncio.create_task(b_up)
        started = time.monotonic()
        await asyncio.to_thread(_neuron, neurons, tmp_path, "a", host_a, tokens / "ours")
        await _first_answer(c, model_id)
        first_answer_s = time.monotonic() - started
        theirs = await b_task
        a = _node(c, "a")
        assert a is not None and a["healthy"] and a["discovered"], a

        # b refuses the token: a stranger, listed, never polled with it nor loaded.
        b = wait_until(lambda: (n := _node(c, "b")) and n["status"] == "stranger" and n, 30, "b")
        assert b["stranger"] and not b["healthy"] and b["models"] == [], b
        assert "another fleet token" in b["last_error"]
        state = c.admin("GET", "/admin/state")[1]
        row = next(line for line in render_status(state).splitlines() if line.startswith("b "))
        assert "stranger" in row, row
        assert status_rc(state) == 0, "a stranger is no node of ours failing"
        assert theirs.get("/models")[1]["models"] == [], "cortex loaded something on b"
        for _ in range(3):  # every answer comes from a
            assert (await asyncio.to_thread(post_chat, c.url, model_id, max_tokens=2))[0] == 200
        assert theirs.get("/models")[1]["models"] == []

        # A join code: refused when wrong, works once, refused when used; b joins.
        status, minted = c.admin("POST", "/admin/join-codes", {})
        assert status == 201, minted
        join = ["join", c.url, "-c", str(theirs.dir / "neuron.toml"), "--code"]
        wrong = await _neuron_cli([*join, "AAAAA-AAAAA-AAAAA-AAAAA"])
        assert wrong[0] == 1 and "unknown join code" in wrong[2], wrong
        done = await _neuron_cli([*join, minted["code"]])
        assert done[0] == 0, done
        assert f"wrote the fleet token to {tokens / 'theirs'}" in done[1], done
        assert "next: restart the neuron" in done[1]
        assert (tokens / "theirs").read_text().strip() == TOKEN
        assert stat.S_IMODE((tokens / "theirs").stat().st_mode) == 0o600
        again = await _neuron_cli([*join, minted["code"]])
        assert again[0] == 1 and "used already" in again[2], again
        status, short = c.admin("POST", "/admin/join-codes", {"ttl_s": 0.2})
        assert status == 201 and short["expires_in_s"] == 0.2
        await asyncio.sleep(0.3)  # past its 0.2 s: a wait bounded below, never a race
        status, late = http_json(c.url + "/join", {"code": short["code"]})
        assert status == 403 and late["error"]["code"] == "join_code_refused", late
        assert "expired" in late["error"]["message"]

        stop_quietly(theirs)
        rejoined_at = time.monotonic()
        _neuron(neurons, tmp_path, "b", host_b, tokens / "theirs")
        wait_until(lambda: (n := _node(c, "b")) and n["healthy"] and n["discovered"], 60, "b in")
        joined_s = time.monotonic() - rejoined_at
        status, body = await asyncio.to_thread(post_chat, c.url, model_id, max_tokens=2)
        assert status == 200, body
    finally:
        if b_task is not None:
            with contextlib.suppress(Exception):
                await b_task  # up (and listed) or failed: never left running unlisted
        for n in neurons:
            stop_quietly(n)
        c.stop()
    log = c.log()
    print(
        f"\n`neuron serve` to first answer through cortex (no [[neurons]] entry): "
        f"{first_answer_s:.1f} s; b restarted after `neuron join` to polled member: "
        f"{joined_s:.1f} s"
    )
    assert "discovered neuron a" in log and "stranger b" in log, log[-2000:]
