"""Anthropic's Messages API on the chat path: POST /v1/messages and /v1/messages/count_tokens.

A Messages request becomes a chat-completions body (`to_chat`), served by the
chat path as it is (routing, cold loads, retries, affinity, admission, traces,
metrics with api="messages"); its answer comes back as a `message` object
(`to_message`) or, streamed, as Anthropic's events (`MessageStream`). Everything
here but the two handlers is a pure function of wire shapes, or a transcoder
that only turns bytes into bytes.

Read from the `anthropic` SDK's own types (2.x): `system` as a string or text
blocks; `messages` of text, `tool_use` and `tool_result` blocks; `max_tokens`
(required); `stop_sequences`; `metadata`; custom `tools` and `tool_choice`;
`output_config.format`; `stream`; and the sampling fields older clients still
send. The fields in `IGNORED` have no meaning here and are accepted so that
Claude Code works unchanged; any other field the chat path does not know is
dropped, as the chat path drops it. What cortex cannot do is a 400 naming it:
image and document blocks (no vision runner), server tools (nothing runs them),
a last assistant turn (no prefill: the chat template closes that turn).

Errors keep our status codes and Retry-After in Anthropic's envelope, so the
SDK's retries and exception classes behave as on Anthropic's own API.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Any

import attrs
from aiohttp import web

from cortex.http.dialect import register_errors
from cortex.http.inference import serve_chat
from shared.errors import (
    ApiError,
    InvalidRequest,
    UpstreamError,
    frame_error,
    read_json_object,
)

PREFIX = "/v1/messages"
COUNT_PATH = PREFIX + "/count_tokens"
# The paths the drain lets finish at shutdown.
PATHS: frozenset[str] = frozenset({PREFIX, COUNT_PATH})

# Accepted and ignored: what Claude Code and the SDK send that means nothing here
# (the README lists these). Unknown fields are dropped too, as on the chat path.
IGNORED: dict[str, str] = {
    "cache_control": "on the request and on any block: no prompt cache to steer"
    " (the runner's own prefix cache and cortex's affinity work without it)",
    "thinking": "no extended thinking: answers carry no thinking blocks",
    "service_tier": "one tier",
    "context_management": "no server-side context editing",
    "metadata": "accepted (an object); `user_id` goes nowhere",
    "output_config.effort": "one effort",
    "tool_choice.disable_parallel_tool_use": "the model calls what it calls",
    "container": "Anthropic's own service setting",
    "diagnostics": "Anthropic's own service setting",
    "inference_geo": "Anthropic's own service setting",
    "speed": "Anthropic's own service setting",
    "user_profile_id": "Anthropic's own service setting",
    "workspace_id": "Anthropic's own service setting",
    "citations": "on text blocks",
    "is_error": "on tool_result blocks: the result's text goes to the model as it is",
    "thinking and redacted_thinking blocks": "in an assistant turn: dropped",
}

# An HTTP status -> the `error.type` of Anthropic's envelope.
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}
# Blocks refused by name: they need a vision runner, or Anthropic's own servers.
_VISION = frozenset({"image", "document"})
# Blocks of an assistant turn that say nothing to this model (we never sent them).
_DROPPED = frozenset({"thinking", "redacted_thinking"})


def error_type(status: int) -> str:
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error envelope."""
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def render_error(exc: ApiError) -> web.Response:
    """Any error on /v1/messages*: our status and Retry-After, Anthropic's envelope."""
    return web.json_response(
        error_body(exc.status, exc.message), status=exc.status, headers=exc.headers()
    )


# -- request -> chat ---------------------------------------------------------------------


def _bad(param: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"`{param}` {what}", param=param)


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A Messages request -> the chat-completions body that serves it (InvalidRequest
    naming the field when it cannot)."""
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise _bad("max_tokens", "is required")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise _bad("max_tokens", "must be an integer of at least 1")
    chat = _prompt(body)
    chat["max_tokens"] = max_tokens
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "must be a boolean")
    if stream:
        # The usage frame ends the stream: message_delta reports its counts.
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    stops = _stops(body.get("stop_sequences"))
    if stops:
        chat["stop"] = stops
    for name in ("temperature", "top_p", "top_k"):  # 2.x SDKs no longer send them
        if body.get(name) is not None:
            chat[name] = body[name]
    fmt = _format(body)
    if fmt is not None:
        chat["response_format"] = fmt
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    return chat


def count_chat(body: dict[str, Any]) -> dict[str, Any]:
    """A count_tokens request -> a one-token chat whose usage counts its prompt.

    Only what shapes the prompt is kept: `tool_choice` "none" hides the tools (as it
    does for an answer), a forced choice or a format would only cost a grammar.
    """
    chat = _prompt(body)
    chat["max_tokens"] = 1
    if isinstance(body.get("tool_choice"), dict) and body["tool_choice"].get("type") == "none":
        chat["tool_choice"] = "none"
    return chat


def _prompt(body: dict[str, Any]) -> dict[str, Any]:
    """model, messages and tools: what the prompt is made of."""
    chat: dict[str, Any] = {"model": body.get("model")}
    if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
        raise _bad("metadata", "must be an object")
    system = _system(body.get("system"))
    chat["messages"] = ([{"role": "system", "content": system}] if system else []) + _messages(
        body.get("messages")
    )
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    return chat


def _text_blocks(content: Any, param: str) -> str:
    """A string, or a list of text blocks, as one text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(param, "must be a string or a list of text blocks")
    return "\n".join(_block_text(b, f"{param}.{i}") for i, b in enumerate(content))


def _block_text(block: Any, param: str) -> str:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind in _VISION:
        raise _bad(param, f"is a {kind} block: {kind} blocks are not supported (no vision runner)")
    if kind != "text" or not isinstance(block.get("text"), str):
        raise _bad(param, f"must be a text block, not {str(kind)[:40]!r}")
    text: str = block["text"]
    return text


def _system(system: Any) -> str:
    return "" if system is None else _text_blocks(system, "system")


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _bad("messages", f"[{i}] must be an object")
        role, content = msg.get("role"), msg.get("content")
        param = f"messages.{i}.content"
        if role == "user":
            out.extend(_user(content, param))
        elif role == "assistant":
            out.append(_assistant(content, param))
        elif role == "system":  # the 2.x SDK's SystemMessageParam
            out.append({"role": "system", "content": _text_blocks(content, param)})
        else:
            raise _bad(f"messages.{i}.role", 'must be "user" or "assistant"')
    if messages[-1].get("role") == "assistant":
        # The chat template closes every turn it renders: a continuation is not possible.
        raise _bad(
            f"messages.{len(messages) - 1}",
            "is an assistant turn: prefill is not supported; end with a user turn",
        )
    return out


def _blocks(content: Any, param: str) -> list[tuple[str, dict[str, Any]]]:
    """(param, block) of a turn's content; a string is one text block."""
    if isinstance(content, str):
        return [(param, {"type": "text", "text": content})]
    if not isinstance(content, list):
        raise _bad(param, "must be a string or a list of content blocks")
    out = []
    for i, block in enumerate(content):
        where = f"{param}.{i}"
        kind = block.get("type") if isinstance(block, dict) else None
        if not isinstance(block, dict) or not isinstance(kind, str):
            raise _bad(where, "must be a content block (an object with a `type`)")
        if kind in _VISION:
            _block_text(block, where)  # raises, naming the block
        out.append((where, block))
    return out


def _user(content: Any, param: str) -> list[dict[str, Any]]:
    """A user turn: its tool results first (each a tool message, right after the call
    they answer, as chat wants them), then its text."""
    tools, texts = [], []
    for where, block in _blocks(content, param):
        if block["type"] == "tool_result":
            tools.append(_tool_result(block, where))
        else:
            texts.append(_block_text(block, where))
    return tools + ([{"role": "user", "content": "\n".join(texts)}] if texts else [])


def _tool_result(block: dict[str, Any], param: str) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise _bad(param, "needs a `tool_use_id`")
    content = block.get("content")
    text = "" if content is None else _text_blocks(content, param + ".content")
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def _assistant(content: Any, param: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for where, block in _blocks(content, param):
        kind = block["type"]
        if kind == "tool_use":
            calls.append(_tool_call(block, where))
        elif kind not in _DROPPED:
            texts.append(_block_text(block, where))
    msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if calls:
        msg["tool_calls"] = calls
    return msg


def _tool_call(block: dict[str, Any], param: str) -> dict[str, Any]:
    call_id, name, args = block.get("id"), block.get("name"), block.get("input", {})
    if not isinstance(call_id, str) or not isinstance(name, str):
        raise _bad(param, "needs an `id` and a `name`")
    if not isinstance(args, dict):
        raise _bad(param, "`input` must be an object")
    fn = {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}
    return {"id": call_id, "type": "function", "function": fn}


def _stops(stops: Any) -> list[str]:
    if stops is None:
        return []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop_sequences", "must be a list of strings")
    return stops


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _bad("tools", "must be a list")
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else "?"
        if kind not in (None, "custom"):
            # Web search, code execution, bash...: Anthropic's servers run those.
            raise _bad(f"tools.{i}", f"is a server tool ({str(kind)[:60]!r}): only custom tools")
        name, schema = tool.get("name"), tool.get("input_schema")
        if not isinstance(name, str) or not isinstance(schema, dict):
            raise _bad(f"tools.{i}", "needs a `name` and an `input_schema` object")
        # OpenAI's own key order (name, description, parameters): the chat template
        # renders the JSON as sent, and the same tools then make the same prompt
        # prefix whichever API asked (the runner's prompt cache reuses it).
        fn: dict[str, Any] = {"name": name}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        fn["parameters"] = schema
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> Any:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind in ("auto", "none"):
        return kind
    if kind == "any":
        return "required"
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _bad(
        "tool_choice", 'must be {"type": "auto" | "any" | "none"} or {"type": "tool", "name"}'
    )


def _format(body: dict[str, Any]) -> dict[str, Any] | None:
    """`output_config.format` (or the older beta's `output_format`) -> `response_format`."""
    config = body.get("output_config")
    if config is not None and not isinstance(config, dict):
        raise _bad("output_config", "must be an object")
    param, fmt = "output_config.format", (config or {}).get("format")
    if fmt is None and body.get("output_format") is not None:
        param, fmt = "output_format", body["output_format"]
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise _bad(param, 'must be {"type": "json_schema", "schema": {...}}')
    schema = fmt.get("schema")
    if not isinstance(schema, dict):
        raise _bad(param, "needs a `schema` object")
    return {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema, "strict": True},
    }


# -- chat answer -> message --------------------------------------------------------------


def message_id(chat_id: Any) -> str:
    """The chat answer's id in Anthropic's form (the same answer, the same id)."""
    raw = str(chat_id).removeprefix("chatcmpl-").replace("-", "") if chat_id else ""
    return "msg_" + (raw if raw.isalnum() else uuid.uuid4().hex)


def stop_reason(
    finish: Any, matched: Any, stops: tuple[str, ...], tool_calls: bool
) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) from the chat's finish_reason.

    The chat says "stop" both at the end of a turn and at a stop sequence; which
    stop sequence ended the text comes as the choice's `stop_reason` (as vLLM puts
    it; the runner is asked to report it), an end-of-turn token as anything else.
    """
    if finish == "length":
        return "max_tokens", None
    if finish == "tool_calls" or tool_calls:
        return "tool_use", None
    if isinstance(matched, str) and matched in stops:
        return "stop_sequence", matched
    return "end_turn", None


def usage(chat_usage: Any) -> dict[str, int]:
    u = chat_usage if isinstance(chat_usage, dict) else {}
    return {
        "input_tokens": _count(u.get("prompt_tokens")),
        "output_tokens": _count(u.get("completion_tokens")),
    }


def _count(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def tool_use_block(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function") or {}
    args = fn.get("arguments")
    try:
        parsed = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        parsed = None
    return {
        "type": "tool_use",
        "id": str(call.get("id") or "toolu_" + uuid.uuid4().hex),
        "name": str(fn.get("name", "")),
        "input": parsed if isinstance(parsed, dict) else {},
    }


def to_message(chat: dict[str, Any], model: str, stops: tuple[str, ...] = ()) -> dict[str, Any]:
    """A whole chat.completion -> Anthropic's `message`."""
    choices = chat.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    choice = choice if isinstance(choice, dict) else {}
    msg = choice.get("message")
    msg = msg if isinstance(msg, dict) else {}
    content: list[dict[str, Any]] = []
    if isinstance(msg.get("content"), str) and msg["content"]:
        content.append({"type": "text", "text": msg["content"]})
    calls = [c for c in msg.get("tool_calls") or [] if isinstance(c, dict)]
    content.extend(tool_use_block(c) for c in calls)
    reason, sequence = stop_reason(
        choice.get("finish_reason"), choice.get("stop_reason"), stops, bool(calls)
    )
    return {
        "id": message_id(chat.get("id")),
        "type": "message",
        "role": "assistant",
        "model": chat.get("model") or model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage(chat.get("usage")),
    }


# -- chat stream -> Anthropic's events ---------------------------------------------------


def event(kind: str, data: dict[str, Any]) -> bytes:
    """One SSE event as Anthropic sends it: `event: <type>` then its JSON (ASCII: a lone
    surrogate a runner's text may hold is escaped, never an encoding error mid-stream)."""
    return b"event: %s\ndata: %s\n\n" % (
        kind.encode(),
        json.dumps(data, separators=(",", ":")).encode(),
    )


PING = event("ping", {"type": "ping"})
# The neuron's usage comment (a stream that did not ask for the usage frame).
_USAGE_COMMENT = b": usage "


@attrs.define
class MessageStream:
    """A chat stream's bytes -> Anthropic's stream: message_start, then per block
    content_block_start / _delta / _stop, then message_delta and message_stop at
    `[DONE]`; a ping for each keepalive once started; an error frame (or a cut by
    cortex) an `error` event, after which nothing more is sent."""

    model: str
    stops: tuple[str, ...] = ()
    _buf: bytes = b""
    _started: bool = False
    _ended: bool = False
    _blocks: int = 0  # blocks opened so far; the open one is the last
    _open: str | None = None  # "text" or "tool_use"
    _call: Any = None  # the open tool call's stream index
    _tool_calls: bool = False
    _finish: Any = None
    _matched: Any = None
    _usage: Any = None

    def feed(self, data: bytes) -> bytes:
        if self._ended:
            return b""
        *lines, self._buf = (self._buf + data).split(b"\n")
        out: list[bytes] = []
        for line in lines:
            if self._ended:
                break
            self._line(line, out)
        return b"".join(out)

    def fail(self, message: str, status: int) -> bytes:
        if self._ended:
            return b""
        self._ended = True
        return event("error", error_body(status, message))

    def _line(self, line: bytes, out: list[bytes]) -> None:
        if line.startswith(b"data: {"):
            try:
                chunk = json.loads(line[6:])
            except ValueError:
                return  # not JSON: nothing a client could use
            if isinstance(chunk, dict):
                self._chunk(chunk, out)
        elif line.startswith(b"data: [DONE]"):
            self._done(out)
        elif line.startswith(_USAGE_COMMENT):
            with contextlib.suppress(ValueError):
                self._usage = json.loads(line[len(_USAGE_COMMENT) :])
        elif line.startswith(b":") and self._started:
            out.append(PING)  # the runner is silent (prefill, or a long token)

    def _chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        err = chunk.get("error")
        if err is not None:
            out.append(self._error(err))
            return
        if not self._started:
            self._start(chunk, out)
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        choices = chunk.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict):
            return
        delta = choice.get("delta") or {}
        text = delta.get("content")
        if text and isinstance(text, str):
            self._text(text, out)
        for call in delta.get("tool_calls") or ():
            if isinstance(call, dict):
                self._tool(call, out)
        if choice.get("finish_reason") is not None:
            self._finish, self._matched = choice["finish_reason"], choice.get("stop_reason")

    def _start(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        self._started = True
        # The prompt's count comes with the usage frame at the end (message_delta).
        message: dict[str, Any] = {
            "id": message_id(chunk.get("id")),
            "type": "message",
            "role": "assistant",
            "model": chunk.get("model") or self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        out.append(event("message_start", {"type": "message_start", "message": message}))

    def _open_block(self, kind: str, block: dict[str, Any], out: list[bytes]) -> None:
        self._close(out)
        self._open = kind
        self._blocks += 1
        start = {"type": "content_block_start", "index": self._blocks - 1, "content_block": block}
        out.append(event("content_block_start", start))

    def _close(self, out: list[bytes]) -> None:
        if self._open is not None:
            stop = {"type": "content_block_stop", "index": self._blocks - 1}
            out.append(event("content_block_stop", stop))
            self._open = None

    def _delta(self, delta: dict[str, Any], out: list[bytes]) -> None:
        body = {"type": "content_block_delta", "index": self._blocks - 1, "delta": delta}
        out.append(event("content_block_delta", body))

    def _text(self, text: str, out: list[bytes]) -> None:
        if self._open != "text":
            self._open_block("text", {"type": "text", "text": ""}, out)
        self._delta({"type": "text_delta", "text": text}, out)

    def _tool(self, call: dict[str, Any], out: list[bytes]) -> None:
        """A streamed tool call: a new `index` (or an id without one) opens a tool_use
        block; its `arguments`, whole or in pieces, are input_json_delta."""
        key = call.get("index")
        fn = call.get("function") or {}
        if self._open != "tool_use" or key is None or key != self._call:
            self._tool_calls = True
            self._call = key
            block = tool_use_block({"id": call.get("id"), "function": {"name": fn.get("name")}})
            self._open_block("tool_use", block, out)
        args = fn.get("arguments")
        if args:
            partial = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
            self._delta({"type": "input_json_delta", "partial_json": partial}, out)

    def _done(self, out: list[bytes]) -> None:
        if not self._started:
            self._start({}, out)
        self._close(out)
        reason, sequence = stop_reason(self._finish, self._matched, self.stops, self._tool_calls)
        counts = usage(self._usage)
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": {
                "input_tokens": counts["input_tokens"],
                "output_tokens": counts["output_tokens"],
            },
        }
        out += [event("message_delta", delta), event("message_stop", {"type": "message_stop"})]
        self._ended = True

    def _error(self, err: Any) -> bytes:
        """The neuron's (or cortex's) error frame: the stream failed, whatever came first."""
        err = err if isinstance(err, dict) else {"message": str(err)}
        status, _ = frame_error(err)
        return self.fail(str(err.get("message") or "the stream failed"), status)


# -- the dialects and handlers -----------------------------------------------------------


@attrs.define  # not frozen: Dialect's `api` is a plain attribute
class MessagesDialect:
    """A /v1/messages request's answer, whole or streamed."""

    model: str
    stops: tuple[str, ...] = ()
    api: str = "messages"

    def answer(self, chat: dict[str, Any]) -> dict[str, Any]:
        return to_message(chat, self.model, self.stops)

    def transcoder(self) -> MessageStream:
        return MessageStream(self.model, self.stops)


@attrs.define
class CountDialect:
    """A count_tokens request: the prompt tokens of its one-token chat."""

    api: str = "count_tokens"

    def answer(self, chat: dict[str, Any]) -> dict[str, Any]:
        counts = chat.get("usage")
        prompt = counts.get("prompt_tokens") if isinstance(counts, dict) else None
        if not isinstance(prompt, int) or isinstance(prompt, bool):
            raise UpstreamError("the runner's answer carries no prompt token count")
        return {"input_tokens": prompt}

    def transcoder(self) -> MessageStream:
        return MessageStream("")  # never streamed: count_chat asks for no stream


async def _create(request: web.Request) -> web.StreamResponse:
    body = await read_json_object(request)
    chat = to_chat(body)
    dialect = MessagesDialect(str(body.get("model")), tuple(chat.get("stop", ())))
    return await serve_chat(request, chat, dialect)


async def _count_tokens(request: web.Request) -> web.StreamResponse:
    # Cortex has no tokenizer, and a count must match what the answer will be
    # charged: the runner counts it, with its own tokenizer and chat template
    # (tools included), by answering one token. Its prefill stays in the runner's
    # prefix cache, and affinity routes the create that usually follows to it.
    body = await read_json_object(request)
    return await serve_chat(request, count_chat(body), CountDialect())


def add_routes(app: web.Application) -> None:
    """POST /v1/messages and /v1/messages/count_tokens."""
    app.router.add_post(PREFIX, _create)
    app.router.add_post(COUNT_PATH, _count_tokens)


# Errors on /v1/messages* (auth, unknown models, 429s and 503s) in Anthropic's envelope.
register_errors(PREFIX, render_error)
