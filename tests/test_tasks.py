"""Background loops stop within a bound, even when a cancel is swallowed once."""

from __future__ import annotations

import asyncio
import time

from libs.common.tasks import stop_all


async def test_a_loop_that_swallows_a_cancel_is_still_ended() -> None:
    swallowed = 0

    async def stubborn() -> None:
        # What redis-py does to a cancel that lands inside a blocking read.
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed > 2:
                    raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    started = time.monotonic()
    await stop_all([task], grace=0)
    assert task.cancelled()
    assert swallowed == 3
    assert time.monotonic() - started < 2


async def test_a_loop_that_watches_its_stop_event_ends_by_itself() -> None:
    stop = asyncio.Event()

    async def polite() -> str:
        await stop.wait()
        return "done"

    task = asyncio.create_task(polite())
    await stop_all([task], stop=stop)
    assert task.result() == "done"


async def test_a_task_that_never_ends_is_given_up_within_the_bound() -> None:
    alive = True

    async def immortal() -> None:
        while alive:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(immortal())
    await asyncio.sleep(0)
    started = time.monotonic()
    await stop_all([task], grace=0, cancel_for=0.3)
    assert time.monotonic() - started < 1.5
    assert not task.done()
    alive = False  # the test's own clean-up: let the loop end at its next wake-up
    task.cancel()
    await task
