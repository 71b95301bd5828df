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

import attrs

from shared.sse import DONE


def is_usage_frame(chunk: dict[str, Any]) -> bool:
    """The stream's usage report: no choices, a `usage` object."""
    return not chunk.get("choices") and isinstance(chunk.get("usage"), dict)


# A whole answer up to this size is parsed as it is; a bigger one (embeddings as floats:
# ~1 s per 40 MB) only from its last `"usage":` on.
WHOLE_PARSE_BYTES = 64 * 1024
_USAGE_KEY = b'"usage":'


def answer_usage(raw: bytes) -> dict[str, Any] | None:
    """The `usage` object of a one-piece JSON answer, or None.

    For a big body, read from the last `"usage":` on (both runners write it last);
    only if that fails is the whole body parsed.
    """
    if len(raw) > WHOLE_PARSE_BYTES:
        at = raw.rfind(_USAGE_KEY)
        if at >= 0:
            text = raw[at + len(_USAGE_KEY) :].decode(errors="replace")
            start = len(text) - len(text.lstrip())
            try:
                usage, _ = json.JSONDecoder().raw_decode(text, start)
            except ValueError:
                usage = None
            if isinstance(usage, dict):
                return usage
    try:
        answer = json.loads(raw)
    except ValueError:
        return None
    usage = answer.get("usage") if isinstance(answer, dict) else None
    return usage if isinstance(usage, dict) else None


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
    parts = _Parts()
    for chunk in chunks:
        parts.add(chunk)
    return parts.answer()


@attrs.define
class _Parts:
    """What the chunks said so far, gathered for the one answer."""

    head: dict[str, Any] = attrs.Factory(dict)
    text: list[str] = attrs.Factory(list)
    reasoning: list[str] = attrs.Factory(list)
    tool_calls: list[dict[str, Any]] = attrs.Factory(list)
    finish_reason: str | None = None
    # The stop sequence that ended the text, as the runner names it (vLLM's field).
    stop_reason: Any = None
    usage: dict[str, Any] | None = None
    chat: bool = False
    role: str = "assistant"

    def add(self, chunk: dict[str, Any]) -> None:
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        if is_usage_frame(chunk):
            return
        if not self.head:
            self.head = chunk
        choices = chunk.get("choices") or []
        choice = choices[0] if choices and isinstance(choices[0], dict) else {}
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
            self.stop_reason = choice.get("stop_reason")
        if "delta" in choice or str(chunk.get("object", "")).startswith("chat."):
            self.chat = True
            self._add_delta(choice.get("delta") or {})
        elif isinstance(choice.get("text"), str):
            self.text.append(choice["text"])

    def _add_delta(self, delta: dict[str, Any]) -> None:
        self.role = delta.get("role") or self.role
        if isinstance(delta.get("content"), str):
            self.text.append(delta["content"])
        if isinstance(delta.get("reasoning"), str):
            self.reasoning.append(delta["reasoning"])
        if isinstance(delta.get("tool_calls"), list):
            _merge_tool_calls(self.tool_calls, delta["tool_calls"])

    def answer(self) -> dict[str, Any]:
        head = self.head
        out: dict[str, Any] = {
            "id": head.get("id"),
            "object": "chat.completion" if self.chat else "text_completion",
            "created": head.get("created"),
            "model": head.get("model"),
            "system_fingerprint": head.get("system_fingerprint"),
        }
        final: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason}
        if self.stop_reason is not None:
            final["stop_reason"] = self.stop_reason
        if self.chat:
            final["message"] = self._message()
        else:
            final["text"] = "".join(self.text)
        out["choices"] = [final]
        if self.usage is not None:
            out["usage"] = self.usage
        return out

    def _message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": self.role, "content": "".join(self.text) or None}
        if self.reasoning:
            message["reasoning"] = "".join(self.reasoning)
        if self.tool_calls:
            # The unstreamed answer carries no `index` per call.
            message["tool_calls"] = [
                {k: v for k, v in c.items() if k != "index"} for c in self.tool_calls
            ]
        return message
