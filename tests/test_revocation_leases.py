"""Revocation leases (libs/common/leases.py): gateways answer "not revoked" from memory only
while identity's revoke is bound to wait for them, and every way of breaking that (a paused
gateway, a lost lease hash, a gateway started after the revoke, a lagging follower) still
leaves no call succeeding after the revoke has answered.

The protocol is tested against the real Redis with a Settings of its own (its own key prefix,
a one-second lease); the break tests run real gateway processes beside the session's identity.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import orjson
import pytest
import redis.asyncio as redis_asyncio
from redis.asyncio.cluster import RedisCluster

from libs.common import keys as redis_keys
from libs.common import leases, marks_fence, redis_client, streams, tasks
from libs.common.config import Settings, load_settings
from services.gateway import ratelimit
from services.gateway.ratelimit import Guard, Pace
from services.gateway.redis_pipeline import PipelinedRedis
from services.gateway.redis_routing import pipelined
from services.gateway.revocation import Lease, RevokedGrants, follow_revocations, lease_clock
from services.identity import grants, keys, revocation_marks
from tests.test_gateway_processes import GatewayProcess, started_gateways
from tests.test_gateway_support import (
    access_claims,
    echo_upstream,
    make_world,
    mint,
    user_grant,
)

__all__ = ["echo_upstream"]

pytestmark = pytest.mark.usefixtures("echo_upstream")

LEASE = 1.0


@pytest.fixture
def lease_settings(base_env: dict[str, str], unique: str) -> Settings:
    return load_settings(
        {
            **base_env,
            "REDIS_KEY_PREFIX": f"{base_env.get('REDIS_KEY_PREFIX', '')}lease-{unique}:",
            "GATEWAY_REVOCATION_LEASE": str(LEASE),
        }
    )


@pytest.fixture
async def lease_redis(lease_settings: Settings) -> AsyncIterator[redis_asyncio.Redis]:
    client = redis_client.connect(lease_settings.redis_url)
    yield client
    found = [k async for k in client.scan_iter(match=lease_settings.redis_prefix + "*")]
    if found:
        await client.delete(*found)
    await client.aclose()


async def _announce(client: redis_asyncio.Redis, settings: Settings, grant_id: str) -> str:
    return await streams.append(
        client, settings.stream(streams.REVOCATIONS), {"grant_id": grant_id, "ttl": 60}
    )


def _stream(settings: Settings) -> str:
    return settings.stream(streams.REVOCATIONS)


async def _run_id(client: redis_asyncio.Redis, settings: Settings) -> str:
    """The run_id of the node holding the lease hash (on a Cluster, one primary of several)."""
    found = await client.eval(  # type: ignore[misc]
        "return string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')",
        1,
        leases.leases_key(settings),
    )
    return found.decode() if isinstance(found, bytes) else str(found)


async def _given_an_epoch(
    client: redis_asyncio.Redis, settings: Settings, *, run_id: str | None = None
) -> None:
    """The state identity leaves once it has written an epoch (the way it gets there, a whole
    lease after noting the loss, has a test of its own below)."""
    await client.hset(
        leases.leases_key(settings),
        mapping={
            "epoch": unique_epoch(),
            "run_id": run_id or await _run_id(client, settings),
            "lease_us": int(LEASE * 1_000_000),
        },
    )
    # And the record of a marks pass on every node (libs/common/marks_fence.py), which the
    # epoch needs before it and a registering gateway checks.
    await marks_fence.record(client, settings, await marks_fence.run_ids(client, settings))


def unique_epoch() -> str:
    return os.urandom(8).hex()


class _Gateway:
    """One gateway as the lease protocol sees it: it registers, then renews with what it
    applied (by default, where it registered)."""

    def __init__(self, client: redis_asyncio.Redis, settings: Settings, name: str = "gw") -> None:
        self.client, self.settings, self.name = client, settings, name
        self.held = leases.LeaseAnswer(0, "", "", 0.0)

    async def register(self) -> leases.LeaseAnswer:
        self.held = await leases.take(
            self.client, self.settings, _stream(self.settings), self.name, applied="", epoch=""
        )
        return self.held

    async def renew(self, applied: str | None = None) -> leases.LeaseAnswer:
        return await leases.take(
            self.client,
            self.settings,
            _stream(self.settings),
            self.name,
            applied=self.held.newest if applied is None else applied,
            epoch=self.held.epoch,
        )


# The protocol --------------------------------------------------------------------------------


@pytest.fixture
async def registered(lease_redis: redis_asyncio.Redis, lease_settings: Settings) -> _Gateway:
    """A gateway that has registered a lease under an epoch."""
    await _given_an_epoch(lease_redis, lease_settings)
    gateway = _Gateway(lease_redis, lease_settings)
    await gateway.register()
    return gateway


async def test_without_an_epoch_no_gateway_gets_a_lease_and_a_revoke_waits_one_out(
    lease_redis: redis_asyncio.Redis, lease_settings: Settings
) -> None:
    assert (await _Gateway(lease_redis, lease_settings).register()).state == 0
    announced = await _announce(lease_redis, lease_settings, "g1")
    began = time.monotonic()
    await leases.wait_for_gateways(lease_redis, lease_settings, announced)
    # A gateway may still count on a lease from before the epoch was lost: a whole lease.
    assert time.monotonic() - began >= LEASE


async def test_a_revoke_waits_for_every_live_lease_to_apply_it(
    lease_redis: redis_asyncio.Redis, lease_settings: Settings
) -> None:
    await _given_an_epoch(lease_redis, lease_settings)
    before = await _announce(lease_redis, lease_settings, "old")
    first, second = (
        _Gateway(lease_redis, lease_settings, "a"),
        _Gateway(lease_redis, lease_settings, "b"),
    )
    # Registration reports the newest entry applied: the marks cover what came before it.
    assert (await first.register()).state == (await second.register()).state == leases.REGISTERED
    assert first.held.newest == before

    announced = await _announce(lease_redis, lease_settings, "new")
    waiting = asyncio.create_task(leases.wait_for_gateways(lease_redis, lease_settings, announced))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    assert (await first.renew(announced)).state == leases.RENEWED
    await asyncio.sleep(0.1)
    assert not waiting.done()  # "b" has not applied it yet
    await second.renew(announced)
    await asyncio.wait_for(waiting, 2)


async def test_a_lease_that_runs_out_stops_holding_the_revoke_and_must_register_again(
    lease_redis: redis_asyncio.Redis, lease_settings: Settings, registered: _Gateway
) -> None:
    gateway = registered
    announced = await _announce(lease_redis, lease_settings, "g")
    began = time.monotonic()
    await leases.wait_for_gateways(lease_redis, lease_settings, announced)
    assert time.monotonic() - began >= LEASE * 0.5
    # Coming back after the lapse is a registration: the gateway reloads the marks.
    late = await gateway.renew()
    assert late.state == leases.REGISTERED
    assert late.newest == announced


async def test_a_gateway_lagging_behind_the_stream_is_refused_renewal(
    lease_redis: redis_asyncio.Redis, lease_settings: Settings, registered: _Gateway
) -> None:
    gateway = registered
    await _announce(lease_redis, lease_settings, "g")
    # Just announced: a follower may not have read it yet, the renewal stands.
    fresh = await gateway.renew()
    assert fresh.state == leases.RENEWED
    await asyncio.sleep(LEASE / 2 + 0.1)
    # A newer entry does not hide the old one the gateway has not applied.
    await _announce(lease_redis, lease_settings, "h")
    stale = await gateway.renew()
    assert stale.state == leases.REFUSED


async def test_a_gateway_whose_unread_entries_were_trimmed_is_refused_renewal(
    lease_redis: redis_asyncio.Redis, lease_settings: Settings, registered: _Gateway
) -> None:
    gateway = registered
    announced = [await _announce(lease_redis, lease_settings, f"g{n}") for n in range(3)]
    await lease_redis.xtrim(_stream(lease_settings), maxlen=1, approximate=False)
    # The follower reads what is left and reports it: past the two it never saw.
    answer = await gateway.renew(announced[-1])
    assert answer.state == leases.REFUSED


async def test_an_epoch_holds_only_on_the_redis_instance_that_wrote_it(
    lease_redis: redis_asyncio.Redis, lease_settings: Settings
) -> None:
    """A hash that came back from a snapshot or a replica (another run_id) is no lease at
    all: gateways get none, and a revoke waits a whole lease out."""
    await _given_an_epoch(lease_redis, lease_settings, run_id="0" * 40)
    assert (await _Gateway(lease_redis, lease_settings).register()).state == 0
    assert not await lease_redis.exists(leases.leases_key(lease_settings))
    await _given_an_epoch(lease_redis, lease_settings, run_id="1" * 40)
    announced = await _announce(lease_redis, lease_settings, "g")
    began = time.monotonic()
    await leases.wait_for_gateways(lease_redis, lease_settings, announced)
    assert time.monotonic() - began >= LEASE


async def test_no_gateway_is_granted_a_longer_lease_than_the_epoch_says(
    lease_redis: redis_asyncio.Redis, lease_settings: Settings, base_env: dict[str, str]
) -> None:
    await _given_an_epoch(lease_redis, lease_settings)
    longer = load_settings(
        {
            **base_env,
            "REDIS_KEY_PREFIX": lease_settings.redis_prefix,
            "GATEWAY_REVOCATION_LEASE": "5",
        }
    )
    answer = await _Gateway(lease_redis, longer).register()
    assert answer.state == leases.REGISTERED
    assert answer.seconds == LEASE


async def test_a_new_epoch_makes_every_gateway_register_afresh(
    lease_redis: redis_asyncio.Redis, lease_settings: Settings, registered: _Gateway
) -> None:
    gateway = registered
    held = gateway.held
    # Redis lost the hash; identity wrote a new epoch later.
    await lease_redis.delete(leases.leases_key(lease_settings))
    lost = await gateway.renew()
    assert lost.state == 0
    await _given_an_epoch(lease_redis, lease_settings)
    again = await gateway.renew()
    assert again.state == leases.REGISTERED and again.epoch != held.epoch


async def test_an_epoch_is_written_a_whole_lease_after_the_loss_and_after_a_pass_since(
    lease_redis: redis_asyncio.Redis, lease_settings: Settings
) -> None:
    assert await leases.epoch_state(lease_redis, lease_settings) == 0  # the loss, noted
    early = await leases.redis_now_us(lease_redis)
    assert await leases.epoch_state(lease_redis, lease_settings, pass_began_us=early) == 0
    await asyncio.sleep(LEASE + 0.05)
    # A pass that began before the loss was noted does not count.
    assert await leases.epoch_state(lease_redis, lease_settings, pass_began_us=1) == 0
    # Redis loses data again: the note goes with it, and the wait starts over.
    await lease_redis.delete(leases.leases_key(lease_settings))
    assert await leases.epoch_state(lease_redis, lease_settings, pass_began_us=early) == 0
    noted = await leases.redis_now_us(lease_redis)
    await asyncio.sleep(LEASE + 0.05)
    assert (
        await leases.epoch_state(lease_redis, lease_settings, pass_began_us=noted)
        == leases.EPOCH_WRITTEN
    )
    assert await leases.epoch_state(lease_redis, lease_settings) == leases.EPOCH_THERE


async def test_a_loss_noted_on_another_redis_instance_is_noted_again(
    lease_redis: redis_asyncio.Redis, lease_settings: Settings
) -> None:
    """A snapshot or a replica can bring back an old note: the wait starts over on this one."""
    await lease_redis.hset(
        leases.leases_key(lease_settings), mapping={"lost_at": 1, "lost_run_id": "0" * 40}
    )
    now = await leases.redis_now_us(lease_redis)
    assert await leases.epoch_state(lease_redis, lease_settings, pass_began_us=now) == 0
    noted = await lease_redis.hget(leases.leases_key(lease_settings), "lost_at")
    assert int(noted) >= now


async def test_a_revoke_that_finds_the_leases_lost_writes_its_mark_and_announcement_again(
    lease_redis: redis_asyncio.Redis,
    lease_settings: Settings,
    pool: Any,
    gateway_settings: Settings,
    gateway_port: int,
) -> None:
    """Redis lost the leases, and may lose what the revoke wrote before it waited: the revoke
    writes them again after the wait."""
    world = await make_world(pool, gateway_settings, "lease-rewrite", gateway_port)
    grant_id = await user_grant(pool, world, ["read"])
    mark = redis_keys.revoked_mark(lease_settings, world.school.id, grant_id)
    stream = _stream(lease_settings)
    revoking = asyncio.create_task(
        grants.revoke_grant(pool, lease_redis, lease_settings, grant_id, reason="user_revoked")
    )
    deadline = time.monotonic() + 5
    while not await lease_redis.exists(mark):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # the revoke is waiting out a lease
    await lease_redis.delete(mark, stream)  # lost with the rest
    await revoking
    assert await lease_redis.exists(mark)
    entries = await lease_redis.xrange(stream)
    assert [orjson.loads(f[b"data"])["grant_id"] for _, f in entries] == [str(grant_id)]


async def test_a_lease_that_neither_applies_nor_runs_out_fails_the_revoke_in_the_end(
    lease_redis: redis_asyncio.Redis, lease_settings: Settings
) -> None:
    """No follower renews without applying for long (renewal is refused), but if a lease
    says so anyway the revoke does not answer as if it were immediate."""
    await _given_an_epoch(lease_redis, lease_settings)
    far = await leases.redis_now_us(lease_redis) + 60_000_000
    await lease_redis.hset(
        leases.leases_key(lease_settings), mapping={"e:stuck": far, "a:stuck": "0-0"}
    )
    announced = await _announce(lease_redis, lease_settings, "g")
    with pytest.raises(leases.GatewaysUnconfirmed):
        await leases.wait_for_gateways(lease_redis, lease_settings, announced)


async def test_a_released_lease_holds_no_revoke(
    lease_redis: redis_asyncio.Redis, lease_settings: Settings
) -> None:
    await _given_an_epoch(lease_redis, lease_settings)
    await _Gateway(lease_redis, lease_settings).register()
    await leases.release(lease_redis, lease_settings, "gw")
    announced = await _announce(lease_redis, lease_settings, "g")
    await asyncio.wait_for(
        leases.wait_for_gateways(lease_redis, lease_settings, announced), LEASE * 0.9
    )


async def test_identity_writes_the_epoch_a_lease_after_finding_it_gone(
    lease_redis: redis_asyncio.Redis, lease_settings: Settings, pool: Any
) -> None:
    stop = asyncio.Event()
    began = time.monotonic()
    task = asyncio.create_task(revocation_marks.run(pool, lease_redis, lease_settings, stop))
    try:
        while await leases.epoch_state(lease_redis, lease_settings) != leases.EPOCH_THERE:
            assert time.monotonic() - began < 10
            await asyncio.sleep(0.05)
        assert time.monotonic() - began >= LEASE
    finally:
        stop.set()
        await task


# The gateway's follower ------------------------------------------------------------------------


async def test_the_follower_holds_a_lease_only_once_the_marks_are_loaded(
    lease_redis: redis_asyncio.Redis, lease_settings: Settings
) -> None:
    """A gateway registering after revocations knows them from their marks, and answers from
    memory only then; a revocation after that reaches it through the stream before the
    revoke returns."""
    await lease_redis.set(redis_keys.revoked_mark(lease_settings, 1, "before"), "x", ex=60)
    await _announce(lease_redis, lease_settings, "before")
    await _given_an_epoch(lease_redis, lease_settings)
    revoked = RevokedGrants()
    lease = Lease(LEASE)
    follower = asyncio.create_task(follow_revocations(lease_redis, lease_settings, revoked, lease))
    try:
        deadline = lease_clock() + 5
        while not lease.live():
            assert lease_clock() < deadline
            await asyncio.sleep(0.01)
        assert "before" in revoked
        await lease_redis.set(redis_keys.revoked_mark(lease_settings, 1, "after"), "x", ex=60)
        announced = await _announce(lease_redis, lease_settings, "after")
        await asyncio.wait_for(leases.wait_for_gateways(lease_redis, lease_settings, announced), 5)
        assert "after" in revoked
        # The hash loses its epoch: the gateway stops answering from memory at its next read.
        await lease_redis.delete(leases.leases_key(lease_settings))
        deadline = lease_clock() + LEASE + 2
        while lease.live():
            assert lease_clock() < deadline
            await asyncio.sleep(0.01)
    finally:
        # As the gateway stops it: a cancel landing in redis-py's blocking read can be lost.
        await tasks.stop_all([follower], grace=0)
    assert follower.done()
    # Stopping gave the lease back.
    fields = await lease_redis.hkeys(leases.leases_key(lease_settings))
    assert not [f for f in fields if f.decode().endswith(lease.gateway)]


# Rate limits under a lease -------------------------------------------------------------------


async def _evalshas(client: redis_asyncio.Redis) -> int:
    if redis_client.is_cluster(client):
        # Every primary's count: the guard's keys are spread over them.
        per_node: Any = await client.info(  # type: ignore[call-arg]
            "commandstats", target_nodes=RedisCluster.PRIMARIES
        )
        return sum(
            int(stats.get("cmdstat_evalsha", {}).get("calls", 0)) for stats in per_node.values()
        )
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


Guards = Callable[..., Guard]


@pytest.fixture
async def guards(lease_settings: Settings) -> AsyncIterator[Guards]:
    """Guards as gateways hold them, each on a connection of its own: under a live lease
    unless `leased=False` (a lease never extended)."""
    connections: list[PipelinedRedis] = []

    def guard(*, leased: bool = True) -> Guard:
        connections.append(pipelined(lease_settings.redis_url))
        lease = Lease(30)
        if leased:
            lease.extend(lease_clock(), 30)
        return Guard(connections[-1], lease)

    yield guard
    for connection in connections:
        await connection.close()


@pytest.fixture
def bucket(lease_settings: Settings, unique: str) -> str:
    return redis_keys.gateway_bucket(lease_settings, 1, unique)


@pytest.fixture
def mark(lease_settings: Settings, unique: str) -> str:
    return redis_keys.revoked_mark(lease_settings, 1, unique)


async def test_under_a_lease_calls_come_in_blocks_from_the_one_shared_bucket(
    lease_redis: redis_asyncio.Redis, guards: Guards, bucket: str, mark: str
) -> None:
    """Two gateways share a client's bucket: blocks are taken from it, so together they allow
    no more than the burst, and each asks Redis far less often than it is called."""
    pace = Pace.of(60, 32)  # one call a second after a burst of 32; blocks of up to 16
    assert pace.block == 16
    gateways = [guards(), guards()]
    before = await _evalshas(lease_redis)
    verdicts = [
        await gateways[n % 2].admit(mark, bucket, consume=True, pace=pace) for n in range(40)
    ]
    asked = await _evalshas(lease_redis) - before
    assert sum(v.allowed for v in verdicts) == 32
    assert all(v.retry_after >= 1 for v in verdicts if not v.allowed)
    assert all(v.remaining >= 0 for v in verdicts)
    assert asked < 40 // 2
    # Concurrent calls on one gateway wait for the block in flight rather than each asking.
    fresh = bucket + ":fresh"
    before = await _evalshas(lease_redis)
    together = await asyncio.gather(
        *(gateways[0].admit(mark, fresh, consume=True, pace=pace) for _ in range(8))
    )
    assert all(v.allowed for v in together)
    assert await _evalshas(lease_redis) - before <= 4


async def test_remaining_counts_down_by_one_through_blocks(
    guards: Guards, bucket: str, mark: str
) -> None:
    guard = guards()
    pace = Pace(32, 60_000_000)  # a burst of 32, then one call a minute
    verdicts = [await guard.admit(mark, bucket, consume=True, pace=pace) for _ in range(33)]
    assert [v.remaining for v in verdicts[:32]] == list(range(31, -1, -1))
    assert not verdicts[32].allowed


async def test_calls_of_a_block_left_unspent_are_given_back(
    guards: Guards, bucket: str, mark: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway holding calls it does not spend must not cost the client its burst."""
    monkeypatch.setattr(ratelimit, "BLOCK_LIFE", 0.05)
    guard = guards()
    pace = Pace(32, 600_000_000)  # a burst of 32, then one call every ten minutes
    for _ in range(8):  # blocks of 1, 2, 4, then 4 held with calls to spare
        assert (await guard.admit(mark, bucket, consume=True, pace=pace)).allowed
    await asyncio.sleep(0.1)  # the block runs out with calls unspent
    verdict = await guard.admit(mark, bucket, consume=True, pace=pace)
    # Every call not spent is the client's again: nothing refills in the meantime.
    assert verdict.remaining == 32 - 9


async def test_calls_given_back_after_the_bucket_refilled_are_not_extra_calls(
    guards: Guards, bucket: str, mark: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ratelimit, "BLOCK_LIFE", 0.05)
    first, second = guards(), guards()
    quick = Pace(32, 10_000)  # a burst of 32, refilled in a third of a second
    for _ in range(4):  # blocks of 1, 2, then 4 with three to spare
        assert (await first.admit(mark, bucket, consume=True, pace=quick)).allowed
    await asyncio.sleep(0.5)  # the bucket is full again: the spare calls are owed nothing
    slow = Pace(32, 10**9)  # from now on, nothing refills within the test
    spent = [await second.admit(mark, bucket, consume=True, pace=slow) for _ in range(40)]
    assert sum(v.allowed for v in spent) == 32
    assert not (await first.admit(mark, bucket, consume=True, pace=slow)).allowed


async def test_without_a_live_lease_every_call_asks_redis(
    lease_redis: redis_asyncio.Redis, guards: Guards, bucket: str, mark: str
) -> None:
    guard = guards(leased=False)
    pace = Pace.of(600, 100)
    before = await _evalshas(lease_redis)
    for _ in range(5):
        assert (await guard.admit(mark, bucket, consume=True, pace=pace)).allowed
    assert await _evalshas(lease_redis) - before == 5
    await lease_redis.set(mark, "revoked", ex=60)
    assert (await guard.admit(mark, bucket, consume=True, pace=pace)).revoked


# Breaking it with real gateway processes ----------------------------------------------------


@pytest.fixture(scope="module")
def lease_gateways(
    gateway_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[GatewayProcess]]:
    # At info, each process logs its lease registrations (with its lease id).
    env = {**gateway_env, "LOG_LEVEL": "info"}
    with started_gateways(env, tmp_path_factory.mktemp("lease-gateways"), 2) as started:
        yield started


def _gateway_id(process: GatewayProcess) -> str | None:
    """The lease id the gateway process registered last (it logs each registration)."""
    found = None
    for line in process.log.read_text().splitlines():
        if "revocation_lease_registered" in line:
            found = orjson.loads(line)["gateway"]
    return found


async def _lease_expiry(client: redis_asyncio.Redis, settings: Settings, gateway: str) -> int:
    raw = await client.hget(leases.leases_key(settings), "e:" + gateway)
    return int(raw) if raw else 0


async def _leased(
    process: GatewayProcess, client: redis_asyncio.Redis, settings: Settings, timeout: float = 20
) -> str:
    """Until the gateway process holds a live lease; its id."""
    deadline = time.monotonic() + timeout
    while True:
        gateway = _gateway_id(process)
        now = await leases.redis_now_us(client)
        if gateway and await _lease_expiry(client, settings, gateway) > now:
            return gateway
        assert time.monotonic() < deadline, process.log.read_text()[-2000:]
        await asyncio.sleep(0.05)


@pytest.fixture
async def leased_gateways(
    lease_gateways: list[GatewayProcess],
    gateway_identity_url: str,
    http: Any,
    redis: Any,
    gateway_settings: Settings,
) -> list[GatewayProcess]:
    for process in lease_gateways:
        await process.ready(http)
        await _leased(process, redis, gateway_settings)
    return lease_gateways


async def _status(http: Any, base: str, host: str, token: str) -> int:
    async with http.get(
        base + "/api/v1/courses", headers={"Host": host, "Authorization": f"Bearer {token}"}
    ) as resp:
        await resp.read()
        return int(resp.status)


async def _granted_token(pool: Any, settings: Settings, world: Any) -> tuple[Any, str]:
    grant_id = await user_grant(pool, world, ["read"])
    token = await mint(
        keys.KeyRing(pool, settings),
        world.school.id,
        access_claims(settings, world, grant_id, "read"),
    )
    return grant_id, token


async def test_a_paused_gateway_holds_the_revoke_until_its_lease_is_over(
    leased_gateways: list[GatewayProcess],
    http: Any,
    pool: Any,
    redis: Any,
    gateway_settings: Settings,
    gateway_port: int,
) -> None:
    """SIGSTOP one gateway while it holds a lease; revoke. The revoke answers only after that
    lease is over by Redis's clock (so after the gateway's own view of it), and the gateway,
    resumed, refuses the token."""
    world = await make_world(pool, gateway_settings, "lease-stop", gateway_port)
    paused, running = leased_gateways
    for trial in range(3):
        gateway = await _leased(paused, redis, gateway_settings)
        grant_id, token = await _granted_token(pool, gateway_settings, world)
        assert await _status(http, paused.url, world.host, token) == 200
        assert await _status(http, running.url, world.host, token) == 200
        os.kill(paused.process.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(0.05)  # any renewal in flight has landed
            held_until = await _lease_expiry(redis, gateway_settings, gateway)
            assert held_until > await leases.redis_now_us(redis), trial
            await grants.revoke_grant(
                pool, redis, gateway_settings, grant_id, reason="user_revoked"
            )
            assert await leases.redis_now_us(redis) >= held_until, trial
        finally:
            os.kill(paused.process.pid, signal.SIGCONT)
        assert await _status(http, paused.url, world.host, token) == 401, trial
        assert await _status(http, running.url, world.host, token) == 401, trial


async def test_a_lost_lease_hash_makes_the_revoke_wait_out_every_lease(
    leased_gateways: list[GatewayProcess],
    http: Any,
    pool: Any,
    redis: Any,
    gateway_settings: Settings,
    gateway_port: int,
) -> None:
    """Redis loses the lease hash (eviction, a restart without persistence) while gateways
    hold leases: a revoke then waits a whole lease, past any gateway's own view of its lease,
    and the gateways take leases again only under the epoch identity writes later."""
    world = await make_world(pool, gateway_settings, "lease-lost", gateway_port)
    grant_id, token = await _granted_token(pool, gateway_settings, world)
    for process in leased_gateways:
        assert await _status(http, process.url, world.host, token) == 200
    await redis.delete(leases.leases_key(gateway_settings))
    began = time.monotonic()
    await grants.revoke_grant(pool, redis, gateway_settings, grant_id, reason="user_revoked")
    assert time.monotonic() - began >= gateway_settings.gateway.revocation_lease
    for process in leased_gateways:
        assert await _status(http, process.url, world.host, token) == 401
    for process in leased_gateways:
        await _leased(process, redis, gateway_settings)
        assert await _status(http, process.url, world.host, token) == 401


async def test_a_gateway_started_after_the_revoke_refuses_from_the_marks(
    leased_gateways: list[GatewayProcess],
    gateway_env: dict[str, str],
    http: Any,
    pool: Any,
    redis: Any,
    gateway_settings: Settings,
    gateway_port: int,
    tmp_path: Any,
) -> None:
    world = await make_world(pool, gateway_settings, "lease-late", gateway_port)
    grant_id, token = await _granted_token(pool, gateway_settings, world)
    await grants.revoke_grant(pool, redis, gateway_settings, grant_id, reason="user_revoked")
    late = GatewayProcess({**gateway_env, "LOG_LEVEL": "info"}, tmp_path / "late.log")
    try:
        await late.ready(http)
        await _leased(late, redis, gateway_settings)
        # A live grant of the same client takes a block of calls from the client's bucket, so
        # the revoked token's call is answered from memory alone, not by Redis's mark.
        _, live = await _granted_token(pool, gateway_settings, world)
        # Blocks grow with use (1, 2, then 4): after four calls three are held.
        for _ in range(4):
            assert await _status(http, late.url, world.host, live) == 200
        assert await _status(http, late.url, world.host, token) == 401
    finally:
        late.stop()
