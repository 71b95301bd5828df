"""POST /admin/nodes/{name}/reboot: reboot a node's machine, where its neuron allows it.

`cortex restart` recycles the neuron process; the runbooks' reboot (RDMA queue
pairs leaked by jaccl groups) needs the machine. The body must confirm the node
by name (`{"confirm": NAME}`); cortex takes the node out of routing as for a
restart (until it answers as a new process, or `recycle_timeout_s`) and asks the
neuron (POST /admin/reboot, confirmed by its node_id), which runs its
`reboot_command` only with `allow_reboot = true`. A refusal is answered as the
neuron's 403 `reboot_not_allowed`, with the command to run by hand on that host.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from cortex.config import CONFIG
from cortex.http.recycle import named_node
from cortex.run.loader import LOADER
from cortex.run.poller import FLEET
from shared.errors import (
    ApiError,
    InvalidRequest,
    RebootNotAllowed,
    UpstreamUnavailable,
    read_json_object,
)


def by_hand(url: str, name: str) -> str:
    """The command an operator runs when the node cannot reboot itself."""
    return f"ssh {urlsplit(url).hostname or name} sudo shutdown -r now"


async def post_reboot(request: web.Request) -> web.Response:
    app = request.app
    fleet = app[FLEET]
    name, node = named_node(request)
    if app[CONFIG].admin_token is None:
        # /admin is open without one: nobody who can reach cortex may reboot a machine.
        raise RebootNotAllowed(
            "rebooting a node needs cortex's admin_token; reboot it from a shell: "
            + by_hand(node.url, name)
        )
    body = await read_json_object(request) if request.can_read_body else {}
    if body.get("confirm") != name:
        raise InvalidRequest(
            f'confirm must name the node: {{"confirm": "{name}"}} (a reboot is never implied)',
            param="confirm",
        )
    if node.discovery is None:
        raise UpstreamUnavailable(f"node {name} has not been discovered yet: try again")
    fleet.begin_recycle(name, app[CONFIG].recycle_timeout_s, "machine reboot requested")
    url = node.url.rstrip("/") + "/admin/reboot"
    timeout = aiohttp.ClientTimeout(total=30.0, sock_connect=app[CONFIG].connect_timeout_s)
    try:
        async with app[LOADER].session.post(
            url, json={"confirm": node.discovery.node_id}, timeout=timeout
        ) as resp:
            answer: Any = await resp.json(content_type=None)
            if resp.status >= 400:
                raise ApiError.from_envelope(resp.status, answer, resp.headers.get("Retry-After"))
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        fleet.end_recycle(name)
        raise UpstreamUnavailable(f"node {name} did not take the reboot: {exc!r}") from exc
    except RebootNotAllowed as exc:
        fleet.end_recycle(name)
        why = exc.message.split(";")[0]  # the neuron's reason; the command is ours
        raise RebootNotAllowed(
            f"{name}: {why}; reboot it from a shell: {by_hand(node.url, name)}"
        ) from exc
    except ApiError:
        fleet.end_recycle(name)
        raise
    return web.json_response(
        {
            "node": name,
            "rebooting": True,
            "command": answer.get("command") if isinstance(answer, dict) else None,
            "output": answer.get("output") if isinstance(answer, dict) else None,
        },
        status=202,
    )


def setup(app: web.Application) -> None:
    app.router.add_post("/admin/nodes/{name}/reboot", post_reboot)
