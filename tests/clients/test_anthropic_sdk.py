"""The `anthropic` SDK, unchanged, against cortex's /v1/messages.

On the real fleet (smollm2-135m, a real neuron and mlx_lm runner): create,
stream (Anthropic's event sequence), count_tokens (the runner's own count),
a forced tool call and its result on the wire, an unknown model. In front of
fake neurons (aiohttp apps on port 0, in-process cortex): a 429 the SDK retries
after Retry-After, x-api-key auth, and a stream cut mid-way raising, never
ending cleanly. max_tokens stay small: this CPU decodes ~8 tokens/s.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import anthropic
import attrs
import openai
import pytest
from aiohttp import web

from cortex.config import ApiKey
from tests.clients.conftest import (
    ASK_CITY,
    CITY_DESCRIPTION,
    CITY_PARAMETERS,
    REAL_MODEL,
    RealFleet,
)
from tests.cortex.fakes import FakeNeuron, gateway, sse_frames

QUESTION: list[Any] = [{"role": "user", "content": "What is the capital of France?"}]
ASK: list[Any] = [{"role": "user", "content": ASK_CITY}]
# The session's one tool (see tests/clients/conftest.py), in Anthropic's shape.
CITY: Any = {"name": "City", "description": CITY_DESCRIPTION, "input_schema": CITY_PARAMETERS}


@pytest.fixture
def client(real_fleet: RealFleet) -> Iterator[anthropic.Anthropic]:
    # Retries off: anything a test sees is cortex's first answer.
    with anthropic.Anthropic(
        base_url=real_fleet.url, api_key="unused", max_retries=0, timeout=180
    ) as c:
        yield c


def _text(content: list[Any]) -> str:
    return "".join(b.text for b in content if b.type == "text")


def test_create(client: anthropic.Anthropic, real_fleet: RealFleet) -> None:
    msg = client.messages.create(
        model=REAL_MODEL, max_tokens=24, messages=QUESTION, system="Answer in one sentence."
    )
    assert isinstance(msg, anthropic.types.Message)
    assert msg.id.startswith("msg_") and msg.role == "assistant" and msg.model == REAL_MODEL
    assert "Paris" in _text(msg.content), msg
    assert msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.usage.input_tokens > 10 and 0 < msg.usage.output_tokens <= 24
    # Served by the chat path, counted with the API as a label.
    assert _requests(real_fleet, "messages") >= 1


def _requests(fleet: RealFleet, api: str) -> float:
    """cortex_requests_total of the real model answered 200, for one API label."""
    with urllib.request.urlopen(fleet.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("cortex_requests_total{")
        and f'api="{api}"' in line
        and 'code="200"' in line
        and f'model="{REAL_MODEL}"' in line
    )


def test_stream_is_anthropics_event_sequence(client: anthropic.Anthropic) -> None:
    """The raw events, in order (the SDK drops pings), then the SDK's stream helper."""
    with client.messages.create(
        model=REAL_MODEL, max_tokens=24, messages=QUESTION, stream=True
    ) as stream:
        events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"], kinds
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"], kinds
    assert set(kinds[2:-3]) == {"content_block_delta"}, kinds
    deltas = [e.delta for e in events if e.type == "content_block_delta"]
    assert all(d.type == "text_delta" for d in deltas)
    text = "".join(d.text for d in deltas if d.type == "text_delta")
    assert "Paris" in text, text
    end = events[-2]
    assert end.type == "message_delta"
    assert end.delta.stop_reason in ("end_turn", "max_tokens")
    assert 0 < end.usage.output_tokens <= 24 and (end.usage.input_tokens or 0) > 10

    with client.messages.stream(model=REAL_MODEL, max_tokens=24, messages=QUESTION) as helper:
        joined = "".join(helper.text_stream)
        final = helper.get_final_message()
    assert joined == _text(final.content) and "Paris" in joined, final
    assert final.usage.input_tokens == end.usage.input_tokens


def test_a_stop_sequence_is_told_from_the_end_of_the_turn(client: anthropic.Anthropic) -> None:
    """The chat path says "stop" for both; the runner names the sequence that matched.
    (mlx_lm matches stop sequences by tokens: " Paris" is the token the model writes.)"""
    kw: Any = {"model": REAL_MODEL, "max_tokens": 24, "messages": QUESTION}
    kw["system"] = "Answer in one sentence."
    msg = client.messages.create(**kw, stop_sequences=[" Paris", "Lyon"])
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", " Paris"), msg
    assert "Paris" not in _text(msg.content), msg
    with client.messages.stream(**kw, stop_sequences=["Lyon", " Paris"]) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", " Paris"), final
    assert _text(final.content) == _text(msg.content)


def test_count_tokens_is_the_runners_prompt_count(
    client: anthropic.Anthropic, real_fleet: RealFleet
) -> None:
    """The count equals the prompt tokens a chat of the same messages reports, tools
    included (the runner's own tokenizer and chat template)."""
    system = "You are terse."
    counted = client.messages.count_tokens(model=REAL_MODEL, messages=QUESTION, system=system)
    with openai.OpenAI(base_url=real_fleet.url + "/v1", api_key="x", max_retries=0) as oai:
        chat = oai.chat.completions.create(
            model=REAL_MODEL,
            messages=[{"role": "system", "content": system}, *QUESTION],
            max_tokens=1,
        )
    assert chat.usage is not None
    assert counted.input_tokens == chat.usage.prompt_tokens > 10
    # The very prompt of the forced tool call below: the runner's prompt cache then
    # prefills it once (this CPU prefills ~10 tokens/s).
    with_tools = client.messages.count_tokens(model=REAL_MODEL, messages=ASK, tools=[CITY])
    assert with_tools.input_tokens > counted.input_tokens + 20
    assert _requests(real_fleet, "count_tokens") >= 2


def test_a_forced_tool_call_and_its_result_on_the_wire(client: anthropic.Anthropic) -> None:
    """tool_choice {"type": "tool"}: the runner must call it; the tool_result goes back
    as a tool message and the model answers it."""
    ask = ASK
    msg = client.messages.create(
        model=REAL_MODEL,
        max_tokens=48,
        messages=ask,
        tools=[CITY],
        tool_choice={"type": "tool", "name": "City"},
    )
    calls = [b for b in msg.content if b.type == "tool_use"]
    assert msg.stop_reason == "tool_use" and len(calls) >= 1, msg
    call = calls[0]
    assert call.name == "City" and isinstance(call.input, dict), call
    assert isinstance(call.input.get("city"), str), call.input
    turn: list[Any] = [
        *ask,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Noted."}],
        },
    ]
    reply = client.messages.create(model=REAL_MODEL, max_tokens=16, messages=turn, tools=[CITY])
    assert reply.stop_reason in ("end_turn", "max_tokens", "tool_use"), reply
    assert reply.content, reply


def test_an_unknown_model_raises_not_found(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as exc:
        client.messages.create(model="no-such-model", max_tokens=4, messages=QUESTION)
    assert exc.value.status_code == 404
    body: Any = exc.value.body
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error", body
    assert "no-such-model" in body["error"]["message"]


def test_a_request_without_max_tokens_is_a_400_naming_it(real_fleet: RealFleet) -> None:
    """The SDK will not send one without max_tokens: on the wire, in Anthropic's envelope."""
    req = urllib.request.Request(
        real_fleet.url + "/v1/messages",
        data=json.dumps({"model": REAL_MODEL, "messages": QUESTION}).encode(),
        headers={"Content-Type": "application/json", "anthropic-version": "2023-06-01"},
    )
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=30)
    assert exc.value.code == 400
    body = json.loads(exc.value.read())
    assert body["error"]["type"] == "invalid_request_error", body
    assert "max_tokens" in body["error"]["message"], body


# -- in front of fake neurons ----------------------------------------------------------------


@attrs.define
class FullOnce(FakeNeuron):
    """A neuron whose queue is full for its first `full` chat requests (429, Retry-After)."""

    full: int = 1

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        if self.full > 0:
            self.full -= 1
            self.calls["chat"] += 1
            await request.read()
            body = {"error": {"message": "fake: queue full", "type": "rate_limit_error"}}
            body["error"]["code"] = "queue_full"
            return web.json_response(body, status=429, headers={"Retry-After": "1"})
        return await super()._chat(request)


async def test_a_429_is_retried_by_the_sdk_after_retry_after() -> None:
    """The neuron's queue is full once: cortex answers 429 with its Retry-After in
    Anthropic's envelope, the SDK waits it out and retries, and the retry succeeds."""
    node = await FullOnce(name="n1").start()
    node.add_model("m1")
    try:
        async with gateway([node]) as gw:
            url = str(gw.make_url(""))
            async with anthropic.AsyncAnthropic(
                base_url=url, api_key="x", max_retries=2, timeout=60
            ) as c:
                started = time.monotonic()
                raw = await c.messages.with_raw_response.create(
                    model="m1", max_tokens=4, messages=QUESTION
                )
                elapsed = time.monotonic() - started
                msg = await raw.parse()
        assert _text(msg.content) == "hi" and msg.stop_reason == "end_turn"
        assert raw.retries_taken == 1
        assert node.calls["chat"] == 2
        # The SDK waited the 1 s Retry-After (a slow machine only adds to it).
        assert elapsed >= 1.0, elapsed
    finally:
        await node.stop()


async def test_x_api_key_is_a_key_and_a_wrong_one_an_authentication_error() -> None:
    node = await FakeNeuron(name="n1").start()
    node.add_model("m1")
    key = ApiKey(key="sk-ant-test-key-0123456789", models=("m1",), name="t")
    try:
        async with gateway([node], api_keys=(key,)) as gw:
            url = str(gw.make_url(""))
            async with anthropic.AsyncAnthropic(base_url=url, api_key=key.key, max_retries=0) as c:
                msg = await c.messages.create(model="m1", max_tokens=4, messages=QUESTION)
                assert _text(msg.content) == "hi"
                with pytest.raises(anthropic.PermissionDeniedError) as denied:
                    await c.messages.create(model="m2", max_tokens=4, messages=QUESTION)
            async with anthropic.AsyncAnthropic(
                base_url=url, api_key="sk-wrong", max_retries=0
            ) as c:
                with pytest.raises(anthropic.AuthenticationError) as exc:
                    await c.messages.create(model="m1", max_tokens=4, messages=QUESTION)
        body: Any = exc.value.body
        assert body["error"]["type"] == "authentication_error", body
        denied_body: Any = denied.value.body
        assert denied_body["error"]["type"] == "permission_error", denied_body
    finally:
        await node.stop()


async def test_a_stream_cut_mid_way_raises_never_ends_cleanly() -> None:
    """The neuron dies after its first frame: the SDK gets Anthropic's error event and
    raises; no message_stop came before it."""
    node = await FakeNeuron(
        name="n1", stream_chunks=sse_frames(5), die_after_first_byte=True
    ).start()
    node.add_model("m1")
    seen: list[str] = []
    try:
        async with gateway([node]) as gw:
            url = str(gw.make_url(""))
            async with anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0) as c:
                stream = await c.messages.create(
                    model="m1", max_tokens=8, messages=QUESTION, stream=True
                )
                with pytest.raises(anthropic.APIStatusError) as exc:
                    async for ev in stream:
                        seen.append(ev.type)
    finally:
        await node.stop()
    assert seen[:3] == ["message_start", "content_block_start", "content_block_delta"], seen
    assert "message_stop" not in seen and "message_delta" not in seen, seen
    body: Any = exc.value.body
    assert body["type"] == "error" and body["error"]["type"] == "api_error", body
    assert "n1" in body["error"]["message"], body
