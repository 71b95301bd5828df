"""Interrupt a task's await on our own account, and tell our cancel from anyone else's.

asyncio's only way to interrupt an await from a callback is `Task.cancel`.  The
idle timer and the runner's exit of a stream (shared.quiet) and the drain's cut
at shutdown (shared.drain) each need one, then take it back where it lands, so
that the await ends in an ordinary outcome while a cancel of anyone else (a
client that left) still propagates.  This is the one place that does it.
"""

from __future__ import annotations

import asyncio
from typing import Any


class Interrupt:
    """At most one cancel of `task` made by us at a time, and its withdrawal."""

    __slots__ = ("_task", "fired")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self._task = task
        # A cancel of ours is on its way to, or has reached, the task.
        self.fired = False

    def fire(self) -> None:
        """Cancel the task (once, until `withdraw`): its current await raises CancelledError."""
        if not self.fired:
            self.fired = True
            self._task.cancel()

    def withdraw(self) -> bool:
        """Take our cancel back (call it where the CancelledError landed).

        True when no cancel of anyone else is pending, i.e. the CancelledError
        was ours alone and the task may carry on; False when it must propagate.
        """
        if not self.fired:
            return False
        self.fired = False
        return self._task.uncancel() == 0
