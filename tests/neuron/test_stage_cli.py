"""`neuron stage` as an operator runs it: a subprocess against real neurons on loopback.

The target neuron is a `neuron serve` subprocess; it stages from a peer neuron
holding the copy, or from a fake hub (a real aiohttp app) that falls silent.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pty
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.conftest import NeuronProcess, http_json
from tests.support.fake_hub import repo_info

TOKEN = "fleet-token-for-stage-cli-0123456789"
REPO = "test-org/cli-demo"
NAME = "test-org--cli-demo"
BIG = 48 * 1024 * 1024


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Path:
    """The demo model plus 48 MB of random bytes, so a transfer has some length."""
    d = tmp_path_factory.mktemp("cli-model") / "m"
    shutil.copytree(demo_model, d)
    (d / "big.safetensors").write_bytes(os.urandom(BIG))
    return d


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    f = tmp_path / "token"
    f.write_text(TOKEN)
    return f


def _settings(token_file: Path, **kw: Any) -> dict[str, Any]:
    return {"fleet_token_file": str(token_file), "min_free_gb": 0, **kw}


def _peer(neuron_factory: Any, token_file: Path, model: Path, name: str = "peer") -> NeuronProcess:
    peer: NeuronProcess = neuron_factory(_settings(token_file), name=name)
    shutil.copytree(model, peer.dir / "store" / "models" / NAME, copy_function=os.link)
    return peer


def _argv(url: str, *extra: str, token_file: Path | None = None) -> list[str]:
    argv = [sys.executable, "-m", "neuron.cli", "stage", "m", REPO, "--url", url, *extra]
    return argv + (["--token-file", str(token_file)] if token_file is not None else [])


def _digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".neuron-")
    }


def test_stage_from_peer_follows_to_staged_with_plain_lines(
    neuron_factory: Any, token_file: Path, model_dir: Path
) -> None:
    peer = _peer(neuron_factory, token_file, model_dir)
    target: NeuronProcess = neuron_factory(_settings(token_file), name="target")
    r = subprocess.run(
        _argv(target.url, "--peer", peer.url, token_file=token_file),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, (r.stdout, r.stderr)
    lines = r.stdout.splitlines()
    assert "\r" not in r.stdout  # not a terminal: plain lines
    assert lines[0].startswith("m: ")  # the first progress line
    assert lines[-1].startswith("m: staged ") and NAME in lines[-1]
    copy = target.dir / "store" / "models" / NAME
    assert _digest(copy) == _digest(model_dir)

    # Again: the copy is there, nothing moves.
    again = subprocess.run(
        _argv(target.url, token_file=token_file), capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0, again.stderr
    assert "already staged" in again.stdout


def test_on_a_terminal_the_line_updates_in_place(
    neuron_factory: Any, token_file: Path, model_dir: Path
) -> None:
    peer = _peer(neuron_factory, token_file, model_dir)
    target: NeuronProcess = neuron_factory(_settings(token_file), name="target")
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        _argv(target.url, "--peer", peer.url, token_file=token_file),
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(timeout=120) == 0, out
    text = out.decode()
    assert text.startswith("\rm: ")  # rewritten in place, from the first line
    assert "%" in text and "MB /" in text and "[" in text
    assert text.rstrip().splitlines()[-1].startswith("m: staged ")


def test_a_stage_that_fails_verification_exits_1_naming_the_file(
    neuron_factory: Any, token_file: Path, model_dir: Path, tmp_path: Path
) -> None:
    peer = _peer(neuron_factory, token_file, model_dir)
    # The manifest (sha256 of each file) is made now; the file rots after.
    status, _ = http_json(f"{peer.url}/store/models/{NAME}/manifest", token=TOKEN)
    assert status == 200
    victim = peer.dir / "store" / "models" / NAME / "tokenizer.json"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.unlink()  # a hard link: rot this copy only
    victim.write_bytes(bytes(data))
    target: NeuronProcess = neuron_factory(_settings(token_file), name="target")
    r = subprocess.run(
        _argv(target.url, "--peer", peer.url, token_file=token_file),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1, (r.stdout, r.stderr)
    last = r.stdout.splitlines()[-1]
    assert last.startswith("m: stage failed:") and "tokenizer.json" in last
    assert "Traceback" not in r.stderr


def test_unreachable_neuron_and_wrong_token_exit_2_in_one_line(
    neuron_factory: Any, token_file: Path, tmp_path: Path
) -> None:
    r = subprocess.run(_argv("http://127.0.0.1:9"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("neuron stage: cannot reach the neuron at http://127.0.0.1:9")
    assert len(r.stderr.splitlines()) == 1 and r.stdout == ""

    target: NeuronProcess = neuron_factory(_settings(token_file), name="target")
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token-at-all")
    r = subprocess.run(
        _argv(target.url, token_file=wrong), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert len(r.stderr.splitlines()) == 1 and "401" in r.stderr and "token" in r.stderr

    r = subprocess.run(
        _argv(target.url, token_file=tmp_path / "missing"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "cannot read the token file" in r.stderr

    r = subprocess.run(
        [sys.executable, "-m", "neuron.cli", "stage", "m"], capture_output=True, text=True
    )
    assert r.returncode == 2 and "SOURCE" in r.stderr


# --- Ctrl-C against a hub that falls silent ------------------------------------


@pytest_asyncio.fixture
async def silent_hub(demo_model: Path) -> AsyncIterator[TestServer]:
    """The hub's metadata and file routes for REPO; model.safetensors stalls after 1000 bytes."""
    files = sorted(p for p in demo_model.iterdir() if p.is_file())  # noqa: ASYNC240
    release = asyncio.Event()

    async def info(request: web.Request) -> web.Response:
        return web.json_response(repo_info(REPO, files))

    async def resolve(request: web.Request) -> web.StreamResponse:
        path = demo_model / request.match_info["file"]
        if path.name != "model.safetensors":
            return web.FileResponse(path)
        resp = web.StreamResponse(status=200, headers={"Content-Length": str(path.stat().st_size)})
        await resp.prepare(request)
        await resp.write(path.read_bytes()[:1000])
        await release.wait()
        return resp

    app = web.Application()
    app.router.add_get("/api/models/{org}/{name}/revision/{rev}", info)
    app.router.add_get("/api/models/{org}/{name}", info)
    app.router.add_get("/{org}/{name}/resolve/{rev}/{file}", resolve)
    server = TestServer(app, port=0)
    await server.start_server()
    yield server
    release.set()
    await server.close()


async def test_ctrl_c_cancels_the_stage_and_exits_130(
    neuron_factory: Any, token_file: Path, silent_hub: TestServer
) -> None:
    hub = str(silent_hub.make_url("")).rstrip("/")
    # The hub stalls the file for good: no read timeout may end the stage before the
    # Ctrl-C does (on a loaded machine the CLI's first line can take a while).
    settings = _settings(token_file, hub_endpoint=hub, stage_read_timeout_s=600.0)
    target: NeuronProcess = await asyncio.to_thread(neuron_factory, settings, "target")
    proc = await asyncio.create_subprocess_exec(
        *_argv(target.url, token_file=token_file),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 60)
    assert first.startswith(b"m: "), first
    proc.send_signal(signal.SIGINT)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 130, (out, err)
    text = out.decode()
    assert "interrupted, cancelling" in text and "m: stage cancelled" in text
    assert b"Traceback" not in err
    status, storage = await asyncio.to_thread(http_json, target.url + "/store/storage", token=TOKEN)
    assert status == 200
    (job,) = [j for j in storage["staging"] if j["name"] == NAME]
    assert job["state"] == "failed" and job["error"] == "cancelled"
