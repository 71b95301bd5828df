"""The fleet token: once configured, it closes every neuron endpoint but the probes.

Cortex sends it as `Authorization: Bearer <token>`; anything else is 401
invalid_api_key. GET /health and GET /metrics stay open for probes and Prometheus,
GET /fleet/proof for cortex's discovery (it answers a proof, never the token).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from shared.errors import InvalidApiKey

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN = frozenset(
    (method, path)
    for method in ("GET", "HEAD")
    # /fleet/proof: how a neuron shows cortex it holds the token (neuron.announce).
    for path in ("/health", "/metrics", "/fleet/proof")
)


def bearer(request: web.Request) -> bytes | None:
    """The bearer token as bytes; header bytes that are not UTF-8 arrive as surrogates."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip().encode("utf-8", "surrogatepass")


def fleet_token_middleware(token: str) -> Middleware:
    expected = token.encode()

    @web.middleware
    async def fleet_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (request.method, request.path) not in OPEN:
            given = bearer(request)
            if given is None:
                raise InvalidApiKey("missing fleet token: send Authorization: Bearer <token>")
            if not hmac.compare_digest(expected, given):
                raise InvalidApiKey("wrong fleet token")
        return await handler(request)

    return fleet_token
