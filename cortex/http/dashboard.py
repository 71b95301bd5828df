"""GET /dashboard: the fleet on one live page, for an operator's browser; and
GET /admin/history, the last minutes its charts draw.

The page (cortex/http/dashboard.html: inline CSS and vanilla JS, no build step, no
external assets) is a shell without data: it polls /admin/state, /admin/events,
/admin/traces and /admin/history with the admin token the operator types in (kept
in the tab's sessionStorage, sent as a bearer token), so the page itself is open
and the data stays behind /admin's guard. Its playground streams POST
/v1/chat/completions with an API key (or the admin token). A strict
Content-Security-Policy lets only the page's own script and style run, and no
site may frame it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator
from importlib import resources

from aiohttp import web

from cortex.config import CONFIG
from cortex.http.auth import AUTH
from cortex.http.traces import TRACES
from cortex.run.history import History
from cortex.run.poller import FLEET
from shared.errors import InvalidRequest

PAGE = resources.files("cortex.http").joinpath("dashboard.html").read_text(encoding="utf-8")
# Endpoints the page uses only where this cortex has them (it never asks for a 404).
OPTIONAL = {"events": "/admin/events", "traces": "/admin/traces"}


def _hash(tag: str) -> str:
    found = re.search(rf"<{tag}>(.*?)</{tag}>", PAGE, re.DOTALL)
    if found is None:
        raise RuntimeError(f"dashboard.html has no <{tag}> element")
    digest = hashlib.sha256(found.group(1).encode()).digest()
    return "'sha256-" + base64.b64encode(digest).decode() + "'"


CSP = "; ".join(
    [
        "default-src 'none'",
        f"script-src {_hash('script')}",
        f"style-src {_hash('style')}",
        "connect-src 'self'",
        "img-src data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def features(app: web.Application) -> dict[str, str]:
    """What the page needs to know before its first call (fixed words, never data)."""
    auth = app[AUTH]
    paths = {r.canonical for r in app.router.resources()}
    # "closed": API keys on but no admin token, so /admin/* refuses everyone.
    mode = "token" if auth.admin_token is not None else "closed" if auth.enabled else "open"
    # keys "1": /v1 needs an API key (or the admin token), so the playground asks for one.
    out = {"auth": mode, "keys": "1" if auth.enabled else "0"}
    for name, path in OPTIONAL.items():
        out[name] = "1" if path in paths else "0"
    return out


def page(app: web.Application) -> str:
    attrs = " ".join(f'data-{k}="{v}"' for k, v in sorted(features(app).items()))
    return PAGE.replace("<body>", f"<body {attrs}>", 1)


async def dashboard(request: web.Request) -> web.Response:
    return web.Response(
        text=page(request.app), content_type="text/html", charset="utf-8", headers=HEADERS
    )


async def admin_history(request: web.Request) -> web.Response:
    """The charts' points, oldest first; `since` (wall-clock seconds): only newer ones."""
    raw = request.query.get("since")
    since = None
    if raw:
        try:
            since = float(raw)
        except ValueError:
            raise InvalidRequest("'since' must be a number", param="since") from None
    return web.json_response(request.app[HISTORY].to_json(since))


def setup(app: web.Application, *, background: bool = True) -> None:
    """The page, its history endpoint, and (with `background`) the sampler behind it."""
    cfg = app[CONFIG]
    app[HISTORY] = History(step_s=cfg.history_step_s, span_s=cfg.history_span_s)
    app.router.add_get("/dashboard", dashboard)
    app.router.add_get("/admin/history", admin_history)
    if background:
        app.cleanup_ctx.append(_sampling)


async def _sampling(app: web.Application) -> AsyncIterator[None]:
    # The fleet and the traces as they are at each step (both live for the app's life).
    task = asyncio.create_task(
        app[HISTORY].run(lambda: (app[FLEET].snapshot(), app[TRACES])), name="cortex history"
    )
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# The charts' ring of points (cortex.run.history).
HISTORY = web.AppKey("history", History)
