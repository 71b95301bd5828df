"""OpenAI's Responses API (`POST /v1/responses`), translated onto the chat path.

A Responses request becomes a chat-completions body (`to_chat`), served by the
chat path as it is (routing, cold loads, retries, affinity, admission, traces,
metrics with api="responses"); its answer comes back as a `response` object
(`response_body`) or, streamed, as the Responses events (`ResponseStream`),
every one numbered from 0. Everything here but the handler is a pure function
of wire shapes, or a transcoder that only turns bytes into bytes.

Stateless: cortex keeps no response, so `previous_response_id`, `conversation`
and item references are refused with a 400 naming them (clients send the whole
conversation in `input`, as the Agents SDK does by default); `store` is accepted
and means nothing. Fields the request types define that change nothing here are
accepted and ignored (`IGNORED`); those that would need what cortex has not
(stored state, logprobs in the stream, images) are refused by name (`REFUSED`),
and so is any field the API does not have.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import attrs
from aiohttp import web

from cortex.http.dialect import Transcoder
from cortex.http.inference import serve_chat
from shared.errors import InvalidRequest, frame_error, read_json_object

PATH = "/v1/responses"
# The paths the drain lets finish at shutdown.
PATHS: frozenset[str] = frozenset({PATH})

# Request fields translated onto the chat body (keep_alive is cortex's own, as on chat).
HANDLED = frozenset(
    {
        "model",
        "input",
        "instructions",
        "max_output_tokens",
        "temperature",
        "top_p",
        "tools",
        "tool_choice",
        "text",
        "stream",
        "keep_alive",
    }
)
# Accepted and ignored: hints for OpenAI's own service that change nothing in an
# answer from here (`store`: nothing is kept either way; `truncation`: a prompt over
# the context is a 400 naming it, as "disabled" says; `reasoning`: no reasoning model).
IGNORED = frozenset(
    {
        "metadata",
        "parallel_tool_calls",
        "truncation",
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
        "service_tier",
        "store",
        "reasoning",
        "include",
        "max_tool_calls",
        "context_management",
        "stream_options",
        "image",
        "access_programs",
        "background_options",
    }
)
# Refused unless absent, null or their no-op value: each asks for what cortex has not.
REFUSED: dict[str, str] = {
    "previous_response_id": "cortex keeps no responses (stateless): send the whole"
    " conversation in `input`",
    "conversation": "cortex keeps no conversations (stateless): send the whole"
    " conversation in `input`",
    "prompt": "cortex has no stored prompts",
    "background": "cortex runs no background responses",
    "moderation": "cortex has no moderation model",
    "top_logprobs": "log probabilities are not returned on /v1/responses",
}
# `include` values that ask for output cortex does not produce in this API.
_REFUSED_INCLUDES = frozenset({"message.output_text.logprobs"})
# Part types whose text is the message's text (input, a previous answer, its refusal).
_TEXT_PARTS = {"input_text": "text", "output_text": "text", "refusal": "refusal"}
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


# -- request: Responses -> chat ----------------------------------------------------


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """The chat-completions body that asks what this Responses body asks; InvalidRequest
    naming the field (as the client spelled it) for anything it cannot honour."""
    _refuse(body)
    chat: dict[str, Any] = {"model": body.get("model"), "messages": _messages(body)}
    for field in ("temperature", "top_p", "keep_alive"):
        if body.get(field) is not None:
            chat[field] = body[field]
    limit = body.get("max_output_tokens")
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise _bad("max_output_tokens", "must be a positive integer")
        chat["max_tokens"] = limit
    tools = _tools(body.get("tools"))
    if tools:
        chat["tools"] = tools
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(body["tool_choice"])
    fmt = _response_format(body.get("text"))
    if fmt is not None:
        chat["response_format"] = fmt
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", "must be a boolean")
    if stream:
        # The usage frame before [DONE] gives the final event its token counts.
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    return chat


def _bad(param: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"`{param}` {what}", param=param)


def _refuse(body: dict[str, Any]) -> None:
    unknown = sorted(set(body) - HANDLED - IGNORED - set(REFUSED))
    if unknown:
        raise InvalidRequest(
            f"unknown field(s) for /v1/responses: {', '.join(unknown)}", param=unknown[0]
        )
    for field, why in REFUSED.items():
        if body.get(field) not in (None, False, 0):
            raise _bad(field, f"is not supported: {why}")
    include = body.get("include")
    if isinstance(include, list):
        for value in include:
            if value in _REFUSED_INCLUDES:
                raise _bad("include", f"{value!r} is not supported on /v1/responses")


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("instructions", "must be a string")
        out.append({"role": "system", "content": instructions})
    given = body.get("input")
    if isinstance(given, str):
        out.append({"role": "user", "content": given})
    elif isinstance(given, list) and given:
        out.extend(input_messages(given))
    else:
        raise _bad("input", "must be a string or a non-empty list of input items")
    return out


def input_messages(items: list[Any]) -> list[dict[str, Any]]:
    """Input items as chat messages: a message as itself, a `function_call` as a tool
    call of the assistant turn it belongs to, its `function_call_output` as a tool
    message. Reasoning items are dropped: they are never shown to a model again."""
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise _bad("input", f"item {i} must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            out.append(_message(item, i))
        elif kind == "function_call":
            _add_call(out, _call(item, i))
        elif kind == "function_call_output":
            out.append(_call_output(item, i))
        elif kind != "reasoning":
            raise _bad("input", f"item {i}: items of type {str(kind)[:64]!r} are not supported")
    return out


def _message(item: dict[str, Any], i: int) -> dict[str, Any]:
    given = item.get("role")
    role = _ROLES.get(given) if isinstance(given, str) else None
    if role is None:
        raise _bad("input", f"item {i}: role must be one of user, assistant, system, developer")
    return {"role": role, "content": _text(item.get("content"), f"item {i}")}


def _text(content: Any, where: str) -> str:
    """The text of a string or of a list of text parts; a 400 naming any other part."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad("input", f"{where}: content must be a string or a list of parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        key = _TEXT_PARTS.get(kind) if isinstance(kind, str) else None
        if key is None:
            raise _bad(
                "input",
                f"{where}, part {j}: {str(kind)[:64]!r} parts are not supported"
                " (text only: input_text, output_text)",
            )
        text = part.get(key)
        if not isinstance(text, str):
            raise _bad("input", f"{where}, part {j}: `{key}` must be a string")
        texts.append(text)
    return "".join(texts)


def _call(item: dict[str, Any], i: int) -> dict[str, Any]:
    name, call_id, args = item.get("name"), item.get("call_id"), item.get("arguments")
    if not isinstance(name, str) or not isinstance(call_id, str) or not isinstance(args, str):
        raise _bad("input", f"item {i}: a function_call needs string name, call_id, arguments")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}


def _add_call(out: list[dict[str, Any]], call: dict[str, Any]) -> None:
    # A turn's text and its calls are one assistant message in chat.
    if out and out[-1]["role"] == "assistant":
        out[-1].setdefault("tool_calls", []).append(call)
    else:
        out.append({"role": "assistant", "content": "", "tool_calls": [call]})


def _call_output(item: dict[str, Any], i: int) -> dict[str, Any]:
    call_id = item.get("call_id")
    if not isinstance(call_id, str):
        raise _bad("input", f"item {i}: a function_call_output needs a string call_id")
    content = _text(item.get("output"), f"item {i} output")
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def _tools(tools: Any) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise _bad("tools", "must be a list of tools")
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise _bad(
                "tools", f"[{i}]: {str(kind)[:64]!r} tools are not supported (function only)"
            )
        if not isinstance(tool.get("name"), str):
            raise _bad("tools", f"[{i}]: a function tool needs a string `name`")
        fn = {
            k: tool[k]
            for k in ("name", "description", "parameters", "strict")
            if tool.get(k) is not None
        }
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    named = isinstance(choice, dict) and choice.get("type") == "function"
    if named and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _bad(
        "tool_choice", 'must be "auto", "none", "required" or {"type": "function", "name": ...}'
    )


def _response_format(text: Any) -> dict[str, Any] | None:
    """`text.format` as chat's `response_format` (None for plain text)."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise _bad("text", "must be an object")
    fmt = text.get("format")  # `verbosity` alone asks nothing of the runner
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise _bad("text.format", 'must have type "text", "json_object" or "json_schema"')
    schema = fmt.get("schema")
    if not isinstance(schema, dict):
        raise _bad("text.format.schema", "must be a JSON schema (an object)")
    spec = {"name": fmt.get("name") or "response", "schema": schema}
    for key in ("strict", "description"):
        if fmt.get(key) is not None:
            spec[key] = fmt[key]
    return {"type": "json_schema", "json_schema": spec}


# -- answer: chat -> Responses -----------------------------------------------------


@attrs.frozen
class Head:
    """What every `response` object of one request says besides its output: its id,
    its time, and the request's settings echoed back (the SDK's model requires some)."""

    id: str
    created_at: int
    model: str
    echo: dict[str, Any]

    @classmethod
    def of(cls, body: dict[str, Any]) -> Head:
        return cls(
            id=f"resp_{uuid.uuid4().hex}",
            created_at=int(time.time()),
            model=str(body.get("model")),
            echo=echo(body),
        )


def echo(body: dict[str, Any]) -> dict[str, Any]:
    """The request's settings as a `response` object states them."""
    parallel = body.get("parallel_tool_calls")
    return {
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "metadata": body.get("metadata") or {},
        "parallel_tool_calls": True if parallel is None else bool(parallel),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": body.get("tools") or [],
        "text": body.get("text") or {"format": {"type": "text"}},
        "truncation": body.get("truncation") or "disabled",
        "previous_response_id": None,
        "background": False,
        "user": body.get("user"),
    }


def response(
    head: Head,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A whole `response` object."""
    return {
        "id": head.id,
        "object": "response",
        "created_at": head.created_at,
        "status": status,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "model": head.model,
        "output": output,
        "usage": None if usage is None else response_usage(usage),
        **head.echo,
    }


def response_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """Chat's token counts as the Responses API names them."""
    given, made = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return {
        "input_tokens": given,
        "input_tokens_details": {"cached_tokens": cached or 0, "cache_write_tokens": 0},
        "output_tokens": made,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.get("total_tokens") or given + made,
    }


def _status(finish_reason: Any) -> str:
    # A token-limit stop is the one incomplete answer a runner gives.
    return "incomplete" if finish_reason == "length" else "completed"


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [part],
    }


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def _arguments(args: Any) -> str:
    # OpenAI's are a JSON string; a runner that gave the object gets it serialised.
    return args if isinstance(args, str) else json.dumps(args)


def response_body(chat: dict[str, Any], head: Head) -> dict[str, Any]:
    """A whole chat.completion as the `response` object (unstreamed)."""
    choices = chat.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    status = _status(choice.get("finish_reason"))
    text = message.get("content") or ""
    calls = message.get("tool_calls") or []
    output = []
    if text or not calls:
        output.append(message_item(_item_id("msg"), text, status))
    for call in calls:
        fn = call.get("function") or {}
        output.append(
            call_item(
                _item_id("fc"),
                call.get("id") or _item_id("call"),
                str(fn.get("name", "")),
                _arguments(fn.get("arguments", "")),
                "completed",
            )
        )
    usage = chat.get("usage")
    return response(head, status, output, usage if isinstance(usage, dict) else None)


def _item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# -- stream: chat SSE -> Responses events ------------------------------------------


@attrs.define
class _Item:
    """The output item being streamed: a message's text or a function call's arguments."""

    index: int  # its output_index
    id: str
    parts: list[str] = attrs.Factory(list)
    # A function call: the chat stream's index for it, its call id and name.
    call: int | None = None
    call_id: str = ""
    name: str = ""

    def done(self, status: str) -> dict[str, Any]:
        text = "".join(self.parts)
        if self.call is None:
            return message_item(self.id, text, status)
        return call_item(self.id, self.call_id, self.name, text, status)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


@attrs.define
class ResponseStream:
    """One streamed answer: the chat stream's bytes in, Responses events out.

    `response.created` and `response.in_progress` open it; text opens a message item
    (`output_item.added`, `content_part.added`, then `output_text.delta`s), a tool call
    a function_call item (`function_call_arguments.delta`s); an item is closed by its
    `.done` events when the next one starts or the stream ends; `[DONE]` ends it with
    `response.completed`, or `response.incomplete` at the token limit. An error frame
    (a runner lost) or cortex's own cut (`fail`) ends it with `response.failed`.
    """

    head: Head
    seq: int = 0
    buf: bytes = b""
    started: bool = False
    ended: bool = False
    output: list[dict[str, Any]] = attrs.Factory(list)
    item: _Item | None = None
    finish: str | None = None
    usage: dict[str, Any] | None = None
    # Fresh item ids (a function, so that tests can fix them).
    new_id: Callable[[str], str] = _item_id

    def feed(self, data: bytes) -> bytes:
        if self.ended:
            return b""
        out: list[bytes] = [] if self.started else self._start()
        *lines, self.buf = (self.buf + data).split(b"\n")
        for line in lines:
            self._line(line.rstrip(b"\r"), out)
            if self.ended:
                break
        return b"".join(out)

    def fail(self, message: str, status: int) -> bytes:
        if self.ended:
            return b""
        out: list[bytes] = [] if self.started else self._start()
        self._failed(message, status, out)
        return b"".join(out)

    def _event(self, kind: str, fields: dict[str, Any]) -> bytes:
        seq, self.seq = self.seq, self.seq + 1
        data = _dumps({"type": kind, **fields, "sequence_number": seq})
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def _start(self) -> list[bytes]:
        self.started = True
        now = response(self.head, "in_progress", [])
        return [
            self._event("response.created", {"response": now}),
            self._event("response.in_progress", {"response": now}),
        ]

    def _line(self, line: bytes, out: list[bytes]) -> None:
        if line.startswith(b":"):
            out.append(line + b"\n\n")  # a keepalive: the client sees the link live
            return
        if not line.startswith(b"data:"):
            return  # the blank line between events (chat streams have no other field)
        data = line[5:].strip()
        if data == b"[DONE]":
            self._done(out)
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            return  # not a chunk: nothing a client could be given
        if not isinstance(chunk, dict):
            return
        if "error" in chunk:
            err = chunk["error"] if isinstance(chunk["error"], dict) else {}
            status, _ = frame_error(err)
            self._failed(str(err.get("message") or chunk["error"]), status, out)
            return
        self._chunk(chunk, out)

    def _chunk(self, chunk: dict[str, Any], out: list[bytes]) -> None:
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = chunk.get("choices")
        if not choices or not isinstance(choices[0], dict):
            return
        choice = choices[0]
        delta = choice.get("delta") or {}
        text = delta.get("content")
        if text:
            self._text(str(text), out)
        for call in delta.get("tool_calls") or ():
            if isinstance(call, dict):
                self._call(call, out)
        if choice.get("finish_reason"):
            self.finish = choice["finish_reason"]

    def _text(self, text: str, out: list[bytes]) -> None:
        item = self.item
        if item is None or item.call is not None:
            item = self._open_message(out)
        item.parts.append(text)
        where = {"item_id": item.id, "output_index": item.index, "content_index": 0}
        out.append(
            self._event("response.output_text.delta", {**where, "delta": text, "logprobs": []})
        )

    def _open_message(self, out: list[bytes]) -> _Item:
        self._close(out)
        item = self.item = _Item(len(self.output), self.new_id("msg"))
        added = message_item(item.id, "", "in_progress")
        added["content"] = []
        out.append(
            self._event("response.output_item.added", {"output_index": item.index, "item": added})
        )
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        where = {"item_id": item.id, "output_index": item.index, "content_index": 0}
        out.append(self._event("response.content_part.added", {**where, "part": part}))
        return item

    def _call(self, call: dict[str, Any], out: list[bytes]) -> None:
        fn = call.get("function") or {}
        # A chunk continues the open call if it has its index and no other id.
        index, call_id = call.get("index", 0), call.get("id")
        item = self.item
        if item is None or item.call != index or (call_id and call_id != item.call_id):
            self._close(out)
            item = self.item = _Item(
                len(self.output),
                self.new_id("fc"),
                call=index,
                call_id=str(call_id or self.new_id("call")),
            )
            item.name = str(fn.get("name") or "")
            added = call_item(item.id, item.call_id, item.name, "", "in_progress")
            out.append(
                self._event(
                    "response.output_item.added", {"output_index": item.index, "item": added}
                )
            )
        args = fn.get("arguments")
        if args:
            delta = _arguments(args)
            item.parts.append(delta)
            where = {"item_id": item.id, "output_index": item.index}
            out.append(
                self._event("response.function_call_arguments.delta", {**where, "delta": delta})
            )

    def _close(self, out: list[bytes]) -> None:
        """The open item's `.done` events; it joins the output."""
        item, self.item = self.item, None
        if item is None:
            return
        # Only the last item can have been cut by the token limit.
        done = item.done(_status(self.finish))
        where: dict[str, Any] = {"item_id": item.id, "output_index": item.index}
        if item.call is None:
            text, part = done["content"][0]["text"], done["content"][0]
            where["content_index"] = 0
            out.append(
                self._event("response.output_text.done", {**where, "text": text, "logprobs": []})
            )
            out.append(self._event("response.content_part.done", {**where, "part": part}))
        else:
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    {**where, "name": item.name, "arguments": done["arguments"]},
                )
            )
        out.append(
            self._event("response.output_item.done", {"output_index": item.index, "item": done})
        )
        self.output.append(done)

    def _done(self, out: list[bytes]) -> None:
        if not self.output and self.item is None:
            self._open_message(out)  # an empty answer is an empty message, as unstreamed
        self._close(out)
        status = _status(self.finish)
        final = response(self.head, status, self.output, self.usage)
        out.append(self._event(f"response.{status}", {"response": final}))
        self.ended = True

    def _failed(self, message: str, status: int, out: list[bytes]) -> None:
        output = list(self.output)
        if self.item is not None:
            output.append(self.item.done("incomplete"))
        code = "rate_limit_exceeded" if status == 429 else "server_error"
        error = {"code": code, "message": message}
        final = response(self.head, "failed", output, self.usage, error)
        out.append(self._event("response.failed", {"response": final}))
        self.ended = True


@attrs.define
class ResponsesDialect:
    """The chat path's answers to one Responses request, in the Responses API."""

    head: Head
    api: str = "responses"

    def answer(self, chat: dict[str, Any]) -> dict[str, Any]:
        return response_body(chat, self.head)

    def transcoder(self) -> Transcoder:
        return ResponseStream(self.head)


# -- the edge ----------------------------------------------------------------------


def add_routes(app: web.Application) -> None:
    """Its endpoints on the app."""
    app.router.add_post(PATH, _create)


async def _create(request: web.Request) -> web.StreamResponse:
    body = await read_json_object(request)
    chat = to_chat(body)
    return await serve_chat(request, chat, ResponsesDialect(Head.of(body)))
