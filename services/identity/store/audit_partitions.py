"""SQL of audit_log's lifecycle: its monthly partitions, their retention, and the truncation
of old client addresses (services/identity/audit_retention.py decides when).

audit_log is partitioned by month of occurred_at, in UTC (migrations/012_audit_partitions.sql);
a month's partition is `audit_log_y<YYYY>m<MM>`, and rows of a month without one wait in
`audit_log_default`. DDL takes no parameters, so names and bounds are made here from dates,
never from input.

Locks: making a partition (ATTACH) takes SHARE UPDATE EXCLUSIVE on audit_log, which inserts
do not wait for, and ACCESS EXCLUSIVE on the small default partition; dropping one takes
ACCESS EXCLUSIVE on audit_log, which inserts do wait for. Each runs with a short lock_timeout
(LOCK_TIMEOUT): a waiting ACCESS EXCLUSIVE request queues every later insert behind it, so
rather than wait long for a slow reader (a big CSV export) it gives up and the next sweep
tries again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime

from libs.common.db import Connection, Executor

DEFAULT_PARTITION = "audit_log_default"
_NAME = re.compile(r"audit_log_y(\d{4})m(\d{2})")
LOCK_TIMEOUT = "500ms"
# pg_try_advisory_xact_lock key of partition upkeep: one process at a time makes or drops.
_UPKEEP_LOCK = 0x4C43_4155_4450  # "LCAUDP"

# An address is cut to its /24 (IPv4) or /48 (IPv6) network: it still says which provider
# and roughly where a call came from, and no longer which household. IPv4-mapped IPv6
# addresses are family 6 and lose their IPv4 part entirely at /48: more cut, never less.
_KEPT_BITS = "CASE WHEN family(ip) = 4 THEN 24 ELSE 48 END"
_FULL_ADDRESS = f"ip IS NOT NULL AND masklen(ip) > {_KEPT_BITS}"


def month_start(moment: datetime) -> date:
    return date(moment.year, moment.month, 1)


def next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def partition_name(month: date) -> str:
    return f"audit_log_y{month.year:04d}m{month.month:02d}"


def _bound(month: date) -> str:
    """A month's first instant as a timestamptz literal, in UTC whatever the session's zone."""
    return f"'{month.isoformat()} 00:00:00+00'"


def starts_at(month: date) -> datetime:
    """A month's first instant, UTC."""
    return datetime(month.year, month.month, 1, tzinfo=UTC)


async def months(db: Executor) -> list[date]:
    """The months that have a partition, oldest first."""
    rows = await db.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = 'audit_log'::regclass"
    )
    found = [_NAME.fullmatch(r["relname"]) for r in rows]
    return sorted(date(int(m[1]), int(m[2]), 1) for m in found if m)


async def upkeep_lock(conn: Connection) -> bool:
    """Take partition upkeep's lock for this transaction; False when another process has it.
    Also bounds this transaction's lock waits (LOCK_TIMEOUT)."""
    await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
    return bool(await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", _UPKEEP_LOCK))


async def add_month(conn: Connection, month: date) -> int:
    """Make `month`'s partition, moving into it the default partition's rows of that month
    (ATTACH refuses while the default holds any); how many moved. In the caller's
    transaction, under upkeep_lock."""
    name = partition_name(month)
    low, high = _bound(month), _bound(next_month(month))
    # Made apart and attached: CREATE ... PARTITION OF would take ACCESS EXCLUSIVE on
    # audit_log, ATTACH only SHARE UPDATE EXCLUSIVE.
    await conn.execute(f"CREATE TABLE {name} (LIKE audit_log INCLUDING DEFAULTS)")
    status = await conn.execute(
        f"WITH moved AS (DELETE FROM {DEFAULT_PARTITION}"  # noqa: S608 - names made above
        f" WHERE occurred_at >= {low} AND occurred_at < {high} RETURNING *)"
        f" INSERT INTO {name} SELECT * FROM moved"
    )
    await conn.execute(
        f"ALTER TABLE audit_log ATTACH PARTITION {name} FOR VALUES FROM ({low}) TO ({high})"
    )
    return int(status.rsplit(" ", 1)[-1])


async def drop_month(conn: Connection, month: date) -> None:
    """Drop `month`'s partition and its rows. In the caller's transaction, under
    upkeep_lock."""
    await conn.execute(f"DROP TABLE {partition_name(month)}")


async def delete_old_default_rows(db: Executor, before: datetime, batch: int) -> int:
    """Delete up to `batch` rows of the default partition older than `before`."""
    status = await db.execute(
        f"DELETE FROM {DEFAULT_PARTITION} WHERE ctid = ANY(ARRAY("  # noqa: S608
        f" SELECT ctid FROM {DEFAULT_PARTITION} WHERE occurred_at < $1 LIMIT $2))",
        before,
        batch,
    )
    return int(status.rsplit(" ", 1)[-1])


@dataclass(frozen=True, slots=True)
class TruncationState:
    """Where address truncation stands: every row before `done_before` is cut."""

    done_before: datetime


async def lock_truncation(conn: Connection) -> TruncationState | None:
    """Lock the truncation's progress row for this transaction; None when another process
    holds it (that one is truncating)."""
    row = await conn.fetchrow(
        "SELECT ips_truncated_before FROM audit_retention FOR UPDATE SKIP LOCKED"
    )
    if row is None:
        return None
    done: datetime = row["ips_truncated_before"]
    # '-infinity' (nothing cut yet) comes back from asyncpg as a naive datetime.min.
    return TruncationState(done if done.tzinfo else done.replace(tzinfo=UTC))


async def first_full_address(db: Executor, low: datetime, high: datetime) -> datetime | None:
    """The occurred_at of the oldest row in [low, high) whose address is not cut yet."""
    found: datetime | None = await db.fetchval(
        "SELECT min(occurred_at) FROM audit_log"  # noqa: S608
        f" WHERE occurred_at >= $1 AND occurred_at < $2 AND {_FULL_ADDRESS}",
        low,
        high,
    )
    return found


async def truncate_addresses(conn: Connection, low: datetime, high: datetime) -> int:
    """Cut every address of rows in [low, high) to its network; how many rows changed."""
    status = await conn.execute(
        f"UPDATE audit_log SET ip = network(set_masklen(ip, {_KEPT_BITS}))::inet"  # noqa: S608
        f" WHERE occurred_at >= $1 AND occurred_at < $2 AND {_FULL_ADDRESS}",
        low,
        high,
    )
    return int(status.rsplit(" ", 1)[-1])


async def record_truncated_before(conn: Connection, moment: datetime) -> None:
    """Every row before `moment` has its address cut (never moves back)."""
    await conn.execute(
        "UPDATE audit_retention SET ips_truncated_before = $1 WHERE ips_truncated_before < $1",
        moment,
    )
