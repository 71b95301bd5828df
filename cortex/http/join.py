"""Join codes over HTTP: an admin mints one, a new neuron trades it for the fleet token.

POST /admin/join-codes (admin token; optional {"ttl_s": n} to shorten the life)
answers a code good once for `join_code_ttl_s`. POST /join {"code": ...} is
authenticated by the code alone (it is outside /admin and /v1, so the auth
middleware leaves it to this handler) and answers the fleet token once.
`neuron join URL --code CODE` is its client (neuron.cli.join).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from aiohttp import web

from cortex.config import CONFIG
from cortex.core.join_codes import JoinCodes, JoinRefused
from cortex.run.lifecycle import LIFECYCLE
from shared.errors import (
    ForceNeedsAdminToken,
    InvalidRequest,
    JoinCodeRefused,
    NoFleetToken,
    read_json_object,
    reject_unknown,
)
from shared.fleet_discovery import node_name

log = logging.getLogger(__name__)

JOIN_CODES = web.AppKey("join_codes", JoinCodes)
JOIN_PATH = "/join"


def setup(app: web.Application) -> None:
    app[JOIN_CODES] = JoinCodes(ttl_s=app[CONFIG].join_code_ttl_s)
    app.router.add_post("/admin/join-codes", mint)
    app.router.add_post(JOIN_PATH, redeem)


async def mint(request: web.Request) -> web.Response:
    app = request.app
    cfg = app[CONFIG]
    if cfg.admin_token is None:
        # Without one /admin may be open to anyone who reaches cortex, and a code
        # hands out the fleet token: the key to every neuron.
        raise ForceNeedsAdminToken(
            "join codes need admin_token set in cortex.toml (and presented): a code"
            " hands out the fleet token"
        )
    if cfg.fleet_token is None:
        raise NoFleetToken(
            "this cortex has no fleet token to hand out: set fleet_token_file in cortex.toml"
            " (and the same token on its neurons), then mint a code"
        )
    body = await read_json_object(request) if request.can_read_body else {}
    reject_unknown(body, {"ttl_s"})
    ttl = body.get("ttl_s")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl <= 0):
        raise InvalidRequest("'ttl_s' must be a number of seconds > 0", param="ttl_s")
    codes = app[JOIN_CODES]
    codes.ttl_s = cfg.join_code_ttl_s  # as a reload of cortex.toml may have set it
    code, life = codes.mint(None if ttl is None else float(ttl))
    _event(app, "join code minted", f"good once, for {life:g} s")
    return web.json_response(
        {
            "code": code,
            "expires_in_s": life,
            "expires_at": time.time() + life,
            "cortex_url": str(request.url.origin()),
        },
        status=201,
        headers={"Cache-Control": "no-store"},
    )


async def redeem(request: web.Request) -> web.Response:
    app = request.app
    body = await read_json_object(request)
    reject_unknown(body, {"code", "node_id", "name"})
    code = body.get("code")
    if not isinstance(code, str) or not code.strip() or len(code) > 64:
        raise InvalidRequest(
            "'code' must be the join code `cortex join-code` printed", param="code"
        )
    who = _who(body, request.remote)
    token = app[CONFIG].fleet_token
    try:
        if token is None:
            raise JoinRefused("unknown", "this cortex has no fleet token any more")
        app[JOIN_CODES].redeem(code, who)
    except JoinRefused as exc:
        log.warning("join code refused (%s) from %s", exc.why, who)
        _event(app, "join refused", f"{exc.why} code, from {who}")
        raise JoinCodeRefused(str(exc), param="code") from None
    log.info("join code redeemed by %s", who)
    _event(app, "node joined", f"join code redeemed by {who}: fleet token handed over")
    answer: dict[str, Any] = {"fleet_token": token, "discover": app[CONFIG].discover}
    return web.json_response(answer, headers={"Cache-Control": "no-store"})


def _who(body: dict[str, Any], remote: str | None) -> str:
    """`name (node id) at address`, from what the neuron says, cleaned for the log."""
    name, node_id = body.get("name"), body.get("node_id")
    parts = [node_name(name) if isinstance(name, str) and name else "a neuron"]
    if isinstance(node_id, str) and node_id:
        parts.append(f"({node_name(node_id)})")
    parts.append(f"at {remote or '?'}")
    return " ".join(parts)


def _event(app: web.Application, what: str, detail: str) -> None:
    if LIFECYCLE in app:
        app[LIFECYCLE].event(None, what, detail)
