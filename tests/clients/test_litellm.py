"""LiteLLM as the real client of cortex: chat, stream, cold loads, errors, and its Router.

Cortex's error contract is written for LiteLLM (DESIGN.md, "Error contract"):
it retries 408/409/429/5xx honouring Retry-After, never retries a 404 and
benches an upstream that says 404. These tests drive `litellm.acompletion`
and `litellm.Router` against a real `cortex serve` in front of a real neuron
and mlx_lm runner (the demo model), and against in-process cortexes in front
of fake neurons where a condition (a full queue, a broken upstream) has to be
forced. What cortex saw is read from its own /metrics, never from timings.
"""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import attrs
import litellm
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from litellm.exceptions import NotFoundError, RateLimitError
from litellm.llms.custom_httpx.async_client_cleanup import close_litellm_async_clients
from litellm.router import Router

from tests.conftest import NeuronProcess, stop_quietly, wait_until
from tests.cortex.fakes import FakeNeuron, fleet, gateway, stop_all
from tests.e2e.conftest import CortexProcess

litellm.suppress_debug_info = True
litellm.success_callback = []
litellm.failure_callback = []
litellm.callbacks = []

# litellm's own pydantic models warn at first use; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Item 'summary' on TypedDict:UserWarning")

Client = TestClient[web.Request, web.Application]
MESSAGES: list[Any] = [{"role": "user", "content": "Hello"}]


@attrs.frozen
class Fleet:
    """One real cortex (load_wait_s=0.05) over one real neuron, shared by the module."""

    cortex: CortexProcess
    neuron: NeuronProcess
    warm: str  # keep_loaded: ready before any test runs
    cold: str  # catalogued, loaded by the first request for it

    @property
    def api_base(self) -> str:
        return self.cortex.url + "/v1"


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("litellm")
    neuron = NeuronProcess.start(root / "neuron")
    tag = uuid.uuid4().hex[:8]
    warm, cold = f"llm-warm-{tag}", f"llm-cold-{tag}"
    models: list[dict[str, Any]] = [
        {"id": warm, "source": str(demo_model), "keep_loaded": True},
        {"id": cold, "source": str(demo_model)},
    ]
    # A tiny load_wait_s: the request that starts a cold load is told 503 model_loading.
    cortex = CortexProcess.write(root / "cortex", [("a", neuron)], models, load_wait_s=0.05)
    try:
        cortex.start()
        wait_until(lambda: _ready(cortex, warm), 120, f"{warm} ready")
        yield Fleet(cortex=cortex, neuron=neuron, warm=warm, cold=cold)
    finally:
        cortex.stop()
        stop_quietly(neuron)


@pytest.fixture(autouse=True)
async def fresh_litellm_clients() -> AsyncIterator[None]:
    """LiteLLM caches HTTP clients by api_base, but each test has its own event loop."""
    yield
    await cast(Callable[[], Awaitable[None]], close_litellm_async_clients)()
    cast(Callable[[], None], litellm.in_memory_llm_clients_cache.flush_cache)()


@pytest.fixture
async def fakes() -> AsyncIterator[list[FakeNeuron]]:
    nodes = await fleet("f1", "f2")
    yield nodes
    await stop_all(nodes)


def _ready(c: CortexProcess, model_id: str) -> bool:
    return any(loc["state"] == "ready" and loc["healthy"] for loc in c.model(model_id)["locations"])


def _parse_requests(text: str, model: str) -> dict[str, float]:
    """cortex_requests_total for one model label, by HTTP status."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("cortex_requests_total{") and f'model="{model}"' in line:
            code = line.split('code="', 1)[1].split('"', 1)[0]
            out[code] = out.get(code, 0.0) + float(line.rsplit(" ", 1)[1])
    # Every series exists from the start at 0 (pre-initialised): only those counted.
    return {code: n for code, n in out.items() if n}


def _requests(c: CortexProcess, model: str) -> dict[str, float]:
    with urllib.request.urlopen(c.url + "/metrics", timeout=5) as r:
        return _parse_requests(r.read().decode(), model)


async def _gateway_requests(client: Client, model: str) -> dict[str, float]:
    resp = await client.get("/metrics")
    return _parse_requests(await resp.text(), model)


def _base(client: Client) -> str:
    return str(client.make_url("/v1"))


def _content(resp: Any) -> str:
    assert isinstance(resp, litellm.ModelResponse), type(resp)
    content = resp.choices[0].message.content
    assert isinstance(content, str)
    return content


# -- 1. chat and stream through cortex to a real runner ------------------------------------


async def test_chat_and_stream_reach_a_real_runner(real: Fleet) -> None:
    """Non-streamed and streamed chat via LiteLLM return the runner's tokens."""
    kw: dict[str, Any] = {
        "model": f"openai/{real.warm}",
        "api_base": real.api_base,
        "api_key": "x",
        "messages": MESSAGES,
        "max_tokens": 8,
        "temperature": 0,
    }
    before = _requests(real.cortex, real.warm)
    text = _content(await litellm.acompletion(**kw))
    assert text

    stream = await litellm.acompletion(**kw, stream=True)
    pieces = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert len([p for p in pieces if p]) > 1, "tokens arrive as several chunks"
    assert "".join(pieces) == text, "greedy decoding: the stream is the same answer"
    # A stream is counted as its handler ends, which may be just after the client has
    # read [DONE]: waited for, then compared whole.
    want = {**before, "200": before.get("200", 0.0) + 2}
    wait_until(
        lambda: _requests(real.cortex, real.warm).get("200", 0.0) >= want["200"],
        60,
        "both answers counted",
    )
    assert _requests(real.cortex, real.warm) == want


# -- 2. a cold load: 503 model_loading, retried by LiteLLM -----------------------------


async def test_cold_load_503_is_retried_until_the_answer(real: Fleet) -> None:
    """The first request starts a load and gets 503 + Retry-After; LiteLLM retries it."""
    assert not _ready(real.cortex, real.cold)
    resp = await litellm.acompletion(
        model=f"openai/{real.cold}",
        api_base=real.api_base,
        api_key="x",
        messages=MESSAGES,
        max_tokens=4,
        num_retries=30,
    )
    assert _content(resp) is not None
    seen = _requests(real.cortex, real.cold)
    assert seen.get("503", 0) >= 1, seen
    assert seen.get("200") == 1, seen
    assert set(seen) == {"503", "200"}, seen
    assert _ready(real.cortex, real.cold)


# -- 3. 404 model_not_found: raised, never retried -------------------------------------------


async def test_unknown_model_404_is_not_retried(real: Fleet) -> None:
    """acompletion (its SDK retries on) and a Router with retries each send one request."""
    unknown = f"nope-{uuid.uuid4().hex[:8]}"
    before = _requests(real.cortex, "other").get("404", 0.0)  # unknown ids count as "other"
    with pytest.raises(NotFoundError) as exc:
        await litellm.acompletion(
            model=f"openai/{unknown}", api_base=real.api_base, api_key="x", messages=MESSAGES
        )
    # LiteLLM keeps the envelope's message (cortex names the model), drops its code.
    assert exc.value.status_code == 404 and unknown in str(exc.value)
    assert _requests(real.cortex, "other").get("404", 0.0) == before + 1

    router = Router(
        model_list=[
            {
                "model_name": "chat",
                "litellm_params": {
                    "model": f"openai/{unknown}",
                    "api_base": real.api_base,
                    "api_key": "x",
                },
            }
        ],
        num_retries=3,
    )
    with pytest.raises(NotFoundError):
        await router.acompletion(model="chat", messages=MESSAGES)
    assert _requests(real.cortex, "other").get("404", 0.0) == before + 2


# -- 4. 429 queue_full: RateLimitError with Retry-After ----------------------------------------


async def test_queue_full_429_is_a_rate_limit_error_with_retry_after(
    fakes: list[FakeNeuron],
) -> None:
    """Every replica full: cortex answers 429 queue_full + Retry-After, LiteLLM raises it."""
    for f in fakes:
        f.add_model("m1")
        f.chat_error = (429, "queue_full")
    async with gateway(fakes) as client:
        with pytest.raises(RateLimitError) as exc:
            await litellm.acompletion(
                model="openai/m1",
                api_base=_base(client),
                api_key="x",
                messages=MESSAGES,
                num_retries=0,
            )
        assert exc.value.status_code == 429
        headers = getattr(exc.value, "litellm_response_headers", None)
        # The last replica's own Retry-After (the fakes say 2), not a generic one.
        assert headers is not None and headers.get("retry-after") == "2"
        assert [f.calls["chat"] for f in fakes] == [1, 1], "cortex tried each replica once"
        assert await _gateway_requests(client, "m1") == {"429": 1.0}

        # With its default retries (the OpenAI SDK's two), LiteLLM retries the 429.
        with pytest.raises(RateLimitError):
            await litellm.acompletion(
                model="openai/m1", api_base=_base(client), api_key="x", messages=MESSAGES
            )
        assert await _gateway_requests(client, "m1") == {"429": 4.0}


# -- 5. Router: a broken deployment is benched, the other answers --------------------------------


async def test_router_moves_off_a_deployment_answering_503(
    real: Fleet, fakes: list[FakeNeuron]
) -> None:
    """One deployment's cortex says 503 upstream_unavailable; the Router uses the other."""
    bad = fakes[0]
    bad.add_model("m1")
    bad.chat_error = (503, "upstream_unavailable")
    async with gateway([bad]) as broken:
        router = Router(
            model_list=[
                {
                    # Tried first (lowest order) until benched.
                    "model_name": "chat",
                    "litellm_params": {
                        "model": "openai/m1",
                        "api_base": _base(broken),
                        "api_key": "x",
                        "order": 1,
                    },
                },
                {
                    "model_name": "chat",
                    "litellm_params": {
                        "model": f"openai/{real.warm}",
                        "api_base": real.api_base,
                        "api_key": "x",
                        "order": 2,
                    },
                },
            ],
            num_retries=2,
            allowed_fails=0,  # bench a deployment on its first failure
        )
        before = _requests(real.cortex, real.warm).get("200", 0.0)
        for _ in range(3):
            resp = await router.acompletion(model="chat", messages=MESSAGES, max_tokens=4)
            assert _content(resp) is not None
        assert _requests(real.cortex, real.warm).get("200", 0.0) == before + 3
        seen = await _gateway_requests(broken, "m1")
        assert set(seen) == {"503"} and seen["503"] >= 1, seen
