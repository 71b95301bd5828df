"""POST /admin/restart: drain, stop the runners, and re-execute this neuron in place.

The restart takes the path a SIGTERM takes (the drain lets requests in flight
finish for up to `drain_s` while the node still listens and says `draining`,
then cleanup stops every runner), and only then does `neuron serve` exec itself
with its own command line (`reexec`): same PID, same config, same persisted
node_id, a new `started_at`, so cortex sees a restarted process and its
reconciler brings the wished models back. Nothing of the old process crosses the
exec: every descriptor above stderr is closed first (the listening socket, the
runners' watchdog pipes), so a runner that somehow survived the stop still sees
its watchdog's EOF and dies.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import attrs
from aiohttp import web

from neuron.config import NeuronConfig
from shared.drain import DRAIN
from shared.errors import ApiError, read_json_object

log = logging.getLogger(__name__)
# Long enough for the 202 to be written before the shutdown begins.
SIGNAL_DELAY_S = 0.2


class RestartUnsupported(ApiError):
    """Only `neuron serve` can exec itself again; an app embedded elsewhere cannot."""

    status = 501
    code = "restart_unsupported"
    type = "server_error"


@attrs.define
class Restart:
    drain_s: float
    # Set by `neuron serve`: an in-process app (tests, embedding) must not SIGTERM
    # its host process.
    supported: bool = False
    requested: bool = False
    reason: str | None = None


RESTART = web.AppKey("restart", Restart)


async def post_restart(request: web.Request) -> web.Response:
    app = request.app
    restart = app[RESTART]
    if not restart.supported:
        raise RestartUnsupported("this neuron was not started by `neuron serve`: it cannot restart")
    body = await read_json_object(request) if request.can_read_body else {}
    reason = body.get("reason")
    already = restart.requested
    restart.requested = True
    restart.reason = reason[:200] if isinstance(reason, str) else "admin restart"
    if not already:
        log.warning("restart requested (%s): draining, then re-executing", restart.reason)
        # Draining from this answer on (/status says so): the drain SIGTERM continues.
        app[DRAIN].begin(restart.drain_s)
        # The way SIGTERM stops us, so the drain and the runners' stop are the same code.
        asyncio.get_running_loop().call_later(SIGNAL_DELAY_S, os.kill, os.getpid(), signal.SIGTERM)
    return web.json_response(
        {"restarting": True, "already": already, "drain_s": restart.drain_s, "draining": True},
        status=202,
    )


def setup(app: web.Application, config: NeuronConfig) -> None:
    app[RESTART] = Restart(drain_s=config.drain_s)
    app.router.add_post("/admin/restart", post_restart)


def enable(app: web.Application) -> None:
    """`neuron serve` runs this app as its process: POST /admin/restart may exec it again."""
    app[RESTART].supported = True


def requested(app: web.Application) -> bool:
    return app[RESTART].requested


def reexec() -> int:
    """Replace this process with a fresh `neuron serve` of the same command line.

    Returns (1) only if the exec itself failed: a service manager restarts us then.
    """
    argv = list(sys.orig_argv)
    log.warning("re-executing: %s", " ".join(argv))
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    # Only stdin/stdout/stderr cross the exec (PEP 446 makes ours non-inheritable
    # already; this holds even for a descriptor a library made inheritable).
    os.closerange(3, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 65536)
    try:
        os.execv(sys.executable, argv)
    except OSError as exc:
        print(f"neuron: restart failed, cannot exec {sys.executable}: {exc}", file=sys.stderr)
    return 1
