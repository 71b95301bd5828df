"""Shared foundation: strict config, the error envelope, the catalogue, wire records."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import attrs
import pytest

from shared import errors
from shared.catalogue import Catalogue
from shared.config import ConfigError, load_config
from shared.wire import GroupSpec, LoadRequest


@attrs.frozen
class _Inner:
    cap: int = 4
    timeout_s: float = 1.5


@attrs.frozen
class _Conf:
    name: str
    mode: Literal["a", "b"] = "a"
    inner: _Inner = _Inner()
    tags: tuple[str, ...] = ()
    limit: int | None = None


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "conf.toml"
    p.write_text(text)
    return p


def test_config_roundtrip(tmp_path: Path) -> None:
    """Known keys of the right types load into the frozen record."""
    p = _write(tmp_path, 'name = "x"\nmode = "b"\ntags = ["t"]\n[inner]\ncap = 2\ntimeout_s = 3\n')
    conf = load_config(_Conf, p)
    assert conf == _Conf(name="x", mode="b", inner=_Inner(cap=2, timeout_s=3.0), tags=("t",))


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('name = "x"\nnmae = "y"\n', "'nmae'"),
        ('name = "x"\n[inner]\ncapp = 1\n', "'inner.capp'"),
        ('name = "x"\n[inner]\ncap = "4"\n', "'inner.cap' must be int"),
        ('name = "x"\nmode = "c"\n', "'mode' must be one of"),
        ('name = "x"\ntags = "t"\n', "'tags' must be an array"),
        ('name = "x"\nlimit = true\n', "'limit'"),
        ("mode = 'a'\n", "missing required key 'name'"),
        ("name = \n", "not valid TOML"),
    ],
)
def test_config_errors_name_key_and_file(tmp_path: Path, text: str, needle: str) -> None:
    """An unknown, mistyped or missing key is an error naming the key and the file."""
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(_Conf, p)
    assert needle in str(exc.value)
    assert str(p) in str(exc.value)


def test_error_envelope_and_retry_after() -> None:
    """Errors render the OpenAI envelope; retryable ones carry Retry-After, capped at 60."""
    e = errors.ModelLoading("loading demo")
    assert e.to_json() == {
        "error": {
            "message": "loading demo",
            "type": "server_error",
            "code": "model_loading",
            "param": None,
        }
    }
    assert e.headers() == {"Retry-After": "2"}
    assert errors.ModelNotFound("x").headers() == {}
    assert errors.ColdLoadFailed("x", retry_after=600).retry_after == 60


def test_error_from_envelope_keeps_type() -> None:
    """A neuron's envelope becomes the same typed error on the cortex side."""
    e = errors.QueueFull("full")
    back = errors.ApiError.from_envelope(429, e.to_json(), "1")
    assert isinstance(back, errors.QueueFull)
    assert back.retry_after == 1
    assert isinstance(errors.ApiError.from_envelope(500, "junk"), errors.UpstreamError)


def test_catalogue_aliases_and_relative_source(tmp_path: Path) -> None:
    """Models resolve by id or alias; relative sources are relative to the file."""
    p = tmp_path / "models.toml"
    p.write_text('[[models]]\nid = "m"\nsource = "./d"\naliases = ["mm"]\n')
    cat = Catalogue.load(p)
    spec = cat.resolve("mm")
    assert spec is not None and spec.id == "m"
    assert spec.source == str((tmp_path / "d").resolve())
    assert cat.resolve("nope") is None


def test_catalogue_duplicate_name(tmp_path: Path) -> None:
    """Two models claiming one name is a config error naming the name."""
    p = tmp_path / "models.toml"
    p.write_text(
        '[[models]]\nid = "a"\nsource = "x/a"\n[[models]]\nid = "b"\nsource = "x/b"\n'
        'aliases = ["a"]\n'
    )
    with pytest.raises(ConfigError, match="'a'"):
        Catalogue.load(p)


def test_shipped_catalogue_loads() -> None:
    """The repository's models.toml is valid."""
    cat = Catalogue.load(Path(__file__).parent.parent / "models.toml")
    assert cat.resolve("demo") is not None
    big = cat.get("llama-3.1-70b")
    assert big is not None and big.min_nodes == 2
    assert big.facts().heads == 64


def test_load_request_validation() -> None:
    """Load requests reject a bad group or deadline with a message naming the field."""
    ok = LoadRequest.from_json(
        {
            "model_id": "m",
            "source": "/x",
            "group": {
                "group_id": "g",
                "rank": 1,
                "world_size": 2,
                "backend": "ring",
                "sharding": "tensor",
                "hosts": ["a:1", "b:2"],
            },
        }
    )
    assert ok.group == GroupSpec("g", 1, 2, "ring", "tensor", ("a:1", "b:2"))
    assert LoadRequest.from_json(ok.to_json()) == ok
    with pytest.raises(ValueError, match="rank"):
        LoadRequest.from_json(
            {"model_id": "m", "group": {"group_id": "g", "rank": 2, "world_size": 2}}
        )
    with pytest.raises(ValueError, match="hosts"):
        LoadRequest.from_json(
            {"model_id": "m", "group": {"group_id": "g", "rank": 0, "world_size": 2}}
        )
    with pytest.raises(ValueError, match="coordinator"):
        LoadRequest.from_json(
            {
                "model_id": "m",
                "group": {"group_id": "g", "rank": 0, "world_size": 2, "backend": "jaccl"},
            }
        )
    with pytest.raises(ValueError, match="warmup_deadline_s"):
        LoadRequest.from_json({"model_id": "m", "warmup_deadline_s": -1})


def test_group_layer_split_must_match_world() -> None:
    """A pipeline split names one positive layer count per rank."""
    base = {
        "group_id": "g",
        "rank": 0,
        "world_size": 2,
        "sharding": "pipeline",
        "hosts": ["a:1", "b:1"],
    }
    ok = GroupSpec.from_json({**base, "layer_split": [7, 23]})
    assert ok.layer_split == (7, 23)
    assert GroupSpec.from_json(ok.to_json()) == ok
    with pytest.raises(ValueError, match="layer_split"):
        GroupSpec.from_json({**base, "layer_split": [30]})
    with pytest.raises(ValueError, match="layer_split"):
        GroupSpec.from_json({**base, "layer_split": [0, 30]})


async def test_unhandled_error_still_gets_the_envelope() -> None:
    """A bug in a handler answers 500 with the OpenAI envelope, not aiohttp's text page."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("boom")

    app = web.Application(middlewares=[errors.error_middleware])
    app.router.add_get("/x", broken)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/x")
        assert resp.status == 500
        body = await resp.json()
    assert body["error"]["code"] == "internal_error"
    assert "boom" not in body["error"]["message"]
