"""Per-model admission: an in-flight cap, a bounded FIFO queue, a queue timeout.

Over any of them the answer is 429 `queue_full` with Retry-After, so a
gateway tries another replica or backs off instead of piling work on a runner.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import statistics
import time
from collections.abc import AsyncIterator

import attrs

from shared.errors import QueueFull

# /health's queue time is the median wait of this many last admitted requests: one
# slow wait does not hide the usual one, and an idle model keeps its last figure.
WAITS_KEPT = 100


@attrs.define
class Admission:
    max_in_flight: int
    max_queue: int
    queue_timeout_s: float
    in_flight: int = 0
    _waiters: collections.deque[asyncio.Future[None]] = attrs.Factory(collections.deque)
    _waits: collections.deque[float] = attrs.Factory(lambda: collections.deque(maxlen=WAITS_KEPT))

    @property
    def wait_p50_s(self) -> float | None:
        """Median seconds the last admitted requests waited for a slot (None: none yet)."""
        return round(statistics.median(self._waits), 6) if self._waits else None

    @property
    def queue_depth(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one in-flight slot for the body of the `async with`."""
        queued_at = time.monotonic()
        await self._acquire()
        self._waits.append(time.monotonic() - queued_at)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self) -> None:
        if self.in_flight < self.max_in_flight and not self._waiters:
            self.in_flight += 1
            return
        if self.queue_depth >= self.max_queue:
            raise QueueFull(
                f"model is at capacity: {self.in_flight} in flight, "
                f"{self.queue_depth} queued (max {self.max_queue})"
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                await fut
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                # The slot was handed over just as the timeout struck: use it.
                return
            self._forget(fut)
            raise QueueFull(
                f"waited {self.queue_timeout_s:g} s in the queue without a free slot"
            ) from None
        except BaseException:
            if fut.done() and not fut.cancelled():
                self._release()
            else:
                self._forget(fut)
            raise

    def resize(self, max_in_flight: int, max_queue: int, queue_timeout_s: float) -> None:
        """New limits (a reload): waiters take the slots a larger limit frees at once;
        a smaller one lets the requests running finish (it admits none until below it)."""
        self.max_in_flight, self.max_queue = max_in_flight, max_queue
        self.queue_timeout_s = queue_timeout_s
        while self.in_flight < self.max_in_flight and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                self.in_flight += 1
                fut.set_result(None)

    def _forget(self, fut: asyncio.Future[None]) -> None:
        fut.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(fut)

    def _release(self) -> None:
        # Hand the slot straight to the oldest waiter, keeping in_flight unchanged.
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.in_flight -= 1
