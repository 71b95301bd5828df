"""Reads with an idle timeout and one timer per stream, not one per chunk."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

from shared.interrupt import Interrupt

T = TypeVar("T")


class StreamEnded(Exception):
    """The `ended` future of an IdleRace completed (the upstream's process exited)."""


class IdleRace:
    """`next(aw)` races `aw` against `quiet_s` of silence and the `ended` future.

    It gives `aw`'s result; or None once `quiet_s` passed without one (the
    caller sends a heartbeat, or gives up, and calls again); or raises
    StreamEnded once `ended` is done.  Like `asyncio.timeout(quiet_s)` around
    each await plus a watcher of `ended`, but with no task, wait or timer per
    chunk (every cancelled timer churns the loop's heap): an await only moves the
    deadline, and the one timer, should it fire early, re-arms itself at the
    deadline.  `aw` runs in the caller's task, which the timer or `ended`
    interrupts (shared.interrupt); a cancel from anyone else propagates.  An
    `aw` that must survive the interruption (a request being opened) is passed
    through `asyncio.shield`.
    """

    def __init__(self, quiet_s: float, ended: asyncio.Future[Any] | None = None) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._interrupt = Interrupt(task)
        self._loop = task.get_loop()
        self._quiet_s = quiet_s
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._waiting = False
        self._ended = ended
        # `ended` is done (set by its callback: a flag is cheaper to read per chunk).
        self._over = False
        self._by_end = False
        if ended is not None:
            ended.add_done_callback(self._on_end)

    async def next(self, aw: Awaitable[T]) -> T | None:
        if self._over:
            if isinstance(aw, Coroutine):
                aw.close()  # never awaited: no warning
            raise StreamEnded
        self._deadline = self._loop.time() + self._quiet_s
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
        self._waiting = True
        try:
            return await aw
        except asyncio.CancelledError:
            by_end, self._by_end = self._by_end, False
            if not self._interrupt.withdraw():
                raise
            if by_end:
                raise StreamEnded from None
            return None
        finally:
            self._waiting = False

    def _on_timer(self) -> None:
        self._timer = None
        if not self._waiting:
            return  # the next await arms it again
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
        else:
            self._interrupt.fire()

    def _on_end(self, _: asyncio.Future[Any]) -> None:
        self._over = True
        # Between awaits the next one sees it; a fire already made says "quiet" first.
        if self._waiting and not self._interrupt.fired:
            self._by_end = True
            self._interrupt.fire()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._ended is not None:
            self._ended.remove_done_callback(self._on_end)
