"""Revocation marks re-asserted from PostgreSQL, so a Redis that lost its data cannot bring
revoked tokens back to life.

Gateways refuse a grant when `connect:revoked:<grant>` exists in Redis (or their in-memory set
heard of it on `connect:revocations`). PostgreSQL is the source of truth; Redis may not be
durable: a restart without persistence, a failover to a replica that lagged, or eviction under
memory pressure can drop marks while the grants' access tokens are still live. So identity
writes the marks again, from the grants revoked within one mark lifetime (the access-token
lifetime plus leeway, grants.mark_ttl): older revocations have no live access token left.

When: at start, on a schedule, and at once when a Redis node (every primary of a Cluster) runs
under a run_id the last complete pass did not record (libs/common/marks_fence.py: restarted,
empty or from a snapshot, or a replica promoted; checked every few seconds). Gateways refuse
to read "no mark" as "not revoked" on such a node until the pass records it. The schedule
covers the rest: a single evicted mark.

Each restored mark gets what is left of its original lifetime (never a fresh one) and is
written with NX, so a mark that is there is left alone; each one restored is announced again on
`connect:revocations`, since a gateway that registered its revocation lease while the mark was
missing answers from memory and hears of revocations only there. After a pass, the lease epoch
is written again if Redis lost it (libs/common/leases.py). Every identity process may run this at
once: the writes are idempotent, each page is one short query, and nothing is locked.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

import asyncpg
import redis.asyncio as redis
from redis.exceptions import RedisError

from libs.common import keys, leases, marks_fence, streams
from libs.common.config import Settings
from libs.common.logging import get_logger
from services.identity import grants
from services.identity.store import revocations as revocation_store

log = get_logger(__name__)

# How often each process looks at every primary's record of the last pass
# (libs/common/marks_fence.py): the longest a lost mark stays lost, and gateways fail closed on
# that node, after it comes back empty.
CHECK_INTERVAL = 5.0
# How often a full pass runs regardless of the sentinel.
REASSERT_INTERVAL = 120.0
# Grants read and marks written per round trip.
PAGE_SIZE = 1000


async def reassert_once(pool: asyncpg.Pool, redis_client: redis.Redis, settings: Settings) -> int:
    """One complete pass; how many marks were missing and have been written again."""
    window = grants.mark_ttl(settings)
    # Read before anything is written: the pass counts for a node only if it ran the same
    # run_id throughout (marks_fence.record compares on the node itself).
    began = await marks_fence.run_ids(redis_client, settings)
    cursor = revocation_store.START
    restored = 0
    while True:
        page = await revocation_store.revoked_since(
            pool, window_seconds=window, after=cursor, limit=PAGE_SIZE
        )
        if page:
            pipe = redis_client.pipeline(transaction=False)
            for revoked in page:
                pipe.set(
                    keys.revoked_mark(settings, revoked.school_id, revoked.grant_id),
                    revoked.reason,
                    ex=revoked.ttl_left,
                    nx=True,
                )
            written = [r for r, w in zip(page, await pipe.execute(), strict=True) if w]
            if written:
                # Announced again too: a gateway that registered while the mark was missing
                # answers from memory and learns of revocations only from the stream.
                await streams.append_many(
                    redis_client,
                    settings.stream(streams.REVOCATIONS),
                    [
                        {
                            "grant_id": str(r.grant_id),
                            "reason": r.reason,
                            "at": time.time(),
                            "ttl": r.ttl_left,
                            "restored": True,
                        }
                        for r in written
                    ],
                    maxlen=grants.REVOCATIONS_MAXLEN,
                )
            restored += len(written)
            cursor = (page[-1].revoked_at, page[-1].grant_id)
        if len(page) < PAGE_SIZE:
            break
        # Let requests in between pages: one pass can cover many thousands of grants.
        await asyncio.sleep(0)
    await marks_fence.record(redis_client, settings, began)
    return restored


async def _unrestored(redis_client: redis.Redis, settings: Settings) -> bool:
    return bool(await marks_fence.unrestored(redis_client, settings))


async def run(
    pool: asyncpg.Pool, redis_client: redis.Redis, settings: Settings, stop: asyncio.Event
) -> None:
    """Re-assert at start, every REASSERT_INTERVAL (jittered, so processes started together
    do not run in lockstep), and whenever the sentinel has gone, until `stop` is set."""
    loop = asyncio.get_running_loop()
    due = loop.time()
    while not stop.is_set():
        try:
            if loop.time() >= due or await _unrestored(redis_client, settings):
                restored = await reassert_once(pool, redis_client, settings)
                if restored:
                    # Marks were missing: Redis lost data, which operators should know about.
                    log.warning("revocation_marks_restored", restored=restored)
                due = loop.time() + random.uniform(  # noqa: S311 - jitter, not a secret
                    REASSERT_INTERVAL / 2, REASSERT_INTERVAL
                )
            if (
                settings.gateway.revocation_lease > 0
                and await leases.epoch_state(redis_client, settings) != leases.EPOCH_THERE
            ):
                await _renew_epoch(pool, redis_client, settings, stop)
        except (OSError, asyncpg.PostgresError, RedisError):
            # Retried at the next check: the sentinel is written only after a complete pass.
            log.warning("revocation_reassert_failed", exc_info=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), CHECK_INTERVAL)


async def _renew_epoch(
    pool: asyncpg.Pool, redis_client: redis.Redis, settings: Settings, stop: asyncio.Event
) -> None:
    """Let gateways take revocation leases again (libs/common/leases.py), the loss having
    been noted in the lease hash: a whole lease later, so no gateway still counts on a lease
    it held before, and after a complete pass begun since, so the marks a registering gateway
    loads are all there."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), settings.gateway.revocation_lease)
    if stop.is_set():
        return
    began = await leases.redis_now_us(redis_client)
    await reassert_once(pool, redis_client, settings)
    state = await leases.epoch_state(redis_client, settings, pass_began_us=began)
    if state == leases.EPOCH_WRITTEN:
        log.info("revocation_leases_epoch_written")
