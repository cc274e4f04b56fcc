"""The webhooks workers survive what used to end them for good while /healthz said 200: a
poison entry on the stream, a Redis that refuses at start, a Redis that is a read-only replica.
Each loop runs under libs.common.tasks.Supervisor, restarts with backoff, and /readyz says
when one has been failing (503) and when it is back (200).

Real redis-servers of the tests' own on free ports, real receivers, no mocks. The services
started here work on a database of their own, so the session's workers never take part.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as redis_asyncio
from pytest_aiohttp import AiohttpServer

from libs.common import db, streams
from libs.common.config import Settings, load_settings
from services.webhooks import dispatcher
from services.webhooks.app import create_app
from tests.support import (
    ExampleResolver,
    base_url,
    database_env,
    free_port,
    without_handler_cancellation,
)
from tests.test_crash_recovery import receiving, start_redis
from tests.test_webhooks import Api, Caller, Receiver, _ok, eventually, new_school, publish

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
async def own_database(base_env: dict[str, str]) -> AsyncIterator[str]:
    url = base_env["DATABASE_URL"] + "_supervised"
    await db.migrate(url)
    yield url
    await db.drop_database(url)


def own_settings(webhooks_env: dict[str, str], database_url: str, redis_port: int) -> Settings:
    return load_settings(
        {
            **webhooks_env,
            **database_env(webhooks_env, database_url),
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "REDIS_KEY_PREFIX": f"sup{secrets.token_hex(3)}:",
        }
    )


async def serve(aiohttp_server: AiohttpServer, settings: Settings) -> str:
    app = create_app(settings, resolver=ExampleResolver())
    server = await aiohttp_server(app, access_log=None, shutdown_timeout=1)
    return base_url(without_handler_cancellation(server))


async def probe(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as response:
        return response.status, await response.json()


@pytest.fixture
async def receiver(aiohttp_server: AiohttpServer) -> AsyncIterator[Receiver]:
    async with receiving(aiohttp_server, _ok) as started:
        yield started


@pytest.fixture
async def session_api(webhooks_url: str, webhooks_settings: Settings) -> AsyncIterator[Api]:
    """The session's webhooks service (conftest `webhooks_url`)."""
    async with aiohttp.ClientSession() as http:
        yield Api(http, webhooks_url, webhooks_settings)


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


# -------------------------------------------------------------------------------------------------
# Poison entries


async def test_poison_entries_are_dead_lettered_and_the_good_ones_delivered(
    session_api: Api, receiver: Receiver, redis: redis_asyncio.Redis, pool: asyncpg.Pool
) -> None:
    """Entries whose `data` is not a JSON object (a list, not JSON at all, missing) among
    good events: every good one is delivered, each poison one is set aside in
    webhooks.dead_letters, counted on /metrics, and acknowledged; the dispatcher goes on."""
    api = session_api
    caller = Caller(new_school())
    await api.subscribe(caller, receiver.url)
    settings = api.settings
    stream = settings.stream(streams.EVENTS)
    first = await publish(redis, settings, caller.school_id)
    poison: list[Any] = []
    try:
        await _poison_among_good(session_api, receiver, redis, pool, caller, first, poison)
    finally:
        # The session's stream is read by hand by other tests: leave it as it was.
        if poison:
            await redis.xdel(stream, *poison)


async def _poison_among_good(
    api: Api,
    receiver: Receiver,
    redis: redis_asyncio.Redis,
    pool: asyncpg.Pool,
    caller: Caller,
    first: dict[str, Any],
    poison: list[Any],
) -> None:
    settings = api.settings
    stream = settings.stream(streams.EVENTS)
    poison += [
        await redis.xadd(stream, {b"data": b"[1, 2, 3]"}),
        await redis.xadd(stream, {b"data": b"{not json"}),
        await redis.xadd(stream, {b"other": b"field"}),
    ]
    rest = [await publish(redis, settings, caller.school_id) for _ in range(2)]
    got = await receiver.wait_for(3, timeout=10)
    assert {g.headers["webhook-id"] for g in got} == {e["id"] for e in [first, *rest]}

    ids = [streams.text(p) for p in poison]

    async def set_aside() -> bool:
        found = await pool.fetchval(
            "SELECT count(*) FROM webhooks.dead_letters WHERE stream = $1"
            " AND entry_id = ANY ($2::text[])",
            streams.EVENTS,
            ids,
        )
        return int(found) == 3

    await eventually(set_aside, timeout=5)
    row = await pool.fetchrow(
        "SELECT reason, payload FROM webhooks.dead_letters WHERE entry_id = $1", ids[0]
    )
    assert row is not None
    assert (row["reason"], bytes(row["payload"])) == ("not a JSON object", b"[1, 2, 3]")

    async def nothing_pending() -> bool:
        return int((await redis.xpending(stream, dispatcher.GROUP))["pending"]) == 0

    await eventually(nothing_pending)
    async with api.http.get(api.base + "/metrics") as response:
        text = await response.text()
    counted = 'stream_dead_letters_total{stream="connect:events"}'
    (line,) = [x for x in text.splitlines() if x.startswith(counted)]
    assert float(line.split()[-1]) >= 3
    # And still dispatching: one more event after the poison.
    last = await publish(redis, settings, caller.school_id)
    got = await receiver.wait_for(4, timeout=10)
    assert got[-1].headers["webhook-id"] == last["id"]


# -------------------------------------------------------------------------------------------------
# Redis refusing at start


async def test_a_redis_that_refuses_at_start_is_waited_for_and_readiness_says_so(
    webhooks_env: dict[str, str],
    own_database: str,
    receiver: Receiver,
    aiohttp_server: AiohttpServer,
) -> None:
    """Nothing listens on Redis's port when the service starts: it serves, /readyz is 503,
    the dispatcher keeps being restarted. A redis-server then appears on that port: the
    loops recover by themselves, /readyz is 200, and an event is delivered."""
    port = free_port()
    settings = own_settings(webhooks_env, own_database, port)
    url = await serve(aiohttp_server, settings)
    proc: asyncio.subprocess.Process | None = None
    async with aiohttp.ClientSession() as http:
        try:
            status, body = await probe(http, url + "/readyz")
            assert (status, body["checks"]["redis"]) == (503, False)
            # Alive all along: the loops are restarted, not dead.
            assert (await probe(http, url + "/healthz"))[0] == 200

            proc = await start_redis(port)

            async def ready() -> bool:
                return (await probe(http, url + "/readyz"))[0] == 200

            await eventually(ready, timeout=20)
            api = Api(http, url, settings)
            caller = Caller(new_school())
            await api.subscribe(caller, receiver.url)
            async with redis_asyncio.Redis(port=port) as client:
                event = await publish(client, settings, caller.school_id)
            (got,) = await receiver.wait_for(1, timeout=15)
            assert got.headers["webhook-id"] == event["id"]
        finally:
            if proc is not None:
                await stop(proc)


# -------------------------------------------------------------------------------------------------
# READONLY


async def test_a_read_only_replica_given_as_the_primary_fails_readiness_until_promoted(
    webhooks_env: dict[str, str],
    own_database: str,
    receiver: Receiver,
    aiohttp_server: AiohttpServer,
) -> None:
    """REDIS_URL names a replica (as after a failover a client may still reach the old
    primary, now a replica): creating the group and reading as a group are refused with
    READONLY. The dispatcher is restarted with backoff, and once it has failed long enough
    /readyz is 503 naming the background loops (Redis itself answers PING, so only they can
    tell). The replica is promoted (REPLICAOF NO ONE): /readyz turns 200 and events flow."""
    primary_port, replica_port = free_port(), free_port()
    primary = await start_redis(primary_port)
    replica = await start_redis(replica_port, "--replicaof", "127.0.0.1", str(primary_port))
    try:
        settings = own_settings(webhooks_env, own_database, replica_port)
        url = await serve(aiohttp_server, settings)
        async with aiohttp.ClientSession() as http:

            async def not_ready() -> bool:
                status, body = await probe(http, url + "/readyz")
                return status == 503 and body["checks"] == {
                    "postgresql": True,
                    "redis": True,
                    "background": False,
                }

            await eventually(not_ready, timeout=30)
            assert (await probe(http, url + "/healthz"))[0] == 200

            async with redis_asyncio.Redis(port=replica_port) as client:
                await client.execute_command("REPLICAOF", "NO", "ONE")

                async def ready() -> bool:
                    return (await probe(http, url + "/readyz"))[0] == 200

                await eventually(ready, timeout=30)
                api = Api(http, url, settings)
                caller = Caller(new_school())
                await api.subscribe(caller, receiver.url)
                event = await publish(client, settings, caller.school_id)
                (got,) = await receiver.wait_for(1, timeout=15)
                assert got.headers["webhook-id"] == event["id"]
    finally:
        await stop(replica)
        await stop(primary)
        for port in (primary_port, replica_port):
            # What the replica synced (start_redis names the file by port).
            synced = Path(tempfile.gettempdir(), f"lc-test-{port}.rdb")
            await asyncio.to_thread(synced.unlink, missing_ok=True)
