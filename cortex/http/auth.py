"""API keys with per-key model allow-lists, and the admin token.

Auth is off when no key is configured (a laptop fleet). With keys, every
/v1/* call needs one (401 invalid_api_key) and may use only the models its
allow-list names, by id or alias (403 model_not_allowed). /admin/* needs the
admin token (as a bearer token, or the password of HTTP Basic auth); /health and
/metrics are always open (probes and Prometheus), and so is /dashboard: a page
without data that asks the operator for the token and sends it to /admin/*.
It no longer prompts for Basic auth, so a browser holds no credential it would
attach by itself to a cross-site POST.
A /v1 request pinned to a node (X-Cortex-Node) needs the admin token in
place of an API key; any /v1 request may present the admin token in place of
one (every model: the dashboard's playground signs in with it).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Awaitable, Callable

import attrs
from aiohttp import web
from aiohttp.typedefs import Middleware

from cortex.config import ApiKey
from shared.catalogue import Catalogue
from shared.errors import InvalidApiKey, ModelNotAllowed
from shared.model_id import shown

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# The key a request authenticated with (None when auth is off).
REQUEST_KEY = web.RequestKey("api_key", ApiKey)
OPEN_PATHS = frozenset({"/health", "/metrics", "/dashboard"})
# DELETE /v1/requests/{id}: the admin token or the key that sent the request.
CANCEL_PREFIX = "/v1/requests/"
# Pins an inference request to one node's replica (benchmarks, probes): operators
# only, so a request carrying it needs the admin token instead of an API key.
NODE_HEADER = "X-Cortex-Node"


def presented_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if scheme.lower() == "basic" and token.strip():
        try:
            user_pass = base64.b64decode(token.strip(), validate=True).decode()
        except (binascii.Error, ValueError):  # not base64, not ASCII, not UTF-8
            return None
        return user_pass.partition(":")[2] or None
    return request.headers.get("X-Api-Key") or None


def _bytes(text: str) -> bytes:
    """Header bytes that are not UTF-8 arrive as surrogates: encode them, never fail."""
    return text.encode("utf-8", "surrogatepass")


@attrs.define
class Auth:
    # Replaced whole by a reload (cortex.http.reload), for the next request; nothing
    # else writes them.
    keys: tuple[ApiKey, ...] = ()
    admin_token: str | None = attrs.field(default=None, repr=False)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def client(self, request: web.Request) -> ApiKey | None:
        """The caller's key; InvalidApiKey when auth is on and it is missing or unknown."""
        if not self.enabled:
            return None
        given = presented_key(request)
        if given is None:
            raise InvalidApiKey("missing API key: send Authorization: Bearer <key> or X-Api-Key")
        found = None
        for k in self.keys:
            # Compare with every key in constant time: no timing hint of a near miss.
            if hmac.compare_digest(_bytes(k.key), _bytes(given)):
                found = k
        if found is None:
            raise InvalidApiKey("unknown API key")
        return found

    def is_admin(self, request: web.Request) -> bool:
        """The request presents the admin token (constant-time compare)."""
        given = presented_key(request)
        if self.admin_token is None or given is None:
            return False
        return hmac.compare_digest(_bytes(self.admin_token), _bytes(given))

    def admin(self, request: web.Request) -> None:
        if self.admin_token is None:
            if self.enabled:
                raise InvalidApiKey("admin endpoints need admin_token set in cortex.toml")
            return
        given = presented_key(request) or ""
        if not hmac.compare_digest(_bytes(self.admin_token), _bytes(given)):
            raise InvalidApiKey("admin endpoints need the admin token")

    @staticmethod
    def allowed(key: ApiKey | None, model: str, catalogue: Catalogue) -> bool:
        if key is None or "*" in key.models:
            return True
        spec = catalogue.resolve(model)
        names = spec.names() if spec is not None else (model,)
        return any(n in key.models for n in names)

    def check_model(self, key: ApiKey | None, model: str, catalogue: Catalogue) -> None:
        if not self.allowed(key, model, catalogue):
            raise ModelNotAllowed(f"this API key may not use model {shown(model)}", param="model")

    def middleware(self) -> Middleware:
        @web.middleware
        async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            path = request.path
            if path in OPEN_PATHS or path.startswith(CANCEL_PREFIX):
                pass  # a cancel takes the admin token or a key: cortex.http.cancel checks
            elif path.startswith("/admin") or (
                path.startswith("/v1") and NODE_HEADER in request.headers
            ):
                self.admin(request)
            elif path.startswith("/v1"):
                key = None if self.is_admin(request) else self.client(request)
                if key is not None:
                    request[REQUEST_KEY] = key
            return await handler(request)

        return auth_middleware


# Where the app keeps its key check.
AUTH = web.AppKey("auth", Auth)
