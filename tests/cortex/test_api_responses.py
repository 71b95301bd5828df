"""cortex.http.responses: OpenAI's Responses API to the chat path and back, without a network.

Requests: every input form becomes the chat messages a model sees, every field the
chat body it asks for, every refusal a 400 naming the field. Answers: a chat
completion becomes the `response` object the openai SDK validates (its own pydantic
models, strictly). Streams: a chat SSE byte stream, cut anywhere, becomes the exact
Responses event sequence, numbered from 0, that the SDK's event types validate.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from cortex.http.responses import (
    IGNORED,
    REFUSED,
    Head,
    ResponsesDialect,
    ResponseStream,
    echo,
    input_messages,
    response_body,
    to_chat,
)
from shared.errors import InvalidRequest, sse_error_frame

EVENT = TypeAdapter[Any](ResponseStreamEvent)


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "input": "Hi", **fields}


# -- requests --------------------------------------------------------------------------

CALL = {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": '{"x":1}'}
CHAT_CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}}

INPUTS: list[tuple[str, list[Any], list[dict[str, Any]]]] = [
    (
        "a message with string content; developer is chat's system",
        [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    ),
    (
        "input_text parts are joined",
        [
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Hello, "},
                    {"type": "input_text", "text": "world", "prompt_cache_breakpoint": {}},
                ],
            }
        ],
        [{"role": "user", "content": "Hello, world"}],
    ),
    (
        "a previous answer (output_text), its call and the call's output",
        [
            {"role": "user", "content": "Weather?"},
            {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}],
            },
            {**CALL, "id": "fc_1", "status": "completed"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        ],
        [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Let me look.", "tool_calls": [CHAT_CALL]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
    ),
    (
        "a call with no text before it is an assistant turn of its own; two calls, one turn",
        [
            {"role": "user", "content": "Go"},
            CALL,
            {**CALL, "call_id": "call_2"},
            {
                "type": "function_call_output",
                "call_id": "call_1",
                "output": [{"type": "input_text", "text": "ok"}],
            },
        ],
        [
            {"role": "user", "content": "Go"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [CHAT_CALL, {**CHAT_CALL, "id": "call_2"}],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "ok"},
        ],
    ),
    (
        "reasoning items are dropped; a refusal is the assistant's text",
        [
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
        ],
        [{"role": "assistant", "content": "No."}],
    ),
]


@pytest.mark.parametrize(("case", "items", "want"), INPUTS, ids=[c for c, _, _ in INPUTS])
def test_input_items_become_chat_messages(
    case: str, items: list[Any], want: list[dict[str, Any]]
) -> None:
    assert input_messages(items) == want


def test_a_string_input_and_instructions() -> None:
    chat = to_chat(body(input="What is 2+2?", instructions="Answer in digits."))
    assert chat == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Answer in digits."},
            {"role": "user", "content": "What is 2+2?"},
        ],
    }


TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}

FIELDS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "sampling and the token limit",
        {"max_output_tokens": 16, "temperature": 0.2, "top_p": 0.9},
        {"max_tokens": 16, "temperature": 0.2, "top_p": 0.9},
    ),
    (
        "function tools, as chat nests them",
        {"tools": [TOOL], "tool_choice": "auto"},
        {
            "tools": [
                {"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}
            ],
            "tool_choice": "auto",
        },
    ),
    ("tool_choice required", {"tool_choice": "required"}, {"tool_choice": "required"}),
    ("tool_choice none", {"tool_choice": "none"}, {"tool_choice": "none"}),
    (
        "a named function",
        {"tool_choice": {"type": "function", "name": "get_weather"}},
        {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
    ),
    (
        "text.format json_schema",
        {
            "text": {
                "format": {"type": "json_schema", "name": "a", "schema": SCHEMA, "strict": True}
            }
        },
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "a", "schema": SCHEMA, "strict": True},
            }
        },
    ),
    (
        "text.format json_object",
        {"text": {"format": {"type": "json_object"}}},
        {"response_format": {"type": "json_object"}},
    ),
    ("text.format text, and verbosity, ask nothing", {"text": {"format": {"type": "text"}}}, {}),
    ("verbosity alone", {"text": {"verbosity": "low"}}, {}),
    (
        "a stream asks for usage in it",
        {"stream": True},
        {"stream": True, "stream_options": {"include_usage": True}},
    ),
    ("stream false", {"stream": False}, {}),
    ("cortex's keep_alive passes on", {"keep_alive": "5m"}, {"keep_alive": "5m"}),
    (
        "the no-op values of refused fields",
        {"background": False, "top_logprobs": 0, "previous_response_id": None},
        {},
    ),
    (
        "every ignored field",
        {field: None for field in IGNORED}
        | {"store": True, "include": ["reasoning.encrypted_content"]},
        {},
    ),
]


@pytest.mark.parametrize(("case", "given", "want"), FIELDS, ids=[c for c, _, _ in FIELDS])
def test_fields_become_the_chat_body(
    case: str, given: dict[str, Any], want: dict[str, Any]
) -> None:
    chat = to_chat(body(**given))
    assert chat == {"model": "m", "messages": [{"role": "user", "content": "Hi"}], **want}


def _image(kind: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "input_text", "text": "See"}, {"type": kind}]}


REFUSALS: list[tuple[dict[str, Any], str, str]] = [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "stateless"),
    ({"conversation": "conv_1"}, "conversation", "stateless"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt", "stored prompts"),
    ({"background": True}, "background", "background"),
    ({"top_logprobs": 3}, "top_logprobs", "log probabilities"),
    ({"moderation": {"model": "x"}}, "moderation", "moderation"),
    ({"include": ["message.output_text.logprobs"]}, "include", "logprobs"),
    ({"frobnicate": 1}, "frobnicate", "unknown field"),
    ({"input": [_image("input_image")]}, "input", "'input_image' parts"),
    ({"input": [_image("input_file")]}, "input", "'input_file' parts"),
    (
        {
            "input": [
                {
                    "type": "function_call_output",
                    "call_id": "c",
                    "output": [{"type": "input_image"}],
                }
            ]
        },
        "input",
        "'input_image' parts",
    ),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input", "'item_reference'"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input", "role must be"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "input", "call_id"),
    ({"input": []}, "input", "non-empty"),
    ({"input": None}, "input", "non-empty"),
    ({"instructions": ["x"]}, "instructions", "string"),
    ({"tools": [{"type": "web_search"}]}, "tools", "'web_search' tools"),
    ({"tools": [{"type": "function"}]}, "tools", "name"),
    (
        {"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}},
        "tool_choice",
        "must be",
    ),
    ({"tool_choice": "any"}, "tool_choice", "must be"),
    ({"text": {"format": {"type": "json_schema", "name": "a"}}}, "text.format.schema", "schema"),
    ({"text": {"format": {"type": "grammar"}}}, "text.format", "json_schema"),
    ({"text": "json"}, "text", "object"),
    ({"max_output_tokens": 0}, "max_output_tokens", "positive"),
    ({"max_output_tokens": "5"}, "max_output_tokens", "positive"),
    ({"stream": "yes"}, "stream", "boolean"),
]


@pytest.mark.parametrize(("given", "param", "says"), REFUSALS, ids=[r[1] for r in REFUSALS])
def test_what_cannot_be_honoured_is_a_400_naming_it(
    given: dict[str, Any], param: str, says: str
) -> None:
    with pytest.raises(InvalidRequest) as err:
        to_chat(body(**given))
    assert err.value.status == 400
    assert err.value.param == param
    assert says in err.value.message


def test_every_refused_field_is_known_and_none_is_also_ignored() -> None:
    assert not set(REFUSED) & IGNORED


# -- answers ---------------------------------------------------------------------------


def head(**given: Any) -> Head:
    return Head(id="resp_1", created_at=1700000000, model="m", echo=echo(body(**given)))


HEAD_ECHOED = head()


def completion(
    content: str | None, finish: str = "stop", calls: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m",
        "choices": [{"index": 0, "finish_reason": finish, "message": message}],
        "usage": {
            "prompt_tokens": 12,
            "completion_tokens": 5,
            "total_tokens": 17,
            "prompt_tokens_details": {"cached_tokens": 4},
        },
    }


def valid(answer: dict[str, Any]) -> Response:
    """The answer as the SDK's own model reads it, every field checked."""
    return Response.model_validate(answer, strict=False)


def test_a_text_answer() -> None:
    answer = response_body(completion("Paris."), head(temperature=0.0))
    r = valid(answer)
    assert (r.status, r.output_text, r.incomplete_details, r.error) == (
        "completed",
        "Paris.",
        None,
        None,
    )
    assert r.id == "resp_1" and r.object == "response" and r.model == "m"
    assert [item.type for item in r.output] == ["message"]
    assert r.output[0].status == "completed" and r.output[0].role == "assistant"  # type: ignore[union-attr]
    assert r.output[0].id.startswith("msg_")  # type: ignore[union-attr]
    assert r.usage is not None
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (12, 5, 17)
    assert r.usage.input_tokens_details.cached_tokens == 4
    assert r.temperature == 0.0 and r.tool_choice == "auto" and r.tools == []
    assert r.completed_at is not None


def test_a_tool_call_answer() -> None:
    call = {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    answer = response_body(completion(None, "tool_calls", [call]), head(tools=[TOOL]))
    r = valid(answer)
    assert r.status == "completed" and r.output_text == ""
    (item,) = r.output
    assert item.type == "function_call"
    assert (item.call_id, item.name, item.arguments, item.status) == (
        "call_9",
        "f",
        '{"x": 1}',
        "completed",
    )
    assert item.id is not None and item.id.startswith("fc_")
    assert r.tools[0].type == "function"


def test_text_then_calls_keep_their_order_and_object_arguments_become_json() -> None:
    calls = [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
        {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]
    r = valid(response_body(completion("Calling.", "tool_calls", calls), HEAD_ECHOED))
    assert [i.type for i in r.output] == ["message", "function_call", "function_call"]
    assert [getattr(i, "arguments", None) for i in r.output] == [None, '{"x": 1}', "{}"]


def test_the_token_limit_is_an_incomplete_response() -> None:
    r = valid(response_body(completion("The capital", "length"), head(max_output_tokens=2)))
    assert r.status == "incomplete"
    assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete"  # type: ignore[union-attr]
    assert r.max_output_tokens == 2 and r.completed_at is None


def test_an_empty_answer_is_an_empty_message() -> None:
    r = valid(response_body(completion(None), HEAD_ECHOED))
    assert [i.type for i in r.output] == ["message"] and r.output_text == ""


def test_the_dialect_answers_and_streams_for_one_request() -> None:
    d = ResponsesDialect(HEAD_ECHOED)
    assert d.api == "responses"
    assert d.answer(completion("x"))["id"] == "resp_1"
    assert isinstance(d.transcoder(), ResponseStream)


# -- streams ---------------------------------------------------------------------------


def frame(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def chunk(
    content: str | None = None,
    finish: str | None = None,
    calls: list[dict[str, Any]] | None = None,
) -> bytes:
    """One chat.completion.chunk as mlx_lm.server writes it."""
    delta: dict[str, Any] = {"role": "assistant"}
    if content:
        delta["content"] = content
    if calls:
        delta["tool_calls"] = calls
    return frame(
        {
            "id": "chatcmpl-1",
            "system_fingerprint": "fp",
            "object": "chat.completion.chunk",
            "model": "m",
            "created": 1700000000,
            "choices": [{"index": 0, "finish_reason": finish, "delta": delta}],
        }
    )


USAGE = frame(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "m",
        "created": 1700000000,
        "choices": [],
        "usage": {"prompt_tokens": 30, "completion_tokens": 3, "total_tokens": 33},
    }
)
KEEPALIVE = b": keepalive\n\n"
DONE = b"data: [DONE]\n\n"
TEXT_STREAM = (
    KEEPALIVE
    + chunk("The capital")
    + KEEPALIVE
    + chunk(" is Paris")
    + chunk(".")
    + chunk(finish="stop")
    + USAGE
    + DONE
)


def stream() -> ResponseStream:
    ids = itertools.count(1)
    return ResponseStream(HEAD_ECHOED, new_id=lambda prefix: f"{prefix}_{next(ids)}")


def events(raw: bytes) -> list[dict[str, Any]]:
    """The events of a Responses SSE body, each checked: its `event:` line names its
    type, the SDK's event model validates it; comments are kept as {"comment": ...}."""
    out: list[dict[str, Any]] = []
    assert raw.endswith(b"\n\n") or not raw
    for block in raw.split(b"\n\n")[:-1]:
        if block.startswith(b":"):
            out.append({"comment": block.decode()})
            continue
        head_line, data_line = block.split(b"\n")
        kind = head_line.removeprefix(b"event: ").decode()
        data = json.loads(data_line.removeprefix(b"data: "))
        assert data["type"] == kind
        EVENT.validate_python(data)
        out.append(data)
    return out


def fed(pieces: list[bytes], make: Callable[[], ResponseStream] = stream) -> list[dict[str, Any]]:
    xl = make()
    return events(b"".join(xl.feed(p) for p in pieces))


def kinds(evs: list[dict[str, Any]]) -> list[str]:
    return [e.get("type", "comment") for e in evs]


def numbered(evs: list[dict[str, Any]]) -> None:
    """Every event has its sequence number, from 0 with no gap."""
    seqs = [e["sequence_number"] for e in evs if "type" in e]
    assert seqs == list(range(len(seqs)))


def test_a_text_stream_is_the_exact_event_sequence() -> None:
    evs = fed([TEXT_STREAM])
    assert kinds(evs) == [
        "response.created",
        "response.in_progress",
        "comment",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "comment",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    numbered(evs)
    assert [e["delta"] for e in evs if e.get("type") == "response.output_text.delta"] == [
        "The capital",
        " is Paris",
        ".",
    ]
    created = evs[0]["response"]
    assert (created["status"], created["output"], created["id"]) == ("in_progress", [], "resp_1")
    done = evs[-1]["response"]
    r = valid(done)
    assert r.status == "completed" and r.output_text == "The capital is Paris."
    assert r.output[0].id == "msg_1" == evs[3]["item"]["id"] == evs[5]["item_id"]
    assert r.usage is not None and (r.usage.input_tokens, r.usage.output_tokens) == (30, 3)
    assert evs[9]["text"] == "The capital is Paris."


def test_a_stream_cut_anywhere_gives_the_same_events() -> None:
    whole = _stable(fed([TEXT_STREAM]))
    for cut in range(1, len(TEXT_STREAM)):
        assert _stable(fed([TEXT_STREAM[:cut], TEXT_STREAM[cut:]])) == whole, cut
    for size in (1, 3, 7, 64):
        pieces = [TEXT_STREAM[i : i + size] for i in range(0, len(TEXT_STREAM), size)]
        assert _stable(fed(pieces)) == whole, size


def _stable(evs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events without the one field that reads the clock."""
    for e in evs:
        if "response" in e:
            e["response"].pop("completed_at", None)
    return evs


def test_nothing_is_sent_before_a_whole_line() -> None:
    xl = stream()
    first = xl.feed(b'data: {"choi')
    assert kinds(events(first)) == ["response.created", "response.in_progress"]
    assert xl.feed(b'ces":[]}') == b""


CALL_STREAM = (
    chunk("Let me check.")
    + chunk(
        calls=[
            {
                "index": 0,
                "id": "call_a",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": '},
            }
        ]
    )
    + chunk(calls=[{"index": 0, "function": {"arguments": '"Paris"}'}}])
    + chunk(
        calls=[
            {
                "index": 1,
                "id": "call_b",
                "type": "function",
                "function": {"name": "get_time", "arguments": "{}"},
            }
        ]
    )
    + chunk(finish="tool_calls")
    + USAGE
    + DONE
)


def test_function_calls_stream_in_their_own_items() -> None:
    evs = fed([CALL_STREAM])
    assert kinds(evs) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    numbered(evs)
    added = evs[8]["item"]
    assert (added["type"], added["call_id"], added["name"], added["arguments"]) == (
        "function_call",
        "call_a",
        "get_weather",
        "",
    )
    assert evs[8]["output_index"] == 1 and evs[13]["output_index"] == 2
    assert evs[11]["arguments"] == '{"city": "Paris"}'
    r = valid(evs[-1]["response"])
    assert [(i.type, getattr(i, "call_id", None)) for i in r.output] == [
        ("message", None),
        ("function_call", "call_a"),
        ("function_call", "call_b"),
    ]
    assert [getattr(i, "arguments", None) for i in r.output] == [None, '{"city": "Paris"}', "{}"]


def test_the_token_limit_ends_in_response_incomplete() -> None:
    evs = fed([chunk("The capital"), chunk(finish="length"), USAGE, DONE])
    assert kinds(evs)[-2:] == ["response.output_item.done", "response.incomplete"]
    numbered(evs)
    assert evs[-2]["item"]["status"] == "incomplete"
    r = valid(evs[-1]["response"])
    assert r.status == "incomplete"
    assert r.incomplete_details is not None and r.incomplete_details.reason == "max_output_tokens"


def test_an_empty_answer_streams_an_empty_message() -> None:
    evs = fed([chunk(finish="stop"), USAGE, DONE])
    assert "response.output_item.added" in kinds(evs)
    assert valid(evs[-1]["response"]).output_text == ""


def test_the_neurons_error_frame_is_response_failed_never_completed() -> None:
    lost = sse_error_frame("runner of 'm' lost: exited with code -9")
    evs = fed([chunk("The"), lost[:20], lost[20:], chunk("ignored")])
    assert kinds(evs) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.failed",
    ]
    numbered(evs)
    r = valid(evs[-1]["response"])
    assert r.status == "failed" and r.error is not None
    assert r.error.code == "server_error" and "lost" in r.error.message
    assert r.output[0].status == "incomplete" and r.output_text == "The"  # type: ignore[union-attr]


def test_cortexs_own_cut_is_response_failed_and_ends_the_stream() -> None:
    xl = stream()
    raw = xl.feed(chunk("The")) + xl.fail("replica a was lost mid-stream", 502)
    assert xl.feed(chunk("more") + DONE) == b""
    assert xl.fail("again", 502) == b""
    evs = events(raw)
    assert kinds(evs)[-1] == "response.failed"
    numbered(evs)
    assert "replica a was lost" in evs[-1]["response"]["error"]["message"]


def test_a_cut_before_any_byte_still_opens_the_response() -> None:
    evs = events(stream().fail("cortex is shutting down", 503))
    assert kinds(evs) == ["response.created", "response.in_progress", "response.failed"]
    numbered(evs)


def test_after_done_nothing_more_is_sent() -> None:
    xl = stream()
    xl.feed(TEXT_STREAM)
    assert xl.feed(chunk("late") + DONE) == b""
    assert xl.fail("late", 502) == b""
