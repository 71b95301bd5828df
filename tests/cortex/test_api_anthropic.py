"""Anthropic's Messages API on the chat path: the pure translations, no network.

Request -> chat body, chat answer -> message, a chat SSE byte stream (split
anywhere) -> Anthropic's exact event sequence, error frames and cuts -> an error
event, keepalives -> pings, and errors -> Anthropic's envelope. Every message and
event is also checked against the `anthropic` SDK's own types.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import pydantic
import pytest

from cortex.http.anthropic import (
    IGNORED,
    CountDialect,
    MessagesDialect,
    MessageStream,
    count_chat,
    error_body,
    render_error,
    stop_reason,
    to_chat,
    to_message,
)
from shared.errors import (
    ApiError,
    InvalidApiKey,
    InvalidRequest,
    ModelLoading,
    ModelNotAllowed,
    ModelNotFound,
    QueueFull,
    RequestTooLarge,
    UpstreamError,
    UpstreamUnavailable,
    sse_error_frame,
)

EVENTS: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(anthropic.types.RawMessageStreamEvent)
USER = {"role": "user", "content": "Hi"}


def base(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 16, "messages": [USER], **kw}


# -- request -> chat -----------------------------------------------------------------------


WEATHER = {
    "name": "weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
WEATHER_FN = {
    "type": "function",
    "function": {
        "name": "weather",
        "parameters": WEATHER["input_schema"],
        "description": "The weather in a city.",
    },
}
CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "minimal",
        base(),
        {"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "Hi"}]},
    ),
    (
        "system as a string",
        base(system="Be brief."),
        {"messages": [{"role": "system", "content": "Be brief."}, USER]},
    ),
    (
        "system as blocks, cache_control ignored",
        base(
            system=[
                {"type": "text", "text": "One.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Two."},
            ]
        ),
        {"messages": [{"role": "system", "content": "One.\nTwo."}, USER]},
    ),
    (
        "text blocks, joined by lines",
        base(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ]
        ),
        {"messages": [{"role": "user", "content": "a\nb"}]},
    ),
    (
        "a tool round trip: tool_use -> tool_calls, tool_result -> a tool message first",
        base(
            messages=[
                USER,
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hm", "signature": "s"},
                        {"type": "text", "text": "Checking."},
                        {
                            "type": "tool_use",
                            "id": "toolu_1",
                            "name": "weather",
                            "input": {"city": "Paris"},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_1",
                            "content": [{"type": "text", "text": "sunny"}],
                            "is_error": False,
                        },
                        {"type": "text", "text": "And so?"},
                    ],
                },
            ]
        ),
        {
            "messages": [
                USER,
                {
                    "role": "assistant",
                    "content": "Checking.",
                    "tool_calls": [
                        {
                            "id": "toolu_1",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
                {"role": "user", "content": "And so?"},
            ]
        },
    ),
    (
        "tool_result content as a string, and none",
        base(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "a", "content": "42"},
                        {"type": "tool_result", "tool_use_id": "b"},
                    ],
                }
            ]
        ),
        {
            "messages": [
                {"role": "tool", "tool_call_id": "a", "content": "42"},
                {"role": "tool", "tool_call_id": "b", "content": ""},
            ]
        },
    ),
    (
        "a system turn in messages (the 2.x SDK's SystemMessageParam)",
        base(messages=[{"role": "system", "content": "S"}, USER]),
        {"messages": [{"role": "system", "content": "S"}, USER]},
    ),
    ("stop_sequences -> stop", base(stop_sequences=["\n\n", "END"]), {"stop": ["\n\n", "END"]}),
    ("no stop_sequences: no stop", base(stop_sequences=[]), {"max_tokens": 16}),
    (
        "stream asks for the usage frame",
        base(stream=True),
        {"stream": True, "stream_options": {"include_usage": True}},
    ),
    ("stream false", base(stream=False), {"max_tokens": 16}),
    (
        "sampling fields of older clients are honoured",
        base(temperature=0.5, top_p=0.9, top_k=40),
        {"temperature": 0.5, "top_p": 0.9, "top_k": 40},
    ),
    ("tools -> functions", base(tools=[WEATHER]), {"tools": [WEATHER_FN]}),
    (
        "custom tool type is a tool",
        base(tools=[{**WEATHER, "type": "custom", "cache_control": {"type": "ephemeral"}}]),
        {"tools": [WEATHER_FN]},
    ),
    (
        "tool_choice auto",
        base(tools=[WEATHER], tool_choice={"type": "auto"}),
        {"tool_choice": "auto"},
    ),
    (
        "tool_choice any -> required",
        base(tools=[WEATHER], tool_choice={"type": "any", "disable_parallel_tool_use": True}),
        {"tool_choice": "required"},
    ),
    (
        "tool_choice tool -> named",
        base(tools=[WEATHER], tool_choice={"type": "tool", "name": "weather"}),
        {"tool_choice": {"type": "function", "function": {"name": "weather"}}},
    ),
    (
        "tool_choice none",
        base(tools=[WEATHER], tool_choice={"type": "none"}),
        {"tool_choice": "none"},
    ),
    (
        "output_config.format -> response_format json_schema",
        base(
            output_config={
                "format": {"type": "json_schema", "schema": {"type": "object"}},
                "effort": "low",
            }
        ),
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": {"type": "object"}, "strict": True},
            }
        },
    ),
    (
        "the older beta's output_format",
        base(output_format={"type": "json_schema", "schema": {"type": "object"}}),
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": {"type": "object"}, "strict": True},
            }
        },
    ),
]


@pytest.mark.parametrize(("body", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_request_to_chat(body: dict[str, Any], want: dict[str, Any]) -> None:
    chat = to_chat(body)
    for key, value in want.items():
        assert chat[key] == value, key
    if "stop" not in want:
        assert "stop" not in chat
    if "stream" not in want:
        assert "stream" not in chat and "stream_options" not in chat


def test_what_claude_code_sends_and_means_nothing_here_is_ignored() -> None:
    """cache_control, thinking, service_tier, context_management, metadata...: the chat
    body is the one without them."""
    noisy = base(
        cache_control={"type": "ephemeral"},
        thinking={"type": "enabled", "budget_tokens": 2048},
        service_tier="auto",
        context_management={"edits": [{"type": "clear_tool_uses_20250919"}]},
        metadata={"user_id": "someone"},
        container=None,
        inference_geo="us",
        speed="fast",
        output_config={"effort": "high"},
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}],
            }
        ],
    )
    assert to_chat(noisy) == to_chat(base())
    for field in ("cache_control", "thinking", "service_tier", "context_management"):
        assert field in IGNORED


REFUSED: list[tuple[str, dict[str, Any], str, str]] = [
    ("max_tokens missing", {"model": "m", "messages": [USER]}, "max_tokens", "required"),
    ("max_tokens zero", base(max_tokens=0), "max_tokens", "at least 1"),
    ("max_tokens not an int", base(max_tokens="8"), "max_tokens", "integer"),
    ("no messages", base(messages=[]), "messages", "non-empty"),
    (
        "an image block",
        base(messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]),
        "messages.0.content.0",
        "image blocks are not supported",
    ),
    (
        "a document block",
        base(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "x"}, {"type": "document", "source": {}}],
                }
            ]
        ),
        "messages.0.content.1",
        "document blocks are not supported",
    ),
    (
        "an image in a tool result",
        base(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "a",
                            "content": [{"type": "image", "source": {}}],
                        }
                    ],
                }
            ]
        ),
        "messages.0.content.0.content.0",
        "image blocks are not supported",
    ),
    (
        "an image in the system",
        base(system=[{"type": "image", "source": {}}]),
        "system.0",
        "image blocks",
    ),
    (
        "an unknown block",
        base(messages=[{"role": "user", "content": [{"type": "search_result", "source": "x"}]}]),
        "messages.0.content.0",
        "'search_result'",
    ),
    ("a bad role", base(messages=[{"role": "tool", "content": "x"}]), "messages.0.role", "user"),
    (
        "prefill",
        base(messages=[USER, {"role": "assistant", "content": "The answer is"}]),
        "messages.1",
        "prefill is not supported",
    ),
    (
        "a server tool",
        base(tools=[{"type": "web_search_20250305", "name": "web_search"}]),
        "tools.0",
        "server tool",
    ),
    ("a tool without a schema", base(tools=[{"name": "x"}]), "tools.0", "input_schema"),
    ("a bad tool_choice", base(tool_choice={"type": "function"}), "tool_choice", "must be"),
    (
        "tool_choice tool without a name",
        base(tool_choice={"type": "tool"}),
        "tool_choice",
        "must be",
    ),
    (
        "a text format",
        base(output_config={"format": {"type": "text"}}),
        "output_config.format",
        "json_schema",
    ),
    (
        "a format without a schema",
        base(output_config={"format": {"type": "json_schema"}}),
        "output_config.format",
        "schema",
    ),
    ("stop_sequences a string", base(stop_sequences="END"), "stop_sequences", "list of strings"),
    ("stream not a boolean", base(stream="yes"), "stream", "boolean"),
    ("metadata not an object", base(metadata="x"), "metadata", "object"),
    (
        "a tool_use without an id",
        base(
            messages=[
                {"role": "assistant", "content": [{"type": "tool_use", "name": "f", "input": {}}]},
                USER,
            ]
        ),
        "messages.0.content.0",
        "`id`",
    ),
    (
        "a tool_result without its id",
        base(messages=[{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]),
        "messages.0.content.0",
        "tool_use_id",
    ),
]


@pytest.mark.parametrize(
    ("body", "param", "says"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_a_request_cortex_cannot_serve_is_a_400_naming_it(
    body: dict[str, Any], param: str, says: str
) -> None:
    with pytest.raises(InvalidRequest) as exc:
        to_chat(body)
    assert exc.value.status == 400
    assert exc.value.param == param, exc.value.message
    assert says in exc.value.message, exc.value.message


def test_count_tokens_is_a_one_token_chat_of_the_same_prompt() -> None:
    body = base(system="S", tools=[WEATHER], tool_choice={"type": "any"})
    del body["max_tokens"]  # count_tokens takes none
    chat = count_chat({**body, "output_config": {"format": {"type": "json_schema", "schema": {}}}})
    assert chat == {
        "model": "m",
        "messages": [{"role": "system", "content": "S"}, USER],
        "tools": [WEATHER_FN],
        "max_tokens": 1,
    }
    # "none" hides the tools from the prompt: kept.
    assert count_chat({**body, "tool_choice": {"type": "none"}})["tool_choice"] == "none"


# -- chat answer -> message ----------------------------------------------------------------


def chat_answer(
    message: dict[str, Any], finish: str | None = "stop", **choice: Any
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1234abcd-aaaa",
        "object": "chat.completion",
        "model": "smollm2-135m",
        "choices": [{"index": 0, "message": message, "finish_reason": finish, **choice}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
    }


def test_a_text_answer() -> None:
    msg = to_message(chat_answer({"role": "assistant", "content": "Paris."}), "asked")
    assert msg == {
        "id": "msg_1234abcdaaaa",
        "type": "message",
        "role": "assistant",
        "model": "smollm2-135m",
        "content": [{"type": "text", "text": "Paris."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 5},
    }
    anthropic.types.Message.model_validate(msg)


def test_a_tool_call_answer() -> None:
    call = {
        "id": "call-1",
        "type": "function",
        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
    }
    msg = to_message(
        chat_answer(
            {"role": "assistant", "content": "Let me see.", "tool_calls": [call]}, "tool_calls"
        ),
        "m",
    )
    assert msg["content"] == [
        {"type": "text", "text": "Let me see."},
        {"type": "tool_use", "id": "call-1", "name": "weather", "input": {"city": "Paris"}},
    ]
    assert msg["stop_reason"] == "tool_use"
    parsed = anthropic.types.Message.model_validate(msg)
    assert isinstance(parsed.content[1], anthropic.types.ToolUseBlock)


def test_an_empty_answer_has_no_blocks_and_the_asked_model_when_the_chat_has_none() -> None:
    chat = chat_answer({"role": "assistant", "content": None}, "length")
    del chat["model"], chat["usage"]
    msg = to_message(chat, "asked")
    assert (msg["content"], msg["model"], msg["stop_reason"]) == ([], "asked", "max_tokens")
    assert msg["usage"] == {"input_tokens": 0, "output_tokens": 0}


STOPS: list[tuple[Any, Any, tuple[str, ...], bool, tuple[str, str | None]]] = [
    ("stop", None, (), False, ("end_turn", None)),
    ("stop", None, ("END",), False, ("end_turn", None)),
    # The runner names the stop sequence that matched (vLLM's `stop_reason`).
    ("stop", "END", ("\n\n", "END"), False, ("stop_sequence", "END")),
    # An end-of-turn token id, or a string that was not asked for: the turn's end.
    ("stop", 2, ("END",), False, ("end_turn", None)),
    ("stop", "other", ("END",), False, ("end_turn", None)),
    ("length", None, (), False, ("max_tokens", None)),
    ("length", None, (), True, ("max_tokens", None)),
    ("tool_calls", None, (), True, ("tool_use", None)),
    ("stop", None, (), True, ("tool_use", None)),
    (None, None, (), False, ("end_turn", None)),
]


@pytest.mark.parametrize(("finish", "matched", "stops", "calls", "want"), STOPS)
def test_stop_reason(
    finish: Any, matched: Any, stops: tuple[str, ...], calls: bool, want: tuple[str, str | None]
) -> None:
    assert stop_reason(finish, matched, stops, calls) == want


def test_a_stop_sequence_answer() -> None:
    chat = chat_answer({"role": "assistant", "content": "1, 2, 3"}, "stop", stop_reason="4")
    msg = MessagesDialect("m", ("4",)).answer(chat)
    assert (msg["stop_reason"], msg["stop_sequence"]) == ("stop_sequence", "4")


def test_count_tokens_answer_is_the_prompt_count() -> None:
    assert CountDialect().answer(chat_answer({"role": "assistant", "content": "x"})) == {
        "input_tokens": 12
    }
    with pytest.raises(UpstreamError):
        CountDialect().answer({"choices": []})


# -- chat stream -> events -----------------------------------------------------------------


def frame(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def chunk(delta: dict[str, Any], finish: str | None = None, **choice: Any) -> bytes:
    return frame(
        {
            "id": "chatcmpl-77",
            "object": "chat.completion.chunk",
            "model": "smollm2-135m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **choice}],
        }
    )


USAGE = frame(
    {"id": "chatcmpl-77", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}}
)
DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keepalive\n\n"
# As mlx_lm.server streams through the neuron: prefill keepalives, one frame per token,
# the finish frame, the usage frame, [DONE].
TEXT_STREAM = b"".join(
    [
        b": keepalive 12/40\n\n",
        chunk({"role": "assistant", "content": "The"}),
        chunk({"role": "assistant", "content": " capital"}),
        KEEPALIVE,
        chunk({"role": "assistant", "content": " is Paris \u00e9\u4e2d."}),
        chunk({"role": "assistant"}, "stop"),
        USAGE,
        DONE,
    ]
)
CALL = {
    "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
    "type": "function",
    "id": "call-9",
    "index": 0,
}
TOOL_STREAM = b"".join(
    [
        chunk({"role": "assistant", "content": "Checking."}),
        chunk({"role": "assistant", "tool_calls": [CALL]}, "tool_calls"),
        USAGE,
        DONE,
    ]
)


def parse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """The (event, data) pairs of an Anthropic SSE body, each checked against the SDK."""
    out = []
    assert raw.endswith(b"\n\n"), raw[-40:]
    for block in raw.decode().split("\n\n")[:-1]:
        lines = block.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), block
        kind, data = lines[0][7:], json.loads(lines[1][6:])
        assert data["type"] == kind
        if kind not in ("ping", "error"):
            EVENTS.validate_python(data)
        out.append((kind, data))
    return out


def splits(raw: bytes) -> list[list[bytes]]:
    """The stream in one piece, byte by byte, and cut every 2..13 bytes (odd places,
    inside JSON, inside a UTF-8 character, inside `data: [DONE]`)."""
    out = [[raw], [raw[i : i + 1] for i in range(len(raw))]]
    out += [[raw[i : i + n] for i in range(0, len(raw), n)] for n in range(2, 14)]
    return out


def transcode(pieces: list[bytes], stops: tuple[str, ...] = ()) -> bytes:
    xl = MessagesDialect("asked", stops).transcoder()
    return b"".join(xl.feed(p) for p in pieces)


def test_a_text_stream_is_the_exact_event_sequence_however_it_is_split() -> None:
    whole = transcode([TEXT_STREAM])
    for pieces in splits(TEXT_STREAM):
        assert transcode(pieces) == whole
    events = parse(whole)
    assert [k for k, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "ping",  # the keepalive while the runner was silent
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["id"] == "msg_77" and start["model"] == "smollm2-135m"
    assert start["content"] == [] and start["stop_reason"] is None
    assert events[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    text = "".join(d["delta"]["text"] for k, d in events if k == "content_block_delta")
    assert text == "The capital is Paris \u00e9\u4e2d."
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"input_tokens": 9, "output_tokens": 3},
    }


def test_a_tool_call_stream_is_a_text_block_then_a_tool_use_block() -> None:
    whole = transcode([TOOL_STREAM])
    for pieces in splits(TOOL_STREAM)[:4]:
        assert transcode(pieces) == whole
    events = parse(whole)
    assert [(k, d.get("index")) for k, d in events] == [
        ("message_start", None),
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert events[4][1]["content_block"] == {
        "type": "tool_use",
        "id": "call-9",
        "name": "weather",
        "input": {},
    }
    assert events[5][1]["delta"] == {
        "type": "input_json_delta",
        "partial_json": '{"city": "Paris"}',
    }
    assert events[7][1]["delta"]["stop_reason"] == "tool_use"


def test_tool_arguments_streamed_in_pieces_and_two_calls() -> None:
    """An OpenAI-style stream: a call's id and name first, its arguments in pieces
    under the same index, then a second call."""
    first = {"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": ""}}
    raw = b"".join(
        [
            chunk({"tool_calls": [first]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x":'}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}),
            chunk(
                {
                    "tool_calls": [
                        {"index": 1, "id": "b", "function": {"name": "g", "arguments": "{}"}}
                    ]
                }
            ),
            chunk({}, "tool_calls"),
            DONE,
        ]
    )
    events = parse(transcode([raw]))
    starts = [d["content_block"] for k, d in events if k == "content_block_start"]
    assert [(b["id"], b["name"]) for b in starts] == [("a", "f"), ("b", "g")]
    pieces = [
        (d["index"], d["delta"]["partial_json"]) for k, d in events if k == "content_block_delta"
    ]
    assert pieces == [(0, '{"x":'), (0, " 1}"), (1, "{}")]


def test_a_stop_sequence_and_the_token_limit_in_a_stream() -> None:
    raw = chunk({"content": "1, 2, 3"}) + chunk({}, "stop", stop_reason="4") + USAGE + DONE
    delta = parse(transcode([raw], ("4",)))[-2][1]["delta"]
    assert delta == {"stop_reason": "stop_sequence", "stop_sequence": "4"}
    raw = chunk({"content": "1, 2"}) + chunk({}, "length") + USAGE + DONE
    assert parse(transcode([raw]))[-2][1]["delta"]["stop_reason"] == "max_tokens"


def test_usage_from_the_neurons_comment_when_there_is_no_usage_frame() -> None:
    raw = (
        chunk({"content": "x"})
        + chunk({}, "stop")
        + b': usage {"prompt_tokens":4,"completion_tokens":2}\n\n'
        + DONE
    )
    events = parse(transcode([raw]))
    assert events[-2][1]["usage"] == {"input_tokens": 4, "output_tokens": 2}
    assert "ping" not in [k for k, _ in events]


# The neuron's error frame as it sends it now (shared.errors), and as one older than
# issue 19 did (the status in `code`): both end in [DONE].
LEGACY_FRAME = (
    frame({"error": {"message": "runner lost mid-stream", "type": "upstream_error", "code": 502}})
    + DONE
)


@pytest.mark.parametrize(
    ("err", "kind"),
    [
        (sse_error_frame("runner lost mid-stream"), "api_error"),
        (
            sse_error_frame("runner lost mid-stream", 503, "upstream_unavailable"),
            "overloaded_error",
        ),
        (LEGACY_FRAME, "api_error"),
    ],
)
def test_an_error_frame_mid_stream_is_an_error_event_never_a_clean_stop(
    err: bytes, kind: str
) -> None:
    """The neuron's runner lost: its error frame then [DONE] -> Anthropic's error event, last."""
    raw = chunk({"content": "The"}) + err
    for pieces in splits(raw)[:5]:
        events = parse(transcode(pieces))
        assert [k for k, _ in events] == [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "error",
        ]
    assert events[-1][1] == {
        "type": "error",
        "error": {"type": kind, "message": "runner lost mid-stream"},
    }


def test_cortex_cutting_a_stream_is_an_error_event_and_nothing_after() -> None:
    xl = MessageStream("m")
    head = xl.feed(chunk({"content": "The"}) + b'data: {"id": "chatcmpl-77", "cho')
    cut = xl.fail("replica a was lost mid-stream", 502)
    assert [k for k, _ in parse(head + cut)][-1] == "error"
    assert json.loads(cut.split(b"data: ")[1]) == error_body(502, "replica a was lost mid-stream")
    # Whatever comes after (the rest of a frame, [DONE], another cut) is not sent.
    assert xl.feed(b'ices": []}\n\n' + DONE) == b""
    assert xl.fail("again", 503) == b""
    # A drain's cut (503) after a complete stream sends nothing either.
    done = MessageStream("m")
    done.feed(TEXT_STREAM)
    assert done.fail("shutting down", 503) == b""


def test_keepalives_before_the_first_token_send_nothing_after_it_a_ping() -> None:
    xl = MessageStream("m")
    assert xl.feed(KEEPALIVE + b": keepalive 3/9\n\n") == b""
    out = xl.feed(chunk({"content": "a"}) + KEEPALIVE)
    assert [k for k, _ in parse(out)] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "ping",
    ]


def test_done_without_tokens_still_starts_and_ends_the_message() -> None:
    events = parse(transcode([DONE]))
    assert [k for k, _ in events] == ["message_start", "message_delta", "message_stop"]


# -- errors -> Anthropic's envelope --------------------------------------------------------


ERRORS: list[tuple[ApiError, int, str]] = [
    (InvalidRequest("bad", param="x"), 400, "invalid_request_error"),
    (InvalidApiKey("unknown API key"), 401, "authentication_error"),
    (ModelNotAllowed("not this one"), 403, "permission_error"),
    (ModelNotFound("no such model"), 404, "not_found_error"),
    (RequestTooLarge("too big"), 413, "request_too_large"),
    (QueueFull("full"), 429, "rate_limit_error"),
    (ModelLoading("loading"), 503, "overloaded_error"),
    (UpstreamUnavailable("gone"), 503, "overloaded_error"),
    (UpstreamError("odd"), 502, "api_error"),
    (ApiError("bug"), 500, "api_error"),
]


@pytest.mark.parametrize(("exc", "status", "kind"), ERRORS)
def test_errors_keep_our_status_and_retry_after_in_anthropics_envelope(
    exc: ApiError, status: int, kind: str
) -> None:
    resp = render_error(exc)
    assert resp.status == status
    assert resp.body is not None and isinstance(resp.body, bytes)
    assert json.loads(resp.body) == {
        "type": "error",
        "error": {"type": kind, "message": exc.message},
    }
    assert resp.headers.get("Retry-After") == (
        None if exc.retry_after is None else str(exc.retry_after)
    )


@pytest.mark.parametrize(
    "chat",
    [{}, {"choices": {}}, {"choices": [None]}, {"choices": [{"message": "x"}]}, {"usage": "x"}],
)
def test_a_malformed_chat_answer_is_an_empty_message_not_a_crash(chat: dict[str, Any]) -> None:
    msg = to_message(chat, "asked")
    assert (msg["content"], msg["stop_reason"], msg["model"]) == ([], "end_turn", "asked")
    anthropic.types.Message.model_validate(msg)


def test_a_lone_surrogate_in_the_runners_text_is_escaped_not_an_error() -> None:
    raw = b'data: {"choices": [{"delta": {"content": "a\\ud800b"}}]}\n\n' + DONE
    events = parse(transcode([raw]))
    assert [d["delta"]["text"] for k, d in events if k == "content_block_delta"] == ["a\ud800b"]
