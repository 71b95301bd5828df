"""The one cancel-and-take-back helper (shared.interrupt), and the race built on it (shared.quiet).

No network and no measured durations: every wait is bounded by WAIT_S, and the
silences are futures that never complete.
"""

from __future__ import annotations

import asyncio
import warnings

import pytest

from shared.interrupt import Interrupt
from shared.quiet import IdleRace, StreamEnded

WAIT_S = 30.0  # an upper bound, never a measured duration


async def test_our_cancel_is_taken_back() -> None:
    """A fired interrupt lands as CancelledError; withdrawn, the task carries on."""
    task = asyncio.current_task()
    assert task is not None
    cut = Interrupt(task)
    asyncio.get_running_loop().call_soon(cut.fire)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(WAIT_S)
    assert cut.fired
    assert cut.withdraw() is True
    assert not cut.fired and task.cancelling() == 0
    await asyncio.sleep(0)  # no cancel left pending


async def test_one_cancel_per_fire_until_withdrawn() -> None:
    task = asyncio.current_task()
    assert task is not None
    cut = Interrupt(task)
    loop = asyncio.get_running_loop()
    loop.call_soon(cut.fire)
    loop.call_soon(cut.fire)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(WAIT_S)
    assert task.cancelling() == 1
    assert cut.withdraw() is True


async def test_anyone_elses_cancel_still_propagates() -> None:
    """Ours and another's: withdrawing ours says the CancelledError must go on."""
    task = asyncio.current_task()
    assert task is not None
    cut = Interrupt(task)
    loop = asyncio.get_running_loop()
    loop.call_soon(cut.fire)
    loop.call_soon(task.cancel)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(WAIT_S)
    assert cut.withdraw() is False
    assert task.uncancel() == 0  # the other's, taken back by this test alone


async def test_withdraw_without_fire_is_false() -> None:
    task = asyncio.current_task()
    assert task is not None
    assert Interrupt(task).withdraw() is False
    assert task.cancelling() == 0


async def test_race_gives_results_and_silence() -> None:
    """`next` gives the awaitable's result, or None after quiet_s with nothing."""
    race = IdleRace(0.01)
    never: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    try:
        async with asyncio.timeout(WAIT_S):
            assert await race.next(asyncio.sleep(0, b"x")) == b"x"
            assert await race.next(asyncio.shield(never)) is None
            assert await race.next(asyncio.shield(never)) is None
        assert not never.cancelled()  # shielded: the silence never aborts it
        never.set_result(b"late")
        assert await race.next(asyncio.shield(never)) == b"late"
    finally:
        race.close()


async def test_race_ends_when_ended_completes() -> None:
    """The `ended` future interrupts a wait at once, and every later one."""
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[int] = loop.create_future()
    race = IdleRace(WAIT_S, ended)
    never: asyncio.Future[bytes] = loop.create_future()
    loop.call_soon(ended.set_result, 1)
    try:
        async with asyncio.timeout(WAIT_S):
            with pytest.raises(StreamEnded):
                await race.next(never)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # the coroutine is closed, not left unawaited
                with pytest.raises(StreamEnded):
                    await race.next(asyncio.sleep(0))
    finally:
        race.close()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_race_lets_another_cancel_through() -> None:
    """A cancel from anyone else (a client gone) is not mistaken for silence."""
    race = IdleRace(WAIT_S)
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().call_soon(task.cancel)
    try:
        with pytest.raises(asyncio.CancelledError):
            await race.next(asyncio.sleep(WAIT_S))
    finally:
        race.close()
        task.uncancel()
