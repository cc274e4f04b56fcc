"""A real Redis Cluster (3 primaries + 3 replicas, services/dev/redis_cluster.py) and real
single-node Redis servers of the tests' own: the key space, the lean guard connection's routing,
and the revocation marks fence (libs/common/marks_fence.py) after a node loses its data."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from libs.common import keys, leases, marks_fence, redis_client, streams
from libs.common.config import Settings
from services.dev.redis_cluster import RedisCluster, start_redis_cluster
from services.gateway.ratelimit import Guard, Pace
from services.gateway.redis_pipeline import MarksNotRestored, PipelinedRedis
from services.gateway.redis_routing import PipelinedCluster, pipelined
from services.gateway.revocation import RevokedGrants, load_marks
from tests.support import free_port, redis_server

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="no redis-server (apt-get install redis-server)"
)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    ports = [free_port() for _ in range(6)]
    buses = [free_port() for _ in range(6)]
    made = start_redis_cluster(tmp_path_factory.mktemp("cluster"), ports, bus_ports=buses)
    try:
        yield made
    finally:
        made.stop()


@pytest.fixture
def cluster_settings(settings: Settings, cluster: RedisCluster) -> Settings:
    prefix = f"cl{secrets.token_hex(3)}:"
    return dataclasses.replace(settings, redis_url=cluster.url, redis_prefix=prefix)


@pytest.fixture
async def client(cluster_settings: Settings) -> AsyncIterator[Any]:
    made = redis_client.connect(cluster_settings.redis_url)
    yield made
    found = [k async for k in made.scan_iter(match=f"{cluster_settings.redis_prefix}*")]
    if found:
        await made.delete(*found)
    await made.aclose()


def _spread_schools(cluster: RedisCluster) -> list[int]:
    """Schools whose keys land on different primaries (one per primary)."""
    from redis.crc import key_slot

    chosen: dict[int, int] = {}
    for school in range(1, 500):
        port = cluster.primary_for_slot(key_slot(keys.school_tag(school).encode()))
        chosen.setdefault(port, school)
    return list(chosen.values())


async def test_guard_lease_throttle_and_marks_run_on_the_cluster(
    cluster: RedisCluster, cluster_settings: Settings, client: Any
) -> None:
    settings = cluster_settings
    schools = _spread_schools(cluster)
    assert len(schools) == 3
    await marks_fence.record(client, settings, await marks_fence.run_ids(client, settings))
    conn = pipelined(settings.redis_url, timeout=2.0, fenced_by=settings)
    assert isinstance(conn, PipelinedCluster)
    guard = Guard(conn)
    pace = Pace.of(per_minute=600, burst=3)
    try:
        for school in schools:
            grant = secrets.token_hex(4)
            mark = keys.revoked_mark(settings, school, grant)
            bucket = keys.gateway_bucket(settings, school, "app")
            verdicts = [await guard.check(mark, bucket, want=1, pace=pace) for _ in range(4)]
            assert [v.allowed for v in verdicts] == [True, True, True, False]
            await client.set(mark, "revoked", ex=60)
            assert (await guard.check(mark, bucket, want=1, pace=pace)).revoked
        # The marks of every primary are loaded.
        loaded = RevokedGrants()
        assert await load_marks(client, settings, loaded) == len(schools)
    finally:
        await conn.close()
    # The lease TAKE: its hash and connect:revocations in one slot.
    stream = settings.stream(streams.REVOCATIONS)
    await streams.append(client, stream, {"grant_id": "g"})
    answer = await leases.take(client, settings, stream, "gw", applied="", epoch="")
    assert answer.state == 0  # no epoch yet: the script ran, on the stream's node
    # The sign-in throttle's two counters in one script.
    from services.identity import sessions

    first = keys.login_throttle(settings, "account", "a")
    second = sessions.address_throttle_key(settings, "127.0.0.1")
    script = client.register_script(sessions._RESERVE)
    assert int(await script(keys=[first, second], args=[60_000, 5, 20])) == 0


async def test_streams_append_read_and_groups_on_the_cluster(
    cluster_settings: Settings, client: Any
) -> None:
    for name in (streams.EVENTS, streams.AUDIT, streams.KEYS, streams.REVOCATIONS):
        stream = cluster_settings.stream(name)
        await streams.ensure_group(client, stream, "g")
        ids = await streams.append_many(client, stream, [{"n": 1}, {"n": 2}])
        got = await streams.read_group(client, stream, "g", "c", block_ms=100)
        assert [e.id for e in got] == ids
        assert await streams.ack(client, stream, "g", ids) == 2
        assert [e.id for e in await streams.read_tail(client, stream, "0-0", block_ms=100)] == ids


async def test_the_guard_follows_a_failover_and_refuses_until_marks_are_restored(
    cluster: RedisCluster, cluster_settings: Settings, client: Any
) -> None:
    """A primary killed: its replica takes over (MOVED / a refused connection followed), and
    the guard does not read "no mark" as "not revoked" there until identity's pass records the
    new primary's run."""
    settings = cluster_settings
    await marks_fence.record(client, settings, await marks_fence.run_ids(client, settings))
    school = _spread_schools(cluster)[0]
    mark = keys.revoked_mark(settings, school, "g1")
    bucket = keys.gateway_bucket(settings, school, "app")
    conn = pipelined(settings.redis_url, timeout=1.0, fenced_by=settings)
    guard = Guard(conn)
    pace = Pace.of(per_minute=6000, burst=100)
    try:
        assert (await guard.check(mark, bucket, want=1, pace=pace)).allowed
        from redis.crc import key_slot

        victim = cluster.primary_for_slot(key_slot(keys.school_tag(school).encode()))
        cluster.kill_node(victim)
        refused = 0
        for _ in range(200):
            try:
                await guard.check(mark, bucket, want=1, pace=pace)
                break
            except MarksNotRestored:
                refused += 1
                break
            except (ConnectionError, OSError):
                await asyncio.sleep(0.1)
        assert refused == 1, "the promoted replica answered before its marks were restored"
        # Identity's pass records the new primary's run; then the guard answers.
        await client.aclose()
        fresh = redis_client.connect(settings.redis_url)
        try:
            await marks_fence.record(fresh, settings, await marks_fence.run_ids(fresh, settings))
        finally:
            await fresh.aclose()
        await asyncio.sleep(0.3)
        assert (await guard.check(mark, bucket, want=1, pace=pace)).allowed
    finally:
        await conn.close()
        cluster.start_node(victim)
        await asyncio.to_thread(cluster.wait_ok)


async def test_a_node_promoted_again_is_asked_again_over_the_same_connection(
    cluster: RedisCluster, cluster_settings: Settings, client: Any
) -> None:
    """A primary paused past the node timeout comes back as its replica's replica, then is
    promoted again: same process, same run_id, and the guard's connection to it never dropped.
    Its record is a copy of the other node's, so it is not trusted until identity's pass
    records its run (the connection's "restored" of before is forgotten when the map moves)."""
    from redis.crc import key_slot

    settings = cluster_settings
    await marks_fence.record(client, settings, await marks_fence.run_ids(client, settings))
    school = _spread_schools(cluster)[1]
    slot = key_slot(keys.school_tag(school).encode())
    mark = keys.revoked_mark(settings, school, "g1")
    bucket = keys.gateway_bucket(settings, school, "app")
    first = cluster.primary_for_slot(slot)
    conn = pipelined(settings.redis_url, timeout=1.0, fenced_by=settings)
    guard = Guard(conn)
    pace = Pace.of(per_minute=6000, burst=100)

    async def until(what: str, probe: Any) -> None:
        for _ in range(300):
            with contextlib.suppress(Exception):
                if await asyncio.to_thread(probe):
                    return
            await asyncio.sleep(0.1)
        raise AssertionError(f"not within 30 s: {what}")

    try:
        assert (await guard.check(mark, bucket, want=1, pace=pace)).allowed
        # Paused with nothing in flight: the gateway's connection to it stays open.
        cluster.pause(first)
        await until("its replica promoted", lambda: cluster.primary_for_slot(slot) != first)
        second = cluster.primary_for_slot(slot)
        cluster.resume(first)
        await until("the paused node a replica", lambda: cluster.roles().get(first) == "slave")
        await asyncio.to_thread(cluster.wait_ok)
        await marks_fence.record(client, settings, await marks_fence.run_ids(client, settings))
        # MOVED from the old node to the new primary, restored: answered.
        assert (await guard.check(mark, bucket, want=1, pace=pace)).allowed
        # The first node takes its slots back (a manual failover), its run_id unchanged.
        import redis as redis_sync

        with redis_sync.Redis(port=first) as node:
            node.execute_command("CLUSTER", "FAILOVER")

        def demoted() -> bool:
            # As the second node itself sees it: it answers MOVED, not the guard's script.
            with redis_sync.Redis(port=second) as node:
                return bool(node.info("replication")["role"] == "slave")

        await until("the second node a replica again", demoted)
        refused = False
        for _ in range(100):
            try:
                verdict = await guard.check(mark, bucket, want=1, pace=pace)
            except MarksNotRestored:
                refused = True
                break
            except ConnectionError:
                await asyncio.sleep(0.1)
            else:
                pytest.fail(f"the node promoted again answered on its old word: {verdict}")
        assert refused
    finally:
        await conn.close()
        await asyncio.to_thread(cluster.wait_ok)


async def test_a_restored_node_a_move_names_is_answered_at_once(
    cluster: RedisCluster, cluster_settings: Settings, client: Any
) -> None:
    """After a failover, the first call redirected (MOVED) to a node whose marks identity has
    restored is answered. The guard used to patch its slot map with the one slot the MOVED
    named and ask the node's record in the first slot of that partial map, not the record
    identity keeps in the node's real first slot: the restored node was refused (503) until
    the refresh in the background had read the whole map."""
    import redis as redis_sync
    from redis.crc import key_slot

    settings = cluster_settings
    with redis_sync.Redis(port=cluster.primaries()[0]) as node:
        starts = {int(r[0]) for r in node.execute_command("CLUSTER", "SLOTS")}
    # A school whose slot is not the first of its primary's range (most are not).
    school = next(
        s for s in _spread_schools(cluster) if key_slot(keys.school_tag(s).encode()) not in starts
    )
    slot = key_slot(keys.school_tag(school).encode())
    mark = keys.revoked_mark(settings, school, "g1")
    bucket = keys.gateway_bucket(settings, school, "app")
    first = cluster.primary_for_slot(slot)
    second = cluster.replica_of(first)[0]
    conn = pipelined(settings.redis_url, timeout=1.0, fenced_by=settings)
    guard = Guard(conn)
    pace = Pace.of(per_minute=6000, burst=100)

    async def fail_over_to(port: int) -> None:
        """A manual failover (run_ids kept), then identity's pass. TAKEOVER: no election, whose
        votes the primaries refuse a second failover of the same slots for a while."""
        with redis_sync.Redis(port=port) as node:
            node.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
        for _ in range(300):
            if await asyncio.to_thread(cluster.primary_for_slot, slot) == port:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"{port} did not take over within 30 s")
        await asyncio.to_thread(cluster.wait_ok)
        await marks_fence.record(client, settings, await marks_fence.run_ids(client, settings))

    try:
        await marks_fence.record(client, settings, await marks_fence.run_ids(client, settings))
        assert (await guard.check(mark, bucket, want=1, pace=pace)).allowed
        # There and back: the guard holds its map and a connection to each node, and each
        # node is restored for its run before the guard's next call, which meets a MOVED.
        for port in (second, first):
            await fail_over_to(port)
            assert (await guard.check(mark, bucket, want=1, pace=pace)).allowed
    finally:
        await conn.close()
        if await asyncio.to_thread(cluster.primary_for_slot, slot) != first:
            with redis_sync.Redis(port=first) as node:
                node.execute_command("CLUSTER", "FAILOVER", "TAKEOVER")
        await asyncio.to_thread(cluster.wait_ok)


async def test_concurrent_first_calls_share_the_fence_check(
    cluster_settings: Settings, client: Any
) -> None:
    """Calls arriving while a new connection asks its node's record wait for that answer: on
    restored nodes none of them is refused (they were, all but the first, before)."""
    settings = cluster_settings
    await marks_fence.record(client, settings, await marks_fence.run_ids(client, settings))
    conn = pipelined(settings.redis_url, timeout=2.0, fenced_by=settings)
    guard = Guard(conn)
    pace = Pace.of(per_minute=60_000, burst=1000)
    try:
        await conn.refresh()  # the map known, so the calls meet at the connections
        verdicts = await asyncio.gather(
            *[
                guard.check(
                    keys.revoked_mark(settings, school, "g"),
                    keys.gateway_bucket(settings, school, "app"),
                    want=1,
                    pace=pace,
                )
                for school in range(1, 33)
            ]
        )
        assert all(v.allowed for v in verdicts)
    finally:
        await conn.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[int, dict[str, subprocess.Popen[bytes]]]]:
    """A redis-server of the test's own (its files in `tmp_path`); a test may replace the
    process in the holder, which is stopped at the end."""
    port = free_port()
    holder = {"proc": redis_server(port, directory=tmp_path)}
    yield port, holder
    holder["proc"].terminate()
    holder["proc"].wait(5)


async def _answers(port: int) -> None:
    probe = redis_client.connect(f"redis://127.0.0.1:{port}/0")
    try:
        for _ in range(100):
            try:
                await probe.ping()
                return
            except Exception:
                await asyncio.sleep(0.05)
    finally:
        await probe.aclose()


async def test_a_single_redis_restarted_empty_is_not_read_as_not_revoked(
    settings: Settings, own_redis: Any, tmp_path: Path
) -> None:
    """The hole: a revoked grant's mark lost with a restart must not make the call pass."""
    port, holder = own_redis
    url = f"redis://127.0.0.1:{port}/0"
    own = dataclasses.replace(settings, redis_url=url)
    await _answers(port)
    client = redis_client.connect(url)
    await marks_fence.record(client, own, await marks_fence.run_ids(client, own))
    mark = keys.revoked_mark(own, 7, "grant")
    bucket = keys.gateway_bucket(own, 7, "app")
    await client.set(mark, "revoked", ex=60)
    await client.aclose()
    conn = pipelined(url, timeout=1.0, fenced_by=own)
    guard = Guard(conn)
    pace = Pace.of(per_minute=600, burst=5)
    try:
        assert (await guard.check(mark, bucket, want=1, pace=pace)).revoked
        holder["proc"].kill()
        holder["proc"].wait(5)
        holder["proc"] = redis_server(port, directory=tmp_path)  # empty: no persistence
        await _answers(port)
        with pytest.raises(ConnectionError):
            # Without the fence this answered "not revoked": the mark went with the data.
            await guard.check(mark, bucket, want=1, pace=pace)
    finally:
        await conn.close()


async def test_sentinel_url_reaches_the_master(own_redis: Any, tmp_path: Path) -> None:
    port, _holder = own_redis
    await _answers(port)
    sentinel_port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\nsentinel monitor main 127.0.0.1 {port} 1\n"
    )
    proc = subprocess.Popen(  # noqa: ASYNC220 - a test server, started once
        ["redis-server", str(conf), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await _answers(sentinel_port)
        url = f"redis+sentinel://127.0.0.1:{sentinel_port}/main/0"
        client = redis_client.connect(url)
        try:
            await client.set("sentinel-probe", "1", ex=10)
            assert await client.get("sentinel-probe") == b"1"
        finally:
            await client.aclose()
        conn = pipelined(url, timeout=2.0)
        assert isinstance(conn, PipelinedRedis)
        try:
            assert await conn.execute(b"*1\r\n$4\r\nPING\r\n") == b"PONG"
        finally:
            await conn.close()
    finally:
        proc.terminate()
        proc.wait(5)
