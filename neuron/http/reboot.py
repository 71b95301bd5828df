"""POST /admin/reboot: reboot this machine, opt-in and confirmed.

"Reboot" in the runbooks means the machine: RDMA queue pairs that jaccl groups
leaked belong to the kernel, so `cortex restart` (which recycles the neuron
process) frees none of them. A neuron whose neuron.toml says `allow_reboot =
true` runs `reboot_command` (default `sudo -n /sbin/shutdown -r +1`: its user
needs the right, a sudoers rule or root; the minute lets this answer and the
drain happen) for a request whose `confirm` names this node (its node_name or
node_id). Off by default, and refused without a fleet token: an open API must
not reboot a machine. Refused, the answer gives the command to run by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from pathlib import Path

import attrs
from aiohttp import web

from neuron.config import NeuronConfig
from neuron.discovery import load_or_create_node_id
from shared.errors import InvalidRequest, RebootFailed, RebootNotAllowed, read_json_object

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 20.0
BY_HAND = "reboot it from a shell instead: sudo shutdown -r now"


@attrs.frozen
class Reboot:
    allowed: bool
    has_token: bool
    command: tuple[str, ...]
    name: str
    store: Path


REBOOT = web.AppKey("reboot", Reboot)


def _check(r: Reboot, confirm: object, node_id: str) -> None:
    if not r.allowed:
        raise RebootNotAllowed(f"reboot is off on this node (allow_reboot = false); {BY_HAND}")
    if not r.has_token:
        raise RebootNotAllowed(f"reboot needs a fleet token on this node; {BY_HAND}")
    if not isinstance(confirm, str) or confirm not in (r.name, node_id):
        raise InvalidRequest(
            "confirm must name this node (its node_name or node_id): a reboot is never implied",
            param="confirm",
        )


async def post_reboot(request: web.Request) -> web.Response:
    r = request.app[REBOOT]
    body = await read_json_object(request) if request.can_read_body else {}
    # The persisted id (discovery's node_id, which is what cortex sends).
    _check(r, body.get("confirm"), await asyncio.to_thread(load_or_create_node_id, r.store))
    log.warning("reboot requested: running %s", " ".join(r.command))
    try:
        proc = await asyncio.create_subprocess_exec(
            *r.command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        raise RebootFailed(f"cannot run {r.command[0]}: {exc.strerror or exc}") from exc
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        why = f"{r.command[0]} gave no answer within {COMMAND_TIMEOUT_S:g} s"
        raise RebootFailed(why) from None
    text = out.decode(errors="replace").strip()[-500:]
    if proc.returncode != 0:
        raise RebootFailed(f"{' '.join(r.command)} exited {proc.returncode}: {text}")
    return web.json_response(
        {"rebooting": True, "command": list(r.command), "output": text}, status=202
    )


def setup(app: web.Application, config: NeuronConfig) -> None:
    app[REBOOT] = Reboot(
        allowed=config.allow_reboot,
        has_token=config.fleet_token is not None,
        command=config.reboot_command,
        name=config.node_name or socket.gethostname(),
        store=config.store_path,
    )
    app.router.add_post("/admin/reboot", post_reboot)
