"""connect:audit lands in PostgreSQL: batched, once per entry, even when a consumer dies."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from libs.common import streams
from libs.common.config import Settings
from services.gateway.audit import AuditBuffer
from services.gateway.resp import PipelinedRedis
from services.identity import audit, audit_consumer
from services.identity.store import audit as audit_store


async def _stored(pool: Any, marker: str) -> list[Any]:
    return list(
        await pool.fetch(
            "SELECT * FROM audit_log WHERE detail->>'marker' = $1 ORDER BY stream_id", marker
        )
    )


async def test_running_identity_stores_audit_records(
    identity_url: str, pool: Any, redis: Any, settings: Settings, unique: str
) -> None:
    records = [
        audit.record(
            "api.call",
            school_id=42,
            client_id="c1",
            subject="u1",
            method="GET",
            path="/api/v1/courses",
            status=200,
            scope="courses:read",
            ip="127.0.0.1",
            marker=unique,
            n=i,
        )
        for i in range(25)
    ]
    for r in records:
        await audit.append(redis, settings, r)
    for _ in range(100):
        rows = await _stored(pool, unique)
        if len(rows) == 25:
            break
        await asyncio.sleep(0.05)
    assert len(rows) == 25
    first = rows[0]
    assert first["action"] == "api.call"
    assert first["school_id"] == 42 and first["client_id"] == "c1"
    assert str(first["ip"]) == "127.0.0.1" and first["status"] == 200


async def test_entries_of_a_dead_consumer_are_claimed_and_stored_once(
    pool: Any, redis: Any, settings: Settings, unique: str
) -> None:
    # A stream of its own, so the identity service other tests run does not consume it.
    settings = dataclasses.replace(settings, redis_prefix=f"{settings.redis_prefix}{unique}:")
    stream = settings.stream(streams.AUDIT)
    await streams.ensure_group(redis, stream, audit_consumer.GROUP)
    for i in range(5):
        await audit.append(redis, settings, audit.record("token.issued", marker=unique, n=i))
    # A consumer reads the entries and dies before storing or acknowledging them.
    taken = await streams.read_group(redis, stream, audit_consumer.GROUP, "dead", count=100)
    assert len(taken) == 5
    assert await _stored(pool, unique) == []

    await asyncio.sleep(0.06)
    handled = await audit_consumer.consume_once(
        pool, redis, settings, "alive", block_ms=10, claim_idle_ms=50
    )
    assert handled == 5
    assert len(await _stored(pool, unique)) == 5

    # Delivered again (the at-least-once case): still stored once.
    rows = [row for e in taken for row in audit_consumer.to_rows(e)]
    await audit_store.insert_many(pool, rows)
    assert len(await _stored(pool, unique)) == 5
    pending = await redis.xpending(stream, audit_consumer.GROUP)
    assert pending["pending"] == 0


async def test_a_record_postgresql_refuses_costs_itself_never_its_batch(
    pool: Any, redis: Any, settings: Settings, unique: str
) -> None:
    """A caller controls a request's path: `%00` decodes to NUL, which text and jsonb refuse.
    It is stored with NUL replaced; a value nothing can store is dropped alone, and the
    records around it are stored and the batch acknowledged (not claimed again forever)."""
    settings = dataclasses.replace(settings, redis_prefix=f"{settings.redis_prefix}{unique}:")
    stream = settings.stream(streams.AUDIT)
    await streams.ensure_group(redis, stream, audit_consumer.GROUP)
    await audit.append(redis, settings, audit.record("api.call", marker=unique, n=0))
    await audit.append(
        redis,
        settings,
        audit.record(
            "api.call",
            marker=unique,
            n=1,
            path="/api/v1/courses/\x00",
            ip="not an address",
            note="a\x00b",
        ),
    )
    # Out of the status column's range: no cleaning makes it storable.
    await audit.append(redis, settings, audit.record("api.call", marker=unique, n=2, status=2**40))
    await audit.append(redis, settings, audit.record("api.call", marker=unique, n=3))

    handled = await audit_consumer.consume_once(
        pool, redis, settings, "alive", block_ms=10, claim_idle_ms=60_000
    )
    assert handled == 4
    rows = await _stored(pool, unique)
    assert sorted(int(r["detail"]["n"]) for r in rows) == [0, 1, 3]
    (cleaned,) = [r for r in rows if r["detail"]["n"] == 1]
    assert cleaned["path"] == "/api/v1/courses/\ufffd"
    assert cleaned["ip"] is None
    assert cleaned["detail"]["note"] == "a\ufffdb"
    pending = await redis.xpending(stream, audit_consumer.GROUP)
    assert pending["pending"] == 0


async def test_batch_entries_are_stored_a_row_per_record_once_beside_single_entries(
    pool: Any, redis: Any, settings: Settings, unique: str
) -> None:
    """The gateway writes a flush's records as one entry; identity appends one entry each.
    Both land a row per record, keyed by entry id and index, once however often delivered;
    a refused record in a batch costs itself only."""
    settings = dataclasses.replace(settings, redis_prefix=f"{settings.redis_prefix}{unique}:")
    stream = settings.stream(streams.AUDIT)
    await streams.ensure_group(redis, stream, audit_consumer.GROUP)
    connection = PipelinedRedis(settings.redis_url, timeout=2.0)
    try:
        buffer = AuditBuffer(connection, stream, capacity=1000)
        for n in range(250):  # two batch entries
            buffer.append(audit.record("api.call", marker=unique, n=n, path=f"/p/{n}"))
        buffer.append(audit.record("api.call", marker=unique, n=250, path="/p/\x00"))
        buffer.append(audit.record("api.call", marker=unique, n=251, status=2**40))
        assert await buffer.flush() == 252
    finally:
        await connection.close()
    await audit.append(redis, settings, audit.record("token.issued", marker=unique, n=300))

    # A consumer reads the three entries and dies; another claims and stores them.
    taken = await streams.read_group(redis, stream, audit_consumer.GROUP, "dead", count=100)
    assert [len(audit.records_of(e.data)) for e in taken] == [200, 52, 1]
    await asyncio.sleep(0.06)
    handled = await audit_consumer.consume_once(
        pool, redis, settings, "alive", block_ms=10, claim_idle_ms=50
    )
    assert handled == 3
    rows = await _stored(pool, unique)
    by_n = {int(r["detail"]["n"]): r for r in rows}
    assert sorted(by_n) == [*range(251), 300]  # n=251 cannot be stored, and only it
    # The gateway's records by the id it gave each; identity's own by its entry id.
    gateway_keys = [by_n[n]["stream_id"] for n in (0, 199, 200)]
    assert all(k.startswith("r:") for k in gateway_keys) and len(set(gateway_keys)) == 3
    assert by_n[300]["stream_id"] == taken[2].id
    assert by_n[250]["path"] == "/p/\ufffd"
    assert by_n[7]["path"] == "/p/7" and by_n[7]["action"] == "api.call"

    # Delivered again (the at-least-once case): still stored once.
    again = [row for e in taken for row in audit_consumer.to_rows(e)]
    assert len(again) == 253
    await audit_store.insert_many(pool, [r for r in again if r.status is None])
    assert len(await _stored(pool, unique)) == 252
    pending = await redis.xpending(stream, audit_consumer.GROUP)
    assert pending["pending"] == 0


def test_malformed_batch_members_are_left_out_not_fatal() -> None:
    entry = streams.Entry("1-0", {"records": [{"action": "api.call"}, "junk", 5]})
    assert [r.stream_id for r in audit_consumer.to_rows(entry)] == ["1-0:0"]
    assert audit_consumer.to_rows(streams.Entry("2-0", {"records": "junk"})) == []


async def test_a_time_out_of_range_is_stored_as_the_time_it_was_stored(
    pool: Any, redis: Any, settings: Settings, unique: str
) -> None:
    """A timestamp datetime cannot hold must not stop the consumer (it would crash on the same
    entry forever): the record is kept, stamped when it was stored."""
    settings = dataclasses.replace(settings, redis_prefix=f"{settings.redis_prefix}{unique}:")
    stream = settings.stream(streams.AUDIT)
    await streams.ensure_group(redis, stream, audit_consumer.GROUP)
    for n, occurred in enumerate((1e300, float("nan"))):
        record = audit.record("api.call", marker=unique, n=n)
        record["occurred_at"] = occurred
        await streams.append(redis, stream, record)
    handled = await audit_consumer.consume_once(
        pool, redis, settings, "alive", block_ms=10, claim_idle_ms=60_000
    )
    assert handled == 2
    assert len(await _stored(pool, unique)) == 2


async def test_records_a_gateway_sent_twice_in_different_entries_are_stored_once(
    pool: Any, redis: Any, settings: Settings, unique: str
) -> None:
    """A flush whose replies were lost sends its records again, in new entries grouped
    differently: each record's own id keeps it to one row."""
    settings = dataclasses.replace(settings, redis_prefix=f"{settings.redis_prefix}{unique}:")
    stream = settings.stream(streams.AUDIT)
    await streams.ensure_group(redis, stream, audit_consumer.GROUP)
    records = [
        {**audit.record("api.call", marker=unique, n=n), "rid": f"{unique}-{n}"} for n in range(3)
    ]
    await streams.append(redis, stream, {"records": records[:2]})
    await streams.append(redis, stream, {"records": records})  # the re-send, regrouped
    handled = await audit_consumer.consume_once(
        pool, redis, settings, "alive", block_ms=10, claim_idle_ms=60_000
    )
    assert handled == 2
    rows = await _stored(pool, unique)
    assert sorted(int(r["detail"]["n"]) for r in rows) == [0, 1, 2]
