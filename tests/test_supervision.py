"""Supervised background loops (libs/common/tasks.py) seen from outside: /readyz says when a
loop has kept failing and when it has recovered, and identity's and the gateway's loops,
started while Redis refuses every connection, do their work once a Redis appears."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from libs.common import redis_client, streams, tasks
from libs.common.config import Settings, load_settings
from libs.common.web import base_application, watch_background
from services.gateway.context import CONTEXT as GATEWAY
from services.identity import grants
from tests.support import free_port, running, shutdown_redis, start_redis


async def _status(http: Any, url: str) -> int:
    async with http.get(url) as resp:
        return int(resp.status)


async def _until(check: Callable[[], Awaitable[bool]], what: str, bound: float = 30.0) -> None:
    """Wait until `check()` holds; fail naming `what` after `bound` seconds (a bound, not a
    timing under test)."""
    deadline = asyncio.get_running_loop().time() + bound
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"never: {what}"
        await asyncio.sleep(0.05)


async def test_readyz_is_503_while_a_loop_keeps_failing_and_200_once_it_recovers(
    http: Any,
) -> None:
    broken = True
    runs = 0
    stop = asyncio.Event()
    supervisor = tasks.Supervisor(stop, not_ready_after=0.5, steady_after=0.3)

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if broken:
            raise ConnectionError("the store refuses")
        while not stop.is_set():
            supervisor.ran_cleanly("flaky")
            await asyncio.sleep(0.05)

    app = base_application("supervision-test")

    async def supervised(app: web.Application) -> Any:
        supervisor.start("flaky", loop)
        watch_background(app, supervisor)
        yield
        await supervisor.close(grace=1)

    app.cleanup_ctx.append(supervised)
    async with running(app, free_port()) as url:
        # Failing, restarted with backoff, for longer than the threshold: not ready, yet alive
        # (restarting is what the supervisor is for; the process is not to be killed for it).
        await _until(lambda: _is(http, url + "/readyz", 503), "503 while the loop keeps failing")
        assert supervisor.loops["flaky"].restarts >= 1 and runs >= 2
        assert await _status(http, url + "/healthz") == 200
        async with http.get(url + "/readyz") as resp:
            assert (await resp.json())["checks"] == {"background": False}

        broken = False
        await _until(lambda: _is(http, url + "/readyz", 200), "200 once the loop runs again")
        # And it stays so while the loop runs well.
        for _ in range(5):
            assert await _status(http, url + "/readyz") == 200
            await asyncio.sleep(0.1)


async def _is(http: Any, url: str, status: int) -> bool:
    return await _status(http, url) == status


def _settings_on(base_env: dict[str, str], redis_port: int, **more: str) -> Settings:
    # The run's database, a key prefix of this test's own, and a Redis that is not there yet.
    return load_settings(
        {
            **base_env,
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "REDIS_KEY_PREFIX": f"{base_env['REDIS_KEY_PREFIX']}sup{uuid.uuid4().hex[:6]}:",
            **more,
        }
    )


async def test_identity_and_gateway_loops_start_without_redis_and_recover_when_it_appears(
    base_env: dict[str, str], migrated: None, pool: Any, http: Any
) -> None:
    from services.gateway.app import create_app as gateway_app
    from services.identity.app import create_app as identity_app

    redis_port = free_port()  # nothing listens here until the test starts its own Redis
    identity_port, gateway_port = free_port(), free_port()
    identity_settings = _settings_on(base_env, redis_port, IDENTITY_PORT=str(identity_port))
    gateway_settings = load_settings(
        {
            **base_env,
            "REDIS_URL": identity_settings.redis_url,
            "REDIS_KEY_PREFIX": identity_settings.redis_prefix,
            "GATEWAY_PORT": str(gateway_port),
            "IDENTITY_URL": f"http://127.0.0.1:{identity_port}",
        }
    )
    record_id = uuid.uuid4().hex
    gateway = gateway_app(gateway_settings)
    proc = None
    try:
        async with (
            running(identity_app(identity_settings), identity_port) as identity_url,
            running(gateway, gateway_port) as gateway_url,
        ):
            for url in (identity_url, gateway_url):
                assert await _status(http, url + "/readyz") == 503
                assert await _status(http, url + "/healthz") == 200
            proc = await start_redis(redis_port)
            for url in (identity_url, gateway_url):
                await _until(lambda u=url: _is(http, u + "/readyz", 200), f"{url} ready")

            # Identity's audit consumer reads the stream of the new Redis into PostgreSQL.
            client = redis_client.connect(identity_settings.redis_url)
            try:
                record = {"rid": record_id, "action": "api.call", "occurred_at": 1.0}
                await client.xadd(
                    identity_settings.stream(streams.AUDIT),
                    {"data": orjson.dumps({"records": [record]})},
                )

                async def stored() -> bool:
                    found = await pool.fetchval(
                        "SELECT count(*) FROM audit_log WHERE record_id = $1", f"r:{record_id}"
                    )
                    return bool(found)

                await _until(stored, "the audit record stored by identity's consumer")

                # The gateway follows connect:revocations on it (under its lease, which it
                # can register only once identity's marks pass restored this Redis's marks):
                # an announcement reaches the grants it refuses from memory.
                grant_id = uuid.uuid4()
                await grants.announce_revocations(
                    client, identity_settings, {grant_id: 1}, reason="test"
                )
                revoked = gateway[GATEWAY].revoked

                async def heard() -> bool:
                    return str(grant_id) in revoked

                await _until(heard, "the revocation heard by the gateway")
            finally:
                await client.aclose()
    finally:
        if proc is not None:
            await shutdown_redis(redis_port, proc)
