"""Crash recovery with real processes, real servers and no mocks: at least once survives
SIGKILL and a Redis that goes away.

- `loopwise-connect serve webhooks` runs as a real process and is SIGKILLed in the middle of a
  delivery (the receiver holds the request open), or while stopped (SIGSTOP) right after an
  event was appended; a new process on another port must then deliver the event, with the
  same webhook-id and a valid signature, from the egress address.
- The school API's outbox relay runs against a redis-server of its own, which is shut down
  and started again on the same port: a write made meanwhile succeeds, and its event reaches
  the stream exactly once when Redis is back.

Everything here uses a database of its own (and, for webhooks, a key prefix of its own), so the
session's webhooks sender and school API relay never take part.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import redis.asyncio as redis_asyncio
from aiohttp import web
from pytest_aiohttp import AiohttpClient, AiohttpServer
from standardwebhooks import Webhook

from libs.common import streams
from libs.common.config import Settings, load_settings
from services.school_api import store as school_store
from services.school_api.app import RELAY
from services.school_api.app import create_app as create_school_api
from services.webhooks import dispatcher
from tests.support import (
    base_url,
    connect,
    database_env,
    free_port,
    migrated_database,
    shutdown_redis,
    start_redis,
    statement_cache,
    without_handler_cancellation,
)
from tests.test_school_api_events import call, who
from tests.test_webhooks import (
    CLI,
    Api,
    Behaviour,
    Caller,
    Receiver,
    eventually,
    new_school,
    publish,
)

pytestmark = pytest.mark.timeout(120)

# The delivery timeout of the processes started here. A sender leases a delivery for twice
# the timeout, at least LEASE_MIN (services/webhooks/delivery/sender.py), and renews the
# lease while it lives: a delivery cut short by SIGKILL is claimed again when the dead
# sender's last lease runs out.
DELIVERY_TIMEOUT = 1.0


# -------------------------------------------------------------------------------------------------
# Helpers: a database of our own, webhooks processes, receivers, a private redis-server


@pytest.fixture(scope="module")
async def crash_database(base_env: dict[str, str]) -> AsyncIterator[str]:
    """A migrated database no session-wide service works on."""
    async with migrated_database(base_env, "_crash") as url:
        yield url


def crash_env(webhooks_env: dict[str, str], database_url: str) -> dict[str, str]:
    """The webhooks processes of one test: its own database and its own key prefix (under
    the run's, so the session's cleanup removes its keys too); short timeouts and claims."""
    return {
        **webhooks_env,
        **database_env(webhooks_env, database_url),
        "REDIS_KEY_PREFIX": f"{webhooks_env['REDIS_KEY_PREFIX']}crash{secrets.token_hex(3)}:",
        "WEBHOOK_EGRESS_IP": "127.0.0.2",
        "WEBHOOK_TIMEOUT_SECONDS": str(DELIVERY_TIMEOUT),
        "WEBHOOK_RETRY_SCHEDULE": "0.2,0.4,0.8",
        # Stream entries a dead dispatcher read are claimed by another after this.
        "WEBHOOK_CLAIM_IDLE_SECONDS": "1",
    }


@dataclass
class Process:
    proc: asyncio.subprocess.Process
    url: str
    output: asyncio.Task[bytes]

    async def kill(self) -> None:
        """SIGKILL (a stopped process dies too) and reap it."""
        if self.proc.returncode is None:
            self.proc.kill()
        await asyncio.wait_for(self.proc.wait(), 10)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.output), 5)


async def serve_webhooks(env: dict[str, str], processes: list[Process]) -> Process:
    """`loopwise-connect serve webhooks --port P` as a process of its own, once it listens
    (the workers start before the socket opens). Added to `processes` for the cleanup."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        CLI,
        "serve",
        "webhooks",
        "--port",
        str(port),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    # Drained all along, so a chatty process never blocks on a full pipe.
    started = Process(proc, f"http://127.0.0.1:{port}", asyncio.create_task(proc.stderr.read()))
    processes.append(started)
    deadline = time.monotonic() + 20
    while True:
        if proc.returncode is not None:
            raise AssertionError(f"webhooks exited ({proc.returncode}): {await started.output!r}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return started


@asynccontextmanager
async def receiving(aiohttp_server: AiohttpServer, behaviour: Behaviour) -> AsyncIterator[Receiver]:
    """A real receiver on 127.0.0.1 (tests.test_webhooks.Receiver) for the block. Its handlers
    are not cancelled when a sender goes away: a killed sender's request stays held."""
    receiver = Receiver(behaviour)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", receiver.handle)
    server = await aiohttp_server(app, access_log=None, shutdown_timeout=0.5)
    receiver.url = str(without_handler_cancellation(server).make_url("/hooks"))
    async with server:
        yield receiver


def holding_the_first(release: asyncio.Event) -> Behaviour:
    """Never answers the first request (until released at the test's end); 200 after."""

    async def behaviour(n: int, _request: web.Request) -> web.StreamResponse:
        if n == 1:
            await release.wait()
        return web.Response(text="ok")

    return behaviour


async def delivery_rows(database_url: str, subscription_id: str) -> list[asyncpg.Record]:
    conn = await connect(database_url)
    try:
        return list(
            await conn.fetch(
                "SELECT status, attempt_count, locked_by,"
                " extract(epoch FROM locked_until - now())::float8 AS lease_left,"
                " (SELECT count(*) FROM webhooks.attempts a WHERE a.delivery_id = d.id)"
                " AS attempts"
                " FROM webhooks.deliveries d WHERE subscription_id = $1",
                uuid.UUID(subscription_id),
            )
        )
    finally:
        await conn.close()


def entries_with_id(raw: Any, event_id: str) -> list[dict[str, Any]]:
    """Stream entries (XRANGE answer) carrying this event id, decoded by hand."""
    found = [orjson.loads(fields[b"data"]) for _, fields in raw]
    return [e for e in found if e.get("id") == event_id]


# -------------------------------------------------------------------------------------------------
# Webhooks: SIGKILL


async def test_a_delivery_cut_short_by_sigkill_is_sent_again_by_the_next_process(
    webhooks_env: dict[str, str],
    crash_database: str,
    redis: redis_asyncio.Redis,
    aiohttp_server: AiohttpServer,
) -> None:
    """The process is killed while the receiver holds its request open: nothing about the
    attempt was recorded, the delivery is still leased to the dead sender, and a new process
    sends it again when the lease runs out, as the same message (webhook-id and body)."""
    env = crash_env(webhooks_env, crash_database)
    settings = load_settings(env)
    release = asyncio.Event()
    processes: list[Process] = []
    async with (
        receiving(aiohttp_server, holding_the_first(release)) as receiver,
        aiohttp.ClientSession() as http,
    ):
        try:
            first = await serve_webhooks(env, processes)
            caller = Caller(new_school())
            made = await Api(http, first.url, settings).subscribe(caller, receiver.url)
            event = await publish(redis, settings, caller.school_id)

            (cut,) = await receiver.wait_for(1, timeout=5)
            await first.kill()
            # The kill came mid-request: the receiver is still holding it, and the dead
            # process recorded no attempt; its lease on the delivery is all that is left.
            assert receiver.in_flight == 1
            (row,) = await delivery_rows(crash_database, made["id"])
            assert (row["status"], row["attempt_count"], row["attempts"]) == ("pending", 0, 0)
            assert f"-{first.proc.pid}-" in row["locked_by"]
            lease_left = float(row["lease_left"])
            assert lease_left > 0

            second = await serve_webhooks(env, processes)
            api = Api(http, second.url, settings)
            # Claimed when the lease runs out; the sender looks for due work every second.
            _, again = await receiver.wait_for(2, timeout=lease_left + 10)

            assert cut.headers["webhook-id"] == again.headers["webhook-id"] == event["id"]
            assert again.body == cut.body
            for got in (cut, again):
                assert Webhook(made["secret"]).verify(got.body, dict(got.headers)) == event
                assert got.remote == "127.0.0.2"

            async def delivered() -> bool:
                found = await api.deliveries(caller, made["id"])
                return bool(found) and found[0]["status"] == "delivered"

            await eventually(delivered)
            (logged,) = await api.deliveries(caller, made["id"])
            assert logged["event_id"] == event["id"]
            # The attempt the kill cut short left no trace; the one that went through did.
            assert [(a["response_status"], a["outcome"]) for a in logged["attempts"]] == [
                (200, "delivered")
            ]
            await asyncio.sleep(0.5)
            assert len(receiver.received) == 2
        finally:
            for process in processes:
                await process.kill()
            release.set()
            await redis.delete(settings.stream(streams.EVENTS))


async def test_a_live_sender_keeps_its_leases_however_long_deliveries_wait_their_turn(
    webhooks_env: dict[str, str],
    crash_database: str,
    redis: redis_asyncio.Redis,
    aiohttp_server: AiohttpServer,
) -> None:
    """One request at a time to a slow endpoint: the last of nine deliveries waits about
    twice the lease for its turn. The sender renews what it holds, so no delivery is claimed
    a second time while it waits (which would send it twice)."""
    env = {**crash_env(webhooks_env, crash_database), "WEBHOOK_ENDPOINT_CONCURRENCY": "1"}
    settings = load_settings(env)
    processes: list[Process] = []

    async def slow(_n: int, _request: web.Request) -> web.StreamResponse:
        # Under the 1 s timeout: every attempt succeeds, only slowly.
        await asyncio.sleep(DELIVERY_TIMEOUT * 0.9)
        return web.Response(text="ok")

    async with receiving(aiohttp_server, slow) as receiver, aiohttp.ClientSession() as http:
        try:
            await serve_webhooks(env, processes)
            caller = Caller(new_school())
            await Api(http, processes[0].url, settings).subscribe(caller, receiver.url)
            events = [await publish(redis, settings, caller.school_id) for _ in range(9)]

            await receiver.wait_for(9, timeout=30)
            # Time for a duplicate to show up, had a lease run out under a waiting delivery.
            await asyncio.sleep(DELIVERY_TIMEOUT * 2)
            ids = [got.headers["webhook-id"] for got in receiver.received]
            assert sorted(ids) == sorted(e["id"] for e in events)
            assert receiver.max_in_flight == 1
        finally:
            for process in processes:
                await process.kill()
            await redis.delete(settings.stream(streams.EVENTS))


async def test_an_event_appended_while_the_process_dies_is_delivered_once_by_the_next(
    webhooks_env: dict[str, str],
    crash_database: str,
    redis: redis_asyncio.Redis,
    aiohttp_server: AiohttpServer,
) -> None:
    """The process is stopped (SIGSTOP), the event appended, the process SIGKILLed: it never
    recorded the delivery. A new process claims the entry from the dead consumer (or reads
    it, had the dead one not been blocked reading) and delivers it exactly once."""
    env = crash_env(webhooks_env, crash_database)
    settings = load_settings(env)
    stream = settings.stream(streams.EVENTS)
    processes: list[Process] = []
    async with receiving(aiohttp_server, _ok) as receiver, aiohttp.ClientSession() as http:
        try:
            first = await serve_webhooks(env, processes)
            caller = Caller(new_school())
            made = await Api(http, first.url, settings).subscribe(caller, receiver.url)

            async def reading() -> bool:
                # The dispatcher has made its group (it reads right after).
                if not await redis.exists(stream):
                    return False
                groups = await redis.xinfo_groups(stream)
                return any(g["name"] == dispatcher.GROUP.encode() for g in groups)

            await eventually(reading)
            await asyncio.sleep(0.2)
            first.proc.send_signal(signal.SIGSTOP)
            event = await publish(redis, settings, caller.school_id)
            await asyncio.sleep(0.3)
            pending = await redis.xpending(stream, dispatcher.GROUP)
            await first.kill()
            # Nothing recorded, nothing acknowledged, nothing sent.
            assert await delivery_rows(crash_database, made["id"]) == []
            assert receiver.received == []
            # The stopped dispatcher was (nearly always) blocked reading, so Redis handed it
            # the entry: it is pending to the dead consumer (named after its pid) and only a
            # claim gets it out. Had it been between two reads, no one has read it yet.
            owners = [c["name"].decode() for c in pending["consumers"]]
            assert (int(pending["pending"]), len(owners)) in ((1, 1), (0, 0)), pending
            assert all(f"-{first.proc.pid}-" in name for name in owners), pending

            second = await serve_webhooks(env, processes)
            api = Api(http, second.url, settings)
            (got,) = await receiver.wait_for(1, timeout=10)
            assert got.headers["webhook-id"] == event["id"]
            assert Webhook(made["secret"]).verify(got.body, dict(got.headers)) == event
            assert got.remote == "127.0.0.2"

            async def delivered() -> bool:
                found = await api.deliveries(caller, made["id"])
                return bool(found) and found[0]["status"] == "delivered"

            await eventually(delivered)
            (logged,) = await api.deliveries(caller, made["id"])
            assert [a["response_status"] for a in logged["attempts"]] == [200]

            async def acknowledged() -> bool:
                return int((await redis.xpending(stream, dispatcher.GROUP))["pending"]) == 0

            await eventually(acknowledged)
            # Longer than a claim round (claim idle 1 s, every 0.5 s): still only one.
            await asyncio.sleep(1.5)
            assert len(receiver.received) == 1
            assert len(await api.deliveries(caller, made["id"])) == 1
        finally:
            for process in processes:
                await process.kill()
            await redis.delete(stream)


async def _ok(_n: int, _request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok")


# -------------------------------------------------------------------------------------------------
# Outbox: Redis stopped and started


async def test_an_event_written_while_redis_is_down_reaches_the_stream_once_it_is_back(
    settings: Settings,
    crash_database: str,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
) -> None:
    """The school API (with its relay) on a redis-server of its own. Redis is shut down: a
    course created meanwhile is still 201, its outbox row waits unpublished while the relay
    fails; Redis starts again (empty: no persistence) on the same port, and the event is on
    the stream exactly once and its row marked published."""
    port = free_port()
    own = dataclasses.replace(
        settings, database_url=crash_database, redis_url=f"redis://127.0.0.1:{port}/0"
    )
    stream = own.stream(streams.EVENTS)
    school = new_school()
    headers = who(own, school)
    redis_proc = await start_redis(port)
    pool: asyncpg.Pool | None = None
    try:
        pool = await school_store.create_pool(
            crash_database, min_size=1, max_size=2, statement_cache=statement_cache()
        )
        app = create_school_api(own)
        server = await aiohttp_server(app, access_log=None, shutdown_timeout=2)
        async with await aiohttp_client(without_handler_cancellation(server)) as client:
            http, courses = client.session, f"{base_url(server)}/api/v1/courses"
            # Events flow while Redis is up.
            status, before = await call(http, "POST", courses, headers, {"title": "Before"})
            assert status == 201, before
            (row,) = await school_store.outbox_events_for(pool, school)

            async def on_stream(event_id: str) -> list[dict[str, Any]]:
                # A connection of its own each time: the server may have restarted since.
                async with redis_asyncio.Redis.from_url(own.redis_url) as client:
                    return entries_with_id(await client.xrange(stream), event_id)

            async def first_arrived() -> bool:
                return len(await on_stream(str(row["event_id"]))) == 1

            await eventually(first_arrived, timeout=5)

            await shutdown_redis(port, redis_proc)
            status, created = await call(http, "POST", courses, headers, {"title": "While down"})
            assert status == 201, created
            rows = await school_store.outbox_events_for(pool, school)
            (owed,) = [r for r in rows if r["data"]["id"] == created["id"]]
            event_id = str(owed["event_id"])
            assert owed["published_at"] is None
            relay = app[RELAY]

            async def tried_and_failed() -> bool:
                return relay.failures >= 1

            await eventually(tried_and_failed, timeout=5)
            found = await school_store.outbox_event(pool, owed["event_id"])
            assert found is not None
            assert found["published_at"] is None

            redis_proc = await start_redis(port)

            async def arrived() -> bool:
                return len(await on_stream(event_id)) >= 1

            # The relay's backoff after a second or so of failures is a few seconds at most.
            await eventually(arrived, timeout=15)

            async def marked() -> bool:
                got = await school_store.outbox_event(pool, owed["event_id"])
                return got is not None and got["published_at"] is not None

            await eventually(marked, timeout=5)
            # Past another poll of the relay (every second): still exactly one.
            await asyncio.sleep(1.5)
            (event,) = await on_stream(event_id)
            assert (event["type"], event["school_id"], event["data"]) == (
                "course.created",
                school,
                created,
            )
    finally:
        if pool is not None:
            await pool.close()
        if redis_proc.returncode is None:
            redis_proc.kill()
            await redis_proc.wait()
