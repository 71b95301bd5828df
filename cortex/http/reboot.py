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

from urllib.parse import urlsplit

from aiohttp import web

from cortex.config import CONFIG
from cortex.http.recycle import ask_recycle, named_node
from shared.errors import (
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
    try:
        answer = await ask_recycle(
            app,
            name,
            "/admin/reboot",
            {"confirm": node.discovery.node_id},
            "reboot",
            30.0,
            "machine reboot requested",
        )
    except RebootNotAllowed as exc:
        why = exc.message.split(";")[0]  # the neuron's reason; the command is ours
        raise RebootNotAllowed(
            f"{name}: {why}; reboot it from a shell: {by_hand(node.url, name)}"
        ) from exc
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
