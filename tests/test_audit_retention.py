"""audit_log partitioned by month, its retention and the truncation of client addresses
(issue 16 §4; README "Audit retention").

Each test has a database of its own, since retention is run at chosen moments ("now" years
ahead drops months) and must not touch the session's rows:
- the migration converts a populated audit_log of the previous schema, keeping every row and
  id, each in its month's partition, and new rows get new ids; a record stored again (the
  consumer's batches, identity's rows) stays one row;
- the sweep makes partitions ahead, moving rows that waited in the default partition into
  their month's; drops exactly the months whose last instant is older than the retention,
  and deletes the default partition's rows older than it;
- addresses older than AUDIT_IP_RETENTION_DAYS are cut to /24 and /48, newer ones are not, a
  second pass changes nothing, and the admin page's query still reads the rows.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from libs.common import db
from libs.common.config import ConfigError, Settings, load_settings
from services.identity import audit, audit_retention, sweep
from services.identity.store import admin as admin_store
from services.identity.store import audit as audit_store
from services.identity.store import audit_partitions
from tests.support import connect, database_env

pytestmark = pytest.mark.timeout(180)

PARTITIONING = 12  # identity's migration that partitions audit_log


@pytest.fixture
async def own(base_env: dict[str, str], run_id: str) -> AsyncIterator[tuple[str, Settings]]:
    """A database of the test's own (not migrated) and settings on it."""
    name = f"{run_id}_aud_{secrets.token_hex(4)}"
    url = base_env["DATABASE_URL"].rsplit("/", 1)[0] + f"/{name}"
    yield url, load_settings({**base_env, **database_env(base_env, url)})
    await db.drop_database(url)


@pytest.fixture
async def pool(own: tuple[str, Settings]) -> AsyncIterator[asyncpg.Pool]:
    url, settings = own
    await db.migrate(url)
    p = await db.create_pool(settings=settings, min_size=1, max_size=4)
    yield p
    await p.close()


def _row(when: datetime, ip: str | None = "192.0.2.77", **extra: Any) -> audit_store.AuditRow:
    values: dict[str, Any] = {
        "record_id": f"i:{uuid.uuid4()}",
        "occurred_at": when,
        "school_id": 42,
        "client_id": "lc_ret_client",
        "subject": None,
        "grant_id": None,
        "action": "api.call",
        "method": "GET",
        "path": "/api/v1/courses",
        "status": 200,
        "scope": "courses:read",
        "ip": ip,
        "detail": {},
    }
    values.update(extra)
    return audit_store.AuditRow(**values)


async def _where(pool: asyncpg.Pool) -> dict[str, str]:
    """Each row's record id and the partition holding it."""
    rows = await pool.fetch("SELECT record_id, tableoid::regclass::text AS part FROM audit_log")
    return {r["record_id"]: r["part"] for r in rows}


def _month(moment: datetime) -> date:
    return date(moment.year, moment.month, 1)


async def test_migration_partitions_a_populated_audit_log(own: tuple[str, Settings]) -> None:
    url, settings = own
    before = [
        m
        for m in db.discover_migrations()
        if not (m.component == "identity" and m.version >= PARTITIONING)
    ]
    await db.migrate(url, before)
    now = datetime.now(UTC)
    stamps = {
        "legacy:1": now - timedelta(days=400),
        "r:recent": now - timedelta(days=3),
        "i:now": now,
        "h:ancient": now - timedelta(days=365 * 7),
    }
    conn = await connect(url)
    try:
        # Ids with gaps, as deletes and rolled-back inserts leave them: kept as they are.
        for (record_id, when), old_id in zip(stamps.items(), (7, 1000, 55, 3), strict=True):
            await conn.execute(
                "INSERT INTO audit_log (id, record_id, occurred_at, school_id, action, ip, detail)"
                " OVERRIDING SYSTEM VALUE"
                " VALUES ($3, $1, $2, 42, 'api.call', '198.51.100.9', '{\"n\": 1}')",
                record_id,
                when,
                old_id,
            )
        old_ids = {
            r["record_id"]: r["id"] for r in await conn.fetch("SELECT record_id, id FROM audit_log")
        }
    finally:
        await conn.close()

    await db.migrate(url)
    p = await db.create_pool(settings=settings, min_size=1, max_size=2)
    try:
        kind = await p.fetchval("SELECT relkind FROM pg_class WHERE relname = 'audit_log'")
        assert kind == b"p" or kind == "p"
        rows = await p.fetch("SELECT * FROM audit_log")
        assert {r["record_id"]: r["id"] for r in rows} == old_ids
        assert {r["record_id"]: r["occurred_at"] for r in rows} == stamps
        assert all(str(r["ip"]) == "198.51.100.9" and r["detail"] == {"n": 1} for r in rows)
        where = await _where(p)
        for record_id in ("legacy:1", "r:recent", "i:now"):
            assert where[record_id] == audit_partitions.partition_name(_month(stamps[record_id]))
        # Older than the five years the migration makes partitions for: the default one.
        assert where["h:ancient"] == "audit_log_default"
        months = await audit_partitions.months(p)
        ahead = audit_partitions.next_month(
            audit_partitions.next_month(audit_partitions.next_month(_month(now)))
        )
        assert ahead in months

        # New rows get new ids; a record stored again stays one row, by either insert path.
        again = _row(now - timedelta(minutes=1))
        await audit_store.insert_many(p, [again])
        await audit_store.insert_many(p, [again, _row(now)])
        entry = orjson.dumps(
            {"records": [{"rid": "resent", "occurred_at": now.timestamp(), "action": "api.call"}]}
        ).decode()
        assert await audit_store.insert_batches(p, [entry]) == 1
        assert await audit_store.insert_batches(p, [entry, entry]) == 0
        counts = await p.fetch(
            "SELECT record_id, count(*) AS n, min(id) AS id FROM audit_log GROUP BY record_id"
        )
        assert all(r["n"] == 1 for r in counts)
        assert len(counts) == len(stamps) + 3
        new_ids = [r["id"] for r in counts if r["record_id"] not in old_ids]
        assert min(new_ids) > max(old_ids.values())
    finally:
        await p.close()


async def test_partitions_ahead_retention_and_the_default_partition(
    own: tuple[str, Settings], pool: asyncpg.Pool
) -> None:
    _, settings = own
    settings = replace(settings, identity=replace(settings.identity, audit_retention_days=60))
    # A moment well ahead of every partition the migration made, so this test's months are
    # all its own: rows of months without a partition wait in the default one.
    now = datetime(2031, 5, 10, 12, 0, tzinfo=UTC)
    stamps = {
        "jan-early": datetime(2031, 1, 1, 0, 0, tzinfo=UTC),
        "jan-late": datetime(2031, 1, 31, 23, 59, 59, tzinfo=UTC),
        "feb-early": datetime(2031, 2, 1, tzinfo=UTC),
        # The cutoff is 2031-03-11 12:00: March straddles it.
        "mar-before-cutoff": datetime(2031, 3, 2, tzinfo=UTC),
        "mar-after-cutoff": datetime(2031, 3, 20, tzinfo=UTC),
        "may": datetime(2031, 5, 9, tzinfo=UTC),
        "july": datetime(2031, 7, 4, tzinfo=UTC),
    }
    await audit_store.insert_many(pool, [_row(t, record_id=k) for k, t in stamps.items()])
    assert set((await _where(pool)).values()) == {"audit_log_default"}
    ids = {r["record_id"]: r["id"] for r in await pool.fetch("SELECT record_id, id FROM audit_log")}

    # Months ahead made, each taking its rows out of the default partition.
    done = await audit_retention.sweep(pool, settings, now=now)
    assert done["audit_partitions_made"] == 4  # May to August 2031
    where = await _where(pool)
    assert where["may"] == "audit_log_y2031m05" and where["july"] == "audit_log_y2031m07"
    assert {
        r["record_id"]: r["id"] for r in await pool.fetch("SELECT record_id, id FROM audit_log")
    } == {k: v for k, v in ids.items() if k in where}
    # Rows older than the cutoff in the default partition are deleted; the rest wait there.
    assert done["audit_default_rows_deleted"] == 4  # January, February, early March
    assert set(where) == {"mar-after-cutoff", "may", "july"}
    assert where["mar-after-cutoff"] == "audit_log_default"

    # Partitions of past months, with rows, as a long-running system has them.
    async with pool.acquire() as conn, conn.transaction():
        for month in (date(2031, 1, 1), date(2031, 2, 1), date(2031, 3, 1)):
            await audit_partitions.add_month(conn, month)
    assert (await _where(pool))["mar-after-cutoff"] == "audit_log_y2031m03"
    await audit_store.insert_many(
        pool,
        [
            _row(t, record_id=k)
            for k, t in stamps.items()
            if k.startswith(("jan", "feb", "mar-before"))
        ],
    )
    # Retention drops exactly the months whose last instant is past the cutoff: January and
    # February; March (which straddles it) stays whole, its early row included.
    done = await audit_retention.sweep(pool, settings, now=now)
    assert done["audit_partitions_dropped"] == 2
    months = await audit_partitions.months(pool)
    assert date(2031, 1, 1) not in months and date(2031, 2, 1) not in months
    assert date(2031, 3, 1) in months
    assert set(await _where(pool)) == {"mar-before-cutoff", "mar-after-cutoff", "may", "july"}

    # Nothing more to do on a second pass.
    done = await audit_retention.sweep(pool, settings, now=now)
    assert not any(v for k, v in done.items() if k != "audit_addresses_truncated")

    # The sweep identity runs does it too.
    later = await sweep.sweep_once(pool, settings)
    assert "audit_partitions_made" in later


async def test_addresses_are_cut_after_their_retention(
    own: tuple[str, Settings], pool: asyncpg.Pool
) -> None:
    _, settings = own
    settings = replace(settings, identity=replace(settings.identity, audit_ip_retention_days=30))
    now = datetime.now(UTC)
    days = settings.identity.audit_ip_retention_days
    old = now - timedelta(days=days, hours=1)
    young = now - timedelta(days=days) + timedelta(hours=1)
    rows = [
        _row(old - timedelta(days=90), "203.0.113.200", record_id="v4-very-old"),
        _row(old, "192.0.2.77", record_id="v4-old"),
        _row(old, "2001:db8:abcd:12:1:2:3:4", record_id="v6-old"),
        _row(old, "::ffff:198.51.100.7", record_id="mapped-old"),
        _row(old, None, record_id="none-old"),
        _row(young, "192.0.2.78", record_id="v4-young"),
        _row(young, "2001:db8:abcd:12::9", record_id="v6-young"),
    ]
    await audit_store.insert_many(pool, rows)
    # The migration made partitions from this month on: the very old row may wait in the
    # default partition, which is cut all the same.
    done = await audit_retention.sweep(pool, settings, now=now)
    assert done["audit_addresses_truncated"] == 4
    stored = {
        r["record_id"]: r["ip"] for r in await pool.fetch("SELECT record_id, ip FROM audit_log")
    }
    assert stored["v4-very-old"] == ipaddress.ip_interface("203.0.113.0/24")
    assert stored["v4-old"] == ipaddress.ip_interface("192.0.2.0/24")
    assert stored["v6-old"] == ipaddress.ip_interface("2001:db8:abcd::/48")
    assert stored["mapped-old"] == ipaddress.ip_interface("::/48")
    assert stored["none-old"] is None
    assert stored["v4-young"] == ipaddress.ip_address("192.0.2.78")
    assert stored["v6-young"] == ipaddress.ip_address("2001:db8:abcd:12::9")

    # A second pass has nothing to cut; progress is recorded.
    again = await audit_retention.sweep(pool, settings, now=now)
    assert again["audit_addresses_truncated"] == 0
    mark = await pool.fetchval("SELECT ips_truncated_before FROM audit_retention")
    assert mark == now - timedelta(days=days)

    # Later, the young rows' turn comes.
    later = await audit_retention.sweep(pool, settings, now=now + timedelta(hours=2))
    assert later["audit_addresses_truncated"] == 2

    # The admin page's query reads the cut addresses as networks.
    listed = await admin_store.audit_entries(
        pool, 42, admin_store.AuditFilters(), before=None, limit=50
    )
    assert {e.ip for e in listed} >= {"192.0.2.0/24", "2001:db8:abcd::/48", "::/48"}


def test_bad_retention_settings_name_their_variable(base_env: dict[str, str]) -> None:
    for name in ("AUDIT_RETENTION_DAYS", "AUDIT_IP_RETENTION_DAYS"):
        for bad in ("0", "-3", "ninety"):
            with pytest.raises(ConfigError) as caught:
                load_settings({**base_env, name: bad})
            assert caught.value.variable == name
    loaded = load_settings(
        {**base_env, "AUDIT_RETENTION_DAYS": "90", "AUDIT_IP_RETENTION_DAYS": "7"}
    )
    assert loaded.identity.audit_retention_days == 90
    assert loaded.identity.audit_ip_retention_days == 7
    unset = {k: v for k, v in base_env.items() if not k.startswith("AUDIT_")}
    defaults = load_settings(unset).identity
    assert (defaults.audit_retention_days, defaults.audit_ip_retention_days) == (400, 30)


async def test_the_consumer_stamps_a_record_as_postgresql_does(pool: asyncpg.Pool) -> None:
    """A record's occurred_at is part of its key: the instant the consumer makes of a float
    of seconds (audit.row) is the one PostgreSQL's to_timestamp makes (insert_batches), to
    the microsecond, or a record stored both ways would be two rows."""
    rng = random.Random(20261207)
    seconds = [rng.uniform(0, 4e9) for _ in range(20_000)] + [1.5e-6, 0.0000005, 1733616000.0000025]
    by_postgresql = await pool.fetch(
        "SELECT to_timestamp(s) AS at FROM unnest($1::float8[]) WITH ORDINALITY AS u(s, n)"
        " ORDER BY n",
        seconds,
    )
    mine = [audit.from_unix_seconds(s) for s in seconds]
    assert mine == [r["at"] for r in by_postgresql]


async def test_upkeep_runs_once_among_many_and_gives_way_to_readers(
    own: tuple[str, Settings], pool: asyncpg.Pool
) -> None:
    """Sweeps running at once make each month once and fail none; a drop that would wait
    behind a reader holding audit_log (a long export) is left to the next pass rather than
    queueing every insert behind it."""
    url, settings = own
    settings = replace(settings, identity=replace(settings.identity, audit_retention_days=60))
    now = datetime(2032, 6, 15, tzinfo=UTC)
    results = await asyncio.gather(
        *(audit_retention.sweep(pool, settings, now=now - timedelta(days=120)) for _ in range(4))
    )
    # A sweep that finds the upkeep held leaves that month to the next pass (upkeep_lock is a
    # try-lock): between them, each month is made exactly once.
    again = await audit_retention.sweep(pool, settings, now=now - timedelta(days=120))
    made = sum(r["audit_partitions_made"] for r in [*results, again])
    assert made == 4  # Feb to May 2032
    assert date(2032, 2, 1) in await audit_partitions.months(pool)

    reader = await connect(url)
    try:
        async with reader.transaction():
            await reader.execute("LOCK TABLE audit_log IN ACCESS SHARE MODE")
            held = await audit_retention.sweep(pool, settings, now=now)
            # Inserts still go through while the reader holds its lock.
            await audit_store.insert_many(pool, [_row(now)])
        assert held["audit_partitions_dropped"] == 0
        assert date(2032, 2, 1) in await audit_partitions.months(pool)
    finally:
        await reader.close()
    released = await audit_retention.sweep(pool, settings, now=now)
    assert released["audit_partitions_dropped"] == 2  # February and March 2032
    assert date(2032, 2, 1) not in await audit_partitions.months(pool)
