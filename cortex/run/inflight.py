"""Attempts in flight, per node: ended at once when their node is marked unhealthy.

A node that stops answering (SIGSTOP, a partition) sends nothing, not even an
error: a one-piece answer would wait for its whole timeout. The poller (or
passive health) marking the node unhealthy ends every attempt still waiting on
it with `NodeLost`, so the proxy retries it elsewhere before its first byte, or
ends its stream with an error frame after.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterator
from typing import TypeVar

import attrs

from cortex.core.state import NodeState
from shared.hop import Upstream
from shared.interrupt import Interrupt

T = TypeVar("T")


class NodeLost(Exception):
    """The node this attempt was waiting on was marked unhealthy."""


@attrs.define(eq=False)
class Attempt:
    """One request sent to one node, until its answer is read or given up."""

    node: str
    # Set once the node is lost; the attempt's waits end with NodeLost(reason).
    reason: str | None = None
    # While the answer's headers are awaited: how `end` interrupts that await (in the
    # request's own task: no task of its own per request).
    _opening: Interrupt | None = None
    _response: Upstream | None = None

    async def open(self, pending: Awaitable[T]) -> T:
        """Await the node's answer headers unless the node is lost first."""
        me = asyncio.current_task()
        assert me is not None
        self._opening = interrupt = Interrupt(me)
        try:
            return await pending
        except asyncio.CancelledError:
            # Our own cancel (the node was lost), not the client leaving (or a drain).
            if interrupt.fired and interrupt.withdraw():
                raise NodeLost(self.reason or "node lost") from None
            raise
        finally:
            self._opening = None

    def watch(self, response: Upstream) -> None:
        """From now on losing the node fails the body's next (or pending) read."""
        self._response = response
        if self.reason is not None:
            response.fail(NodeLost(self.reason))

    def end(self, reason: str) -> None:
        if self.reason is not None:
            return
        self.reason = reason
        if self._opening is not None:
            self._opening.fire()
        if self._response is not None:
            self._response.fail(NodeLost(reason))


@attrs.define
class InFlight:
    """The one owner of attempts in flight; a Poller listener ends a lost node's."""

    _by_node: dict[str, set[Attempt]] = attrs.field(factory=dict)

    @contextlib.contextmanager
    def attempt(self, node: str) -> Iterator[Attempt]:
        a = Attempt(node)
        self._by_node.setdefault(node, set()).add(a)
        try:
            yield a
        finally:
            held = self._by_node.get(node)
            if held is not None:
                held.discard(a)
                if not held:
                    del self._by_node[node]

    def node_changed(self, node: NodeState) -> None:
        """Poller listener: a node that is not healthy keeps no attempt waiting on it.

        A draining or recycling node is out of routing but drains what it holds: its
        streams go on (a lost connection or the stream's idle timeout still ends them).
        """
        if node.healthy or node.leaving or node.name not in self._by_node:
            return
        why = f"node {node.name} was marked unhealthy ({node.last_error or 'no answer'})"
        for a in list(self._by_node[node.name]):
            a.end(why)
