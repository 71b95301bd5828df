"""The neuron's API closed by the fleet token, loads confined to model roots, and every
bad input answered with the envelope (in-process neurons; runners only where loading)."""

from __future__ import annotations

import gzip
import logging
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from neuron.config import NeuronConfig
from neuron.store.sources import Store
from shared.config import ConfigError
from shared.errors import InvalidModelPath
from tests.conftest import InProcessFactory
from tests.support import rawhttp

TOKEN = "fleet-token-for-tests-0123456789"
CLOSED = [
    ("GET", "/discovery", None),
    ("GET", "/models", None),
    ("GET", "/v1/models", None),
    ("GET", "/store/storage", None),
    ("POST", "/models/load", {"model_id": "m", "source": "org/m"}),
    ("POST", "/models/unload", {"model_id": "m"}),
    ("POST", "/store/purge-staging", {}),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": []}),
    ("POST", "/linktest", {"test_id": "t"}),
    ("POST", "/linktest/stop", {"test_id": "t"}),
    ("POST", "/admin/restart", {}),
    ("GET", "/no/such/path", None),
]


async def _call(
    url: str, method: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, url, json=body, headers=headers) as r,
    ):
        return r.status, await r.json(content_type=None)


def _port(server: TestServer) -> int:
    assert server.port is not None
    return server.port


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(("method", "path", "body"), CLOSED)
async def test_fleet_token_closes_every_endpoint_but_probes(
    neuron_app_factory: InProcessFactory, method: str, path: str, body: Any
) -> None:
    """Without the token, or with a wrong one: 401 invalid_api_key, whatever the endpoint."""
    server = await neuron_app_factory(fleet_token=TOKEN)
    url = str(server.make_url(path))
    for headers in (None, _bearer("x" * 32), {"Authorization": TOKEN}, {"X-Api-Key": TOKEN}):
        status, answer = await _call(url, method, body, headers)
        assert status == 401, (headers, answer)
        assert answer["error"]["code"] == "invalid_api_key"


async def test_fleet_token_leaves_health_and_metrics_open(
    neuron_app_factory: InProcessFactory,
) -> None:
    """Probes and Prometheus need no token."""
    server = await neuron_app_factory(fleet_token=TOKEN)
    assert (await _call(str(server.make_url("/health")), "GET"))[0] == 200
    async with aiohttp.ClientSession() as s, s.get(server.make_url("/metrics")) as r:
        assert r.status == 200
        assert "neuron_" in await r.text()


async def test_fleet_token_lets_its_holder_load_unload_and_purge(
    neuron_app_factory: InProcessFactory, demo_model: Path
) -> None:
    """With the token the API works as before: load (202), unload, purge, list."""
    server = await neuron_app_factory(fleet_token=TOKEN, model_roots=(str(demo_model.parent),))
    auth = _bearer(TOKEN)
    status, answer = await _call(
        str(server.make_url("/models/load")),
        "POST",
        {"model_id": "tok", "source": str(demo_model)},
        auth,
    )
    assert status == 202, answer
    status, answer = await _call(
        str(server.make_url("/models/unload")), "POST", {"model_id": "tok"}, auth
    )
    assert (status, answer["unloaded"]) == (200, True)
    status, answer = await _call(str(server.make_url("/store/purge-staging")), "POST", {}, auth)
    assert status == 200 and "freed_bytes" in answer
    assert (await _call(str(server.make_url("/discovery")), "GET", None, auth))[0] == 200


async def test_non_utf8_token_bytes_are_401_not_500(
    neuron_app_factory: InProcessFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Credential bytes that are not UTF-8 are just a wrong token."""
    server = await neuron_app_factory(fleet_token=TOKEN)
    with caplog.at_level(logging.INFO):
        answer = await rawhttp.send(
            _port(server),
            rawhttp.request("GET", "/models", headers={"Authorization": "Bearer \xff\xfe\x80"}),
        )
    assert (answer.status, answer.code) == (401, "invalid_api_key")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# -- model roots ------------------------------------------------------------------------


async def test_load_outside_model_roots_is_400(
    neuron_app_factory: InProcessFactory, demo_model: Path, tmp_path: Path
) -> None:
    """/etc, `..` out of a root and a symlink out of a root are refused before any work."""
    root = tmp_path / "models"
    root.mkdir()
    outside = tmp_path / "outside"
    shutil.copytree(demo_model, outside)
    (root / "link").symlink_to(outside)
    server = await neuron_app_factory(model_roots=(str(root),))
    url = str(server.make_url("/models/load"))
    for source in ("/etc", "/etc/passwd", str(root / ".." / "outside"), str(root / "link")):
        status, answer = await _call(url, "POST", {"model_id": "x", "source": source})
        assert status == 400, (source, answer)
        assert (answer["error"]["code"], answer["error"]["param"]) == (
            "invalid_model_path",
            "source",
        )
        assert "outside the store" in answer["error"]["message"]
    status, answer = await _call(str(server.make_url("/models")), "GET")
    assert answer["models"] == []  # no failed record either: refused before any load


def test_store_resolves_before_it_checks(tmp_path: Path, demo_model: Path) -> None:
    """Inside the store or a root is fine; the answer is the resolved directory."""
    root = tmp_path / "models"
    shutil.copytree(demo_model, root / "demo")
    (root / "alias").symlink_to(root / "demo")
    store = Store(tmp_path / "store", (root,))
    assert store.local_model_dir(str(root / "alias")) == (root / "demo").resolve()
    assert store.local_model_dir(str(root / "x" / ".." / "demo")) == (root / "demo").resolve()
    shutil.copytree(demo_model, tmp_path / "store" / "models" / "staged")
    assert store.local_model_dir(str(tmp_path / "store" / "models" / "staged"))
    with pytest.raises(InvalidModelPath, match="outside"):
        Store(tmp_path / "store").local_model_dir(str(root / "demo"))
    with pytest.raises(InvalidModelPath, match="outside"):
        store.local_model_dir(str(tmp_path))
    store.check_source("org/name")  # a hub id is never a path
    with pytest.raises(InvalidModelPath, match="outside"):
        store.check_source("org/..")


# -- config -------------------------------------------------------------------------------


def test_fleet_token_config_env_then_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Env var when set, else the file (relative to the config); never in repr."""
    (tmp_path / "token").write_text(TOKEN + "\n")
    conf = tmp_path / "neuron.toml"
    conf.write_text('fleet_token_env = "T_ENV"\nfleet_token_file = "token"\n')
    monkeypatch.delenv("T_ENV", raising=False)
    cfg = NeuronConfig.from_file(conf)
    assert cfg.fleet_token == TOKEN
    assert TOKEN not in repr(cfg)
    monkeypatch.setenv("T_ENV", "e" * 20)
    assert NeuronConfig.from_file(conf).fleet_token == "e" * 20
    assert NeuronConfig().fleet_token is None


@pytest.mark.parametrize(
    ("toml", "match"),
    [
        ('fleet_token_file = "missing"\n', "cannot read"),
        ('fleet_token_env = "T_UNSET"\n', "T_UNSET, which is not set"),
        ('fleet_token_file = "short"\n', "at least 16"),
        ('fleet_token_file = "spaced"\n', "printable ASCII"),
        ('fleet_token = "inline-secret-0123456789"\n', "unknown key 'fleet_token'"),
    ],
)
def test_fleet_token_config_fails_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toml: str, match: str
) -> None:
    """A token source that yields nothing usable stops the service; the secret is never shown."""
    monkeypatch.delenv("T_UNSET", raising=False)
    (tmp_path / "short").write_text("abc")
    (tmp_path / "spaced").write_text("a token with spaces in it")
    conf = tmp_path / "neuron.toml"
    conf.write_text(toml)
    with pytest.raises(ConfigError, match=match) as info:
        NeuronConfig.from_file(conf)
    assert "with spaces" not in str(info.value)


# -- bad input -----------------------------------------------------------------------------


def _no_errors(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


BAD_BODIES = [
    ("nested arrays", b"[" * 100_000 + b"]" * 100_000, {}, "invalid_request"),
    ("nested objects", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, {}, "invalid_request"),
    ("huge integer", b'{"model_id": ' + b"9" * 5000 + b"}", {}, "invalid_request"),
    ("NaN", b'{"model_id": "m", "warmup_deadline_s": NaN}', {}, "invalid_request"),
    ("bad gzip", b"not gzip at all", {"Content-Encoding": "gzip"}, "invalid_request"),
    ("unknown encoding", b"{}", {"Content-Encoding": "x-foo"}, "invalid_request"),
    ("latin-1 body", b'{"model_id": "\xe9"}', {}, "invalid_request"),
]


@pytest.mark.parametrize(("name", "body", "headers", "code"), BAD_BODIES, ids=lambda x: x)
@pytest.mark.parametrize("path", ["/models/load", "/models/unload", "/v1/chat/completions"])
async def test_unreadable_bodies_are_400_envelopes(
    neuron_app_factory: InProcessFactory,
    caplog: pytest.LogCaptureFixture,
    path: str,
    name: str,
    body: bytes,
    headers: dict[str, str],
    code: str,
) -> None:
    """Deep nesting, bad gzip, unknown encodings, non-UTF-8: 400 envelope, nothing at ERROR."""
    server = await neuron_app_factory()
    with caplog.at_level(logging.INFO):
        answer = await rawhttp.send(_port(server), rawhttp.request("POST", path, body, headers))
        # The connection state is sane afterwards: the next request is served.
        health = await rawhttp.send(_port(server), rawhttp.request("GET", "/health"))
    assert (answer.status, answer.code) == (400, code), answer
    assert health.status == 200
    _no_errors(caplog)


async def test_good_gzip_body_is_read(neuron_app_factory: InProcessFactory) -> None:
    """A gzip body that is valid gets through (the check is not a blanket refusal)."""
    server = await neuron_app_factory()
    body = gzip.compress(b'{"model_id": "m"}')
    answer = await rawhttp.send(
        _port(server),
        rawhttp.request("POST", "/models/unload", body, {"Content-Encoding": "gzip"}),
    )
    assert (answer.status, answer.code) == (404, "model_not_found"), answer


LOAD_BODIES: list[tuple[Any, str | None]] = [
    ({"model_id": "m", "source": "org/m", "group": 1}, "group"),
    ({"model_id": "m", "source": "org/m", "group": "x"}, "group"),
    ({"model_id": "m", "source": "org/m", "group": []}, "group"),
    ({"model_id": "m", "group": {"group_id": "g", "rank": "0", "world_size": 2}}, "group.rank"),
    ({"model_id": "m", "group": {"group_id": "g", "rank": 0, "world_size": 1e400}}, None),
    ({"model_id": "m", "group": {"group_id": 5, "rank": 0, "world_size": 1}}, "group.group_id"),
    (
        {"model_id": "m", "group": {"group_id": "g", "rank": 0, "world_size": 1, "hosts": 3}},
        "group.hosts",
    ),
    (
        {
            "model_id": "m",
            "group": {"group_id": "g", "rank": 0, "world_size": 1, "ibv_devices": [1]},
        },
        "group.ibv_devices[0]",
    ),
    (
        {
            "model_id": "m",
            "group": {"group_id": "g", "rank": 0, "world_size": 1, "layer_split": "ab"},
        },
        "group.layer_split",
    ),
    ({"model_id": ["m"]}, "model_id"),
    ({"model_id": "m", "source": {"a": 1}}, "source"),
    ({"model_id": "m", "source": "/x\u0000y"}, "source"),
    ({"model_id": "m", "warmup_deadline_s": True}, "warmup_deadline_s"),
    ({"model_id": "m", "draft_model": "/etc"}, "draft_model"),
]


@pytest.mark.parametrize(("body", "param"), LOAD_BODIES)
async def test_load_wrong_types_name_the_field(
    neuron_app_factory: InProcessFactory,
    caplog: pytest.LogCaptureFixture,
    body: Any,
    param: str | None,
) -> None:
    """A wrong type anywhere in a load request: 400 invalid_request naming the field."""
    server = await neuron_app_factory()
    with caplog.at_level(logging.INFO):
        status, answer = await _call(str(server.make_url("/models/load")), "POST", body)
    assert status == 400, answer
    assert answer["error"]["code"] in ("invalid_request", "invalid_model_path")
    if param is not None:
        assert answer["error"]["param"] == param, answer
    else:
        # JSON's 1e400 is infinity: not valid JSON for us (parse_constant) or a bad number.
        assert answer["error"]["code"] == "invalid_request"
    _no_errors(caplog)


async def test_oversize_body_is_413_envelope(neuron_app_factory: InProcessFactory) -> None:
    """The neuron's own body limit answers 413 request_too_large, plain or gzipped."""
    server = await neuron_app_factory(max_body_bytes=4096)
    big = b'{"model_id": "' + b"m" * 8192 + b'"}'
    answer = await rawhttp.send(_port(server), rawhttp.request("POST", "/models/load", big))
    assert (answer.status, answer.code) == (413, "request_too_large")
    answer = await rawhttp.send(
        _port(server),
        rawhttp.request("POST", "/models/load", gzip.compress(big), {"Content-Encoding": "gzip"}),
    )
    assert (answer.status, answer.code) == (413, "request_too_large")


PARSER_ERRORS = [
    rawhttp.request(
        "POST", "/models/load", b"zz\r\nab\r\n0\r\n\r\n", {"Transfer-Encoding": "chunked"}
    ),
    # Depending on how the bytes arrive, aiohttp's parser (not the handler) meets this one.
    rawhttp.request("POST", "/models/load", b"\x00\x01\x02", {"Content-Encoding": "deflate"}),
    b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
    b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GARBAGE\r\n\r\n",
]


@pytest.mark.parametrize("data", PARSER_ERRORS)
async def test_parser_errors_are_4xx_and_not_logged_as_errors(
    neuron_app_factory: InProcessFactory, caplog: pytest.LogCaptureFixture, data: bytes
) -> None:
    """aiohttp's own parser answers these (plain text 400, before any middleware runs);
    they are the client's fault, so nothing is logged at ERROR with a traceback."""
    server = await neuron_app_factory()
    with caplog.at_level(logging.DEBUG):
        answer = await rawhttp.send(_port(server), data)
    assert 400 <= answer.status < 500
    _no_errors(caplog)


async def test_listening_beyond_loopback_without_token_warns(
    neuron_app_factory: InProcessFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A neuron told to listen on the LAN with no fleet token says so at start."""
    with caplog.at_level(logging.WARNING, logger="neuron.http.app"):
        await neuron_app_factory(host="127.0.0.1")
        assert "without a fleet token" not in caplog.text
        await neuron_app_factory(host="0.0.0.0", fleet_token=TOKEN)
        assert "without a fleet token" not in caplog.text
        await neuron_app_factory(host="0.0.0.0")
    assert "listening on 0.0.0.0 without a fleet token" in caplog.text
