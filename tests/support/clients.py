"""What a client sends: one OpenAI chat request body for every test that needs one."""

from __future__ import annotations

from typing import Any

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
