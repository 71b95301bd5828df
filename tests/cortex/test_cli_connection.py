"""Every `cortex` command that talks to a running cortex finds it the one way
(cortex.cli.remote): --url, else $CORTEX_URL, else ./run/cortex.toml (or -c), and says
so in its --help.

The cortex here is a real aiohttp app on port 0 answering each admin route with a
canned body and recording who called it with which token; the commands run
in-process (`cortex.cli.main`) in a worker thread while the app serves.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cortex.cli import main as cli
from cortex.cli.remote import CONNECTION_HELP

MODEL = {
    "id": "demo",
    "aliases": [],
    "replicas": 1,
    "placements": [{"node": "a", "state": "ready", "healthy": True}],
    "life": {"wish": {"replicas": 1}, "present": 1},
}
STATE = {"nodes": [{"name": "a", "healthy": True, "seen": True, "models": [{}]}], "models": [MODEL]}
PLACEMENTS = {
    "model_id": "demo",
    "facts": {},
    "candidates": [{"nodes": ["a"], "feasible": False, "holding": ["a"], "reasons": []}],
    "ever": [{"nodes": ["a"], "feasible": True}],
}
LINKTEST = {"ok": True, "nodes": ["a", "b"], "backend": "ring", "world_size": 2, "sizes": []}
TRACE = {"id": "r1", "cortex": {"id": "r1", "model": "demo"}, "neuron": None, "nodes": {}}
STREAM = (
    b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
    b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}\n\n'
    b"data: [DONE]\n\n"
)
# (method, path) -> (status, body); a path's {name} matches one segment.
ROUTES: dict[tuple[str, str], tuple[int, Any]] = {
    ("GET", "/admin/state"): (200, STATE),
    ("GET", "/admin/placements"): (200, PLACEMENTS),
    ("GET", "/admin/doctor"): (200, {"verdict": "pass", "checks": []}),
    ("POST", "/admin/models/{model}/load"): (200, {"model_id": "demo", "nodes": ["a"]}),
    ("POST", "/admin/models/{model}/unload"): (200, {"model_id": "demo", "unloaded": ["a"]}),
    ("POST", "/admin/linktest"): (200, LINKTEST),
    ("POST", "/admin/nodes/{node}/restart"): (202, {"models": [], "drain_s": 1.0}),
    ("GET", "/admin/traces/{id}"): (200, TRACE),
    ("GET", "/admin/events"): (200, {"events": [], "last_seq": 0}),
    ("GET", "/admin/requests"): (200, {"requests": []}),
    ("POST", "/admin/join-codes"): (
        201,
        {"code": "c0de", "expires_in_s": 600.0, "expires_at": 2_000_000_000.0},
    ),
    ("POST", "/admin/nodes/{node}/reboot"): (202, {"command": ["shutdown", "-r", "+1"]}),
}
# Each command that talks to cortex, as an operator types it.
COMMANDS = {
    "status": ["status"],
    "models": ["models"],
    "preview": ["preview", "demo"],
    "load": ["load", "demo"],
    "unload": ["unload", "demo"],
    "doctor": ["doctor"],
    "bench": ["bench", "demo", "--streams", "1", "--tokens", "2"],
    "linktest": ["linktest"],
    "restart": ["restart", "a"],
    "trace": ["trace", "r1"],
    "events": ["events"],
    "cancel": ["cancel"],
    "join-code": ["join-code"],
    "reboot": ["reboot", "a", "--confirm", "a"],
}


def _fake_cortex(seen: list[tuple[str, str, str | None]]) -> web.Application:
    app = web.Application()

    def canned(status: int, body: Any) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            seen.append((request.method, request.path, request.headers.get("Authorization")))
            return web.json_response(body, status=status)

        return handler

    async def chat(request: web.Request) -> web.StreamResponse:
        seen.append((request.method, request.path, request.headers.get("Authorization")))
        return web.Response(body=STREAM, content_type="text/event-stream")

    for (method, path), (status, body) in ROUTES.items():
        app.router.add_route(method, path, canned(status, body))
    app.router.add_post("/v1/chat/completions", chat)
    return app


@pytest.fixture
async def cortex_url() -> AsyncIterator[tuple[str, list[tuple[str, str, str | None]]]]:
    seen: list[tuple[str, str, str | None]] = []
    runner = web.AppRunner(_fake_cortex(seen))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


def _local_fleet(cwd: Path, port: int, token: str) -> None:
    """The run/cortex.toml `make run` writes (`cortex fleet --dir run`), with a token."""
    (cwd / "run").mkdir(exist_ok=True)
    (cwd / "run" / "cortex.toml").write_text(
        f'host = "127.0.0.1"\nport = {port}\nadmin_token = "{token}"\n'
    )


def _closed_port() -> int:
    """A port nothing listens on (bound, then let go)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("command", sorted(COMMANDS))
async def test_cortex_url_beats_the_local_fleet(
    command: str,
    cortex_url: tuple[str, list[Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """$CORTEX_URL and $CORTEX_ADMIN_TOKEN win over a run/cortex.toml naming elsewhere."""
    url, seen = cortex_url
    _local_fleet(tmp_path, _closed_port(), "token-of-the-toml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CORTEX_URL", url)
    monkeypatch.setenv("CORTEX_ADMIN_TOKEN", "token-of-the-env")
    rc = await asyncio.to_thread(cli.main, COMMANDS[command])
    assert rc == 0
    assert seen and all(auth == "Bearer token-of-the-env" for _, _, auth in seen), seen


@pytest.mark.parametrize("command", sorted(COMMANDS))
async def test_the_local_fleet_of_make_run_is_found_from_its_directory(
    command: str,
    cortex_url: tuple[str, list[Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No flag, no environment: ./run/cortex.toml gives the port and the admin token."""
    url, seen = cortex_url
    _local_fleet(tmp_path, int(url.rsplit(":", 1)[1]), "token-of-the-toml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CORTEX_URL", raising=False)
    monkeypatch.delenv("CORTEX_ADMIN_TOKEN", raising=False)
    rc = await asyncio.to_thread(cli.main, COMMANDS[command])
    assert rc == 0
    assert seen and all(auth == "Bearer token-of-the-toml" for _, _, auth in seen), seen


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_cortex_that_does_not_answer_exits_2_naming_where_it_looked(
    command: str, tmp_path: Path
) -> None:
    """The real entry point, run from a directory with run/cortex.toml naming a dead port."""
    port = _closed_port()
    _local_fleet(tmp_path, port, "token-of-the-toml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORTEX_")}
    done = subprocess.run(
        [sys.executable, "-m", "cortex.cli", *COMMANDS[command]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    # Doctor reports it as its first check; the others as one line on stderr.
    text = done.stdout if command == "doctor" else done.stderr
    assert f"cannot reach cortex at http://127.0.0.1:{port}" in text
    assert "run/cortex.toml" in text


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_says_how_cortex_is_found(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main([COMMANDS[command][0], "--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    assert " ".join(CONNECTION_HELP.split()) in " ".join(help_text.split())
    assert "--url" in help_text and "--config" in help_text


def test_every_remote_command_is_covered() -> None:
    """A new command that talks to cortex belongs in COMMANDS (and so in these tests)."""
    local = {"serve", "check", "fleet", "init"}
    parser = cli._parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices or ()) - local == set(COMMANDS)
