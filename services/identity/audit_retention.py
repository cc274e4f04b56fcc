"""How long the audit trail keeps what: run by identity's sweep (services/identity/sweep.py).

- Partitions are made ahead: this month's and the next MONTHS_AHEAD, so a record never waits
  in the default partition in the ordinary course (only one whose clock is far off does).
- A month is dropped whole once its last instant is AUDIT_RETENTION_DAYS old: rows live that
  long at least and at most a month more. Rows of the default partition older than that are
  deleted in batches.
- Client addresses older than AUDIT_IP_RETENTION_DAYS are cut to their /24 (IPv4) or /48
  (IPv6) network, a minute of rows per statement, from where the last pass stopped.

Every identity process runs it; the upkeep's advisory lock and the truncation's row lock let
one process do each at a time, and the others skip it for that pass. A step that cannot get
its lock within the store's short lock_timeout is left to the next pass.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import asyncpg

from libs.common.config import Settings
from libs.common.logging import get_logger
from services.identity.store import audit_partitions as store

log = get_logger(__name__)

MONTHS_AHEAD = 3
# Rows of a truncation statement: by time, since a time range is what the BRIN index finds.
TRUNCATION_STEP = timedelta(minutes=1)
# Steps per pass, so a long backlog (the first pass after the migration) is worked off over
# several passes, each with an end.
MAX_TRUNCATION_STEPS = 2000
MAX_DELETE_BATCHES = 1000


def _months_from(first: date, count: int) -> list[date]:
    out = [first]
    while len(out) < count:
        out.append(store.next_month(out[-1]))
    return out


async def _upkeep(pool: asyncpg.Pool, step: str, month: date) -> int | None:
    """Make or drop one month's partition in its own transaction; None when another process
    holds the upkeep, or a lock did not come within the timeout (the next pass tries again)."""
    try:
        async with pool.acquire() as conn, conn.transaction():
            if not await store.upkeep_lock(conn):
                return None
            if step == "add":
                if month in await store.months(conn):
                    return None
                return await store.add_month(conn, month)
            if month not in await store.months(conn):
                return None
            await store.drop_month(conn, month)
            return 0
    except (asyncpg.LockNotAvailableError, asyncpg.DuplicateTableError):
        log.info("audit_partition_deferred", step=step, month=month.isoformat())
        return None


async def make_months_ahead(pool: asyncpg.Pool, now: datetime) -> list[date]:
    """Make the partitions of this month and the next MONTHS_AHEAD that are missing."""
    made = []
    existing = set(await store.months(pool))
    for month in _months_from(store.month_start(now), MONTHS_AHEAD + 1):
        if month not in existing and await _upkeep(pool, "add", month) is not None:
            made.append(month)
    return made


async def drop_old_months(pool: asyncpg.Pool, before: datetime) -> list[date]:
    """Drop every month whose last instant is before `before`."""
    dropped = []
    for month in await store.months(pool):
        if store.starts_at(store.next_month(month)) > before:
            break
        if await _upkeep(pool, "drop", month) is not None:
            dropped.append(month)
    return dropped


async def delete_old_default_rows(pool: asyncpg.Pool, before: datetime, batch: int) -> int:
    total = 0
    for _ in range(MAX_DELETE_BATCHES):
        deleted = await store.delete_old_default_rows(pool, before, batch)
        total += deleted
        if deleted < batch:
            break
    return total


async def truncate_addresses(pool: asyncpg.Pool, before: datetime) -> int:
    """Cut the addresses of rows older than `before`, from where the last pass stopped."""
    total = 0
    changed = 0
    for _ in range(MAX_TRUNCATION_STEPS):
        async with pool.acquire() as conn, conn.transaction():
            state = await store.lock_truncation(conn)
            if state is None or state.done_before >= before:
                return total
            low = state.done_before
            if changed == 0:
                # Skip over time with nothing to cut (everything before the oldest row, on
                # the first pass; a quiet night) instead of stepping through it a minute at
                # a time.
                first = await store.first_full_address(conn, low, before)
                if first is None:
                    await store.record_truncated_before(conn, before)
                    return total
                low = max(low, first)
            high = min(low + TRUNCATION_STEP, before)
            changed = await store.truncate_addresses(conn, low, high)
            await store.record_truncated_before(conn, high)
            total += changed
    return total


async def sweep(
    pool: asyncpg.Pool, settings: Settings, now: datetime | None = None
) -> dict[str, int]:
    """One pass of the audit trail's retention; what it did, by what."""
    now = datetime.now(UTC) if now is None else now
    policy = settings.identity
    made = await make_months_ahead(pool, now)
    cutoff = now - timedelta(days=policy.audit_retention_days)
    dropped = await drop_old_months(pool, cutoff)
    deleted = await delete_old_default_rows(pool, cutoff, policy.sweep_batch_size)
    truncated = await truncate_addresses(pool, now - timedelta(days=policy.audit_ip_retention_days))
    if made or dropped:
        log.info(
            "audit_partitions_changed",
            made=[m.isoformat() for m in made],
            dropped=[m.isoformat() for m in dropped],
        )
    return {
        "audit_partitions_made": len(made),
        "audit_partitions_dropped": len(dropped),
        "audit_default_rows_deleted": deleted,
        "audit_addresses_truncated": truncated,
    }
