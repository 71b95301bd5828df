"""Structured output as a grammar: what a chat request forces, and its llguidance text (pure).

`response_format` (json_object, json_schema) and a forced `tool_choice`
("required", or one named function) become one `Constraint`.  The neuron builds
it from the request (neuron.runner.request_check), checks that llguidance
compiles every schema in it (a 400 naming the problem otherwise), and sends it
to the runner in the body's `neuron_constraint` field; the runner
(neuron.runner.constrained) turns it into a grammar with its tokenizer's
tool-call markers and masks every token that would break it.

The grammar is Lark with embedded JSON schemas (llguidance's `%json`):

    start: answer              response_format only
    start: call                a forced tool call
    start: answer | call       response_format next to tools the model may call
    answer: %json {schema}
    call: "<tool_call>\\n" (call_0 | call_1 ...) "\\n</tool_call>"
    call_0: %json {"name": first tool's name, "arguments": its parameters}

JSON comes out compact, with `, ` and `: ` between items: a grammar that allows
any whitespace lets a model (a random one always) pad an answer with blank
lines until max_tokens.  A call is `{"name": N, "arguments": {...}}` in that
order, which is what mlx_lm's json_tools parser reads between the markers.
Exactly one call: OpenAI's "required" is "at least one", and one is what the
markers' parser turns into one `tool_calls` entry.

llguidance was chosen on measurements (`python -m bench.grammar`, the real
model's 49k vocabulary): its mask costs 30-90 µs a token (xgrammar 5-15,
outlines-core 25-80; all under 0.1% of a ~145 ms decode step here), it
compiles the bench schema in ~1 ms (xgrammar 8-16 ms, outlines-core 1.1-1.8 s),
imports in 0.1 s and adds 8 MB with no dependencies (xgrammar imports torch in
2-6 s and adds 4.6 GB on Linux), and it takes what a regex cannot
(outlines-core's json_object takes 7 s to compile and stops three levels deep).
"""

from __future__ import annotations

import functools
import json
from typing import Any

import attrs

# How the grammar writes JSON (llguidance's JsonCompileOptions, as `x-guidance`).
JSON_STYLE: Any = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}
# The body field that carries a constraint from the neuron to its runner.
WIRE_FIELD = "neuron_constraint"
# mlx_lm's json_tools format (Hermes, Qwen 2.5, our SmolLM2 template).
HERMES_MARKERS = ("<tool_call>", "</tool_call>")


class GrammarError(ValueError):
    """A constraint llguidance cannot compile; `param` is the request field at fault."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@attrs.frozen
class Tool:
    """One function the answer may call: its name and its arguments' JSON schema."""

    name: str
    parameters: Any


@attrs.frozen
class Constraint:
    """What the runner forces: a JSON answer, a tool call, or either."""

    # The answer's JSON schema; None: a text answer is not constrained (or not allowed).
    schema: Any = None
    tools: tuple[Tool, ...] = ()
    # A tool call and nothing else (`tool_choice` "required" or named).
    tool_required: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "tools": [{"name": t.name, "parameters": t.parameters} for t in self.tools],
            "tool_required": self.tool_required,
        }

    @classmethod
    def from_wire(cls, raw: Any) -> Constraint:
        """The neuron's field back into a constraint; ValueError if it is not one."""
        if not isinstance(raw, dict) or not isinstance(raw.get("tools", []), list):
            raise ValueError(f"`{WIRE_FIELD}` must be an object with a `tools` list")
        tools = []
        for t in raw.get("tools", []):
            if not isinstance(t, dict) or not isinstance(t.get("name"), str):
                raise ValueError(f"`{WIRE_FIELD}` tools need a `name`")
            tools.append(Tool(t["name"], t.get("parameters")))
        return cls(raw.get("schema"), tuple(tools), raw.get("tool_required") is True)


def _styled(schema: Any) -> Any:
    """The schema with the compact JSON style; `true` is any JSON (`{}`)."""
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        return schema
    return {**schema, "x-guidance": JSON_STYLE}


def _arguments(parameters: Any) -> Any:
    """A tool's arguments: always an object (OpenAI's `parameters` may leave out the type)."""
    if parameters is None:
        return {"type": "object"}
    if isinstance(parameters, dict) and "type" not in parameters:
        return {**parameters, "type": "object"}
    return parameters


def call_schema(tool: Tool) -> dict[str, Any]:
    """A call of `tool` as one JSON object: its name, then its arguments.

    The arguments' `$defs` (pydantic writes nested models there) move to this
    object's root, where their `#/$defs/...` references now point.
    """
    arguments = _arguments(tool.parameters)
    hoisted = {}
    if isinstance(arguments, dict):
        hoisted = {k: arguments[k] for k in ("$defs", "definitions") if k in arguments}
        arguments = {k: v for k, v in arguments.items() if k not in hoisted}
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": arguments},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        **hoisted,
    }


def lark(c: Constraint, markers: tuple[str, str] | None) -> str:
    """The grammar text; `markers` are the model's tool-call start and end (None: it has none).

    Raises GrammarError (param tool_choice) for a forced call the model cannot make.
    """
    rules = []
    alternatives = []
    if c.schema is not None and not c.tool_required:
        alternatives.append("answer")
        rules.append(f"answer: %json {_json(_styled(c.schema))}")
    if c.tools and markers is not None:
        alternatives.append("call")
        start, end = _literal(markers[0] + "\n"), _literal("\n" + markers[1])
        names = [f"call_{i}" for i in range(len(c.tools))]
        rules.append(f"call: {start} ({' | '.join(names)}) {end}")
        for name, tool in zip(names, c.tools, strict=True):
            rules.append(f"{name}: %json {_json(_styled(call_schema(tool)))}")
    elif c.tool_required:
        raise GrammarError(
            "`tool_choice` cannot force a tool call on this model: its chat template has "
            "no tool-call format the runner can force (it needs "
            f"{HERMES_MARKERS[0]}{{json}}{HERMES_MARKERS[1]}, as Hermes and Qwen templates write)",
            "tool_choice",
        )
    if not alternatives:
        raise GrammarError("nothing to constrain", "response_format")
    return "start: " + " | ".join(alternatives) + "\n" + "\n".join(rules) + "\n"


def _json(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False, sort_keys=False)


def _literal(text: str) -> str:
    """A Lark string literal (JSON's escapes are Lark's)."""
    return json.dumps(text, ensure_ascii=False)


# Compile results are kept for this many texts, each at most this long (agents send
# the same schema with every request; a cache of 1 MB bodies would hold 256 MB).
CACHED = 256
CACHED_CHARS = 64 * 1024


def _schema_problem(schema_json: str) -> str:
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_json, defaults=JSON_STYLE)
        return str(llguidance.LLMatcher.validate_grammar(grammar))
    except (ValueError, TypeError, RuntimeError) as exc:
        return str(exc)


def _grammar_problem(grammar: str) -> str:
    import llguidance

    try:
        return str(
            llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(grammar))
        )
    except (ValueError, TypeError, RuntimeError) as exc:
        return str(exc)


_cached_schema_problem = functools.lru_cache(maxsize=CACHED)(_schema_problem)
_cached_grammar_problem = functools.lru_cache(maxsize=CACHED)(_grammar_problem)


def schema_problem(schema_json: str) -> str:
    """Why llguidance cannot compile this JSON schema ("" if it can); blocking."""
    if len(schema_json) > CACHED_CHARS:
        return _schema_problem(schema_json)
    return _cached_schema_problem(schema_json)


def grammar_problem(grammar: str) -> str:
    """Why llguidance cannot compile this grammar text ("" if it can), without a tokenizer."""
    if len(grammar) > CACHED_CHARS:
        return _grammar_problem(grammar)
    return _cached_grammar_problem(grammar)


def check(c: Constraint) -> None:
    """Compile every schema in `c`, and the grammar; GrammarError names the first that fails.

    Blocking (milliseconds for a big schema, nothing for one seen before).
    """
    if c.schema is False:
        raise GrammarError("`response_format` schema `false` matches no answer", "response_format")
    if c.schema is not None and not c.tool_required:
        problem = schema_problem(_json(_styled(c.schema)))
        if problem:
            raise GrammarError(
                f"`response_format` schema cannot be compiled: {problem}", "response_format"
            )
    for t in c.tools:
        problem = schema_problem(_json(_styled(call_schema(t))))
        if problem:
            raise GrammarError(
                f"`tools`: the parameters of {t.name!r} cannot be compiled: {problem}", "tools"
            )
    # Any markers do to check the grammar around the schemas.
    problem = grammar_problem(lark(c, HERMES_MARKERS))
    if problem:
        raise GrammarError(f"the constraint cannot be compiled: {problem}", _param(c))


def _param(c: Constraint) -> str:
    return "tool_choice" if c.tool_required else "response_format"
