"""connect:audit lands in PostgreSQL: batched, once per entry, even when a consumer dies."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from datetime import timedelta
from typing import Any

import orjson
from redis.exceptions import RedisError

from libs.common import redis_client, streams
from libs.common.config import Settings
from services.gateway.audit import AuditBuffer
from services.gateway.redis_routing import pipelined
from services.identity import audit, audit_consumer
from services.identity.store import audit as audit_store


async def _stored(pool: Any, marker: str) -> list[Any]:
    return list(
        await pool.fetch(
            "SELECT * FROM audit_log WHERE detail->>'marker' = $1 ORDER BY record_id", marker
        )
    )


async def _append(redis: Any, settings: Settings, record: dict[str, Any]) -> None:
    """A single record as its own entry, as identity appended its records before they went
    straight to PostgreSQL (and as a gateway of another version may still)."""
    await streams.append(redis, settings.stream(streams.AUDIT), record)


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
        await _append(redis, settings, r)
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
        await _append(redis, settings, audit.record("token.issued", marker=unique, n=i))
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
    await _append(redis, settings, audit.record("api.call", marker=unique, n=0))
    await _append(
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
    await _append(redis, settings, audit.record("api.call", marker=unique, n=2, status=2**40))
    await _append(redis, settings, audit.record("api.call", marker=unique, n=3))

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
    connection = pipelined(settings.redis_url, timeout=2.0)
    try:
        buffer = AuditBuffer(connection, stream, capacity=1000)
        for n in range(250):  # two batch entries
            buffer.append(audit.record("api.call", marker=unique, n=n, path=f"/p/{n}"))
        buffer.append(audit.record("api.call", marker=unique, n=250, path="/p/\x00"))
        buffer.append(audit.record("api.call", marker=unique, n=251, status=2**40))
        assert await buffer.flush() == 252
    finally:
        await connection.close()
    await _append(redis, settings, audit.record("token.issued", marker=unique, n=300))

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
    # The gateway's records by the id it gave each; one without an id by its content.
    gateway_keys = [by_n[n]["record_id"] for n in (0, 199, 200)]
    assert all(k.startswith("r:") for k in gateway_keys) and len(set(gateway_keys)) == 3
    assert by_n[300]["record_id"].startswith("h:")
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
    rows = audit_consumer.to_rows(entry)
    assert len(rows) == 1 and rows[0].record_id.startswith("h:")
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


def _varied_records(marker: str, count: int) -> list[dict[str, Any]]:
    """Records as a gateway writes them, with the values that differ between ways of storing:
    any Unicode, JSON escapes, both address families, absent fields, ids of every shape."""
    rng = random.Random(20261204)
    texts = ["/api/v1/courses", "/p/ü/💥", '/q?"a"=\\u0000\\', "/\u202eevil", "/\t\n\r", ""]
    out = []
    for n in range(count):
        record: dict[str, Any] = {
            "occurred_at": rng.uniform(0, 4e9),
            "action": rng.choice(["api.call", "token.issued", ""]),
            "school_id": rng.choice([None, 42, 2**62]),
            "client_id": rng.choice([None, "app_x", "ä" * 40]),
            "subject": rng.choice([None, "usr_1", "x'; DROP TABLE audit_log; --"]),
            "grant_id": rng.choice([None, str(uuid.UUID(int=rng.getrandbits(128)))]),
            "method": rng.choice(["GET", "POST", None]),
            "path": rng.choice(texts) + str(n),
            "status": rng.choice([200, 401, 599, None]),
            "scope": rng.choice([None, "courses:read", "a b c"]),
            "ip": rng.choice([None, "127.0.0.1", "2001:db8::1", "::ffff:10.0.0.1"]),
            "detail": {"marker": marker, "n": n, "deep": {"list": [1, "two", None, 3.5]}},
        }
        shape = n % 5
        if shape == 1:
            pass  # no id of its own
        elif shape == 2:
            record["rid"] = "x" * 65  # too long to be a key: the entry id and index are
        elif shape == 3:
            record["rid"] = n  # not a string: likewise
        else:
            record["rid"] = f"{marker}-{n}"
        if n % 7 == 0:
            record["detail"] = "not an object"
        out.append(record)
    return out


async def test_postgresql_expands_a_batch_into_the_rows_the_consumer_would_build(
    pool: Any, unique: str
) -> None:
    """The gateway's batch entries are expanded by PostgreSQL itself (insert_batches); the
    same records built into rows by the consumer (to_rows, insert_many) store the same."""
    varied = _varied_records(unique, 750)
    # Only a batch whose every record has its id goes to PostgreSQL whole.
    data = {"records": varied}
    assert not audit_consumer._passes_whole(streams.Entry("1-1", data, orjson.dumps(data)))
    records = [r for r in varied if isinstance(r.get("rid"), str) and len(r["rid"]) <= 64]
    assert len(records) == 300
    data = {"records": records}
    entry = streams.Entry(f"{2**40}-7", data, orjson.dumps(data))
    assert audit_consumer._passes_whole(entry)
    columns = (
        "record_id, occurred_at, school_id, client_id, subject, grant_id, action, method, path,"
        " status, scope, ip, detail"
    )
    mine = "record_id LIKE $1 OR record_id LIKE $2"
    keys = (f"r:{unique}-%", f"r:{unique}-%")

    assert await audit_store.insert_batches(pool, [entry.payload.decode()]) == 300
    by_postgresql = await pool.fetch(f"SELECT {columns} FROM audit_log WHERE {mine}", *keys)
    await pool.execute(f"DELETE FROM audit_log WHERE {mine}", *keys)
    await audit_store.insert_many(pool, audit_consumer.to_rows(entry))
    by_consumer = await pool.fetch(f"SELECT {columns} FROM audit_log WHERE {mine}", *keys)

    assert len(by_postgresql) == len(by_consumer) == 300
    a = sorted(map(tuple, by_postgresql))
    b = sorted(map(tuple, by_consumer))
    assert [r[:1] + r[2:] for r in a] == [r[:1] + r[2:] for r in b]
    # A float of seconds may round to either neighbouring microsecond, depending on who reads it.
    assert all(abs(x[1] - y[1]) <= timedelta(microseconds=1) for x, y in zip(a, b, strict=True))
    # Stored again, whichever way: nothing more.
    assert await audit_store.insert_batches(pool, [entry.payload.decode()]) == 0


async def test_the_running_consumer_claims_stores_and_acknowledges_everything(
    pool: Any, redis: Any, settings: Settings, unique: str, monkeypatch: Any
) -> None:
    """run(): a gateway's flushes and identity's own records stored once each; what a dead
    consumer left pending claimed; every entry acknowledged, the last ones when it stops
    (acknowledgements otherwise ride on the next read)."""
    settings = dataclasses.replace(settings, redis_prefix=f"{settings.redis_prefix}{unique}:")
    stream = settings.stream(streams.AUDIT)
    await streams.ensure_group(redis, stream, audit_consumer.GROUP)
    await _append(redis, settings, audit.record("token.issued", marker=unique, n=1000))
    taken = await streams.read_group(redis, stream, audit_consumer.GROUP, "dead", count=10)
    assert len(taken) == 1
    monkeypatch.setattr(audit_consumer, "CLAIM_IDLE_MS", 50)
    monkeypatch.setattr(audit_consumer, "CLAIM_EVERY", 0.05)

    stop = asyncio.Event()
    task = asyncio.create_task(audit_consumer.run(pool, redis, settings, stop))
    connection = pipelined(settings.redis_url, timeout=2.0)
    try:
        buffer = AuditBuffer(connection, stream, capacity=1000)
        for flush in range(5):
            for n in range(flush * 30, flush * 30 + 30):
                buffer.append(audit.record("api.call", marker=unique, n=n, path=f"/p/{n}"))
            assert await buffer.flush() == 30
            await _append(redis, settings, audit.record("grant.revoked", marker=unique, n=-flush))
        for _ in range(100):
            if len(await _stored(pool, unique)) == 156:
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await connection.close()

    rows = await _stored(pool, unique)
    assert sorted(int(r["detail"]["n"]) for r in rows) == sorted(
        [*range(150), *(-f for f in range(5)), 1000]
    )
    assert sum(r["record_id"].startswith("r:") for r in rows) == 150
    pending = await redis.xpending(stream, audit_consumer.GROUP)
    assert pending["pending"] == 0


async def test_the_consumer_does_not_claim_back_what_it_stored(
    pool: Any, redis: Any, settings: Settings, unique: str, monkeypatch: Any
) -> None:
    """Entries it stored wait for their acknowledgement until its next read; when a look for
    stale entries comes first and they have been idle longer than CLAIM_IDLE_MS, they are its
    own, not a dead consumer's: taking them back each cycle would keep it from ever reading
    (and acknowledging) again. Here every cycle looks, and waits longer than the idle time."""
    settings = dataclasses.replace(settings, redis_prefix=f"{settings.redis_prefix}{unique}:")
    stream = settings.stream(streams.AUDIT)
    await streams.ensure_group(redis, stream, audit_consumer.GROUP)
    monkeypatch.setattr(audit_consumer, "CLAIM_IDLE_MS", 10)
    monkeypatch.setattr(audit_consumer, "CLAIM_EVERY", 0.0)
    monkeypatch.setattr(audit_consumer, "GATHER_DELAY", 0.05)

    stop = asyncio.Event()
    task = asyncio.create_task(audit_consumer.run(pool, redis, settings, stop))
    try:
        for n in range(8):
            await _append(redis, settings, audit.record("grant.revoked", marker=unique, n=n))
            await asyncio.sleep(0.03)
        for _ in range(100):
            if len(await _stored(pool, unique)) == 8:
                break
            await asyncio.sleep(0.05)
        stored = await _stored(pool, unique)
        assert sorted(int(r["detail"]["n"]) for r in stored) == list(range(8))
        # Acknowledged while it runs, not only when it stops.
        for _ in range(40):
            if (await redis.xpending(stream, audit_consumer.GROUP))["pending"] <= 1:
                break
            await asyncio.sleep(0.05)
        assert (await redis.xpending(stream, audit_consumer.GROUP))["pending"] <= 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_a_redis_restarted_empty_reusing_entry_ids_loses_no_record(
    pool: Any, redis: Any, settings: Settings, unique: str
) -> None:
    """A new Redis (restarted empty, or whose clock is behind the old one's) hands out entry
    ids the stored records came under: rows are keyed by each record's own id, so the new
    records are stored beside the old, none silently discarded; delivered again, once."""
    settings = dataclasses.replace(settings, redis_prefix=f"{settings.redis_prefix}{unique}:")
    stream = settings.stream(streams.AUDIT)

    def entries(generation: int) -> list[tuple[str, dict[str, Any]]]:
        single = audit.record("login.succeeded", marker=unique, n=generation * 10)
        batch = {
            "records": [
                audit.record("api.call", marker=unique, n=generation * 10 + i) for i in (1, 2)
            ]
        }
        gateway = {
            "records": [
                {
                    **audit.record("api.call", marker=unique, n=generation * 10 + 3),
                    "rid": f"{unique}-{generation}",
                }
            ]
        }
        return [("5-1", single), ("5-2", batch), ("5-3", gateway)]

    made = [entries(0), entries(1)]
    for generation in (0, 1):
        await redis.delete(stream)  # the restart: an empty Redis
        await streams.ensure_group(redis, stream, audit_consumer.GROUP)
        for entry_id, data in made[generation]:
            await redis.xadd(stream, {b"data": orjson.dumps(data)}, id=entry_id)
        assert await audit_consumer.consume_once(pool, redis, settings, "c", block_ms=10) == 3
    stored = sorted(int(r["detail"]["n"]) for r in await _stored(pool, unique))
    assert stored == [0, 1, 2, 3, 10, 11, 12, 13]

    # The same entries delivered again (a consumer died before acknowledging): nothing more.
    taken = [streams.Entry(i, d, orjson.dumps(d)) for i, d in made[1]]
    await audit_consumer._store_entries(pool, taken)
    assert len(await _stored(pool, unique)) == 8
    await redis.delete(stream)


async def test_identitys_records_commit_with_what_they_record(
    pool: Any, redis: Any, settings: Settings, unique: str
) -> None:
    """A revoke's record is a row the moment the revoke has committed, no consumer involved;
    a revoke rolled back leaves no record of itself."""
    from services.identity import grants, schools
    from tests.support import identity_records

    school = await schools.create_school(pool, settings, f"aud{unique}", "Audit school")
    client_id = f"aud-{unique}"
    await pool.execute(
        "INSERT INTO clients (id, school_id, name, redirect_uris, grant_types, response_types,"
        " token_endpoint_auth_method, scopes) VALUES ($1, $2, 'A', '{}',"
        " '{authorization_code}', '{code}', 'none', '{courses:read}')",
        client_id,
        school.id,
    )
    kept = await grants.create_grant(
        pool, school_id=school.id, client_id=client_id, user_id=None, scopes=["courses:read"]
    )
    await grants.revoke_grants(pool, redis, settings, [kept.id], reason="test")
    recorded = await identity_records(settings.database_url, grant_id=kept.id)
    assert [r["action"] for r in recorded] == ["grant.revoked"]
    rolled = await grants.create_grant(
        pool, school_id=school.id, client_id=client_id, user_id=None, scopes=["courses:read"]
    )

    class Injected(Exception):
        pass

    try:
        async with pool.acquire() as conn, conn.transaction():
            await grants.record_revocations(conn, [rolled.id], reason="test")
            raise Injected  # the process failing before the commit
    except Injected:
        pass
    assert await identity_records(settings.database_url, grant_id=rolled.id) == []
    row = await pool.fetchrow("SELECT revoked_at FROM grants WHERE id = $1", rolled.id)
    assert row["revoked_at"] is None


async def test_a_poison_entry_is_dead_lettered_and_the_consumer_goes_on(
    pool: Any, redis: Any, settings: Settings, unique: str
) -> None:
    """An entry whose data is not a JSON object, among good records, before the stream or the
    group exists: the good records are stored, the poison is copied to the dead-letter stream
    and counted, everything is acknowledged, and the consumer keeps running."""
    settings = dataclasses.replace(settings, redis_prefix=f"{settings.redis_prefix}{unique}:")
    stream = settings.stream(streams.AUDIT)
    dead: list[str] = []
    stop = asyncio.Event()
    task = asyncio.create_task(
        audit_consumer.run(pool, redis, settings, stop, on_dead_letter=dead.append)
    )
    try:
        await _append(redis, settings, audit.record("login.failed", marker=unique, n=1))
        await redis.xadd(stream, {b"data": b"[1, 2, 3]"})
        await _append(redis, settings, audit.record("login.failed", marker=unique, n=2))
        for _ in range(100):
            if len(await _stored(pool, unique)) == 2 and dead:
                break
            await asyncio.sleep(0.05)
        await _append(redis, settings, audit.record("login.failed", marker=unique, n=3))
        for _ in range(100):
            if len(await _stored(pool, unique)) == 3:
                break
            await asyncio.sleep(0.05)
        assert not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
    assert sorted(int(r["detail"]["n"]) for r in await _stored(pool, unique)) == [1, 2, 3]
    assert dead == [stream]
    letters = await redis.xrange(settings.stream(audit_consumer.DEAD_LETTERS))
    assert [fields[b"data"] for _, fields in letters] == [b"[1, 2, 3]"]
    assert (await redis.xpending(stream, audit_consumer.GROUP))["pending"] == 0
    await redis.delete(stream, settings.stream(audit_consumer.DEAD_LETTERS))


async def test_records_a_redis_lost_before_identity_stored_them_are_stored_once(
    pool: Any, settings: Settings, unique: str, tmp_path: Any
) -> None:
    """The gateway keeps what it wrote until identity's group acknowledged it: a Redis that
    restarts empty before identity's consumer read the records gets them again, and each
    record is stored once (the fault suite lost 4 to 37 per Cluster restart before this)."""
    from services.gateway.audit_retention import AuditRetention
    from tests.support import free_port, kill_process, start_redis

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    proc = await start_redis(port, directory=tmp_path)
    own = dataclasses.replace(settings, redis_url=url, redis_prefix=f"{unique}:")
    stream = own.stream(streams.AUDIT)
    client = redis_client.connect(url)
    connection = pipelined(url, timeout=2.0)
    retention = AuditRetention(client, stream)
    buffer = AuditBuffer(connection, stream, capacity=1000, retention=retention)
    try:
        await streams.ensure_group(client, stream, audit_consumer.GROUP)
        await retention.check()  # the run these writes go to
        for n in range(40):
            buffer.append({**audit.record("api.call", marker=unique, n=n)})
        assert await buffer.flush() == 40
        await retention.check()
        assert retention.records == 40  # nobody has stored them yet

        # Redis restarts empty before identity's consumer has read a single entry.
        await kill_process(proc)
        proc = await start_redis(port, directory=tmp_path)
        again = 0
        for _ in range(50):
            try:
                again = await retention.check()
                break
            except (ConnectionError, OSError, RedisError):
                await asyncio.sleep(0.1)
        assert again >= 1  # the new run is seen, and what it lost appended to it
        assert retention.records == 40

        # Identity's consumer now reads the new Redis (its group made afresh, from the start).
        await streams.ensure_group(client, stream, audit_consumer.GROUP)
        while await audit_consumer.consume_once(pool, client, own, "c", block_ms=10):
            pass
        stored = sorted(int(r["detail"]["n"]) for r in await _stored(pool, unique))
        assert stored == list(range(40))
        await retention.check()
        assert retention.records == 0  # stored: nothing kept any more
    finally:
        await connection.close()
        await client.aclose()
        await kill_process(proc)
