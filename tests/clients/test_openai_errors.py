"""Every row of the README's error table, as the openai SDK raises it.

Each condition is made for real in a cortex in front of fake neurons (real
aiohttp apps on port 0), and the SDK (retries off) must raise the class a
client would catch: BadRequestError 400, AuthenticationError 401,
PermissionDeniedError 403, NotFoundError 404, APIStatusError 413,
RateLimitError 429, InternalServerError 5xx; a stream cut after its first
byte raises APIError mid-iteration. Every 429 and 503 carries Retry-After
(<= 60 s), which the SDK (and LiteLLM) wait before a retry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from cortex.config import ApiKey
from cortex.http.inference import DRAIN
from shared.catalogue import GIB, ModelSpec
from tests.cortex.fakes import FakeNeuron, catalogue, fleet, gateway, stop_all

Client = TestClient[web.Request, web.Application]
MESSAGES: list[Any] = [{"role": "user", "content": "Hello"}]


@attrs.frozen
class Row:
    """One row: how to make it, what the SDK raises, with which status and code."""

    condition: str
    exc: type[openai.APIStatusError]
    status: int
    code: str
    setup: Callable[[list[FakeNeuron]], dict[str, Any]]  # -> gateway kwargs
    model: str = "m1"
    messages: list[Any] = MESSAGES
    headers: dict[str, str] = attrs.Factory(dict)

    @property
    def retryable(self) -> bool:
        return self.status in (429, 503)


def _ready(nodes: list[FakeNeuron]) -> dict[str, Any]:
    nodes[0].add_model("m1")
    return {}


def _huge(nodes: list[FakeNeuron]) -> dict[str, Any]:
    return {"cat": catalogue(ModelSpec(id="m1", source="org/m1", memory_gb=10_000.0))}


def _feasible_down(nodes: list[FakeNeuron]) -> dict[str, Any]:
    # n1 could hold it but is down; n2 is up but far too small.
    nodes[0].health_ok = False
    nodes[1].memory_total_bytes = nodes[1].memory_available_bytes = GIB // 2
    return {}


def _all_down(nodes: list[FakeNeuron]) -> dict[str, Any]:
    for n in nodes:
        n.health_ok = False
    return {}


def _loading(nodes: list[FakeNeuron]) -> dict[str, Any]:
    nodes[0].add_model("m1", state="loading")
    return {}


def _load_refused(nodes: list[FakeNeuron]) -> dict[str, Any]:
    for n in nodes:
        n.load_error = (500, "internal_error", "disk full")
    return {"load_wait_s": 30.0}


def _chat_error(status: int, code: str) -> Callable[[list[FakeNeuron]], dict[str, Any]]:
    def setup(nodes: list[FakeNeuron]) -> dict[str, Any]:
        for n in nodes:
            n.add_model("m1")
            n.chat_error = (status, code)
        return {}

    return setup


def _keys(nodes: list[FakeNeuron]) -> dict[str, Any]:
    nodes[0].add_model("m1")
    return {"api_keys": (ApiKey(key="sk-only-m2-key", models=("m2",)),)}


def _small_body(nodes: list[FakeNeuron]) -> dict[str, Any]:
    nodes[0].add_model("m1")
    return {"max_body_bytes": 4096}


ROWS = [
    Row("bad field", openai.BadRequestError, 400, "invalid_request", _ready, messages=[]),
    Row("unknown model", openai.NotFoundError, 404, "model_not_found", _ready, model="nope"),
    Row("no node could ever hold it", openai.NotFoundError, 404, "no_feasible_node", _huge),
    Row(
        "feasible node down",
        openai.InternalServerError,
        503,
        "feasible_node_unhealthy",
        _feasible_down,
    ),
    Row("no healthy node", openai.InternalServerError, 503, "no_healthy_nodes", _all_down),
    Row("model loading", openai.InternalServerError, 503, "model_loading", _loading),
    Row("cold load failed", openai.InternalServerError, 503, "cold_load_failed", _load_refused),
    Row("queues full", openai.RateLimitError, 429, "queue_full", _chat_error(429, "queue_full")),
    Row(
        "unknown key",
        openai.AuthenticationError,
        401,
        "invalid_api_key",
        _keys,
        headers={"Authorization": "Bearer sk-wrong-key"},
    ),
    Row(
        "key not allowed this model",
        openai.PermissionDeniedError,
        403,
        "model_not_allowed",
        _keys,
        headers={"Authorization": "Bearer sk-only-m2-key"},
    ),
    # The SDK has no class of its own for 413: its base status error.
    Row("body over the limit", openai.APIStatusError, 413, "request_too_large", _small_body),
    Row(
        "two runners failed it",
        openai.InternalServerError,
        502,
        "upstream_error",
        _chat_error(502, "upstream_error"),
    ),
]


@pytest.fixture
async def nodes() -> AsyncIterator[list[FakeNeuron]]:
    ns = await fleet("n1", "n2")
    yield ns
    await stop_all(ns)


def _sdk(client: Client, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), max_retries=0, **kw)


@pytest.mark.parametrize("row", ROWS, ids=[r.code for r in ROWS])
async def test_error_row_raises_its_sdk_class(nodes: list[FakeNeuron], row: Row) -> None:
    """The condition's status and code reach the SDK as its exception class, with Retry-After."""
    kw = row.setup(nodes)
    cat = kw.pop("cat", None)
    async with gateway(nodes, cat, **kw) as client, _sdk(client, api_key="x") as sdk:
        text = "x" * 10_000 if row.code == "request_too_large" else "Hello"
        messages: list[Any] = (
            row.messages if row.messages != MESSAGES else [{"role": "user", "content": text}]
        )
        with pytest.raises(openai.APIStatusError) as exc:
            await sdk.chat.completions.create(
                model=row.model, messages=messages, extra_headers=row.headers
            )
    err = exc.value
    assert type(err) is row.exc, (row.condition, type(err), err)
    assert err.status_code == row.status and err.code == row.code, (row.condition, err)
    retry = err.response.headers.get("retry-after")
    if row.retryable:
        assert retry is not None and 1 <= int(retry) <= 60, (row.condition, retry)
    else:
        assert retry is None, (row.condition, retry)


async def test_missing_key_is_authentication_error(nodes: list[FakeNeuron]) -> None:
    """No key at all (auth on): AuthenticationError 401 invalid_api_key."""
    kw = _keys(nodes)
    async with gateway(nodes, **kw) as client, _sdk(client, api_key="x") as sdk:
        with pytest.raises(openai.AuthenticationError) as exc:
            await sdk.chat.completions.create(
                model="m1", messages=MESSAGES, extra_headers={"Authorization": openai.Omit()}
            )
    assert exc.value.code == "invalid_api_key"


async def test_lost_before_the_first_byte_is_503_upstream_unavailable(
    nodes: list[FakeNeuron],
) -> None:
    """Every replica gone before answering (connection refused): 503 upstream_unavailable."""
    for n in nodes:
        n.add_model("m1")
    async with gateway(nodes) as client, _sdk(client, api_key="x") as sdk:
        for n in nodes:
            await n.stop()  # polled healthy, then gone
        with pytest.raises(openai.InternalServerError) as exc:
            await sdk.chat.completions.create(model="m1", messages=MESSAGES)
    assert exc.value.status_code == 503 and exc.value.code == "upstream_unavailable", exc.value
    assert exc.value.response.headers.get("retry-after") == "2"


async def test_lost_after_the_first_byte_raises_mid_stream(nodes: list[FakeNeuron]) -> None:
    """A replica lost mid-stream: the SDK raises APIError while iterating, never a clean end."""
    nodes[0].add_model("m1")
    nodes[0].die_after_first_byte = True
    async with gateway(nodes) as client, _sdk(client, api_key="x") as sdk:
        stream = await sdk.chat.completions.create(model="m1", messages=MESSAGES, stream=True)
        got = []
        with pytest.raises(openai.APIError) as exc:
            async for chunk in stream:
                got.append(chunk)
        await stream.close()
    assert not isinstance(exc.value, openai.APIStatusError)  # a 200 stream, then the error
    assert got and not any(c.choices and c.choices[0].finish_reason for c in got)


async def test_shutting_down_is_503_with_retry_after(nodes: list[FakeNeuron]) -> None:
    """A request that arrives while cortex drains: InternalServerError 503 shutting_down."""
    nodes[0].add_model("m1")
    async with gateway(nodes) as client, _sdk(client, api_key="x") as sdk:
        await client.app[DRAIN].close(0)
        with pytest.raises(openai.InternalServerError) as exc:
            await sdk.chat.completions.create(model="m1", messages=MESSAGES)
    assert exc.value.status_code == 503 and exc.value.code == "shutting_down"
    assert exc.value.response.headers.get("retry-after") == "2"
