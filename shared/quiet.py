"""Reads with an idle timeout and one timer per stream, not one per chunk."""

from __future__ import annotations

import asyncio

import aiohttp


class QuietReads:
    """`read()` gives the upstream's next chunk, or None once it has been silent `quiet_s`.

    Like `asyncio.timeout(quiet_s)` around each read, but with one timer per
    `quiet_s` per stream instead of one per chunk (every cancelled timer churns the
    loop's heap): a read only moves the deadline, and the timer, should it fire
    early, re-arms itself at the deadline.  Reads run in the caller's task, which
    the timer cancels to interrupt a read; a cancel from anyone else propagates.
    """

    def __init__(self, upstream: aiohttp.ClientResponse, quiet_s: float) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._loop = task.get_loop()
        self._readany = upstream.content.readany
        self._quiet_s = quiet_s
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._reading = False
        self._fired = False

    async def read(self) -> bytes | None:
        self._deadline = self._loop.time() + self._quiet_s
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
        self._reading = True
        try:
            return await self._readany()
        except asyncio.CancelledError:
            fired, self._fired = self._fired, False
            if fired and self._task.uncancel() == 0:
                return None
            raise
        finally:
            self._reading = False

    def _on_timer(self) -> None:
        self._timer = None
        if not self._reading:
            return  # the next read arms it again
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)
        else:
            self._fired = True
            self._task.cancel()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
