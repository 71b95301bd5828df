"""Cortex's side of the fleet token, and bad client input answered with the envelope."""

from __future__ import annotations

import base64
import gzip
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiohttp import web

from cortex.cli import local_fleet as fleet
from cortex.cli import main as cli
from cortex.config import ApiKey, CortexConfig
from cortex.run.poller import FLEET, POLLER
from neuron.config import NeuronConfig
from tests.cortex.fakes import FakeNeuron, gateway, stop_all
from tests.support import rawhttp
from tests.support.clients import CHAT, chat

TOKEN = "fleet-token-for-tests-0123456789"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
KEYS = (ApiKey(key="sk-client-key-1", models=("*",)),)


@attrs.define(eq=False)
class TokenNeuron(FakeNeuron):
    """A fake neuron that, like a real one with a fleet token, answers 401 without it."""

    token: str = TOKEN
    # The Authorization header of every call it got, in order.
    authorizations: list[str | None] = attrs.Factory(list)

    def app(self) -> web.Application:
        app = super().app()

        @web.middleware
        async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
            given = request.headers.get("Authorization")
            self.authorizations.append(given)
            if given != f"Bearer {self.token}":
                return web.json_response({"error": {"code": "invalid_api_key"}}, status=401)
            return await handler(request)

        app.middlewares.append(check)
        return app


@pytest.fixture
async def guarded() -> AsyncIterator[list[FakeNeuron]]:
    nodes: list[FakeNeuron] = [await TokenNeuron(name="n1").start()]
    yield nodes
    await stop_all(nodes)


async def test_cortex_sends_the_fleet_token_never_the_clients_key(
    guarded: list[FakeNeuron],
) -> None:
    """Poll, load and proxy all carry the fleet token; the client's own key stays at cortex."""
    [n1] = guarded
    assert isinstance(n1, TokenNeuron)
    n1.add_model("m1")
    async with gateway(guarded, api_keys=KEYS, admin_token="admin-token-1", fleet_token=TOKEN) as c:
        assert c.app[FLEET].node("n1").healthy
        client_auth = {"Authorization": "Bearer sk-client-key-1", "X-Api-Key": "sk-client-key-1"}
        resp = await c.post(CHAT, json=chat(), headers=client_auth)
        assert resp.status == 200, await resp.text()
        resp = await c.post(
            "/admin/models/m2/load", headers={"Authorization": "Bearer admin-token-1"}
        )
        assert resp.status == 202, await resp.text()
    assert n1.calls["chat"] == 1 and n1.calls["load"] == 1 and n1.calls["health"] >= 1
    assert set(n1.authorizations) == {f"Bearer {TOKEN}"}
    assert "sk-client-key-1" not in str(n1.chat_headers)


async def test_cortex_without_the_token_cannot_use_a_guarded_neuron(
    guarded: list[FakeNeuron],
) -> None:
    """The guarded fake really refuses: a cortex with no token sees the node fail its polls."""
    guarded[0].add_model("m1")
    async with gateway(guarded) as c:
        for _ in range(3):
            await c.app[POLLER].poll_once()
        assert not c.app[FLEET].node("n1").healthy
        assert (await c.post(CHAT, json=chat())).status == 503


def test_cortex_config_repr_hides_secrets(tmp_path: Path) -> None:
    """Neither the fleet token, the admin token nor a client key shows in repr."""
    (tmp_path / "tok").write_text(TOKEN)
    conf = tmp_path / "cortex.toml"
    conf.write_text(
        'fleet_token_file = "tok"\nadmin_token = "admin-secret-1"\n'
        '[[api_keys]]\nkey = "sk-client-secret"\n'
    )
    cfg = CortexConfig.from_file(conf)
    assert cfg.fleet_token == TOKEN
    for secret in (TOKEN, "admin-secret-1", "sk-client-secret"):
        assert secret not in repr(cfg)


def test_cortex_check_reports_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cortex check` says whether a fleet token is set and where from, never the token."""
    (tmp_path / "models.toml").write_text("")
    conf = tmp_path / "cortex.toml"
    conf.write_text("")
    assert cli.main(["check", "-c", str(conf)]) == 0
    assert "no fleet token" in capsys.readouterr().out
    monkeypatch.setenv("T_FLEET", TOKEN)
    conf.write_text('fleet_token_env = "T_FLEET"\n')
    assert cli.main(["check", "-c", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "token set (from environment variable T_FLEET)" in out and TOKEN not in out
    monkeypatch.delenv("T_FLEET")
    assert cli.main(["check", "-c", str(conf)]) == 2
    assert "T_FLEET, which is not set" in capsys.readouterr().err


def test_fleet_configs_share_one_token_and_a_model_root(tmp_path: Path) -> None:
    """`cortex fleet` gives its neurons and its cortex the same fresh token (mode 0600),
    and its neurons the demo model's folder as a model root."""
    model_dir = tmp_path / "models" / "demo"
    cortex_conf = fleet.write_configs(tmp_path, 2, 9400, 9411, model_dir)
    cfg = CortexConfig.from_file(cortex_conf)
    neurons = [NeuronConfig.from_file(tmp_path / f"neuron-{n}.toml") for n in "ab"]
    assert cfg.fleet_token is not None
    assert {n.fleet_token for n in neurons} == {cfg.fleet_token}
    assert all(n.model_roots == (str(model_dir.parent),) for n in neurons)
    assert (tmp_path / fleet.TOKEN_FILE).stat().st_mode & 0o777 == 0o600
    first = cfg.fleet_token
    fleet.write_configs(tmp_path, 2, 9400, 9411, model_dir)
    assert CortexConfig.from_file(cortex_conf).fleet_token != first


# -- bad input ------------------------------------------------------------------------------


def _no_errors(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


CREDENTIALS = [
    {"Authorization": "Bearer \xff\xfe\x80"},
    {"Authorization": "Basic " + base64.b64encode(b"user:\xff\xfe").decode()},
    {"Authorization": "Basic \xe9\xe9\xe9\xe9"},
    {"X-Api-Key": "\xff\xfe\x80"},
]


@pytest.mark.parametrize("headers", CREDENTIALS)
@pytest.mark.parametrize("path", [CHAT, "/admin/state", "/admin/models/m1/unload"])
async def test_non_utf8_credentials_are_401(
    headers: dict[str, str], path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Credential bytes that are not UTF-8 (or not base64 ASCII) are a wrong key: 401."""
    async with gateway([], api_keys=KEYS, admin_token="admin-token-1") as c:
        assert c.server.port is not None
        method = "GET" if path != CHAT else "POST"
        with caplog.at_level(logging.INFO):
            answer = await rawhttp.send(
                c.server.port, rawhttp.request(method, path, b'{"model": "m1"}', headers)
            )
    assert (answer.status, answer.code) == (401, "invalid_api_key"), answer
    _no_errors(caplog)


BAD_BODIES = [
    (b"[" * 100_000 + b"]" * 100_000, {}),
    (b'{"model":' * 50_000 + b"1" + b"}" * 50_000, {}),
    (b'{"model": "m1", "x": ' + b"9" * 5000 + b"}", {}),
    (b'{"model": "m1", "x": Infinity}', {}),
    (b"definitely not gzip", {"Content-Encoding": "gzip"}),
    (b"{}", {"Content-Encoding": "compress"}),
    (b'{"model": "\xe9"}', {}),
]


@pytest.mark.parametrize(("body", "headers"), BAD_BODIES)
@pytest.mark.parametrize(
    "path", [CHAT, "/v1/completions", "/admin/models/m1/load", "/admin/models/m1/unload"]
)
async def test_unreadable_bodies_are_400(
    guarded: list[FakeNeuron],
    caplog: pytest.LogCaptureFixture,
    path: str,
    body: bytes,
    headers: dict[str, str],
) -> None:
    """Deep nesting, huge numbers, bad gzip, unknown encodings: 400 envelope, no ERROR log."""
    async with gateway(guarded, fleet_token=TOKEN) as c:
        assert c.server.port is not None
        with caplog.at_level(logging.INFO):
            answer = await rawhttp.send(
                c.server.port,
                rawhttp.request(
                    "POST", path, body, {"Content-Type": "application/json", **headers}
                ),
            )
    assert (answer.status, answer.code) == (400, "invalid_request"), answer
    assert guarded[0].calls["chat"] == guarded[0].calls["load"] == 0
    _no_errors(caplog)


async def test_gzipped_chat_is_forwarded_decoded(guarded: list[FakeNeuron]) -> None:
    """A good gzip body is decoded once at cortex and sent on as plain JSON."""
    guarded[0].add_model("m1")
    async with gateway(guarded, fleet_token=TOKEN) as c:
        resp = await c.post(
            CHAT,
            data=gzip.compress(b'{"model": "m1", "messages": [{"role": "user", "content": "x"}]}'),
            headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        )
        assert resp.status == 200, await resp.text()
    assert guarded[0].chat_bodies[-1]["model"] == "m1"


ADMIN_BODIES = [
    ("/admin/models/m1/load", {"nodes": "n1"}, "nodes"),
    ("/admin/models/m1/load", {"nodes": [1]}, "nodes"),
    ("/admin/models/m1/load", {"exclude": {"a": 1}}, "exclude"),
    ("/admin/models/m1/load", {"replicas": 2}, "replicas"),
    ("/admin/models/m1/load", [], None),
    ("/admin/models/m1/unload", {"force": "yes"}, "force"),
    ("/admin/models/m1/unload", "force", None),
]


@pytest.mark.parametrize(("path", "body", "param"), ADMIN_BODIES)
async def test_admin_wrong_types_are_400(
    guarded: list[FakeNeuron], path: str, body: Any, param: str | None
) -> None:
    """A wrong type in an admin body is 400 invalid_request naming the field."""
    guarded[0].add_model("m1")
    async with gateway(guarded, fleet_token=TOKEN) as c:
        resp = await c.post(path, json=body)
        answer = await resp.json()
    assert resp.status == 400, answer
    assert answer["error"]["code"] == "invalid_request"
    assert answer["error"]["param"] == param
