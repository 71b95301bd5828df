"""Is this member's ring port free? Asked before a group load starts a runner.

A rank of an MLX `ring` group binds its own entry of the hostfile
(`GroupSpec.hosts[rank]`) once its runner has started and loaded its weights;
a port another process holds fails it then with `[ring] Couldn't bind socket
(error: 98)`, seconds later, as a failed load. Binding the port here first
turns that into an answer at once (409 `ring_port_taken`), on which cortex
tries another block of ports.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from typing import Protocol

from neuron.runner.states import ENDED
from shared.errors import RingPortTaken
from shared.wire import GroupSpec, LoadRequest, ModelState

log = logging.getLogger(__name__)


class _Loaded(Protocol):
    @property
    def state(self) -> ModelState: ...


def ring_address(group: GroupSpec | None) -> tuple[str, int] | None:
    """(host, port) this member's rank will listen on; None when it listens on none."""
    if group is None or group.backend != "ring" or group.world_size < 2:
        return None
    if not 0 <= group.rank < len(group.hosts):
        return None
    host, _, port = group.hosts[group.rank].rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return None  # the runner's own error says it better


def bind_once(host: str, port: int) -> None:
    """Bind (host, port) the way a ring rank will, and let it go; OSError if it cannot.

    The address is the first getaddrinfo answer, as MLX takes it. SO_REUSEADDR as
    MLX sets it: a socket of an earlier group in TIME_WAIT does not count as taken.
    No SO_REUSEPORT (MLX sets it): a rank of another group still listening there
    would share the port with ours, and the ring would not form.
    """
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)


async def check_ring_port(req: LoadRequest, current: _Loaded | None) -> None:
    """Raise RingPortTaken if `req`'s rank cannot bind its ring port here.

    `current`: this node's record of the model. A load under way or done is joined,
    not started (its own rank may hold the port): nothing to check then.
    """
    where = ring_address(req.group)
    if where is None or (current is not None and current.state not in ENDED):
        return
    host, port = where
    try:
        await asyncio.to_thread(bind_once, host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            assert req.group is not None
            taken = RingPortTaken(
                f"ring port {port} on {host} is taken by another process: rank"
                f" {req.group.rank} of group {req.group.group_id} cannot bind it",
                param="group.hosts",
                details={"host": host, "port": port},
            )
            log.info("load of %s refused: %s", req.model_id, taken.message)
            raise taken from exc
        # Not a taken port (an address not on this node, a name that does not
        # resolve): the runner fails on it as it would have, with MLX's own words.
        log.warning("could not check ring port %s:%s before the load: %s", host, port, exc)
