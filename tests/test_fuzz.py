"""Property-based fuzzing of both services' HTTP endpoints with hypothesis.

Whatever a client sends (arbitrary JSON values, arbitrary bytes, odd headers),
the answer is never a 5xx, every error is the OpenAI envelope with an
`error.code`, and nothing is logged at ERROR. The neuron runs in-process with no
model (its loads can only fail validation); cortex runs in-process in front of a
fake neuron that serves `m1`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from neuron.store.sources import is_local_source
from shared.catalogue import ModelSpec
from tests.conftest import InProcessFactory
from tests.cortex.fakes import FakeNeuron, catalogue, gateway
from tests.support import rawhttp

FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
Client = TestClient[web.Request, web.Application]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
group_like = st.fixed_dictionaries(
    {},
    optional={
        "group_id": json_values,
        "rank": json_values | st.integers(-2, 4),
        "world_size": json_values | st.integers(-1, 4),
        "backend": st.sampled_from(["ring", "jaccl", "x"]) | json_values,
        "sharding": st.sampled_from(["tensor", "pipeline"]) | json_values,
        "hosts": json_values | st.lists(st.text(max_size=8), max_size=3),
        "coordinator": json_values,
        "ibv_devices": json_values | st.lists(st.lists(st.none() | st.text(max_size=4))),
        "layer_split": json_values | st.lists(st.integers(-1, 5), max_size=3),
    },
)
load_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model_id": st.text(max_size=12) | json_values,
        "source": st.sampled_from(["/etc", "../x", "./m", "~/m", "/tmp/../etc"])
        | st.text(max_size=20)
        | json_values,
        "group": group_like | json_values,
        "warmup_deadline_s": json_values,
    },
)
messages = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(["user", "system", "x"]) | json_values,
            "content": json_values,
        },
    ),
    max_size=3,
)
inference_bodies = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["m1", "one", "nope"]) | json_values,
        "messages": messages | json_values,
        "prompt": json_values,
        "stream": st.booleans() | json_values,
        "max_tokens": json_values,
        "stop": json_values,
        "logit_bias": json_values,
    },
)
# Printable latin-1, no CR/LF: odd, but still a header line the parser accepts.
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=30,
)
odd_headers = st.dictionaries(
    st.sampled_from(
        ["Authorization", "X-Api-Key", "Content-Encoding", "Content-Type", "X-Request-Id", "Accept"]
    ),
    header_text | st.sampled_from(["gzip", "deflate", "br", "identity", "Bearer x", "Basic %%%"]),
    max_size=4,
)


def _checked(status: int, body: bytes, caplog: pytest.LogCaptureFixture) -> None:
    assert status < 500, body[:500]
    if status >= 400:
        err = json.loads(body)["error"]
        assert isinstance(err["code"], str) and err["code"], body[:500]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


def _no_download(body: Any) -> bool:
    """A load that would pass validation with a hub id would try the (absent) hub."""
    if not isinstance(body, dict):
        return True
    source = body.get("source", body.get("model_id"))
    return not (isinstance(source, str) and source and not is_local_source(source))


# -- neuron -------------------------------------------------------------------------------

NEURON_POSTS = ["/models/load", "/models/unload", "/v1/chat/completions", "/v1/completions"]


@pytest.fixture
async def neuron_port(neuron_app_factory: InProcessFactory) -> int:
    server = await neuron_app_factory()
    assert server.port is not None
    return server.port


async def _neuron_post(port: int, path: str, body: Any, caplog: pytest.LogCaptureFixture) -> None:
    answer = await rawhttp.send(port, rawhttp.request("POST", path, json.dumps(body).encode()))
    _checked(answer.status, answer.body, caplog)


@FUZZ
@given(path=st.sampled_from(NEURON_POSTS), body=json_values)
async def test_neuron_json_values(
    neuron_port: int, caplog: pytest.LogCaptureFixture, path: str, body: Any
) -> None:
    """Any JSON value at any neuron endpoint: never a 5xx, always the envelope."""
    assume(path != "/models/load" or _no_download(body))
    await _neuron_post(neuron_port, path, body, caplog)


@FUZZ
@given(body=load_bodies)
async def test_neuron_load_bodies(
    neuron_port: int, caplog: pytest.LogCaptureFixture, body: dict[str, Any]
) -> None:
    """Load requests with wrong types anywhere (the group above all): 4xx envelopes."""
    assume(_no_download(body))
    await _neuron_post(neuron_port, "/models/load", body, caplog)


@FUZZ
@given(path=st.sampled_from(NEURON_POSTS[2:]), body=inference_bodies)
async def test_neuron_inference_bodies(
    neuron_port: int, caplog: pytest.LogCaptureFixture, path: str, body: dict[str, Any]
) -> None:
    """OpenAI-shaped bodies with wrong types: 4xx envelopes."""
    await _neuron_post(neuron_port, path, body, caplog)


@FUZZ
@given(path=st.sampled_from(NEURON_POSTS), raw=st.binary(max_size=200), headers=odd_headers)
async def test_neuron_bytes_and_headers(
    neuron_port: int,
    caplog: pytest.LogCaptureFixture,
    path: str,
    raw: bytes,
    headers: dict[str, str],
) -> None:
    """Arbitrary bytes with odd headers: never a 5xx, always the envelope."""
    answer = await rawhttp.send(neuron_port, rawhttp.request("POST", path, raw, headers))
    if answer.headers.get("content-type", "").startswith("text/plain"):
        # aiohttp's own parser refused the message (a bad deflate stream can reach
        # it): plain text, before any application code runs; still a 4xx, still quiet.
        assert 400 <= answer.status < 500
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        return
    _checked(answer.status, answer.body, caplog)


# -- cortex --------------------------------------------------------------------------------


@pytest.fixture
async def cortex() -> AsyncIterator[Client]:
    node = await FakeNeuron(name="n1").start()
    node.add_model("m1")
    cat = catalogue(ModelSpec(id="m1", source="org/m1", aliases=("one",), memory_gb=1.0))
    try:
        async with gateway([node], cat) as client:
            yield client
    finally:
        await node.stop()


CORTEX_POSTS = [
    "/v1/chat/completions",
    "/v1/completions",
    "/admin/models/m1/load",
    "/admin/models/x/load",
    "/admin/models/m1/unload",
    "/admin/models/x/unload",
]


async def _cortex_post(
    cortex: Client, path: str, body: Any, caplog: pytest.LogCaptureFixture
) -> None:
    if "/m1/unload" in path and isinstance(body, dict) and body.get("force") is True:
        body = {**body, "force": False}  # a real unload of m1 would change the fleet
    resp = await cortex.post(path, data=json.dumps(body).encode())
    _checked(resp.status, await resp.read(), caplog)


@FUZZ
@given(path=st.sampled_from(CORTEX_POSTS), body=json_values)
async def test_cortex_json_values(
    cortex: Client, caplog: pytest.LogCaptureFixture, path: str, body: Any
) -> None:
    """Any JSON value at any cortex endpoint: never a 5xx, always the envelope."""
    await _cortex_post(cortex, path, body, caplog)


@FUZZ
@given(path=st.sampled_from(CORTEX_POSTS[:2]), body=inference_bodies)
async def test_cortex_inference_bodies(
    cortex: Client, caplog: pytest.LogCaptureFixture, path: str, body: dict[str, Any]
) -> None:
    """OpenAI-shaped bodies with wrong types: 4xx envelopes (or a real answer)."""
    await _cortex_post(cortex, path, body, caplog)


admin_bodies = st.fixed_dictionaries(
    {},
    optional={
        "nodes": json_values | st.lists(st.sampled_from(["n1", "n2", ""]), max_size=2),
        "exclude": json_values | st.lists(st.sampled_from(["n1", "n2"]), max_size=2),
        "force": json_values,
    },
)


@FUZZ
@given(path=st.sampled_from(CORTEX_POSTS[2:]), body=admin_bodies)
async def test_cortex_admin_bodies(
    cortex: Client, caplog: pytest.LogCaptureFixture, path: str, body: dict[str, Any]
) -> None:
    """Admin bodies with wrong types anywhere: 4xx envelopes (or the action)."""
    await _cortex_post(cortex, path, body, caplog)


@FUZZ
@given(path=st.sampled_from(CORTEX_POSTS), raw=st.binary(max_size=200), headers=odd_headers)
async def test_cortex_bytes_and_headers(
    cortex: Client,
    caplog: pytest.LogCaptureFixture,
    path: str,
    raw: bytes,
    headers: dict[str, str],
) -> None:
    """Arbitrary bytes with odd headers: never a 5xx, always the envelope."""
    assert cortex.server.port is not None
    answer = await rawhttp.send(cortex.server.port, rawhttp.request("POST", path, raw, headers))
    if answer.headers.get("content-type", "").startswith("text/plain"):
        assert 400 <= answer.status < 500
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        return
    _checked(answer.status, answer.body, caplog)
