"""Waiting for a condition: one async `until()` and one blocking `wait_until()`.

Both poll a predicate until it returns something truthy and return that value.
Their bounds are generous upper limits, never measured durations: a slow machine
only waits longer, and a timeout fails naming what was awaited and the last value
the predicate gave (for an `until()` predicate that answers only yes or no, what
its `seen` describes instead).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

# The default upper bound for a wait (seconds); never a measured duration.
UNTIL_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 120.0


@overload
async def until(
    predicate: Callable[[], Awaitable[T]],
    *,
    timeout: float = ...,  # noqa: ASYNC109
    what: str = ...,
    interval: float = ...,
    seen: Callable[[], object] | None = ...,
) -> T: ...


@overload
async def until(
    predicate: Callable[[], T],
    *,
    timeout: float = ...,  # noqa: ASYNC109
    what: str = ...,
    interval: float = ...,
    seen: Callable[[], object] | None = ...,
) -> T: ...


async def until(
    predicate: Callable[[], Any],
    *,
    timeout: float = UNTIL_TIMEOUT_S,  # noqa: ASYNC109
    what: str = "condition",
    interval: float = 0.01,
    seen: Callable[[], object] | None = None,
) -> Any:
    """Await (or call) `predicate` until it returns something truthy; that value.

    Fails after `timeout` seconds with `what` and the last value seen: the
    predicate's, or `seen()` (the state it looked at) when that is given.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            last = value if seen is None else seen()
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what}; last saw {last!r}"
            )
        await asyncio.sleep(interval)


def wait_until(predicate: Any, timeout: float = READY_TIMEOUT_S, what: str = "condition") -> Any:
    """Call `predicate` until it returns something truthy (blocking); that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout} s waiting for {what}; last saw {value!r}"
            )
        time.sleep(0.1)
