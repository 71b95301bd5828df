"""Structured output and forced tool calls on the real model, through cortex, with the
openai SDK: the runner's grammar makes the answer parse and validate, and a forced
call come back as `tool_calls` with finish_reason "tool_calls" (streamed here; a named
forced call unstreamed is LangChain's `function_calling` in test_structured_clients.py).

(LangChain's and `llm`'s own ways of asking are in test_structured_clients.py.)
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
from openai import OpenAI

from tests.clients.conftest import ASK_CITY, CITY_PARAMETERS, CITY_TOOL, REAL_MODEL, RealFleet

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
# The session's one tool, and the very prompt LangChain's `function_calling` test sends
# (test_structured_clients.py): the runner's prompt cache may then prefill it once.
TOOLS: Any = [CITY_TOOL]
ASK: Any = [{"role": "user", "content": ASK_CITY}]


def _client(fleet: RealFleet) -> OpenAI:
    return OpenAI(base_url=fleet.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_json_schema_answer_validates(real_fleet: RealFleet) -> None:
    answer = _client(real_fleet).chat.completions.create(
        model=REAL_MODEL,
        messages=[{"role": "user", "content": "Describe an employee of a small company."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON},
        },
        max_tokens=80,
        temperature=0.7,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content or ""), PERSON)


def test_required_tool_call_streamed(real_fleet: RealFleet) -> None:
    stream = _client(real_fleet).chat.completions.create(
        model=REAL_MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=60,
        temperature=0.0,
        stream=True,
    )
    calls: dict[int, dict[str, str]] = {}
    finish, text = None, ""
    for chunk in stream:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            text += c.delta.content or ""
            for d in c.delta.tool_calls or ():
                call = calls.setdefault(d.index, {"name": "", "arguments": ""})
                call["name"] += (d.function and d.function.name) or ""
                call["arguments"] += (d.function and d.function.arguments) or ""
    assert finish == "tool_calls" and not text.strip(), (finish, text)
    [call] = calls.values()
    assert call["name"] == "City"
    arguments = json.loads(call["arguments"])
    assert isinstance(arguments, dict)
    jsonschema.validate(arguments, CITY_PARAMETERS)
