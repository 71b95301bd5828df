"""Client APIs translated onto the chat path: the seam they plug into.

Anthropic's Messages and OpenAI's Responses are not second gateways. Each turns
its request into a chat-completions body (pure functions in its own module),
hands it to `cortex.http.inference.serve_chat`, and turns the chat path's
answer back into its own shape: `Dialect.answer` for a whole answer, a
`Transcoder` for a stream's bytes. Routing, cold loads, retries, affinity,
admission, traces and metrics stay the chat path's, unchanged.

Errors keep our status codes and Retry-After; an API that has its own envelope
registers a renderer for its paths (`register_errors`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web
from aiohttp.typedefs import Handler

from shared.errors import ApiError


class Transcoder(Protocol):
    """One stream's bytes, chat SSE in, the API's SSE out."""

    def feed(self, data: bytes) -> bytes:
        """The neuron's (or cortex's own) SSE bytes, split anywhere: chat.completion.chunk
        frames, `: keepalive` comments while the runner is silent, the neuron's error
        frame `data: {"error": {...}}` when its runner is lost, `data: [DONE]`. Returns what
        the client gets now (maybe nothing); partial lines wait for the rest."""
        ...

    def fail(self, message: str, status: int) -> bytes:
        """The stream is cut here by cortex (its runner lost, silent, or cortex shutting
        down): the API's error event, whatever was buffered dropped. Never a clean end."""
        ...


class Dialect(Protocol):
    """How one request of a client API is answered from the chat path's answer."""

    # The API's label in traces and metrics ("messages", "responses").
    api: str

    def answer(self, chat: dict[str, Any]) -> dict[str, Any]:
        """A whole chat.completion -> the API's answer body."""
        ...

    def transcoder(self) -> Transcoder:
        """A fresh transcoder for one streamed answer."""
        ...


# The dialect of the request being served, for the proxy to translate its answer.
DIALECT = web.RequestKey("cortex.dialect", Dialect)

Renderer = Callable[[ApiError], web.StreamResponse]
_RENDERERS: dict[str, Renderer] = {}


def register_errors(prefix: str, render: Renderer) -> None:
    """Errors on paths under `prefix` are rendered by `render` (the API's envelope)."""
    _RENDERERS[prefix] = render


def _renderer(path: str) -> Renderer | None:
    for prefix, render in _RENDERERS.items():
        if path == prefix or path.startswith(prefix + "/"):
            return render
    return None


@web.middleware
async def dialect_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Inside the envelope middleware, outside auth: an API with its own envelope gets
    its errors (an unknown key, an unknown model, a 503 to retry) in that envelope."""
    try:
        return await handler(request)
    except ApiError as exc:
        render = _renderer(request.path)
        if render is None:
            raise
        resp = render(exc)
        if exc.close_connection:
            resp.force_close()
        return resp
