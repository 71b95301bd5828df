"""What a client sends: one OpenAI chat request body for every test that needs one,
and one way to send it to a running service and read its answer."""

from __future__ import annotations

from typing import Any

from shared.blocking_http import request_json

CHAT = "/v1/chat/completions"


def chat(
    model: str = "m1", *, stream: bool = False, text: str = "hi", **extra: Any
) -> dict[str, Any]:
    """A one-message chat request for `model` (`extra` adds or overrides fields)."""
    return {
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def post_chat(
    url: str,
    model: str,
    *,
    text: str = "hi",
    token: str | None = None,
    timeout: float = 120.0,
    **extra: Any,
) -> tuple[int, Any]:
    """POST `chat(model, text=text, **extra)` to the service at `url` (blocking;
    from async code, through `asyncio.to_thread`): (status, parsed answer)."""
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    body = chat(model, text=text, **extra)
    status, answer, _ = request_json("POST", url.rstrip("/") + CHAT, body, timeout, headers)
    return status, answer


def answer_text(answer: Any) -> str:
    """The assistant's text in a non-streamed chat answer."""
    return str(answer["choices"][0]["message"]["content"])
