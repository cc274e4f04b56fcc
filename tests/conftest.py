"""Real PostgreSQL and Redis for every test run, isolated per run.

Where the servers come from, in order: TEST_DATABASE_URL / TEST_REDIS_URL; PostgreSQL and
Redis on their default local ports; testcontainers when a Docker engine answers. Each run gets
its own database and its own Redis key prefix, so runs never see each other's data. Through a
transaction-pooling PgBouncer (`make test-cluster`), TEST_DATABASE_STATEMENT_CACHE=0 and
TEST_DATABASE_SESSION_URL (the server itself, for LISTEN) say so.

The run's services are session fixtures served with `tests.support.running` (aiohttp's
TestServer, on the ports their settings name); tests serve apps of their own with
pytest-aiohttp's `aiohttp_server` and `aiohttp_client`.
"""

from __future__ import annotations

import base64
import os
import secrets
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as redis_asyncio

from libs.common import db, redis_client, streams
from libs.common.config import Settings, load_settings
from libs.common.logging import configure_logging
from tests.support import ExampleResolver, client_session, free_port, running

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@dataclass(frozen=True)
class StoreUrls:
    server_database_url: str  # a database on the server we may connect to
    redis_url: str


@pytest.fixture(scope="session")
def store_urls() -> Iterator[StoreUrls]:
    database_url = os.environ.get("TEST_DATABASE_URL")
    redis_url = os.environ.get("TEST_REDIS_URL")
    containers: list[Any] = []
    if database_url is None and _answers("127.0.0.1", 5432):
        database_url = DEFAULT_DATABASE_URL
    if redis_url is None and _answers("127.0.0.1", 6379):
        redis_url = DEFAULT_REDIS_URL
    if (database_url is None or redis_url is None) and _docker_answers():
        if database_url is None:
            from testcontainers.postgres import PostgresContainer

            pg = PostgresContainer("postgres:15-alpine", driver=None).start()
            containers.append(pg)
            database_url = pg.get_connection_url()
        if redis_url is None:
            from testcontainers.redis import RedisContainer

            rc = RedisContainer("redis:7-alpine").start()
            containers.append(rc)
            redis_url = f"redis://{rc.get_container_host_ip()}:{rc.get_exposed_port(6379)}/0"
    if database_url is None or redis_url is None:
        missing = [
            name
            for name, url in (("PostgreSQL", database_url), ("Redis", redis_url))
            if url is None
        ]
        pytest.exit(
            f"No {' or '.join(missing)} for the tests: set TEST_DATABASE_URL / TEST_REDIS_URL, "
            "start PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379, or run a Docker "
            "engine for testcontainers.",
            returncode=3,
        )
    try:
        yield StoreUrls(database_url, redis_url)
    finally:
        for container in containers:
            container.stop()


def _with_database(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def run_id() -> str:
    return f"lc_test_{secrets.token_hex(4)}"


@pytest.fixture(scope="session")
def identity_port() -> int:
    return free_port()


def _key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


@pytest.fixture(scope="session")
def base_env(store_urls: StoreUrls, run_id: str, identity_port: int) -> dict[str, str]:
    """The environment a service of this test run gets: its own database and key prefix."""
    env = {
        "CONNECT_ENV": "test",
        "DATABASE_URL": _with_database(store_urls.server_database_url, run_id),
        "REDIS_URL": store_urls.redis_url,
        "REDIS_KEY_PREFIX": f"{run_id}:",
        "KEY_ENCRYPTION_KEY": _key(),
        "SECRET_PEPPER": _key(),
        "PUBLIC_URL_TEMPLATE": f"http://{{school}}.localhost:{identity_port}",
        "PLATFORM_URL": f"http://localhost:{identity_port}",
        "IDENTITY_PORT": str(identity_port),
        "LOG_LEVEL": "warning",
        "DB_POOL_MIN": "1",
        "DB_POOL_MAX": "5",
        # Tests stamp audit records at any time from 1970 to 2096: the session's sweeps must
        # neither delete nor cut them under a test reading them back (tests of the retention
        # itself set their own, on databases of their own).
        "AUDIT_RETENTION_DAYS": "36500",
        "AUDIT_IP_RETENTION_DAYS": "36500",
        # Uploaded files of this run: a directory of its own, never the checkout's .data.
        "STORAGE_URL": Path(tempfile.mkdtemp(prefix=f"{run_id}-uploads-")).as_uri(),
    }
    # Through a transaction pooler (`make test-cluster`: TEST_DATABASE_URL is PgBouncer's):
    # its statement cache, and the server itself for what needs a session (LISTEN).
    session_url = os.environ.get("TEST_DATABASE_SESSION_URL")
    if session_url:
        env["DATABASE_SESSION_URL"] = _with_database(session_url, run_id)
    cache = os.environ.get("TEST_DATABASE_STATEMENT_CACHE")
    if cache:
        env["DATABASE_STATEMENT_CACHE"] = cache
    return env


@pytest.fixture(scope="session")
def settings(base_env: dict[str, str]) -> Settings:
    configure_logging("warning")
    return load_settings(base_env)


@pytest.fixture(scope="session")
async def migrated(settings: Settings) -> AsyncIterator[None]:
    await db.migrate(settings.database_url)
    # Generated school ids start high, so ids chosen on purpose (the quickstart's 42) are free.
    conn = await db.connect(
        settings.database_url, statement_cache=settings.database_statement_cache
    )
    try:
        await conn.execute("SELECT setval('schools_id_seq', 1000)")
    finally:
        await conn.close()
    yield
    await db.drop_database(settings.database_url)


@pytest.fixture(scope="session")
async def pool(settings: Settings, migrated: None) -> AsyncIterator[asyncpg.Pool]:
    p = await db.create_pool(settings=settings, min_size=1, max_size=5)
    yield p
    await p.close()


@pytest.fixture(scope="session")
async def redis(settings: Settings) -> AsyncIterator[redis_asyncio.Redis]:
    # The factory the services use: on a Cluster, scan_iter walks every primary and DEL is
    # split by slot.
    client = redis_client.connect(settings.redis_url)
    yield client
    keys = [k async for k in client.scan_iter(match=f"{settings.redis_prefix}*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


# A consumer group that reads nothing. Consumers trim connect:events and connect:audit to what
# every group acknowledged (streams.trim_consumed); with this group on them, the run's streams
# keep every entry for tests that look at what was appended.
OBSERVER_GROUP = "test-observer"


@pytest.fixture(autouse=True)
async def observed_streams(redis: redis_asyncio.Redis, settings: Settings) -> None:
    """Per test, not per run: a test may delete a stream, and its group with it."""
    for name in (streams.EVENTS, streams.AUDIT):
        await streams.ensure_group(redis, settings.stream(name), OBSERVER_GROUP)


@pytest.fixture(scope="session")
async def identity_url(
    settings: Settings, migrated: None, identity_port: int
) -> AsyncIterator[str]:
    """The identity service of this run, on a real socket; yields its 127.0.0.1 base URL."""
    from services.identity.app import create_app

    async with running(create_app(settings), identity_port) as url:
        yield url


@pytest.fixture(scope="session")
def school_api_url(settings: Settings, migrated: None) -> Iterator[str]:
    """The school API of this run (with its outbox relay), on a real socket; its base URL.

    It runs on an event loop of its own in a thread, so any test may ask for it, including
    through `request.getfixturevalue` inside a running loop, where an async fixture cannot
    be set up."""
    import asyncio
    import threading
    from concurrent.futures import Future

    from services.school_api.app import create_app

    loop = asyncio.new_event_loop()
    started: Future[tuple[str, asyncio.Event]] = Future()

    async def serve() -> None:
        stop = asyncio.Event()
        try:
            async with running(create_app(settings), free_port()) as url:
                started.set_result((url, stop))
                await stop.wait()
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            raise

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    url, stop = started.result(timeout=60)
    try:
        yield url
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout=30)
        loop.close()


@pytest.fixture
async def http() -> AsyncIterator[Any]:
    """An aiohttp client that resolves *.localhost to 127.0.0.1 and never follows redirects."""
    async with client_session() as session:
        yield session


@pytest.fixture
def unique() -> str:
    """A short random label for names that must not collide across tests."""
    return secrets.token_hex(4)


# The gateway ---------------------------------------------------------------------------------
# A system fronted by a gateway: the public origins (issuers included) are on the gateway's
# port and identity runs behind it on a port of its own. Same database, Redis prefix and keys as
# `settings`, so schools, clients and signing keys made through either are shared; only the
# URLs differ (identity's own tests keep `settings`, whose issuers are on identity's port).


@pytest.fixture(scope="session")
def gateway_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def gateway_identity_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def gateway_upstream_port() -> int:
    """Where the gateway's `school_api` upstream is expected in gateway tests: whatever a test
    serves there (an echo server, the school API) is what protected calls reach."""
    return free_port()


@pytest.fixture(scope="session")
def gateway_webhooks_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def gateway_env(
    base_env: dict[str, str],
    gateway_port: int,
    gateway_identity_port: int,
    gateway_upstream_port: int,
    gateway_webhooks_port: int,
) -> dict[str, str]:
    return {
        **base_env,
        "PUBLIC_URL_TEMPLATE": f"http://{{school}}.localhost:{gateway_port}",
        "PLATFORM_URL": f"http://localhost:{gateway_port}",
        "GATEWAY_PORT": str(gateway_port),
        "IDENTITY_PORT": str(gateway_identity_port),
        "IDENTITY_URL": f"http://127.0.0.1:{gateway_identity_port}",
        "SCHOOL_API_URL": f"http://127.0.0.1:{gateway_upstream_port}",
        "WEBHOOKS_URL": f"http://127.0.0.1:{gateway_webhooks_port}",
    }


@pytest.fixture(scope="session")
def gateway_settings(gateway_env: dict[str, str]) -> Settings:
    configure_logging("warning")
    return load_settings(gateway_env)


@pytest.fixture(scope="session")
async def gateway_identity_url(
    gateway_settings: Settings, migrated: None, gateway_identity_port: int
) -> AsyncIterator[str]:
    """Identity behind the gateway: its issuers are the gateway's origins."""
    from services.identity.app import create_app

    async with running(create_app(gateway_settings), gateway_identity_port) as url:
        yield url


@pytest.fixture(scope="session")
async def gateway_url(
    gateway_settings: Settings, gateway_identity_url: str, gateway_port: int
) -> AsyncIterator[str]:
    """The gateway of this run on a real socket; yields its 127.0.0.1 base URL. Schools answer
    at http://{school}.localhost:{gateway_port} (use the `http` fixture, which resolves them)."""
    from services.gateway.app import create_app

    async with running(create_app(gateway_settings), gateway_port) as url:
        yield url


# -- webhooks ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def webhooks_env(base_env: dict[str, str]) -> dict[str, str]:
    """The webhooks service of this run: deliveries leave from 127.0.0.2 (all of 127/8 is
    local on Linux), retries come fast, and a dead dispatcher's entries are claimed soon."""
    return {
        **base_env,
        "WEBHOOK_EGRESS_IP": "127.0.0.2",
        "WEBHOOK_RETRY_SCHEDULE": "0.2,0.4,0.8",
        "WEBHOOK_CLAIM_IDLE_SECONDS": "1",
        "WEBHOOK_TIMEOUT_SECONDS": "3",
        "WEBHOOK_ENDPOINT_CONCURRENCY": "4",
    }


@pytest.fixture(scope="session")
def webhooks_settings(webhooks_env: dict[str, str]) -> Settings:
    return load_settings(webhooks_env)


@pytest.fixture(scope="session")
async def webhooks_url(webhooks_settings: Settings, migrated: None) -> AsyncIterator[str]:
    """The webhooks service (API and workers) on a real socket; yields its base URL."""
    from services.webhooks.app import create_app

    app = create_app(webhooks_settings, resolver=ExampleResolver())
    async with running(app, free_port()) as url:
        yield url
