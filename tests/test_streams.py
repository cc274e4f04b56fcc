"""Redis Streams helpers against real Redis: trimming, groups, acks, claims, broadcast reads."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest
import redis.asyncio as redis_asyncio
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from libs.common import redis_client, streams
from libs.common.config import Settings

Name = Callable[[str], str]


@pytest.fixture
def name(settings: Settings, unique: str) -> Name:
    """Stream names under this run's prefix (the `redis` fixture deletes them after the run)."""
    return lambda label: settings.stream(f"test:streams:{unique}:{label}")


class CountingConnection(redis_asyncio.Connection):
    """A real connection that counts the writes it sends: one write is one round trip."""

    writes = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        type(self).writes += 1
        await super().send_packed_command(command, check_health)


@pytest.fixture
async def counting_redis(settings: Settings) -> AsyncIterator[redis_asyncio.Redis]:
    if redis_client.parse(settings.redis_url).kind == "cluster":
        async for client in _counting_cluster(settings.redis_url):
            yield client
        return
    pool = redis_asyncio.ConnectionPool.from_url(
        settings.redis_url, connection_class=CountingConnection
    )
    client = redis_asyncio.Redis(connection_pool=pool)
    await client.ping()  # connect (and its handshake) before anything is counted
    yield client
    await client.aclose()
    await pool.disconnect()


async def _counting_cluster(url: str) -> AsyncIterator[redis_asyncio.Redis]:
    """The factory's RedisCluster, each node's connections counting (RedisCluster takes no
    connection class of its own: the nodes it makes from CLUSTER SLOTS get the one in its
    connection kwargs), every primary connected before anything is counted."""
    client = redis_client.connect(url)
    cluster = cast(RedisCluster, client)
    cluster.nodes_manager.connection_kwargs["connection_class"] = CountingConnection
    await cluster.initialize()
    assert all(n.connection_class is CountingConnection for n in cluster.get_nodes())
    await cluster.ping(target_nodes=RedisCluster.PRIMARIES)
    yield client
    await client.aclose()


def _data(raw: list[Any]) -> list[Any]:
    """The documents of raw XRANGE rows, decoded by hand rather than by the module under test."""
    return [json.loads(fields[b"data"]) for _, fields in raw]


async def _pending(redis: Any, stream: str, group: str) -> dict[str, list[str]]:
    """consumer -> ids of the entries it holds unacknowledged."""
    rows = await redis.xpending_range(stream, group, min="-", max="+", count=1000)
    held: dict[str, list[str]] = {}
    for r in rows:
        held.setdefault(r["consumer"].decode(), []).append(r["message_id"].decode())
    return held


async def test_append_trims_approximately(redis: Any, name: Name) -> None:
    """Appending 5,000 entries with maxlen=100 keeps the stream near 100, never below it,
    and the newest entries survive."""
    stream = name("trim")
    last = ""
    for n in range(5000):
        last = await streams.append(redis, stream, {"n": n}, maxlen=100)
    length = await redis.xlen(stream)
    assert 100 <= length < 1000
    assert await streams.last_id(redis, stream) == last
    assert _data(await redis.xrevrange(stream, count=1)) == [{"n": 4999}]


async def test_ensure_group_is_idempotent(redis: Any, name: Name) -> None:
    """Creating a group twice, or ten times at once, leaves one group whose position is kept."""
    stream = name("group")
    await streams.ensure_group(redis, stream, "workers")
    await streams.ensure_group(redis, stream, "workers")
    await asyncio.gather(*(streams.ensure_group(redis, stream, "workers") for _ in range(10)))
    groups = await redis.xinfo_groups(stream)
    assert [g["name"] for g in groups] == [b"workers"]

    await streams.append(redis, stream, {"n": 1})
    await streams.append(redis, stream, {"n": 2})
    first = await streams.read_group(redis, stream, "workers", "c1", count=1, block_ms=None)
    assert [e.data for e in first] == [{"n": 1}]
    # Calling it again (a restart) does not rewind the group to the start.
    await streams.ensure_group(redis, stream, "workers")
    second = await streams.read_group(redis, stream, "workers", "c1", count=10, block_ms=None)
    assert [e.data for e in second] == [{"n": 2}]


async def test_ensure_group_reports_other_errors(redis: Any, name: Name) -> None:
    """Only "group exists" is swallowed: a key of the wrong type is still an error."""
    key = name("not-a-stream")
    await redis.set(key, "x")
    with pytest.raises(ResponseError):
        await streams.ensure_group(redis, key, "workers")


async def test_read_group_and_ack(redis: Any, name: Name) -> None:
    """Entries read by a group stay pending until acknowledged, and are delivered once."""
    stream = name("ack")
    await streams.ensure_group(redis, stream, "g")
    ids = [await streams.append(redis, stream, {"n": n}) for n in range(3)]
    got = await streams.read_group(redis, stream, "g", "c1", count=10, block_ms=100)
    assert [e.id for e in got] == ids
    assert [e.data for e in got] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert await _pending(redis, stream, "g") == {"c1": ids}
    assert await streams.read_group(redis, stream, "g", "c2", count=10, block_ms=50) == []

    assert await streams.ack(redis, stream, "g", ids) == 3
    assert await _pending(redis, stream, "g") == {}
    assert await streams.ack(redis, stream, "g", ids) == 0
    assert await streams.ack(redis, stream, "g", []) == 0


async def test_claim_stale_takes_over_a_dead_consumer(redis: Any, name: Name) -> None:
    """Entries a consumer read and never acknowledged go, same data, to another consumer once
    idle long enough; acknowledged entries and fresh ones are not claimed."""
    stream = name("claim")
    await streams.ensure_group(redis, stream, "g")
    for n in range(4):
        await streams.append(redis, stream, {"n": n, "body": f"event {n}"})
    read = await streams.read_group(redis, stream, "g", "dead", count=10, block_ms=100)
    assert len(read) == 4
    await streams.ack(redis, stream, "g", [read[0].id, read[2].id])
    unacked = [read[1], read[3]]

    # Not idle long enough yet: nothing moves.
    assert await streams.claim_stale(redis, stream, "g", "alive", min_idle_ms=60_000) == []
    await asyncio.sleep(0.3)
    claimed = await streams.claim_stale(redis, stream, "g", "alive", min_idle_ms=200)
    assert claimed == unacked
    assert await _pending(redis, stream, "g") == {"alive": [e.id for e in unacked]}
    # Claiming resets the idle time: an immediate second claim finds nothing.
    assert await streams.claim_stale(redis, stream, "g", "other", min_idle_ms=200) == []


async def test_claim_stale_respects_count_and_skips_trimmed(redis: Any, name: Name) -> None:
    """Claims stop at `count` and continue on the next call; pending entries that trimming
    deleted are not handed out as empty documents."""
    stream = name("claim-many")
    await streams.ensure_group(redis, stream, "g")
    await streams.append_many(redis, stream, [{"n": n} for n in range(25)])
    assert len(await streams.read_group(redis, stream, "g", "dead", count=100, block_ms=100)) == 25
    await redis.xtrim(stream, maxlen=20, approximate=False)  # n = 0..4 gone, still pending
    await asyncio.sleep(0.3)
    first = await streams.claim_stale(redis, stream, "g", "alive", min_idle_ms=200, count=10)
    rest = await streams.claim_stale(redis, stream, "g", "alive2", min_idle_ms=200, count=100)
    assert len(first) == 10
    assert sorted(e.data["n"] for e in first + rest) == list(range(5, 25))


async def test_append_many_is_one_round_trip(
    counting_redis: redis_asyncio.Redis, redis: Any, name: Name
) -> None:
    """A batch of 50 entries is written in one round trip, in order, trimmed like append."""
    stream = name("batch")
    CountingConnection.writes = 0
    await streams.append_many(counting_redis, stream, [{"n": n} for n in range(50)])
    assert CountingConnection.writes == 1
    assert _data(await redis.xrange(stream)) == [{"n": n} for n in range(50)]

    # The same batch by single appends takes one round trip each: the counter counts.
    CountingConnection.writes = 0
    for n in range(5):
        await streams.append(counting_redis, stream, {"n": n})
    assert CountingConnection.writes == 5

    CountingConnection.writes = 0
    await streams.append_many(counting_redis, stream, [])
    assert CountingConnection.writes == 0
    assert await redis.xlen(stream) == 55


async def test_read_tail_and_last_id(redis: Any, name: Name) -> None:
    """Broadcast reading: every follower sees every entry after the id it started from."""
    stream = name("tail")
    assert await streams.last_id(redis, stream) == "0-0"
    ids = [await streams.append(redis, stream, {"n": n}) for n in range(3)]
    assert await streams.last_id(redis, stream) == ids[-1]

    everything = await streams.read_tail(redis, stream, "0-0", block_ms=100)
    assert [(e.id, e.data) for e in everything] == [(i, {"n": n}) for n, i in enumerate(ids)]
    assert [e.id for e in await streams.read_tail(redis, stream, ids[0], block_ms=100)] == ids[1:]
    assert await streams.read_tail(redis, stream, ids[-1], block_ms=50) == []

    # Two followers waiting at the tail both receive the next entry.
    start = ids[-1]
    followers = [
        asyncio.create_task(streams.read_tail(redis, stream, start, block_ms=5000))
        for _ in range(2)
    ]
    await asyncio.sleep(0.1)
    new_id = await streams.append(redis, stream, {"n": "new"})
    for received in await asyncio.wait_for(asyncio.gather(*followers), 5):
        assert [(e.id, e.data) for e in received] == [(new_id, {"n": "new"})]


async def test_trim_consumed_keeps_what_any_group_still_needs(redis: Any, name: Name) -> None:
    """Two groups at different places: only entries both read and acknowledged go. A lagging
    group's unread and pending entries stay, however many were appended."""
    stream = name("trim-consumed")
    assert await streams.trim_consumed(redis, stream) is None  # no stream yet
    await streams.append(redis, stream, {"n": -1})
    assert await streams.trim_consumed(redis, stream) is None  # no group: nothing known done
    await redis.delete(stream)

    await streams.ensure_group(redis, stream, "fast")
    await streams.ensure_group(redis, stream, "slow")
    ids = [await streams.append(redis, stream, {"n": n}) for n in range(10)]
    fast = await streams.read_group(redis, stream, "fast", "f", count=10, block_ms=50)
    await streams.ack(redis, stream, "fast", [e.id for e in fast])
    # The slow group read six, acknowledged the first four; two are pending, four unread.
    slow = await streams.read_group(redis, stream, "slow", "s", count=6, block_ms=50)
    await streams.ack(redis, stream, "slow", [e.id for e in slow[:4]])

    await streams.trim_consumed(redis, stream)
    left = [eid.decode() for eid, _ in await redis.xrange(stream)]
    assert left == ids[4:]

    # Once the slow group is done too, everything read by both goes.
    rest = await streams.read_group(redis, stream, "slow", "s", count=10, block_ms=50)
    await streams.ack(redis, stream, "slow", [e.id for e in slow[4:]] + [e.id for e in rest])
    await streams.trim_consumed(redis, stream)
    assert await redis.xlen(stream) == 0
    # New entries after the trim are delivered as usual.
    newer = await streams.append(redis, stream, {"n": 10})
    got = await streams.read_group(redis, stream, "slow", "s", count=10, block_ms=50)
    assert [e.id for e in got] == [newer]
