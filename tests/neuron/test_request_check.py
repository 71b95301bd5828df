"""The allow-list, unit by unit, with the demo model's real tokenizer and config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from neuron.runner.request_check import (
    BYTES_PER_TOKEN,
    TOP_LOGPROBS_MAX,
    Checked,
    Kind,
    ModelInfo,
    check_size,
    count_prompt,
    finish,
    validate,
)
from shared.assemble import assemble, data_events
from shared.errors import InvalidRequest

CHAT = [{"role": "user", "content": "Once upon a time"}]


@pytest.fixture(scope="module")
def info(demo_model: Path) -> ModelInfo:
    return ModelInfo.load(demo_model)


def check(body: dict[str, Any], info: ModelInfo, kind: Kind = "chat") -> Checked:
    draft = validate({"model": "m", **body}, kind, info)
    check_size(draft, info)
    return finish(draft, count_prompt(draft, info), info, default=512)


def refused(body: dict[str, Any], info: ModelInfo, kind: Kind = "chat") -> str | None:
    with pytest.raises(InvalidRequest) as exc:
        check(body, info, kind)
    return exc.value.param


def test_model_info_from_config_and_tokenizer(info: ModelInfo, demo_model: Path) -> None:
    """Context and vocabulary from config.json; a tokenizer from tokenizer.json."""
    config = json.loads((demo_model / "config.json").read_text())
    assert info.context_limit == config["max_position_embeddings"]
    assert info.vocab_size == config["vocab_size"]
    assert info.count_tokens(["Once upon a time"]) == len(
        info.tokenizer.encode("Once upon a time", add_special_tokens=False).ids
    )
    assert ModelInfo.load(demo_model, context_limit=100).context_limit == 100


def test_runner_body_is_built_from_the_allow_list_only(info: ModelInfo) -> None:
    """Paths and unknown fields never reach the runner; it always streams with usage."""
    c = check(
        {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}], "x": 1}],
            "draft_model": "/etc",
            "adapters": "/tmp/evil",
            "num_draft_tokens": 3,
            "role_mapping": {"user": "U"},
            "chat_template_kwargs": {"x": 1},
            "xtc_probability": 0.5,
            "whatever": True,
            "temperature": 0,
            "seed": 7,
            "stop": "\n",
            "logit_bias": {"1": -100},
            "user": "me",
        },
        info,
    )
    assert c.body == {
        "model": "default_model",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0,
        "seed": 7,
        "stop": ["\n"],
        "logit_bias": {"1": -100.0},
        "max_tokens": 512,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert (c.stream, c.include_usage, c.runner_stream) == (False, False, True)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"stop": [123]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"logit_bias": {"512": 1}}, "logit_bias"),
        ({"logit_bias": {"-1": 1}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 1000}}, "logit_bias"),
        ({"logit_bias": {"5": "1"}}, "logit_bias"),
        ({"top_k": 512}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_completion_tokens": 1.5}, "max_completion_tokens"),
        ({"n": 2}, "n"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": "y"}}, "stream_options"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"tools": "x"}, "tools"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"top_logprobs": 99}, "top_logprobs"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": "http://x"}]}
                ]
            },
            "messages",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}],
                    }
                ]
            },
            "messages",
        ),
    ],
)
def test_bad_chat_field_is_refused_naming_it(
    info: ModelInfo, body: dict[str, Any], param: str
) -> None:
    assert refused({"messages": CHAT, **body}, info) == param


@pytest.mark.parametrize("prompt", [123, ["a", "b"], [1, 2], None, "\udfff"])
def test_completions_prompt_must_be_a_string(info: ModelInfo, prompt: Any) -> None:
    assert refused({"prompt": prompt}, info, "completions") == "prompt"


def refusal(body: dict[str, Any], info: ModelInfo, kind: Kind = "chat") -> InvalidRequest:
    with pytest.raises(InvalidRequest) as exc:
        check(body, info, kind)
    return exc.value


@pytest.mark.parametrize(
    ("prompt", "says"),
    [
        ([1, 2, 3], "token ids is not supported"),
        ([[1, 2], [3]], "token ids is not supported"),
        ([[1, 2]], "token ids is not supported"),
        (["a", "b"], "batch of 2 strings is not supported"),
    ],
)
def test_prompt_shapes_the_runner_cannot_take_say_so(
    info: ModelInfo, prompt: Any, says: str
) -> None:
    """mlx_lm.server's tokenizer refuses ids and a list of strings kills its generation
    thread: both are a 400 that says what to send instead."""
    err = refusal({"prompt": prompt}, info, "completions")
    assert err.param == "prompt" and says in err.message, err.message


def test_a_list_of_one_prompt_is_that_prompt(info: ModelInfo) -> None:
    """What the openai SDK and LangChain send for one prompt."""
    c = check({"prompt": ["Once upon a time"]}, info, "completions")
    assert c.body["prompt"] == "Once upon a time"
    plain = check({"prompt": "Once upon a time"}, info, "completions")
    assert c.prompt_tokens == plain.prompt_tokens


@pytest.mark.parametrize(
    ("logprobs", "runner"),
    [
        (0, {"logprobs": True}),
        (2, {"logprobs": True, "top_logprobs": 2}),
        (TOP_LOGPROBS_MAX, {"logprobs": True, "top_logprobs": TOP_LOGPROBS_MAX}),
        (True, {"logprobs": True}),
        (False, {"logprobs": False}),
    ],
)
def test_completions_logprobs_integer_is_the_top_n(
    info: ModelInfo, logprobs: Any, runner: dict[str, Any]
) -> None:
    """OpenAI's legacy `logprobs: n` becomes the runner's `logprobs` + `top_logprobs`,
    asked unstreamed (only that answer carries them)."""
    c = check({"prompt": "hi", "logprobs": logprobs}, info, "completions")
    got = {k: c.body[k] for k in ("logprobs", "top_logprobs") if k in c.body}
    assert got == runner
    assert c.runner_stream is (logprobs is False)


@pytest.mark.parametrize("logprobs", [TOP_LOGPROBS_MAX + 1, -1, 2.0, "2", [2]])
def test_completions_logprobs_out_of_range_names_the_limit(info: ModelInfo, logprobs: Any) -> None:
    err = refusal({"prompt": "hi", "logprobs": logprobs}, info, "completions")
    assert err.param == "logprobs" and f"[0, {TOP_LOGPROBS_MAX}]" in err.message, err.message


def test_chat_logprobs_stay_a_boolean_with_top_logprobs_to_the_runner_limit(
    info: ModelInfo,
) -> None:
    c = check({"messages": CHAT, "logprobs": True, "top_logprobs": TOP_LOGPROBS_MAX}, info)
    assert (c.body["logprobs"], c.body["top_logprobs"]) == (True, TOP_LOGPROBS_MAX)
    assert refused({"messages": CHAT, "logprobs": 2}, info) == "logprobs"
    err = refusal({"messages": CHAT, "top_logprobs": TOP_LOGPROBS_MAX + 1}, info)
    assert err.param == "top_logprobs" and str(TOP_LOGPROBS_MAX) in err.message


def test_max_tokens_capped_at_the_context_left(info: ModelInfo) -> None:
    """A huge max_tokens, or none, never asks for more than the context holds."""
    c = check({"prompt": "Once upon a time", "max_tokens": 10**9}, info, "completions")
    assert c.prompt_tokens is not None and c.prompt_tokens > 1
    assert c.max_tokens == 4096 - c.prompt_tokens
    small = ModelInfo(context_limit=20, vocab_size=info.vocab_size, tokenizer=info.tokenizer)
    assert check({"messages": CHAT}, small).max_tokens < 20


def test_prompt_over_the_context_is_refused(info: ModelInfo) -> None:
    """Counted over the limit: 400; far over by bytes: 400 without tokenizing."""
    words = " ".join(f"w{i}" for i in range(3000))
    assert refused({"prompt": words}, info, "completions") == "prompt"
    assert refused({"messages": [{"role": "user", "content": words}]}, info) == "messages"
    no_tokenizer = ModelInfo(context_limit=10)
    huge = "a" * (10 * BYTES_PER_TOKEN + 1)
    assert refused({"prompt": huge}, no_tokenizer, "completions") == "prompt"


def test_logprobs_unstreamed_stay_unstreamed(info: ModelInfo) -> None:
    """Only the runner's unstreamed answer carries logprobs."""
    c = check({"messages": CHAT, "logprobs": True, "top_logprobs": 2}, info)
    assert not c.runner_stream and "stream" not in c.body
    s = check({"messages": CHAT, "logprobs": True, "stream": True}, info)
    assert s.runner_stream and s.body["stream_options"] == {"include_usage": True}


def test_a_model_without_tokenizer_or_config_still_gets_checked_fields(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    info = ModelInfo.load(tmp_path)
    c = check({"prompt": "x", "temperature": 0.5}, info, "completions")
    assert c.prompt_tokens is None and c.max_tokens == 512
    assert refused({"prompt": "x", "stop": [1]}, info, "completions") == "stop"
    # No vocabulary size known: no bound for an index, so no logit_bias at all.
    assert refused({"prompt": "x", "logit_bias": {"70000": 1}}, info, "completions") == (
        "logit_bias"
    )


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"messages": [{"role": [], "content": "x"}]}, "messages"),
        ({"temperature": 10**400}, "temperature"),
        ({"logit_bias": {"9" * 5000: 1}}, "logit_bias"),
        ({"logit_bias": {"5": 10**400}}, "logit_bias"),
        ({"tools": [{"type": "function", "function": {"name": "f", "d": "\ud800"}}]}, "tools"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [{"function": {"name": "f", "arguments": {"a": "\udfff"}}}],
                    }
                ]
            },
            "messages",
        ),
    ],
)
def test_odd_shapes_are_400_never_500(info: ModelInfo, extra: dict[str, Any], param: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    assert refused(body, info, "chat") == param


def test_tool_choice_none_hides_the_tools(info: ModelInfo) -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    chat = {"messages": [{"role": "user", "content": "hi"}], "tools": tools}
    assert "tools" in check(chat, info, "chat").body
    assert "tools" not in check({**chat, "tool_choice": "none"}, info, "chat").body


CHAT_STREAM = b"""data: {"id": "c1", "system_fingerprint": "fp", \
"object": "chat.completion.chunk", "model": "default_model", "created": 5, \
"choices": [{"index": 0, "finish_reason": null, \
"delta": {"role": "assistant", "content": "Hel"}}]}

: keepalive 1/2

data: {"id": "c1", "system_fingerprint": "fp", "object": "chat.completion.chunk", \
"model": "default_model", "created": 5, "choices": [{"index": 0, "finish_reason": null, \
"delta": {"role": "assistant", "reasoning": "hm", "tool_calls": [{"index": 0, "id": "t", \
"type": "function", "function": {"name": "f", "arguments": "{\\"a\\""}}]}}]}

data: {"id": "c1", "system_fingerprint": "fp", "object": "chat.completion.chunk", \
"model": "default_model", "created": 5, "choices": [{"index": 0, "finish_reason": "tool_calls", \
"delta": {"role": "assistant", "content": "lo", "tool_calls": [{"index": 0, \
"function": {"arguments": ": 1}"}}]}}]}

data: {"id": "c1", "object": "chat.completion", "model": "default_model", "created": 5, \
"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}

data: [DONE]

"""


def test_assemble_chat_with_reasoning_and_tool_calls() -> None:
    out = assemble(data_events(CHAT_STREAM))
    assert out == {
        "id": "c1",
        "object": "chat.completion",
        "created": 5,
        "model": "default_model",
        "system_fingerprint": "fp",
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": "Hello",
                    "reasoning": "hm",
                    "tool_calls": [
                        {
                            "id": "t",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"a": 1}'},
                        }
                    ],
                },
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def test_assemble_empty_chat_content_is_none() -> None:
    chunk = {"object": "chat.completion.chunk", "choices": [{"delta": {}, "finish_reason": "stop"}]}
    assert assemble([chunk])["choices"][0]["message"] == {"role": "assistant", "content": None}
