"""OpenAI's Responses API as its users call it, on the real model through a real fleet.

The openai SDK (`responses.create`, streamed and not, and `responses.stream`, whose
helper checks every event's place in the sequence), the Agents SDK with its default
model (Responses), and LangChain's `use_responses_api` all talk to cortex unchanged:
cortex turns each request into a chat completion on smollm2-135m and the answer back
(issue 18). The answers are checked for meaning ("Paris"), the streams for the exact
event order and numbering.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import jsonschema
import openai
import pydantic
import pytest
from agents import (
    Agent,
    ModelSettings,
    Runner,
    set_default_openai_client,
    set_tracing_disabled,
)
from agents.models import _openai_shared
from langchain_openai import ChatOpenAI

from tests.clients.conftest import REAL_MODEL, RealFleet

QUESTION = "What is the capital of France?"
# Enough for "The capital of France is Paris." and a little more; ~8 tok/s here.
MAX_TOKENS = 24


@pytest.fixture
def client(real_fleet: RealFleet) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=real_fleet.url + "/v1", api_key="unused", max_retries=0, timeout=120
    ) as c:
        yield c


def test_create(client: openai.OpenAI) -> None:
    """`responses.create`, not streamed: a completed response that says Paris."""
    r = client.responses.create(
        model=REAL_MODEL, input=QUESTION, max_output_tokens=MAX_TOKENS, temperature=0
    )
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.status == "completed", r
    assert "Paris" in r.output_text, r.output_text
    assert [item.type for item in r.output] == ["message"]
    assert r.usage is not None and r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_the_token_limit_is_incomplete(client: openai.OpenAI) -> None:
    r = client.responses.create(model=REAL_MODEL, input=QUESTION, max_output_tokens=2)
    assert r.status == "incomplete", r
    assert r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage is not None and r.usage.output_tokens == 2


def test_stream_helper(client: openai.OpenAI) -> None:
    """`responses.stream`: the events in their order, numbered from 0, ending completed;
    the helper's own final response says Paris."""
    with client.responses.stream(
        model=REAL_MODEL, input=QUESTION, max_output_tokens=MAX_TOKENS, temperature=0
    ) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas >= 2, kinds
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "Paris" in final.output_text, final.output_text
    assert final.status == "completed"
    assert final.usage is not None and final.usage.output_tokens >= deltas


def test_create_streamed(client: openai.OpenAI) -> None:
    """`responses.create(stream=True)`: the text of the deltas is the final text."""
    stream = client.responses.create(
        model=REAL_MODEL,
        input=[{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}],
        instructions="Answer in one short sentence.",
        max_output_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    text, final = "", None
    for event in stream:
        if event.type == "response.output_text.delta":
            text += event.delta
        elif event.type == "response.completed":
            final = event.response
    assert final is not None
    assert final.output_text == text
    assert "Paris" in text, text


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model="no-such-model", input=QUESTION)
    assert err.value.status_code == 404


def test_a_refused_field_is_a_bad_request_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=REAL_MODEL, input=QUESTION, previous_response_id="resp_1")
    assert isinstance(err.value.body, dict)
    assert err.value.body.get("param") == "previous_response_id"


# -- the Agents SDK --------------------------------------------------------------------


@pytest.fixture
async def default_client(real_fleet: RealFleet) -> AsyncIterator[None]:
    """The Agents SDK's default client pointed at cortex (its default model speaks the
    Responses API), put back afterwards: it is process-wide."""
    before = _openai_shared.get_default_openai_client()
    c = openai.AsyncOpenAI(
        base_url=real_fleet.url + "/v1", api_key="unused", max_retries=0, timeout=120
    )
    set_default_openai_client(c, use_for_tracing=False)
    set_tracing_disabled(True)
    try:
        yield
    finally:
        _openai_shared.set_default_openai_client(before)  # type: ignore[arg-type]
        await c.close()


async def test_agents_sdk_default_model(default_client: None) -> None:
    agent = Agent(
        name="geographer",
        model=REAL_MODEL,
        model_settings=ModelSettings(max_tokens=MAX_TOKENS, temperature=0),
    )
    result = await Runner.run(agent, QUESTION)
    assert "Paris" in str(result.final_output), result.final_output


async def test_agents_sdk_streamed(default_client: None) -> None:
    """`Runner.run_streamed`: the SDK reads the Responses events itself and needs its
    terminal event (`response.completed`) to finish the turn."""
    agent = Agent(
        name="geographer",
        model=REAL_MODEL,
        model_settings=ModelSettings(max_tokens=MAX_TOKENS, temperature=0),
    )
    result = Runner.run_streamed(agent, QUESTION)
    deltas = [
        e.data.delta
        async for e in result.stream_events()
        if e.type == "raw_response_event" and e.data.type == "response.output_text.delta"
    ]
    assert "".join(deltas) == result.final_output
    assert "Paris" in str(result.final_output), result.final_output


# -- structured output (enforced by the runner, issue 18 item 4) -----------------------

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
    "required": ["city", "country"],
    "additionalProperties": False,
}


def test_text_format_json_schema(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model=REAL_MODEL,
        input="Name the capital of France and its country as JSON.",
        max_output_tokens=48,
        temperature=0,
        text={"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}},
    )
    assert r.status == "completed", r
    jsonschema.validate(json.loads(r.output_text), CITY)


# -- LangChain ---------------------------------------------------------------------------


def test_langchain_use_responses_api(real_fleet: RealFleet) -> None:
    chat = ChatOpenAI(
        model=REAL_MODEL,
        base_url=real_fleet.url + "/v1",
        api_key=pydantic.SecretStr("unused"),
        use_responses_api=True,
        temperature=0,
        max_completion_tokens=MAX_TOKENS,
        max_retries=0,
        timeout=120,
    )
    answer = chat.invoke(QUESTION)
    assert "Paris" in answer.text, answer
