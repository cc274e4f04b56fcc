"""The periodic sweep: removes authorization codes, sessions and refresh tokens nothing can
use any more, so those tables hold live rows and a bounded tail, not all of history.

What is kept, and why (the SQL and its reasoning are in store/sweep.py):
- authorization codes until they expire, redeemed or not: a replay within the code's life
  still finds the redeemed row and revokes the grant;
- refresh tokens, rotated-away ones included, until their own expiry: reuse detection needs
  the rotated row exactly as long as the token could otherwise be exchanged; the tokens of a
  revoked grant go at once, since nothing can come of presenting them;
- sessions until they expire;
- audit_log's months until AUDIT_RETENTION_DAYS, client addresses in full until
  AUDIT_IP_RETENTION_DAYS (audit_retention.py), partitions made months ahead.
Remembered consents do not expire; CSRF tokens are stateless MACs; pending authorization
requests, rate-limit and sign-in throttle counters live in Redis with an expiry of their own.

Each identity process runs the sweep; the deletes skip rows another sweeper (or a request)
holds, so any number may run together. One pass deletes batch after batch, each its own short
statement, up to a bound per table, so a backlog is worked off over several passes rather
than in one long one.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable

import asyncpg

from libs.common.config import Settings
from libs.common.logging import get_logger
from services.identity import audit_retention
from services.identity.store import sweep as sweep_store

log = get_logger(__name__)

# Batches per table in one pass: with the default batch size, a million rows a pass at most.
MAX_BATCHES_PER_PASS = 1000


async def _drain(delete: Callable[[], Awaitable[int]], batch: int) -> int:
    total = 0
    for _ in range(MAX_BATCHES_PER_PASS):
        deleted = await delete()
        total += deleted
        if deleted < batch:
            break
        # Let requests in between batches: a sweep is never urgent.
        await asyncio.sleep(0)
    return total


async def sweep_once(pool: asyncpg.Pool, settings: Settings) -> dict[str, int]:
    """One pass over every table; how many rows each lost (and what the audit trail's
    retention did: services/identity/audit_retention.py)."""
    batch = settings.identity.sweep_batch_size
    ttl = settings.tokens.revoked_refresh_sweep_window
    return {
        **await audit_retention.sweep(pool, settings),
        "authorization_codes": await _drain(
            lambda: sweep_store.delete_expired_codes(pool, batch), batch
        ),
        "sessions": await _drain(lambda: sweep_store.delete_expired_sessions(pool, batch), batch),
        "refresh_tokens": await _drain(
            lambda: sweep_store.delete_expired_refresh_tokens(pool, batch), batch
        ),
        "revoked_grant_refresh_tokens": await _drain(
            lambda: sweep_store.delete_refresh_tokens_of_revoked_grants(pool, batch, ttl), batch
        ),
    }


async def run(pool: asyncpg.Pool, settings: Settings, stop: asyncio.Event) -> None:
    """Sweep every IDENTITY_SWEEP_INTERVAL_SECONDS until `stop` is set.

    Each wait is jittered (between half and the whole interval, the first one from zero), so
    processes started together do not sweep in lockstep.
    """
    interval = settings.identity.sweep_interval
    wait = random.uniform(0, interval)  # noqa: S311 - jitter, not a secret
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), wait)
        if stop.is_set():
            return
        try:
            deleted = await sweep_once(pool, settings)
            if any(deleted.values()):
                log.info("identity_swept", **deleted)
        except (OSError, asyncpg.PostgresError):
            log.warning("identity_sweep_failed", exc_info=True)
        wait = random.uniform(interval / 2, interval)  # noqa: S311 - jitter, not a secret
