"""One non-streamed OpenAI answer from the chunks of a stream (pure).

The neuron always asks its runner to stream (so a client that leaves stops the
work, and usage comes from the runner); a client that did not ask for a stream
gets the `chat.completion` / `text_completion` object assembled here, as the
runner would have sent it unstreamed.  Cortex may reuse it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator
from typing import Any

from shared.sse import DONE


def is_usage_frame(chunk: dict[str, Any]) -> bool:
    """The stream's usage report: no choices, a `usage` object."""
    return not chunk.get("choices") and isinstance(chunk.get("usage"), dict)


def data_events(raw: bytes) -> Iterator[dict[str, Any]]:
    """The JSON objects of the `data:` events of a whole SSE body (not [DONE])."""
    for event in raw.replace(b"\r\n", b"\n").split(b"\n\n"):
        for line in event.split(b"\n"):
            if line.startswith(b"data:") and line.strip() != DONE.strip():
                obj = json.loads(line[5:])
                if isinstance(obj, dict):
                    yield obj


def _merge_tool_calls(calls: list[dict[str, Any]], delta: list[Any]) -> None:
    """OpenAI's streamed tool calls: a new `index` starts a call, a known one extends it."""
    for item in delta:
        if not isinstance(item, dict):
            continue
        idx = item.get("index")
        known = next((c for c in calls if idx is not None and c.get("index") == idx), None)
        if known is None:
            calls.append(copy.deepcopy(item))
            continue
        fn, more = known.setdefault("function", {}), item.get("function") or {}
        if more.get("name"):
            fn["name"] = fn.get("name", "") + more["name"]
        if more.get("arguments"):
            fn["arguments"] = fn.get("arguments", "") + more["arguments"]


def assemble(chunks: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The non-streamed answer equal to these stream chunks (chat or text completion)."""
    head: dict[str, Any] = {}
    text: list[str] = []
    reasoning: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    chat = False
    role = "assistant"
    for chunk in chunks:
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        if is_usage_frame(chunk):
            continue
        if not head:
            head = chunk
        choices = chunk.get("choices") or []
        choice = choices[0] if choices and isinstance(choices[0], dict) else {}
        if choice.get("finish_reason") is not None:
            finish_reason = choice["finish_reason"]
        if "delta" in choice or str(chunk.get("object", "")).startswith("chat."):
            chat = True
            delta = choice.get("delta") or {}
            role = delta.get("role") or role
            if isinstance(delta.get("content"), str):
                text.append(delta["content"])
            if isinstance(delta.get("reasoning"), str):
                reasoning.append(delta["reasoning"])
            if isinstance(delta.get("tool_calls"), list):
                _merge_tool_calls(tool_calls, delta["tool_calls"])
        elif isinstance(choice.get("text"), str):
            text.append(choice["text"])
    out: dict[str, Any] = {
        "id": head.get("id"),
        "object": "chat.completion" if chat else "text_completion",
        "created": head.get("created"),
        "model": head.get("model"),
        "system_fingerprint": head.get("system_fingerprint"),
    }
    final: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
    content = "".join(text)
    if chat:
        message: dict[str, Any] = {"role": role, "content": content or None}
        if reasoning:
            message["reasoning"] = "".join(reasoning)
        if tool_calls:
            # The unstreamed answer carries no `index` per call.
            message["tool_calls"] = [
                {k: v for k, v in c.items() if k != "index"} for c in tool_calls
            ]
        final["message"] = message
    else:
        final["text"] = content
    out["choices"] = [final]
    if usage is not None:
        out["usage"] = usage
    return out
