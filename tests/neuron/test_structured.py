"""Structured output and forced tool calls: the request check, the grammar, the mask, and a
real neuron whose runner enforces them on the demo model (random weights: only the mask
can make its answers valid JSON) and on a two-rank group.

The real model's tool calls and answers are tested from the clients' side
(tests/clients/test_structured_output.py).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from openai import BadRequestError, OpenAI

from neuron.runner.constrained import GrammarMask, build_lltokenizer, tool_markers
from neuron.runner.grammar import (
    HERMES_MARKERS,
    WIRE_FIELD,
    Constraint,
    GrammarError,
    Tool,
    check,
    lark,
)
from neuron.runner.request_check import Kind, ModelInfo, check_constraint, validate
from shared.errors import InvalidRequest
from tests.conftest import NeuronProcess, free_port, stop_quietly

# Nested objects, enums, bounded integers and strings: a random model must end it.
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo", "Lima"]},
                "zip": {"type": "integer", "minimum": 0, "maximum": 99999},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
JSON_SCHEMA: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Oslo"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS: Any = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time"}},
]
CHAT: Any = [{"role": "user", "content": "A person, as JSON"}]


@pytest.fixture(scope="module")
def info(demo_model: Path) -> ModelInfo:
    return ModelInfo.load(demo_model)


def drafted(body: dict[str, Any], info: ModelInfo, kind: Kind = "chat") -> dict[str, Any]:
    """The runner's body for `body` (messages added), its constraint compiled."""
    draft = validate({"model": "m", "messages": CHAT, "prompt": "p", **body}, kind, info)
    check_constraint(draft)
    return draft.body


def refusal(body: dict[str, Any], info: ModelInfo, kind: Kind = "chat") -> InvalidRequest:
    with pytest.raises(InvalidRequest) as exc:
        drafted(body, info, kind)
    return exc.value


# --- the request check ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "wire"),
    [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, Constraint(schema={"type": "object"})),
        ({"response_format": JSON_SCHEMA}, Constraint(schema=SCHEMA)),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": SCHEMA, "strict": True},
                }
            },
            Constraint(schema=SCHEMA),
        ),
        ({"tools": TOOLS}, None),
        ({"tools": TOOLS, "tool_choice": "auto"}, None),
        ({"tools": TOOLS, "tool_choice": "none"}, None),
        (
            {"tools": TOOLS, "tool_choice": "required"},
            Constraint(
                tools=(Tool("get_weather", WEATHER), Tool("get_time", None)), tool_required=True
            ),
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
            Constraint(tools=(Tool("get_time", None),), tool_required=True),
        ),
        # A JSON answer, or a call of one of the tools: the grammar allows either.
        (
            {"tools": TOOLS, "response_format": JSON_SCHEMA},
            Constraint(schema=SCHEMA, tools=(Tool("get_weather", WEATHER), Tool("get_time", None))),
        ),
        (
            {"tools": TOOLS, "tool_choice": "none", "response_format": JSON_SCHEMA},
            Constraint(schema=SCHEMA),
        ),
    ],
)
def test_accepted_shapes_and_what_the_runner_is_sent(
    body: dict[str, Any], wire: Constraint | None, info: ModelInfo
) -> None:
    out = drafted(body, info)
    assert out.get(WIRE_FIELD) == (None if wire is None else wire.to_wire())
    assert "response_format" not in out and "tool_choice" not in out
    # The tools are shown to the template unless the choice is "none".
    assert ("tools" in out) == ("tools" in body and body.get("tool_choice") != "none")


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"response_format": "json"}, "response_format", "json_object"),
        ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "`json_schema` object"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": "x"}}},
            "response_format",
            "JSON schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {}, "strict": "y"},
                }
            },
            "response_format",
            "boolean",
        ),
        ({"tool_choice": "any", "tools": TOOLS}, "tool_choice", '"required"'),
        ({"tool_choice": {"type": "function"}, "tools": TOOLS}, "tool_choice", "function"),
        ({"tool_choice": "required"}, "tool_choice", "non-empty `tools`"),
        ({"tool_choice": "required", "tools": []}, "tool_choice", "non-empty `tools`"),
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS},
            "tool_choice",
            "'nope'",
        ),
        (
            {"tool_choice": "required", "tools": [{"function": {"name": "f", "parameters": 3}}]},
            "tools",
            "'f'",
        ),
    ],
)
def test_refused_shapes_name_the_field(
    body: dict[str, Any], param: str, says: str, info: ModelInfo
) -> None:
    exc = refusal(body, info)
    assert exc.status == 400 and exc.param == param
    assert says in exc.message, exc.message


def test_completions_take_no_response_format(info: ModelInfo) -> None:
    assert (
        drafted({"response_format": {"type": "text"}}, info, "completions").get(WIRE_FIELD) is None
    )
    exc = refusal({"response_format": {"type": "json_object"}}, info, "completions")
    assert exc.param == "response_format" and "chat/completions" in exc.message


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "strin"}},
                }
            },
            "response_format",
            "Invalid type: strin",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"if": {}}}}},
            "response_format",
            'Unimplemented keys: ["if"]',
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"$ref": "#/$defs/missing"}},
                }
            },
            "response_format",
            "/$defs/missing",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": False}}},
            "response_format",
            "matches no answer",
        ),
        (
            {
                "tool_choice": "required",
                "tools": [
                    {
                        "function": {
                            "name": "f",
                            "parameters": {"type": "array", "uniqueItems": True},
                        }
                    }
                ],
            },
            "tools",
            "'f'",
        ),
    ],
)
def test_a_schema_llguidance_cannot_compile_is_a_400_naming_the_problem(
    body: dict[str, Any], param: str, says: str, info: ModelInfo
) -> None:
    exc = refusal(body, info)
    assert exc.param == param and says in exc.message, exc.message


# --- the grammar (pure) ----------------------------------------------------------------


def test_grammar_shapes() -> None:
    answer = lark(Constraint(schema=SCHEMA), HERMES_MARKERS)
    assert answer.startswith("start: answer\n") and "call" not in answer
    tools = (Tool("f", None),)
    forced = lark(Constraint(tools=tools, tool_required=True), ("<a>", "</a>"))
    assert forced.startswith("start: call\n") and '"<a>\\n"' in forced and '"\\n</a>"' in forced
    either = lark(Constraint(schema=SCHEMA, tools=tools), HERMES_MARKERS)
    assert either.startswith("start: answer | call\n")
    # A model without a tool-call format: a JSON answer still, a forced call never.
    assert lark(Constraint(schema=SCHEMA, tools=tools), None).startswith("start: answer\n")
    with pytest.raises(GrammarError) as exc:
        lark(Constraint(tools=tools, tool_required=True), None)
    assert exc.value.param == "tool_choice" and "tool-call format" in exc.value.message


def test_constraint_wire_round_trip() -> None:
    c = Constraint(schema=SCHEMA, tools=(Tool("f", WEATHER), Tool("g", None)), tool_required=False)
    assert Constraint.from_wire(json.loads(json.dumps(c.to_wire()))) == c
    bad: Any
    for bad in (None, [], {"tools": "x"}, {"tools": [{"parameters": {}}]}):
        with pytest.raises(ValueError, match="neuron_constraint"):
            Constraint.from_wire(bad)


def test_check_accepts_what_the_request_check_builds() -> None:
    check(Constraint(schema=True))
    check(Constraint(schema=SCHEMA, tools=(Tool("f", WEATHER),)))
    check(Constraint(tools=(Tool("f", None), Tool("g", {"properties": {}})), tool_required=True))


# --- the mask (mlx, no runner) -----------------------------------------------------------


class _Wrapper:
    """What build_lltokenizer reads off mlx_lm's TokenizerWrapper."""

    def __init__(self, tokenizer: Any, eos: list[int]) -> None:
        self.backend_tokenizer = tokenizer
        self.eos_token_ids = eos
        self.has_tool_calling = False


@pytest.fixture(scope="module")
def demo_tokens(demo_model: Path) -> tuple[Any, Any, int]:
    """(the demo's tokenizers.Tokenizer, its llguidance tokenizer, its EOS id)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(demo_model / "tokenizer.json"))
    eos = tok.token_to_id("<|end|>")
    assert isinstance(eos, int)
    return tok, build_lltokenizer(_Wrapper(tok, [eos])), eos


def _random_walk(mask: GrammarMask, width: int, eos: int, seed: int) -> list[int]:
    """Decode with random logits through the mask (a random model), until EOS."""
    import mlx.core as mx

    rng = np.random.default_rng(seed)
    tokens = [0]  # the prompt
    for _ in range(500):
        logits = mx.array(rng.normal(size=(1, width)).astype(np.float32) * 5)
        token: Any = mx.argmax(mask(mx.array(tokens), logits), axis=-1).item()
        if token == eos:
            return tokens[1:]
        tokens.append(token)
    raise AssertionError(f"no EOS after {len(tokens)} tokens")


@pytest.mark.parametrize("seed", range(5))
def test_the_mask_makes_random_logits_valid_json(
    demo_tokens: tuple[Any, Any, int], seed: int
) -> None:
    tok, lltok, eos = demo_tokens
    # The model's logits may be wider than the tokenizer: the extra ids are never allowed.
    width = lltok.vocab_size + 7
    mask = GrammarMask.create(lltok, lark(Constraint(schema=SCHEMA), None))
    tokens = _random_walk(mask, width, eos, seed)
    assert max(tokens) < lltok.vocab_size
    answer = json.loads(tok.decode(tokens))
    jsonschema.validate(answer, SCHEMA)
    assert mask.matcher.is_stopped()


def test_the_mask_forces_a_tool_call(demo_tokens: tuple[Any, Any, int]) -> None:
    tok, lltok, eos = demo_tokens
    closed = {"type": "object", "properties": {}, "additionalProperties": False}
    tools = (Tool("get_weather", WEATHER), Tool("get_time", closed))
    grammar = lark(Constraint(tools=tools, tool_required=True), HERMES_MARKERS)
    text = tok.decode(_random_walk(GrammarMask.create(lltok, grammar), lltok.vocab_size, eos, 1))
    assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>"), text
    call = json.loads(text.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))
    assert list(call) == ["name", "arguments"] and call["name"] in ("get_weather", "get_time")
    if call["name"] == "get_weather":
        jsonschema.validate(call["arguments"], WEATHER)


def test_json_object_allows_any_object_and_ends_after_it(demo_tokens: tuple[Any, Any, int]) -> None:
    """`json_object` (random weights rarely close one: walked by hand here)."""
    import mlx.core as mx

    tok, lltok, eos = demo_tokens
    grammar = lark(Constraint(schema={"type": "object"}), None)
    ids = tok.encode('{"a": [1, {"b": null}], "c": "d"}', add_special_tokens=False).ids
    mask = GrammarMask.create(lltok, grammar)
    width = lltok.vocab_size
    seen = [0]
    for i, token in enumerate([*ids, eos]):
        allowed = np.isfinite(np.array(mask(mx.array(seen), mx.zeros((1, width)))[0]))
        assert allowed[token], (i, tok.decode(seen[1:]))
        assert allowed[eos] == (i == len(ids)), i  # EOS once the object is whole, only then
        seen.append(token)
    assert allowed.nonzero()[0].tolist() == [eos]
    not_an_object = GrammarMask.create(lltok, grammar)
    first = np.array(not_an_object(mx.array([0]), mx.zeros((1, width)))[0])
    assert not np.isfinite(first[tok.encode("[", add_special_tokens=False).ids[0]])


def test_tool_parameters_keep_their_defs(demo_tokens: tuple[Any, Any, int]) -> None:
    """pydantic's nested models: `$defs` and `#/$defs/...` refs inside the parameters."""
    tok, lltok, eos = demo_tokens
    params = {
        "$defs": {
            "Place": {
                "type": "object",
                "properties": {"city": {"enum": ["Oslo", "Lima"]}},
                "required": ["city"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"place": {"$ref": "#/$defs/Place"}},
        "required": ["place"],
        "additionalProperties": False,
    }
    forced = Constraint(tools=(Tool("visit", params),), tool_required=True)
    check(forced)
    walk = _random_walk(
        GrammarMask.create(lltok, lark(forced, HERMES_MARKERS)), lltok.vocab_size, eos, 3
    )
    call = json.loads(tok.decode(walk).removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))
    assert call["name"] == "visit"
    jsonschema.validate(call["arguments"], params)


def test_a_broken_matcher_ends_the_answer(demo_tokens: tuple[Any, Any, int]) -> None:
    """A token the grammar refused (it cannot be sampled, but say a bug): only EOS is left."""
    import mlx.core as mx

    tok, lltok, eos = demo_tokens
    mask = GrammarMask.create(lltok, lark(Constraint(schema=SCHEMA), None))
    width = lltok.vocab_size
    first = mask(mx.array([0]), mx.zeros((1, width)))
    brace = tok.encode("{", add_special_tokens=False).ids[0]
    assert np.isfinite(np.array(first[0, brace])) and not np.isfinite(np.array(first[0, eos + 1]))
    after = np.array(
        mask(mx.array([0, tok.encode("x", add_special_tokens=False).ids[0]]), mx.zeros((1, width)))
    )
    assert mask.matcher.is_error()
    assert np.isfinite(after[0]).nonzero()[0].tolist() == [eos]


def test_tool_markers_only_for_the_json_tools_format() -> None:
    class Tok:
        has_tool_calling = True
        tool_call_start, tool_call_end = HERMES_MARKERS

        def __init__(self, parser_module: str) -> None:
            def parse() -> None: ...

            parse.__module__ = parser_module
            self.tool_parser = parse

    assert tool_markers(Tok("mlx_lm.tool_parsers.json_tools")) == HERMES_MARKERS
    assert tool_markers(Tok("mlx_lm.tool_parsers.qwen3_coder")) is None
    assert tool_markers(_Wrapper(None, [0])) is None


# --- a real neuron and runner on the demo model --------------------------------------------

MODEL = f"demo-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def neuron(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Iterator[NeuronProcess]:
    n = NeuronProcess.start(tmp_path_factory.mktemp("neuron-structured"))
    try:
        n.load_ready(MODEL, demo_model)
        yield n
    finally:
        stop_quietly(n)


@pytest.fixture(scope="module")
def client(neuron: NeuronProcess) -> OpenAI:
    return OpenAI(base_url=neuron.url + "/v1", api_key="none", max_retries=0)


@pytest.mark.parametrize("seed", [1, 2])
def test_json_schema_answers_of_a_random_model_validate(client: OpenAI, seed: int) -> None:
    answer = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        response_format=JSON_SCHEMA,
        max_tokens=400,
        temperature=1.0,
        seed=seed,
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "stop", choice
    jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)


def test_json_schema_streamed(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        response_format=JSON_SCHEMA,
        max_tokens=400,
        temperature=1.0,
        stream=True,
    )
    text, finish = [], None
    for chunk in stream:
        for c in chunk.choices:
            text.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert finish == "stop"
    jsonschema.validate(json.loads("".join(text)), SCHEMA)


def test_bad_schema_is_refused_before_the_runner(client: OpenAI) -> None:
    with pytest.raises(BadRequestError) as exc:
        client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "strin"}},
            },
        )
    body: Any = exc.value.body
    assert body["param"] == "response_format" and "Invalid type: strin" in body["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_tool_call_on_a_model_without_a_tool_format_is_a_400(
    client: OpenAI, stream: bool
) -> None:
    """The demo's template has no tool calls: the runner says so, never a plain answer."""
    with pytest.raises(BadRequestError) as exc:
        client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            tools=TOOLS,
            tool_choice="required",
            max_tokens=50,
            stream=stream,
        )
    body: Any = exc.value.body
    assert body["param"] == "tool_choice" and "tool-call format" in body["message"], body


# --- a two-rank group --------------------------------------------------------------------


def test_a_ring_group_enforces_the_same_grammar_on_every_rank(
    neuron: NeuronProcess, neuron_factory: Any, demo_model: Path
) -> None:
    """Greedy constrained answers: the group's equals one rank's, and validates."""
    body = {
        "messages": CHAT,
        "response_format": JSON_SCHEMA,
        "max_tokens": 300,
        "temperature": 0.0,
    }
    single = chat_json(neuron, MODEL, body)
    n0, n1 = neuron, neuron_factory()
    model_id, group_id = f"grp-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    hosts = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    for rank, n in enumerate((n0, n1)):
        n.load(
            model_id,
            demo_model,
            group={
                "group_id": group_id,
                "rank": rank,
                "world_size": 2,
                "backend": "ring",
                "sharding": "tensor",
                "hosts": hosts,
            },
        )
    n0.wait_state(model_id, "ready")
    try:
        grouped = chat_json(n0, model_id, body)
        assert grouped == single
        jsonschema.validate(json.loads(grouped), SCHEMA)
    finally:
        for n in (n0, n1):
            n.post("/models/unload", {"model_id": model_id})


def chat_json(n: NeuronProcess, model_id: str, body: dict[str, Any]) -> str:
    status, answer = n.post("/v1/chat/completions", {"model": model_id, **body})
    assert status == 200, answer
    assert answer["choices"][0]["finish_reason"] == "stop", answer
    return str(answer["choices"][0]["message"]["content"])
