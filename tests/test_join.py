"""`cortex join-code` and `neuron join` against a real in-process cortex: the code, the
token file (0600, atomic, the key added to neuron.toml), and what is refused."""

from __future__ import annotations

import argparse
import asyncio
import io
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from cortex.cli import join as join_code_cli
from cortex.config import CortexConfig
from cortex.http.app import create_app
from neuron.cli import join as join_cli
from neuron.config import NeuronConfig
from shared.catalogue import Catalogue

TOKEN = "the-fleet-token-0123456789"
ADMIN = "admin-token-1234"

NEURON_TOML = """\
# neuron.toml for this test: comments and tables must survive the join.
port = 9411
store_dir = "store"

[runner]
decode_concurrency = 2
"""


async def _cortex(**settings: Any) -> TestServer:
    config = CortexConfig(port=0, **settings)
    server = TestServer(create_app(config, catalogue=Catalogue(models=()), background=False))
    await server.start_server()
    return server


@pytest.fixture
async def cortex() -> AsyncIterator[TestServer]:
    server = await _cortex(fleet_token=TOKEN, admin_token=ADMIN, join_code_ttl_s=60.0)
    yield server
    await server.close()


def _url(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}"


async def _mint(server: TestServer, token: str | None = ADMIN, **body: Any) -> tuple[int, Any]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(_url(server) + "/admin/join-codes", json=body, headers=headers) as r,
    ):
        return r.status, await r.json()


async def _join(server: TestServer, config: Path, code: str) -> tuple[int, str, str]:
    args = argparse.Namespace(url=_url(server), code=code, config=config, owner=None, timeout=10.0)
    out, err = io.StringIO(), io.StringIO()
    rc = await asyncio.to_thread(join_cli.main, args, out, err)
    return rc, out.getvalue(), err.getvalue()


async def test_join_writes_a_0600_token_file_and_names_it_in_the_config(
    cortex: TestServer, tmp_path: Path
) -> None:
    config = tmp_path / "neuron.toml"
    config.write_text(NEURON_TOML)
    config.chmod(0o644)
    status, minted = await _mint(cortex)
    assert status == 201 and minted["expires_in_s"] == 60.0, minted
    rc, out, err = await _join(cortex, config, minted["code"].lower())  # typed by hand
    assert rc == 0, err
    token_file = tmp_path / "fleet-token"
    assert token_file.read_text() == TOKEN + "\n"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.stat().st_mode) == 0o644, "neuron.toml keeps its mode"
    text = config.read_text()
    assert text.startswith(NEURON_TOML.splitlines()[0]) and NEURON_TOML.split("\n", 1)[1] in text
    assert 'fleet_token_file = "fleet-token"' in text and TOKEN not in text
    assert NeuronConfig.from_file(config).fleet_token == TOKEN
    assert f"wrote the fleet token to {token_file}" in out and "added fleet_token_file" in out
    # Nothing half-written is left beside them.
    left = await asyncio.to_thread(lambda: sorted(p.name for p in tmp_path.iterdir()))
    assert left == ["fleet-token", "neuron.toml"]
    # Used: refused, and the files are as they were.
    rc, out, err = await _join(cortex, config, minted["code"])
    assert rc == 1 and "used already" in err, err
    assert config.read_text() == text


async def test_join_replaces_the_token_in_the_file_the_config_names(
    cortex: TestServer, tmp_path: Path
) -> None:
    token_file = tmp_path / "secrets" / "token"
    token_file.parent.mkdir()
    token_file.write_text("an-old-token-of-another-fleet\n")
    config = tmp_path / "neuron.toml"
    config.write_text(f'fleet_token_file = "{token_file}"\n')
    _, minted = await _mint(cortex, ttl_s=5)
    assert minted["expires_in_s"] == 5
    rc, _out, err = await _join(cortex, config, minted["code"])
    assert rc == 0, err
    assert token_file.read_text().strip() == TOKEN
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert config.read_text() == f'fleet_token_file = "{token_file}"\n'


async def test_minting_needs_an_admin_token_and_a_fleet_token(cortex: TestServer) -> None:
    assert (await _mint(cortex, token=None))[0] == 401
    assert (await _mint(cortex, ttl_s=0))[0] == 400
    open_ = await _cortex(fleet_token=TOKEN)  # no admin_token: /admin is open to anyone
    tokenless = await _cortex(admin_token=ADMIN)
    try:
        status, body = await _mint(open_)
        assert status == 403 and body["error"]["code"] == "admin_token_required"
        status, body = await _mint(tokenless)
        assert status == 409 and body["error"]["code"] == "no_fleet_token"
    finally:
        await open_.close()
        await tokenless.close()


async def test_cortex_join_code_prints_the_command_to_run(cortex: TestServer) -> None:
    args = argparse.Namespace(url=_url(cortex), token=ADMIN, config=None, ttl=30.0, json=False)
    out = io.StringIO()
    assert await asyncio.to_thread(join_code_cli.main, args, out) == 0
    text = out.getvalue()
    code = text.split()[2]
    assert "good once, for 30 s" in text
    assert f"neuron join {_url(cortex)} --code {code}" in text
    assert "an address of this cortex the node can reach" in text  # it printed 127.0.0.1
    assert join_code_cli.duration("5m") == 300.0 and join_code_cli.duration("1h") == 3600.0
    with pytest.raises(argparse.ArgumentTypeError):
        join_code_cli.duration("soon")
