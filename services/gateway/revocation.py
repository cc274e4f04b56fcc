"""Revocation as the gateway sees it: immediate, at every gateway process.

Identity's revoke writes PostgreSQL, then `SET connect:revoked:<grant id>` (with a TTL longer
than any access token), then announces on `connect:revocations`, all before it answers. So the
authoritative per-call check is the Redis mark, asked on every protected call in the same
round trip as the rate limiter (see ratelimit.py): once the revoke has answered, the next call
at any gateway sees the mark. Nothing cached can skip it.

The stream feeds :class:`RevokedGrants`, a local set of recently revoked grants: a call with a
grant found there is refused without asking Redis at all (a revoked client retrying in a loop
costs nothing). It is only ever a faster "no", never a "yes".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import redis.asyncio as redis
from redis.exceptions import RedisError

from libs.common import streams
from libs.common.config import Settings
from libs.common.logging import get_logger

log = get_logger(__name__)

# The key identity's grants.revoke_grant sets (services/identity/grants.py REVOKED_KEY); kept
# here as data rather than an import so the gateway does not load identity's modules. A test
# holds the two equal.
REVOKED_KEY = "connect:revoked:"
# When an announcement names no TTL: longer than any access token lives.
DEFAULT_TTL = 7200 + 300
_SWEEP_EVERY = 1024


def revoked_key(settings: Settings, grant_id: str) -> str:
    return settings.stream(REVOKED_KEY) + grant_id


class RevokedGrants:
    """Grant ids announced as revoked, each remembered until its tokens have expired."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._adds = 0

    def add(self, grant_id: str, ttl: float = DEFAULT_TTL) -> None:
        self._until[grant_id] = time.monotonic() + ttl
        self._adds += 1
        if self._adds % _SWEEP_EVERY == 0:
            now = time.monotonic()
            for gid in [g for g, t in self._until.items() if t <= now]:
                del self._until[gid]

    def __contains__(self, grant_id: object) -> bool:
        until = self._until.get(grant_id)  # type: ignore[call-overload]
        return until is not None and until > time.monotonic()

    def __len__(self) -> int:
        return len(self._until)


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
                last = await streams.last_id(client, stream)
                if ready is not None:
                    ready.set()
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


def revocation_handler(revoked: RevokedGrants) -> Callable[[streams.Entry], None]:
    def handle(entry: streams.Entry) -> None:
        grant_id = entry.data.get("grant_id")
        if isinstance(grant_id, str) and grant_id:
            ttl = entry.data.get("ttl")
            revoked.add(grant_id, float(ttl) if isinstance(ttl, int | float) else DEFAULT_TTL)

    return handle
