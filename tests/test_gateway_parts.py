"""The gateway's parts on their own, against real Redis and real sockets: the audit buffer, the
pipelined Redis connection, the guard script's arithmetic, the revoked-grants set."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from libs.common import keys, redis_client, streams
from libs.common.config import Settings
from services.gateway.audit import BATCH, BATCH_BYTES, AuditBuffer, api_call
from services.gateway.ratelimit import Guard, Pace
from services.gateway.redis_pipeline import PipelinedRedis, RedisReplyError, pack
from services.gateway.redis_routing import pipelined
from services.gateway.revocation import RevokedGrants
from services.identity import audit
from tests.support import free_port


def _record(n: int) -> dict[str, Any]:
    return api_call(
        school_id=7,
        client_id="client",
        subject="subject",
        grant_id="00000000-0000-0000-0000-000000000001",
        method="GET",
        path=f"/api/v1/courses/{n}",
        status=200,
        scope="courses:read",
        ip="127.0.0.1",
        request_id=f"r{n}",
    )


@pytest.fixture
async def connection(settings: Settings) -> AsyncIterator[PipelinedRedis]:
    # The factory: on a Cluster (TEST_REDIS_URL=redis+cluster://...) a PipelinedCluster.
    conn = pipelined(settings.redis_url, timeout=2.0)
    yield conn
    await conn.close()


async def test_audit_records_are_written_as_batch_entries_in_the_streams_shape(
    connection: PipelinedRedis, settings: Settings, redis: Any
) -> None:
    stream = settings.stream(f"test:audit:{secrets.token_hex(4)}")
    buffer = AuditBuffer(connection, stream, capacity=1000)
    for n in range(450):  # more than two batches
        buffer.append(_record(n))
    assert await buffer.flush() == 450
    assert len(buffer) == 0
    entries = await streams.read_tail(redis, stream, "0-0", count=1000, block_ms=10)
    assert [len(e.data["records"]) for e in entries] == [BATCH, BATCH, 50]
    records = [r for e in entries for r in audit.records_of(e.data)]
    assert [r["path"] for r in records] == [f"/api/v1/courses/{n}" for n in range(450)]
    assert records[0] == _record(0) | {
        "occurred_at": records[0]["occurred_at"],
        "rid": records[0]["rid"],
    }
    # Every record carries an id of its own (identity's row key, so a re-sent one is stored
    # once).
    assert len({r["rid"] for r in records}) == 450
    await redis.delete(stream)


class _FailsOnce(PipelinedRedis):
    """The factory's real connection (on a Cluster a PipelinedCluster), whose next write raises
    what no Redis failure raises (as a bug would): the audit's flush loop is not to end on it.
    Every call goes to the real connection; this one opens none of its own."""

    def __init__(self, real: PipelinedRedis) -> None:
        self._real = real
        self.failures = 1

    async def execute(self, command: bytes) -> Any:
        return await self._real.execute(command)

    def send_now(self, commands: bytes, count: int, on_replies: Any) -> bool:
        # Durable mode's fast path declines (as with no connection ready), so every write
        # goes the flush loop's way, where the unforeseen is raised.
        return False

    async def execute_many(self, commands: list[bytes]) -> list[Any]:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("nobody foresaw this")
        return await self._real.execute_many(commands)

    async def close(self) -> None:
        await self._real.close()


async def test_the_flush_loop_is_restarted_whatever_ends_it(settings: Settings, redis: Any) -> None:
    """Supervised (libs/common/tasks.py): a call whose write met the unforeseen is answered
    503 rather than left waiting, and the loop, restarted, writes its record with the next."""
    stream = settings.stream(f"test:audit:{secrets.token_hex(4)}")
    connection = _FailsOnce(pipelined(settings.redis_url, timeout=2.0))
    buffer = AuditBuffer(connection, stream, capacity=1000, durable=True)
    buffer.start()
    try:
        first = buffer.reserve()
        assert first is not None
        assert await asyncio.wait_for(first.written(_record(1)), timeout=10) is False
        second = buffer.reserve()
        assert second is not None
        assert await asyncio.wait_for(second.written(_record(2)), timeout=10) is True
        entries = await streams.read_tail(redis, stream, "0-0", count=100, block_ms=10)
        paths = [r["path"] for e in entries for r in audit.records_of(e.data)]
        assert paths == ["/api/v1/courses/1", "/api/v1/courses/2"]
    finally:
        await buffer.stop()
        await connection.close()
        await redis.delete(stream)


async def test_durable_records_of_concurrent_calls_share_one_xadd_and_each_call_waits_for_it(
    connection: PipelinedRedis, settings: Settings, redis: Any
) -> None:
    """Group commit: the calls finishing in one turn (and while a write is in flight) are
    written together, and each call's wait ends only once its record is an entry."""
    stream = settings.stream(f"test:audit:{secrets.token_hex(4)}")
    buffer = AuditBuffer(connection, stream, capacity=1000, durable=True)
    buffer.start()
    try:

        async def call(n: int) -> bool:
            slot = buffer.reserve()
            assert slot is not None
            assert await slot.written(_record(n))
            # Answered now: the record must already be in the stream.
            paths = {
                r["path"]
                for _, fields in await redis.xrange(stream)
                for r in audit.records_of(orjson.loads(fields[b"data"]))
            }
            return f"/api/v1/courses/{n}" in paths

        assert all(await asyncio.gather(*(call(n) for n in range(40))))
        entries = await streams.read_tail(redis, stream, "0-0", count=1000, block_ms=10)
        assert sum(len(e.data["records"]) for e in entries) == 40
        assert len(entries) <= 2  # one XADD for the turn's calls (two if one started early)
        assert buffer.reserved == 0 and len(buffer) == 0
    finally:
        await buffer.stop()
        await redis.delete(stream)


async def test_the_audit_buffer_sleeps_while_idle_and_writes_a_record_soon_after_it_comes(
    connection: PipelinedRedis, settings: Settings, redis: Any
) -> None:
    """No wake-ups while nothing is buffered; a record is written within the flush interval
    of its arrival; stop() writes what is left."""
    stream = settings.stream(f"test:audit:{secrets.token_hex(4)}")
    buffer = AuditBuffer(connection, stream, capacity=1000)
    flushes = 0
    flush = buffer.flush

    async def counted() -> int:
        nonlocal flushes
        flushes += 1
        return await flush()

    buffer.flush = counted  # type: ignore[method-assign]
    buffer.start()
    try:
        await asyncio.sleep(0.2)
        assert flushes == 0
        buffer.append(_record(1))
        for _ in range(50):
            if await redis.xlen(stream) == 1:
                break
            await asyncio.sleep(0.01)
        assert await redis.xlen(stream) == 1
        written = flushes
        await asyncio.sleep(0.2)
        assert flushes == written
        buffer.append(_record(2))
    finally:
        await buffer.stop()
    entries = await streams.read_tail(redis, stream, "0-0", count=10, block_ms=10)
    assert [r["path"] for e in entries for r in audit.records_of(e.data)] == [
        "/api/v1/courses/1",
        "/api/v1/courses/2",
    ]
    await redis.delete(stream)


async def test_a_batch_entry_is_bounded_in_bytes_and_a_huge_record_still_goes(
    connection: PipelinedRedis, settings: Settings, redis: Any
) -> None:
    stream = settings.stream(f"test:audit:{secrets.token_hex(4)}")
    buffer = AuditBuffer(connection, stream, capacity=1000)
    long_path = "/api/v1/courses/" + "x" * (BATCH_BYTES // 3)
    for n in range(7):
        buffer.append(_record(n) | {"path": long_path} if n != 3 else _record(n))
    huge = _record(99) | {"path": "/api/v1/" + "y" * (BATCH_BYTES + 10)}
    buffer.append(huge)
    assert await buffer.flush() == 8
    raw = [fields[b"data"] for _, fields in await redis.xrange(stream)]
    assert len(raw) > 3
    assert all(len(r) <= BATCH_BYTES + 100 for r in raw[:-1])
    entries = await streams.read_tail(redis, stream, "0-0", count=100, block_ms=10)
    assert len(entries[-1].data["records"]) == 1  # the huge one, alone
    records = [r for e in entries for r in audit.records_of(e.data)]
    assert [r["detail"]["request_id"] for r in records] == [f"r{n}" for n in [*range(7), 99]]
    assert records[-1]["path"] == huge["path"]
    await redis.delete(stream)


async def test_a_full_audit_buffer_drops_and_counts_and_never_raises(settings: Settings) -> None:
    dead = PipelinedRedis(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    drops: list[int] = []
    buffer = AuditBuffer(dead, "nowhere", capacity=3, on_drop=lambda: drops.append(1))
    buffer.start()
    for n in range(10):
        buffer.append(_record(n))
    assert len(buffer) == 3
    assert buffer.dropped == 7 and len(drops) == 7
    with pytest.raises(ConnectionError):
        await buffer.flush()
    assert len(buffer) == 3  # kept for the next attempt
    await asyncio.wait_for(buffer.stop(timeout=1), timeout=3)
    await dead.close()


async def test_the_pipelined_connection_orders_replies_and_recovers(
    settings: Settings, redis: Any
) -> None:
    key = settings.stream(f"test:resp:{secrets.token_hex(4)}")
    # One node's connection (under a Cluster, that of the primary serving the key): the
    # connection PipelinedCluster holds per primary.
    url = settings.redis_url
    if redis_client.parse(url).kind == "cluster":
        node = redis.get_node_from_key(key)
        url = f"redis://{node.host}:{node.port}/0"
    connection = PipelinedRedis(url, timeout=2.0)
    answers = await asyncio.gather(*(connection.execute(pack("INCR", key)) for _ in range(200)))
    assert answers == list(range(1, 201))
    with pytest.raises(RedisReplyError):
        await connection.execute(pack("NOSUCHCOMMAND"))
    # A dropped link fails what was waiting, and the next call reconnects.
    assert connection._protocol is not None and connection._protocol.transport is not None
    connection._protocol.transport.abort()
    await asyncio.sleep(0)
    assert await connection.execute(pack("INCR", key)) == 201
    await connection.execute(pack("DEL", key))
    await connection.close()


async def test_a_silent_redis_is_given_up_after_the_timeout() -> None:
    """A server that accepts and never answers: the call fails, it does not hang."""
    held: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    silent = PipelinedRedis(f"redis://127.0.0.1:{port}/0", timeout=0.3)
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(silent.execute(pack("PING")), timeout=3)
    await silent.close()
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_the_guard_checks_revocation_first_and_limits_with_a_burst(
    connection: PipelinedRedis, settings: Settings, redis: Any
) -> None:
    guard = Guard(connection)
    # Both in one school's slot, as the guard's keys always are (libs/common/keys.py).
    school = secrets.randbelow(1_000_000)
    revoked_key = keys.revoked_mark(settings, school, secrets.token_hex(8))
    bucket = keys.gateway_bucket(settings, school, f"test-{secrets.token_hex(4)}")
    pace = Pace.of(per_minute=600, burst=5)  # one call per 100 ms after a burst of 5
    assert (pace.burst, pace.interval_us, pace.window) == (5, 100_000, 1)
    verdicts = [await guard.check(revoked_key, bucket, want=1, pace=pace) for _ in range(6)]
    assert [v.allowed for v in verdicts] == [True] * 5 + [False]
    assert [v.remaining for v in verdicts[:5]] == [4, 3, 2, 1, 0]
    assert verdicts[5].retry_after == 1
    await asyncio.sleep(0.25)  # two calls' worth of refill
    assert (await guard.check(revoked_key, bucket, want=1, pace=pace)).allowed
    # Not consuming (the scope failed) asks only about revocation.
    untouched = await guard.check(revoked_key, bucket, want=0, pace=pace)
    assert untouched.allowed and not untouched.revoked
    await redis.set(revoked_key, "test", ex=60)
    revoked = await guard.check(revoked_key, bucket, want=1, pace=pace)
    assert revoked.revoked and not revoked.allowed
    # A burst never exceeds the per-minute limit.
    assert Pace.of(per_minute=6, burst=100).burst == 6
    # A Redis that does not know the script (NOSCRIPT) gets it by EVAL. The shared Redis's
    # script cache is left alone: a sha no Redis knows stands in for a flushed cache.
    guard._sha = secrets.token_hex(20).encode()
    assert (await guard.check(revoked_key + "x", bucket + "x", want=1, pace=pace)).allowed
    await redis.delete(revoked_key, bucket, bucket + "x")


def test_revoked_grants_expire() -> None:
    revoked = RevokedGrants()
    revoked.add("a", ttl=60)
    revoked.add("b", ttl=-1)
    assert "a" in revoked
    assert "b" not in revoked
    assert "c" not in revoked


async def test_places_held_by_calls_count_against_capacity_and_a_full_buffer_refuses(
    connection: PipelinedRedis, settings: Settings, redis: Any
) -> None:
    """The fail-closed audit trail's accounting: a reserved place is one of the capacity until
    filled (then a record) or given back; when none is left, reserve refuses and counts, and a
    record no call waits on is dropped rather than take a call's place. Nothing reserved is
    ever lost: every filled place is written out."""
    stream = settings.stream(f"test:audit:{secrets.token_hex(4)}")
    buffer = AuditBuffer(connection, stream, capacity=3)
    first, second = buffer.reserve(), buffer.reserve()
    assert first is not None and second is not None
    buffer.append(_record(0))
    assert (len(buffer), buffer.reserved) == (1, 2)
    assert buffer.reserve() is None
    buffer.append(_record(99))  # no place left: dropped, not taken from the calls
    assert (buffer.refused, buffer.dropped, len(buffer)) == (1, 1, 1)

    first.fill(_record(1))
    assert (len(buffer), buffer.reserved) == (2, 1)
    first.release()  # already filled: nothing happens
    assert buffer.reserved == 1
    with pytest.raises(RuntimeError):
        first.fill(_record(1))
    assert buffer.reserve() is None
    second.release()
    second.release()  # once only
    assert (len(buffer), buffer.reserved) == (2, 0)
    third = buffer.reserve()
    assert third is not None and third.open
    third.fill(_record(3))
    assert not third.open
    assert buffer.reserve() is None
    assert buffer.refused == 3

    assert await buffer.flush() == 3
    again = buffer.reserve()
    assert again is not None
    again.fill(_record(4))
    assert await buffer.flush() == 1
    entries = await streams.read_tail(redis, stream, "0-0", count=10, block_ms=10)
    paths = [r["path"] for e in entries for r in audit.records_of(e.data)]
    assert paths == [f"/api/v1/courses/{n}" for n in (0, 1, 3, 4)]
    await redis.delete(stream)


async def test_durable_calls_are_written_and_released_without_the_flush_loop(
    connection: PipelinedRedis, settings: Settings, redis: Any
) -> None:
    """Durable mode's happy path is the calls' own: the first record sends its XADD in its
    call's turn, and the reply releases the calls written and sends the records that came
    meanwhile. The flush loop (never started here) is only for a connection not yet made or a
    failed write; waiting for it cost each call two wake-ups of its task."""
    stream = settings.stream(f"test:audit:{secrets.token_hex(4)}")
    await connection.execute(pack(b"XLEN", stream))  # connected to the stream's node
    buffer = AuditBuffer(connection, stream, capacity=1000, durable=True)
    try:

        async def call(n: int) -> bool:
            slot = buffer.reserve()
            assert slot is not None
            return await slot.written(_record(n))

        assert await asyncio.wait_for(call(0), timeout=5)
        assert all(await asyncio.wait_for(asyncio.gather(*(call(n) for n in range(1, 30))), 5))
        entries = await streams.read_tail(redis, stream, "0-0", count=100, block_ms=10)
        paths = [r["path"] for e in entries for r in audit.records_of(e.data)]
        assert paths == [f"/api/v1/courses/{n}" for n in range(30)]
        # The first call alone, then one write for those of one turn (two if the first of
        # them found nothing in flight).
        assert len(entries) <= 3
        assert len(buffer) == 0
    finally:
        await redis.delete(stream)
