"""The opt-in reboot (issue 22): `cortex reboot` -> cortex -> a real (in-process) neuron,
whose reboot_command is a fake script: a real reboot never runs in a test."""

from __future__ import annotations

import argparse
import asyncio
import io
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient, TestServer

from cortex.cli import reboot as reboot_cli
from cortex.config import CortexConfig, NeuronRef
from cortex.http.app import create_app
from cortex.run.poller import POLLER
from shared.catalogue import Catalogue
from tests.conftest import InProcessFactory

TOKEN = "fleet-token-0123456789"
ADMIN = "admin-token-xyz"


def fake_shutdown(tmp_path: Path, *, fails: bool = False) -> Path:
    """Writes its arguments to `ran` (what a reboot would have been) and says so."""
    script = tmp_path / ("shutdown-fails" if fails else "shutdown")
    body = (
        "echo 'sudo: a password is required' >&2; exit 1\n"
        if fails
        else f'echo "$@" > {tmp_path / "ran"}; echo "Shutdown scheduled"\n'
    )
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return script


async def _post(server: TestServer, path: str, body: Any, token: str | None) -> tuple[int, Any]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(server.make_url(path), json=body, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def test_the_neuron_reboots_only_when_allowed_confirmed_and_able(
    neuron_app_factory: InProcessFactory, tmp_path: Path
) -> None:
    script = fake_shutdown(tmp_path)
    off = await neuron_app_factory(fleet_token=TOKEN, node_name="n0")
    on = await neuron_app_factory(
        fleet_token=TOKEN, node_name="n1", allow_reboot=True, reboot_command=(str(script), "-r")
    )
    status, body = await _post(off, "/admin/reboot", {"confirm": "n0"}, TOKEN)
    assert status == 403 and body["error"]["code"] == "reboot_not_allowed"
    assert "sudo shutdown -r now" in body["error"]["message"]
    assert (await _post(on, "/admin/reboot", {"confirm": "n1"}, None))[0] == 401
    status, body = await _post(on, "/admin/reboot", {"confirm": "n0"}, TOKEN)
    assert status == 400 and body["error"]["param"] == "confirm"
    assert not (tmp_path / "ran").exists()
    status, body = await _post(on, "/admin/reboot", {"confirm": "n1"}, TOKEN)
    assert status == 202 and body["output"] == "Shutdown scheduled", body
    assert (tmp_path / "ran").read_text().strip() == "-r"
    broken = await neuron_app_factory(
        fleet_token=TOKEN,
        node_name="n2",
        allow_reboot=True,
        reboot_command=(str(fake_shutdown(tmp_path, fails=True)),),
    )
    status, body = await _post(broken, "/admin/reboot", {"confirm": "n2"}, TOKEN)
    assert status == 500 and body["error"]["code"] == "reboot_failed"
    assert "a password is required" in body["error"]["message"]


async def test_cortex_reboot_goes_through_cortex_or_prints_the_command(
    neuron_app_factory: InProcessFactory, tmp_path: Path
) -> None:
    script = fake_shutdown(tmp_path)
    a = await neuron_app_factory(
        fleet_token=TOKEN, node_name="studio-1", allow_reboot=True, reboot_command=(str(script),)
    )
    b = await neuron_app_factory(fleet_token=TOKEN, node_name="studio-2")
    cfg = CortexConfig(
        port=0,
        neurons=(
            NeuronRef("a", str(a.make_url("")).rstrip("/")),
            NeuronRef("b", str(b.make_url("")).rstrip("/")),
        ),
        admin_token=ADMIN,
        fleet_token=TOKEN,
        poll_interval_s=3600.0,
    )
    app = create_app(cfg, catalogue=Catalogue(models=()), background=False)
    async with TestClient(TestServer(app)) as client:
        await app[POLLER].poll_once()
        url = str(client.make_url("")).rstrip("/")

        def cli(node: str, confirm: str) -> tuple[int, str]:
            args = argparse.Namespace(node=node, confirm=confirm, url=url, token=ADMIN, config=None)
            out = io.StringIO()
            return reboot_cli.main(args, out), out.getvalue()

        resp = await client.post("/admin/nodes/a/reboot", json={"confirm": "a"})
        assert resp.status == 401  # the admin token first
        assert await asyncio.to_thread(cli, "a", "b") == (2, "")
        rc, text = await asyncio.to_thread(cli, "a", "a")
        print(text)
        assert rc == 0 and text.startswith(f"a: rebooting (`{script}` on the node)")
        assert (tmp_path / "ran").exists()
        state = await (await client.get("/admin/state", headers=_admin())).json()
        assert next(n for n in state["nodes"] if n["name"] == "a")["recycling"]
        rc, text = await asyncio.to_thread(cli, "b", "b")
        print(text)
        assert rc == 1 and "not rebooted: b: reboot is off on this node" in text
        assert text.strip().endswith("reboot it from a shell: ssh 127.0.0.1 sudo shutdown -r now")


def _admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}
