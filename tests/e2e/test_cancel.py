"""Cancel by id (issue 20): DELETE /v1/requests/{id} on a real fleet.

One fleet for the module (two cores): `cortex serve` with two API keys and an
admin token in front of one `neuron serve` and its real runner on the demo model.

- a stream cancelled by the key that sent it: the client reads the error frame
  (`request_cancelled`, 499) then [DONE], and the runner's CPU stops advancing
  (utime + stime from /proc/<pid>/stat: the figures are printed); another key
  gets 403, no key 401, an unknown id 404; the trace says `cancelled`;
- a one-piece request cancelled by the admin token with `cortex cancel` (which
  lists it first, from /admin/requests): the client gets the 499 error;
- a stream sent straight to the neuron, cancelled there with the fleet token.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest

from cortex.cli.main import _parser as cortex_parser
from shared.sse import DONE
from tests.conftest import (
    LONG_STREAM,
    NeuronProcess,
    http_json,
    read_until,
    runner_pids,
    stop_quietly,
)
from tests.e2e.conftest import CortexProcess
from tests.support.waiting import until, wait_until

ADMIN = "admin-token-for-cancel"
KEY_A = "key-a-0123456789"
KEY_B = "key-b-0123456789"
FLEET_TOKEN = "fleet-token-for-cancel-0123456789"
TICKS = os.sysconf("SC_CLK_TCK")
# A runner at rest: well below this share of a core (busy, it takes most of one).
IDLE_CORES = 0.15


@attrs.frozen
class Fleet:
    cortex: CortexProcess
    neuron: NeuronProcess
    model: str
    runner: int


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("cancel")
    model = f"cancel-{uuid.uuid4().hex[:8]}"
    token_file = root / "fleet.token"
    token_file.write_text(FLEET_TOKEN + "\n")
    n = NeuronProcess.start(
        root / "neuron",
        {
            "fleet_token_file": str(token_file),
            "load": [{"model_id": model, "source": str(demo_model)}],
        },
    )
    c = CortexProcess.write(
        root / "cortex",
        [("a", n)],
        [{"id": model, "source": str(demo_model)}],
        admin_token=ADMIN,
        fleet_token_file=str(token_file),
        api_keys=[
            {"key": KEY_A, "models": ["*"], "name": "a"},
            {"key": KEY_B, "models": ["*"], "name": "b"},
        ],
    )
    try:
        c.start()  # while the runner loads
        wait_until(
            lambda: any(loc["state"] == "ready" for loc in _models(c, model)["locations"]),
            60,
            "cortex to see the model ready",
        )
        (runner,) = runner_pids(model, parent=n.process.pid)
        yield Fleet(cortex=c, neuron=n, model=model, runner=runner)
    finally:
        c.stop()
        stop_quietly(n)


def _models(c: CortexProcess, model: str) -> dict[str, Any]:
    _, body = http_json(c.url + "/v1/models", token=ADMIN)
    return next(m for m in body["data"] if m["id"] == model)


def _auth(token: str | None) -> dict[str, str]:
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def cpu_over(pid: int, seconds: float) -> float:
    """The runner's CPU seconds (utime + stime) over the next `seconds` of wall time."""
    before = cpu_seconds(pid)
    await asyncio.sleep(seconds)
    return cpu_seconds(pid) - before


async def delete(
    s: aiohttp.ClientSession, url: str, rid: str, token: str | None
) -> tuple[int, Any]:
    async with s.delete(f"{url}/v1/requests/{rid}", headers=_auth(token)) as r:
        return r.status, await r.json(content_type=None)


def last_error(tail: bytes) -> dict[str, Any]:
    """The error frame a stream ended with; it must be followed by [DONE] and nothing else."""
    assert tail.rstrip().endswith(DONE.rstrip()), tail[-300:]
    errors = [
        json.loads(line[len(b"data: ") :])["error"]
        for line in tail.split(b"\n")
        if line.startswith(b'data: {"error"')
    ]
    assert len(errors) == 1, tail[-500:]
    return dict(errors[0])


def _cli(c: CortexProcess, rid: str) -> tuple[str, str]:
    """`cortex cancel` (the list), then `cortex cancel RID`: what each printed."""
    outs = []
    for argv in (["cancel"], ["cancel", rid]):
        out = io.StringIO()
        args = cortex_parser().parse_args([*argv, "--url", c.url, "--token", ADMIN])
        rc = args.func(args, out)
        assert rc == 0, (argv, out.getvalue())
        outs.append(out.getvalue())
    return outs[0], outs[1]


async def _runner_stops(pid: int, what: str) -> None:
    """The runner's CPU over the second after the cancel was answered; then that it is
    at rest (bounded generously: a starved machine is only slower)."""
    after = await cpu_over(pid, 1.0)
    print(f"  {what}: runner CPU {after:.2f} s over the 1 s after the cancel")

    async def idle() -> bool:
        return await cpu_over(pid, 0.5) < IDLE_CORES * 0.5

    await until(idle, timeout=30, what=f"the runner at rest after {what}")


async def test_a_stream_cancelled_by_its_sender(fleet: Fleet) -> None:
    c, pid = fleet.cortex, fleet.runner
    body = {"model": fleet.model, "prompt": "once upon", "stream": True, **LONG_STREAM}
    async with aiohttp.ClientSession() as s:
        async with s.post(c.url + "/v1/completions", json=body, headers=_auth(KEY_A)) as resp:
            assert resp.status == 200, await resp.text()
            rid = resp.headers["X-Request-Id"]
            await read_until(resp, b'"text"')
            busy = await cpu_over(pid, 1.0)
            print(f"\n  streaming: runner CPU {busy:.2f} s over 1 s (before the cancel)")
            # Only its sender or the admin token; an unknown id is no request.
            assert (await delete(s, c.url, rid, KEY_B))[0] == 403
            assert (await delete(s, c.url, rid, None))[0] == 401
            status, err = await delete(s, c.url, "no-such-request", KEY_A)
            assert status == 404 and err["error"]["code"] == "not_found", err
            t0 = time.monotonic()
            status, answer = await delete(s, c.url, rid, KEY_A)
            took = time.monotonic() - t0
            assert status == 200, answer
            assert answer == {
                "cancelled": rid,
                "node": "a",
                "model": fleet.model,
                "count": 1,
                "ended": True,
            }
            tail = b""
            while chunk := await resp.content.readany():
                tail += chunk
        err = last_error(tail)
        assert (err["code"], err["status"]) == ("request_cancelled", 499), err
        print(f"DELETE answered in {took * 1000:.0f} ms")
        await _runner_stops(pid, "stream cancelled through cortex")
        # Gone: a second cancel finds nothing; the trace says what happened.
        assert (await delete(s, c.url, rid, KEY_A))[0] == 404
        async with s.get(f"{c.url}/admin/traces/{rid}", headers=_auth(ADMIN)) as r:
            trace = (await r.json())["cortex"]
        assert trace["status"] == "cancelled" and "cancelled by its sender" in trace["error"]
    assert runner_pids(fleet.model, parent=fleet.neuron.process.pid) == [pid]


async def test_a_one_piece_request_cancelled_by_the_admin(fleet: Fleet) -> None:
    c, pid = fleet.cortex, fleet.runner
    rid = f"one-piece-{uuid.uuid4().hex[:8]}"
    body = {"model": fleet.model, "prompt": "once upon", **LONG_STREAM}
    async with aiohttp.ClientSession() as s:

        async def send() -> tuple[int, Any]:
            headers = {**_auth(KEY_A), "X-Request-Id": rid}
            async with s.post(c.url + "/v1/completions", json=body, headers=headers) as r:
                return r.status, await r.json(content_type=None)

        sent = asyncio.create_task(send())

        async def listed() -> dict[str, Any] | None:
            async with s.get(c.url + "/admin/requests", headers=_auth(ADMIN)) as r:
                found = [q for q in (await r.json())["requests"] if q["id"] == rid]
            return found[0] if found and found[0]["node"] == "a" else None

        entry = await until(listed, timeout=30, what=f"{rid} in /admin/requests")
        assert entry["key"] == "a" and entry["stream"] is False and entry["model"] == fleet.model

        async def working() -> bool:
            return await cpu_over(pid, 0.3) > 0.3 * IDLE_CORES

        await until(working, timeout=30, what="the runner at work")
        # The operator's way: `cortex cancel` lists, then `cortex cancel ID` ends it.
        listing, cancelling = await asyncio.to_thread(_cli, c, rid)
        assert rid in listing and " a " in listing, listing
        assert cancelling == f"{rid}: cancelled on a\n", cancelling
        status, err = await asyncio.wait_for(sent, 30)
        assert status == 499, err
        assert err["error"]["code"] == "request_cancelled", err
        assert "cancelled by the admin token" in err["error"]["message"], err
        await _runner_stops(pid, "one-piece request cancelled by the admin")


async def test_a_stream_cancelled_on_the_neuron(fleet: Fleet) -> None:
    n, pid = fleet.neuron, fleet.runner
    rid = f"direct-{uuid.uuid4().hex[:8]}"
    body = {"model": fleet.model, "prompt": "once upon", "stream": True, **LONG_STREAM}
    headers = {**_auth(FLEET_TOKEN), "X-Request-Id": rid}
    async with aiohttp.ClientSession() as s:
        async with s.post(n.url + "/v1/completions", json=body, headers=headers) as resp:
            assert resp.status == 200
            await read_until(resp, b'"text"')
            assert (await delete(s, n.url, rid, None))[0] == 401  # the fleet token's
            status, answer = await delete(s, n.url, rid, FLEET_TOKEN)
            assert status == 200, answer
            assert answer == {"cancelled": rid, "count": 1, "ended": True}
            tail = b""
            while chunk := await resp.content.readany():
                tail += chunk
        err = last_error(tail)
        assert (err["code"], err["status"]) == ("request_cancelled", 499), err
        await _runner_stops(pid, "stream cancelled on the neuron")
