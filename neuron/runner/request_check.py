"""What a runner may be asked: an allow-list of OpenAI fields, checked before any runner work.

`mlx_lm.server` reads fields from the body with almost no checks, and some kill
it: `stop: [123]` ends its generation thread, an out-of-vocabulary `logit_bias`
key segfaults it, `draft_model`/`adapters` make it open paths of the client's
choosing, image URLs make it fetch them.  So the runner's body is built here,
field by field, from checked values; unknown fields are dropped (OpenAI clients
send extras), a bad one is `InvalidRequest` naming it.  The prompt is counted
with the model's own tokenizer and refused when it does not fit the context;
`max_tokens` is capped at the context left, and at the catalogue's
`max_tokens_cap` for the model; a request without one gets the catalogue's
`max_tokens` (else the neuron's).  The catalogue's `chat_template_kwargs` reach
the runner on its command line; a client's own are dropped with the other
unknown fields: the template's variables are the operator's (a client that
wants thinking on asks for the catalogue entry that has it).  `response_format`
and a forced `tool_choice` become a constraint (neuron.runner.grammar) that the
runner enforces token by token; its schemas are compiled here first.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import attrs

from neuron.runner import grammar
from neuron.runner.grammar import WIRE_FIELD, Constraint, GrammarError, Tool
from shared.errors import InvalidRequest
from shared.runner_options import RunnerOptions

Kind = Literal["chat", "completions"]
# mlx_lm.server loads any other name from the hub; its own model is "default_model".
RUNNER_MODEL_NAME = "default_model"
MAX_STOP = 16
MAX_STOP_CHARS = 1000
MAX_TOOLS = 128
MAX_LOGIT_BIAS = 1024
# A byte-level BPE token is rarely longer than this: a prompt over
# `context_limit * BYTES_PER_TOKEN` bytes is refused without tokenizing it.
BYTES_PER_TOKEN = 16
# Chat template tokens around each message and after the last (role headers...).
PER_MESSAGE_TOKENS = 4
PER_PROMPT_TOKENS = 8
# What a chat template may add beyond that (a default system prompt, a date header,
# tool instructions): kept free when max_tokens is capped, so prompt + answer fit.
TEMPLATE_MARGIN_TOKENS = 64
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
SEED_MAX = 2**32 - 1
# mlx_lm.server's own bound on `top_logprobs` (validate_model_parameters: 0..11).
TOP_LOGPROBS_MAX = 11


@attrs.define(eq=False)
class ModelInfo:
    """What the checks need of one model: its context, vocabulary and tokenizer."""

    context_limit: int | None = None
    vocab_size: int | None = None
    # A `tokenizers.Tokenizer` (typed loosely: the library ships no stubs for mypy).
    tokenizer: Any = None
    # The catalogue's default max_tokens for the model, and the most a request gets.
    max_tokens: int | None = None
    max_tokens_cap: int | None = None

    @classmethod
    def load(
        cls,
        model_dir: Path,
        context_limit: int | None = None,
        options: RunnerOptions | None = None,
    ) -> ModelInfo:
        """Read config.json and tokenizer.json (blocking: call it off the event loop)."""
        config: dict[str, Any] = {}
        try:
            raw = json.loads((model_dir / "config.json").read_text())
            if isinstance(raw, dict):
                config = raw
        except (OSError, ValueError):
            pass
        text_config = config.get("text_config")
        if isinstance(text_config, dict):  # multimodal configs nest the language model's
            config = {**config, **text_config}
        vocab = _positive_int(config.get("vocab_size"))
        if context_limit is None:
            context_limit = _positive_int(config.get("max_position_embeddings"))
        tokenizer = None
        path = model_dir / "tokenizer.json"
        if path.is_file():
            from tokenizers import Tokenizer

            try:
                tokenizer = Tokenizer.from_file(str(path))
            except Exception:  # a tokenizer the library cannot read: count nothing
                tokenizer = None
        if vocab is None and tokenizer is not None:
            vocab = _positive_int(tokenizer.get_vocab_size())
        o = options if options is not None else RunnerOptions()
        return cls(
            context_limit=context_limit,
            vocab_size=vocab,
            tokenizer=tokenizer,
            max_tokens=o.max_tokens,
            max_tokens_cap=o.max_tokens_cap,
        )

    def count_tokens(self, texts: list[str]) -> int | None:
        """Tokens of `texts` together, None without a tokenizer (blocking)."""
        if self.tokenizer is None:
            return None
        if not texts:
            return 0
        encoded = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return sum(len(e.ids) for e in encoded)


def _positive_int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


@attrs.frozen
class Draft:
    """A request whose fields passed; its prompt not counted yet."""

    kind: Kind
    body: dict[str, Any]  # the runner's body, without max_tokens and stream settings
    stream: bool
    include_usage: bool
    wants_logprobs: bool
    max_tokens: int | None
    texts: list[str]  # the prompt's text, to count
    overhead: int  # tokens the template adds around those texts
    prompt_bytes: int
    # What the runner must force (structured output, a tool call); compiled by
    # neuron.runner.grammar.check off the event loop before the request goes on.
    constraint: Constraint | None = None


@attrs.frozen
class Checked:
    """The runner's body, and how the client wants the answer."""

    body: dict[str, Any]
    stream: bool  # the client asked for a stream
    include_usage: bool  # ... and for the usage frame in it
    runner_stream: bool  # the runner is asked to stream (always, but logprobs unary)
    prompt_tokens: int | None
    max_tokens: int


def _bad(param: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"`{param}` {what}", param=param)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    # Integers are finite (and math.isfinite overflows on a 400-digit one).
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _text(v: Any, param: str) -> str:
    """A string that encodes as UTF-8 (no lone surrogates)."""
    if not isinstance(v, str):
        raise _bad(param, "must be a string")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _bad(param, f"is not valid Unicode ({exc.reason})") from exc
    return v


def _number(lo: float, hi: float) -> Callable[[Any, str], Any]:
    def check(v: Any, param: str) -> Any:
        if not _is_number(v) or not lo <= v <= hi:
            raise _bad(param, f"must be a number in [{lo:g}, {hi:g}]")
        return v

    return check


def _integer(lo: int, hi: int) -> Callable[[Any, str], Any]:
    def check(v: Any, param: str) -> Any:
        if not _is_int(v) or not lo <= v <= hi:
            raise _bad(param, f"must be an integer in [{lo}, {hi}]")
        return v

    return check


def _boolean(v: Any, param: str) -> Any:
    if not isinstance(v, bool):
        raise _bad(param, "must be a boolean")
    return v


def _stop(v: Any, param: str) -> Any:
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or len(items) > MAX_STOP:
        raise _bad(param, f"must be a string or a list of at most {MAX_STOP} strings")
    for s in items:
        _text(s, param)
        if not s or len(s) > MAX_STOP_CHARS:
            raise _bad(param, f"strings must have 1 to {MAX_STOP_CHARS} characters")
    return items


# Sampling fields: checked, then passed on as they are.
SAMPLING: dict[str, Callable[[Any, str], Any]] = {
    "temperature": _number(0, 100),
    "top_p": _number(0, 1),
    "min_p": _number(0, 1),
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "repetition_penalty": _number(0, 10),
    "seed": _integer(0, SEED_MAX),
    "top_logprobs": _integer(0, TOP_LOGPROBS_MAX),
    "stop": _stop,
}


def _logit_bias(v: Any, vocab: int | None) -> dict[str, float]:
    if vocab is None:
        # An index outside the vocabulary segfaults the runner: no bound, no bias.
        raise _bad("logit_bias", "is not supported for a model of unknown vocabulary size")
    if not isinstance(v, dict) or len(v) > MAX_LOGIT_BIAS:
        raise _bad("logit_bias", f"must be an object of at most {MAX_LOGIT_BIAS} entries")
    out: dict[str, float] = {}
    for k, bias in v.items():
        token = int(k) if k.isascii() and k.isdigit() and len(k) <= 10 else -1
        if not 0 <= token < vocab:
            raise _bad("logit_bias", f"key {k[:40]!r} is not a token id (0 to {vocab - 1})")
        if not _is_number(bias) or not -100 <= bias <= 100:
            raise _bad("logit_bias", f"value for {k!r} must be a number in [-100, 100]")
        out[str(token)] = float(bias)
    return out


def _content(v: Any, param: str) -> str:
    """Message content as text: a string, null, or a list of text parts."""
    if v is None:
        return ""
    if isinstance(v, str):
        return _text(v, param)
    if not isinstance(v, list):
        raise _bad(param, "must be a string or a list of text parts")
    parts = []
    for i, part in enumerate(v):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise _bad(param, f"part {i}: only text parts are supported")
        parts.append(_text(part.get("text"), param))
    return "".join(parts)


def _tool_calls(v: Any, param: str) -> list[dict[str, Any]]:
    if not isinstance(v, list):
        raise _bad(param, "must be a list")
    out = []
    for i, call in enumerate(v):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(param, f"call {i} needs a `function` with a `name`")
        args = fn.get("arguments", "{}")
        # The runner parses string arguments as JSON in its generation thread.
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError as exc:
                raise _bad(param, f"call {i}: arguments are not JSON") from exc
        if not isinstance(args, dict):
            raise _bad(param, f"call {i}: arguments must be a JSON object")
        entry: dict[str, Any] = {
            "type": "function",
            "function": {"name": _text(fn["name"], param), "arguments": args},
        }
        if "id" in call:
            entry["id"] = _text(call["id"], param)
        out.append(entry)
    return out


def _messages(v: Any) -> tuple[list[dict[str, Any]], list[str]]:
    if not isinstance(v, list) or not v:
        raise _bad("messages", "must be a non-empty list of messages")
    out, texts = [], []
    for i, msg in enumerate(v):
        if not isinstance(msg, dict):
            raise _bad("messages", f"[{i}] must be an object")
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise _bad("messages", f"[{i}].role must be one of {', '.join(sorted(ROLES))}")
        text = _content(msg.get("content"), "messages")
        clean: dict[str, Any] = {"role": role, "content": text}
        texts.append(text)
        if msg.get("tool_calls") is not None:
            clean["tool_calls"] = _tool_calls(msg["tool_calls"], "messages")
            texts.append(_json_text(clean["tool_calls"], "messages"))
        for key in ("name", "tool_call_id"):
            if msg.get(key) is not None:
                clean[key] = _text(msg[key], "messages")
        out.append(clean)
    return out, texts


def _json_text(v: Any, param: str) -> str:
    """`v` as the JSON text the template renders; no lone surrogate anywhere in it."""
    text = json.dumps(v, ensure_ascii=False)
    return _text(text, param)


def _tools(v: Any) -> list[dict[str, Any]]:
    if not isinstance(v, list) or len(v) > MAX_TOOLS:
        raise _bad("tools", f"must be a list of at most {MAX_TOOLS} tool objects")
    for i, tool in enumerate(v):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad("tools", f"[{i}] must be an object with a `function` that has a `name`")
    # JSON all the way down (it came from JSON); the chat template only renders it.
    return v


def validate(body: dict[str, Any], kind: Kind, info: ModelInfo) -> Draft:
    """The checked fields of `body`; cheap (no tokenizing), so on the event loop."""
    out: dict[str, Any] = {"model": RUNNER_MODEL_NAME}
    texts, overhead = _chat(body, out) if kind == "chat" else _completion(body, out)
    _sampling(body, info, out)
    _logprobs(body.get("logprobs"), kind, out)
    stream, include_usage = _streaming(body)
    _refuse_unsupported(body)
    constraint = _constraint(body) if kind == "chat" else _no_constraint(body)
    if constraint is not None:
        out[WIRE_FIELD] = constraint.to_wire()
    return Draft(
        kind=kind,
        body=out,
        stream=stream,
        include_usage=include_usage,
        wants_logprobs=bool(out.get("logprobs")) or bool(out.get("top_logprobs")),
        max_tokens=_max_tokens(body),
        texts=texts,
        overhead=overhead,
        prompt_bytes=sum(len(t) for t in texts),
        constraint=constraint,
    )


def _chat(body: dict[str, Any], out: dict[str, Any]) -> tuple[list[str], int]:
    """Messages and tools into `out`; (the texts that make the prompt, token overhead)."""
    out["messages"], texts = _messages(body.get("messages"))
    overhead = PER_PROMPT_TOKENS + PER_MESSAGE_TOKENS * len(out["messages"])
    # "none" is honoured by not showing the tools; a forced choice by the runner's grammar.
    if body.get("tools") is not None and _tool_choice(body)[0] != "none":
        out["tools"] = _tools(body["tools"])
        texts.append(_json_text(out["tools"], "tools"))
    return texts, overhead


def _completion(body: dict[str, Any], out: dict[str, Any]) -> tuple[list[str], int]:
    if "prompt" not in body:
        raise _bad("prompt", "is required (a string)")
    out["prompt"] = _prompt(body["prompt"])
    return [out["prompt"]], 1  # a BOS token the runner's tokenizer may add


def _prompt(v: Any) -> str:
    """One prompt, as text: all mlx_lm.server takes.

    OpenAI also takes token ids and a batch of strings. The runner's tokenizer
    refuses ids (`tokenizer.encode([1, 2])` raises), and a list of strings kills
    its generation thread, so both are refused here, saying so. A list of one
    string is that string (OpenAI's SDKs and LangChain send a prompt so).
    """
    if isinstance(v, list):
        if len(v) == 1 and isinstance(v[0], str):
            return _text(v[0], "prompt")
        if v and all(_is_int(t) or isinstance(t, list) for t in v):
            raise _bad(
                "prompt",
                "as token ids is not supported: the runner (mlx_lm.server) takes text;"
                " send the prompt as a string",
            )
        if len(v) > 1 and all(isinstance(t, str) for t in v):
            raise _bad(
                "prompt",
                f"as a batch of {len(v)} strings is not supported: send one prompt per request",
            )
    return _text(v, "prompt")


def _sampling(body: dict[str, Any], info: ModelInfo, out: dict[str, Any]) -> None:
    for name, check in SAMPLING.items():
        if body.get(name) is not None:
            out[name] = check(body[name], name)
    if body.get("top_k") is not None:
        vocab = info.vocab_size
        out["top_k"] = _integer(0, (vocab or 2**31) - 1)(body["top_k"], "top_k")
    if body.get("logit_bias") is not None:
        out["logit_bias"] = _logit_bias(body["logit_bias"], info.vocab_size)


def _logprobs(v: Any, kind: Kind, out: dict[str, Any]) -> None:
    """`logprobs` into `out`: a boolean, or on completions OpenAI's legacy top-n.

    The legacy integer n asks for the sampled token's logprob and the n likeliest
    at each step; the runner's spelling of that is `logprobs: true` with
    `top_logprobs: n` (an explicit `top_logprobs` is kept). Its answer is the
    runner's shape, `choices[].logprobs.content`, as on chat.
    """
    if v is None:
        return
    if isinstance(v, bool):
        out["logprobs"] = v
        return
    if kind == "chat":
        raise _bad("logprobs", "must be a boolean (and `top_logprobs` the count)")
    if not _is_int(v) or not 0 <= v <= TOP_LOGPROBS_MAX:
        raise _bad(
            "logprobs",
            f"must be a boolean or an integer in [0, {TOP_LOGPROBS_MAX}] (top tokens per step)",
        )
    out["logprobs"] = True
    if v > 0:
        out.setdefault("top_logprobs", v)


def _streaming(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "must be a boolean")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise _bad("stream_options", "must be an object")
    return stream, _boolean(options.get("include_usage", False), "stream_options")


def _refuse_unsupported(body: dict[str, Any]) -> None:
    if body.get("n") not in (None, 1):
        raise _bad("n", "must be 1 (one choice per request)")
    if body.get("user") is not None:
        _text(body["user"], "user")


# --- structured output and forced tool calls (enforced by the runner's grammar) ------


def _tool_choice(body: dict[str, Any]) -> tuple[str | None, str | None]:
    """(mode, function name): mode "none", "auto", "required" or "function"; None if not given."""
    choice = body.get("tool_choice")
    if choice is None or choice in ("none", "auto", "required"):
        return choice, None
    fn = choice.get("function") if isinstance(choice, dict) else None
    if (
        not isinstance(choice, dict)
        or choice.get("type") != "function"
        or not isinstance(fn, dict)
        or not isinstance(fn.get("name"), str)
    ):
        raise _bad(
            "tool_choice",
            'must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
        )
    return "function", fn["name"]


def _answer_schema(body: dict[str, Any]) -> Any:
    """The JSON schema `response_format` asks for; None for text (or none given)."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise _bad("response_format", 'must be {"type": "text" | "json_object" | "json_schema"}')
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise _bad("response_format", "of type json_schema needs a `json_schema` object")
    if spec.get("name") is not None:
        _text(spec["name"], "response_format")
    if spec.get("strict") is not None:
        _boolean(spec["strict"], "response_format")
    schema = spec.get("schema", {})
    if not isinstance(schema, (dict, bool)):
        raise _bad("response_format", "`json_schema.schema` must be a JSON schema (an object)")
    return schema


def _tool_specs(body: dict[str, Any]) -> tuple[Tool, ...]:
    """The tools as the grammar needs them (their shape was checked by _tools)."""
    out = []
    for tool in body.get("tools") or ():
        fn = tool["function"]
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise _bad("tools", f"{fn['name']!r}: `parameters` must be a JSON schema (an object)")
        out.append(Tool(fn["name"], params))
    return tuple(out)


def _constraint(body: dict[str, Any]) -> Constraint | None:
    """What the runner must force, from `response_format` and `tool_choice`."""
    schema = _answer_schema(body)
    mode, name = _tool_choice(body)
    tools = () if mode == "none" else _tool_specs(body)
    if mode == "required":
        if not tools:
            raise _bad("tool_choice", '"required" needs a non-empty `tools` list')
        return Constraint(tools=tools, tool_required=True)
    if mode == "function":
        named = tuple(t for t in tools if t.name == name)
        if not named:
            raise _bad("tool_choice", f"names {str(name)[:64]!r}, which is not one of `tools`")
        return Constraint(tools=named, tool_required=True)
    if schema is None:
        return None
    # Tools the model may call next to a JSON answer: the grammar allows either.
    return Constraint(schema=schema, tools=tools)


def _no_constraint(body: dict[str, Any]) -> Constraint | None:
    """None: completions take no `response_format` (OpenAI's have none)."""
    if _answer_schema(body) is not None:
        raise _bad("response_format", "is supported on /v1/chat/completions only")
    return None


def _max_tokens(body: dict[str, Any]) -> int | None:
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            n: int = _integer(1, 2**62)(body[name], name)
            return n
    return None


def prompt_param(kind: Kind) -> str:
    return "messages" if kind == "chat" else "prompt"


def check_size(draft: Draft, info: ModelInfo) -> None:
    """Refuse a prompt so big it cannot fit, without tokenizing it."""
    limit = info.context_limit
    if limit is not None and draft.prompt_bytes > limit * BYTES_PER_TOKEN:
        raise _bad(
            prompt_param(draft.kind),
            f"is far over the model's context of {limit} tokens ({draft.prompt_bytes} characters)",
        )


def check_constraint(draft: Draft) -> None:
    """Compile the constraint's schemas and grammar (blocking, cached by their text).

    A schema llguidance cannot compile is the client's: a 400 naming it, before
    the request waits for a runner.
    """
    if draft.constraint is None:
        return
    try:
        grammar.check(draft.constraint)
    except GrammarError as exc:
        raise InvalidRequest(exc.message, param=exc.param) from exc


def count_prompt(draft: Draft, info: ModelInfo) -> int | None:
    """Tokens of the prompt as the runner will see it, near enough (blocking)."""
    counted = info.count_tokens(draft.texts)
    return None if counted is None else counted + draft.overhead


def finish(draft: Draft, prompt_tokens: int | None, info: ModelInfo, default: int) -> Checked:
    """Cap max_tokens at the model's cap and the context left; refuse a prompt that
    leaves none. `default`: the neuron's, for a model the catalogue gives none."""
    max_tokens = draft.max_tokens
    if max_tokens is None:
        max_tokens = info.max_tokens if info.max_tokens is not None else default
    if info.max_tokens_cap is not None:
        # Lowered, not refused, as at the context's edge: clients send large asks
        # (Anthropic's API requires one), and finish_reason "length" tells them.
        max_tokens = min(max_tokens, info.max_tokens_cap)
    limit = info.context_limit
    if limit is not None and prompt_tokens is not None:
        left = limit - prompt_tokens
        if left < 1:
            raise _bad(
                prompt_param(draft.kind),
                f"has {prompt_tokens} tokens; the model's context is {limit} tokens",
            )
        if draft.kind == "chat":
            left = max(1, left - TEMPLATE_MARGIN_TOKENS)
        max_tokens = min(max_tokens, left)
    elif limit is not None:
        max_tokens = min(max_tokens, limit)
    body = {**draft.body, "max_tokens": max_tokens}
    # Always stream from the runner: a client that leaves then stops it at its next
    # write (tokens or prefill keepalive), and usage comes in the stream. Logprobs
    # appear only in the runner's non-streamed answer, so those unary requests stay so.
    runner_stream = draft.stream or not draft.wants_logprobs
    if runner_stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return Checked(
        body=body,
        stream=draft.stream,
        include_usage=draft.include_usage,
        runner_stream=runner_stream,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
    )
