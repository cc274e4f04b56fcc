"""Following a broadcast stream from its tail: every gateway reads every entry (plain XREAD,
no consumer group), from the moment it starts. Key rotations on `connect:keys` come this way
(app.py); revocations have a follower of their own that also holds the revocation lease
(revocation.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import redis.asyncio as redis
from redis.exceptions import RedisError

from libs.common import streams
from libs.common.logging import get_logger

log = get_logger(__name__)


async def start_position(client: redis.Redis, stream: str, ready: asyncio.Event | None) -> str:
    """Where a follower starts: the stream's newest entry, `ready` set once it is known."""
    position = await streams.last_id(client, stream)
    if ready is not None:
        ready.set()
    return position


async def follow(
    client: redis.Redis,
    stream: str,
    handle: Callable[[streams.Entry], None],
    *,
    ready: asyncio.Event | None = None,
) -> None:
    """Read a broadcast stream from its tail (new entries only) until cancelled.

    Every gateway reads every entry (plain XREAD, no group). Redis failures back off and
    resume from the last entry seen, so nothing announced while Redis blinked is missed.
    """
    delay = 0.2
    last: str | None = None
    while True:
        try:
            if last is None:
                last = await start_position(client, stream, ready)
            for entry in await streams.read_tail(client, stream, last, block_ms=1000):
                last = entry.id
                try:
                    handle(entry)
                except Exception:
                    log.exception("stream_entry_failed", stream=stream, entry=entry.id)
            delay = 0.2
        except (RedisError, OSError):
            log.warning("stream_follow_failed", stream=stream)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
