"""GET /dashboard: the fleet on one live page, for an operator's browser.

The page (cortex/http/dashboard.html: inline CSS and vanilla JS, no build step, no
external assets) is a shell without data: it polls /admin/state, /admin/events
and /admin/traces with the admin token the operator types in (kept in the tab's
sessionStorage, sent as a bearer token), so the page itself is open and the data
stays behind /admin's guard. A strict Content-Security-Policy lets only the
page's own script and style run, and no site may frame it.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from aiohttp import web

from cortex.http.auth import AUTH

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
    out = {"auth": mode}
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
