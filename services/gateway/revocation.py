"""Revocation as the gateway sees it: immediate, at every gateway process.

Identity's revoke writes PostgreSQL, then `SET connect:revoked:<grant id>` (with a TTL longer
than any access token), then announces on `connect:revocations`, all before it answers. So the
authoritative per-call check is the Redis mark, asked on every protected call in the same
round trip as the rate limiter (see ratelimit.py): once the revoke has answered, the next call
at any gateway sees the mark. Nothing cached can skip it.

The stream feeds :class:`RevokedGrants`, a local set of recently revoked grants: a call with a
grant found there is refused without asking Redis at all (a revoked client retrying in a loop
costs nothing).

While the gateway holds a revocation lease (:class:`Lease`, libs/common/leases.py) the set is
also a "yes": identity's revoke does not answer before this gateway has applied the
announcement, so a grant absent from the set is not revoked, and the call needs no round trip
for it. The follower below renews the lease after every read of the stream. Without a live
lease every call asks Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from collections.abc import Callable

import redis.asyncio as redis
from redis.exceptions import RedisError

from libs.common import keys, leases, marks_fence, streams
from libs.common.config import Settings
from libs.common.logging import get_logger
from services.gateway import broadcasts

log = get_logger(__name__)

# When an announcement names no TTL: longer than any access token lives.
DEFAULT_TTL = 7200 + 300
_SWEEP_EVERY = 1024


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


def _boot_clock() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


# The lease's clock keeps counting while the host sleeps (CLOCK_MONOTONIC stops): a gateway
# waking from a suspend must find its lease over, as Redis does.
lease_clock: Callable[[], float] = (
    _boot_clock if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic
)


class Lease:
    """Until when this gateway may answer "not revoked" from its own set (`lease_clock`)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.gateway = secrets.token_hex(8)
        self._until = 0.0

    def live(self) -> bool:
        return lease_clock() < self._until

    def extend(self, asked_at: float, granted: float) -> None:
        """Redis granted the lease for `granted` seconds from when it ran the request, sent at
        `asked_at`: count a share of that from the sending."""
        self._until = asked_at + min(self.seconds, granted) * leases.OWN_SHARE

    def drop(self) -> None:
        self._until = 0.0


async def load_marks(client: redis.Redis, settings: Settings, revoked: RevokedGrants) -> int:
    """Every revocation mark in Redis into the local set; how many there were. On a Cluster the
    marks are spread over the primaries by school, and scan_iter walks every primary."""
    found = 0
    page: list[bytes] = []
    async for key in client.scan_iter(match=keys.revoked_pattern(settings), count=1000):
        page.append(key)
        if len(page) >= 1000:
            found += await _load_page(client, settings, revoked, page)
            page = []
    return found + await _load_page(client, settings, revoked, page)


async def _load_page(
    client: redis.Redis, settings: Settings, revoked: RevokedGrants, page: list[bytes]
) -> int:
    if not page:
        return 0
    # Each remembered for as long as its mark lives (its tokens' lifetime).
    pipe = client.pipeline(transaction=False)
    for key in page:
        pipe.pttl(key)
    found = 0
    for key, ttl_ms in zip(page, await pipe.execute(), strict=True):
        grant_id = keys.grant_of_mark(settings, streams.text(key))
        if grant_id and ttl_ms != -2:
            revoked.add(grant_id, ttl_ms / 1000 if ttl_ms > 0 else math.inf)
            found += 1
    return found


async def follow_revocations(
    client: redis.Redis,
    settings: Settings,
    revoked: RevokedGrants,
    lease: Lease,
    *,
    ready: asyncio.Event | None = None,
) -> None:
    """Follow connect:revocations into `revoked`, holding `lease` while doing so.

    The lease is renewed after each read (entries or the read's timeout, a quarter of a
    lease), reporting the newest entry applied. A fresh registration moves the read position
    to the stream's newest entry and loads every mark before the lease counts, since the
    entries before it are not read. Any failure drops the lease until the next registration.
    """
    stream = settings.stream(streams.REVOCATIONS)
    use_lease = lease.seconds > 0
    try:
        await _follow(client, settings, stream, revoked, lease, ready)
    finally:
        if use_lease:
            lease.drop()
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await asyncio.wait_for(leases.release(client, settings, lease.gateway), 0.5)


async def _follow(
    client: redis.Redis,
    settings: Settings,
    stream: str,
    revoked: RevokedGrants,
    lease: Lease,
    ready: asyncio.Event | None,
) -> None:
    handle = revocation_handler(revoked)
    use_lease = lease.seconds > 0
    block_ms = max(50, int(lease.seconds * 250)) if use_lease else 1000
    delay = 0.2
    position: str | None = None
    epoch = ""
    registered = False
    while True:
        try:
            if position is None:
                position = await broadcasts.start_position(client, stream, ready)
            if use_lease and not registered:
                # Registering reports the stream's newest entry as applied before the marks
                # are loaded: nothing may be answered from memory in between.
                lease.drop()
                asked_at = lease_clock()
                answer = await leases.take(
                    client, settings, stream, lease.gateway, applied="", epoch=""
                )
                if answer.state == leases.REGISTERED:
                    position, epoch = await _registered(client, settings, revoked, lease, answer)
                    registered = True
                    lease.extend(asked_at, answer.seconds)
            for entry in await streams.read_tail(client, stream, position, block_ms=block_ms):
                position = entry.id
                try:
                    handle(entry)
                except Exception:
                    log.exception("stream_entry_failed", stream=stream, entry=entry.id)
                    # Not applied, so not to be reported applied: start again from the marks.
                    lease.drop()
                    registered = False
            if registered:
                asked_at = lease_clock()
                answer = await leases.take(
                    client, settings, stream, lease.gateway, applied=position, epoch=epoch
                )
                if answer.state == leases.RENEWED:
                    lease.extend(asked_at, answer.seconds)
                elif answer.state == leases.REGISTERED:
                    # The lease had run out in Redis, or Redis has a new epoch (it lost data):
                    # nothing from memory until the marks are loaded again.
                    lease.drop()
                    position, epoch = await _registered(client, settings, revoked, lease, answer)
                    lease.extend(asked_at, answer.seconds)
                else:
                    # No epoch (Redis lost the leases: identity writes a new one later), or
                    # refused (lagging, or entries trimmed unread): register afresh, from the
                    # marks.
                    lease.drop()
                    registered = False
            delay = 0.2
        except (RedisError, OSError):
            log.warning("stream_follow_failed", stream=stream)
            # Whatever was not confirmed cannot be counted on.
            lease.drop()
            registered = False
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def _registered(
    client: redis.Redis,
    settings: Settings,
    revoked: RevokedGrants,
    lease: Lease,
    answer: leases.LeaseAnswer,
) -> tuple[str, str]:
    """After a (re)registration: the marks cover everything up to the newest entry, on nodes
    whose marks identity restored for their run (libs/common/marks_fence.py), the same runs
    before and after the load; else no lease (MarksNotRestored, a RedisError: retried)."""
    before = await marks_fence.states(client, settings)
    if any(run_id != recorded for run_id, recorded in before.values()):
        raise MarksNotRestored("revocation marks not restored on every Redis node yet")
    marks = await load_marks(client, settings, revoked)
    if await marks_fence.run_ids(client, settings) != {s: r for s, (r, _) in before.items()}:
        raise MarksNotRestored("a Redis node changed while the marks were loaded")
    log.info("revocation_lease_registered", gateway=lease.gateway, marks=marks)
    return answer.newest, answer.epoch


class MarksNotRestored(RedisError):
    """Some Redis node may lack marks: the gateway holds no lease until identity restores them."""


def revocation_handler(revoked: RevokedGrants) -> Callable[[streams.Entry], None]:
    def handle(entry: streams.Entry) -> None:
        grant_id = entry.data.get("grant_id")
        if isinstance(grant_id, str) and grant_id:
            ttl = entry.data.get("ttl")
            revoked.add(grant_id, float(ttl) if isinstance(ttl, int | float) else DEFAULT_TTL)

    return handle
