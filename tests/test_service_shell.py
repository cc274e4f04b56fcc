"""The application shell every service shares (libs/common/web.py)."""

from __future__ import annotations

import gc

from aiohttp import web
from pytest_aiohttp import AiohttpClient
from redis.exceptions import ConnectionError as RedisConnectionError

from libs.common.leases import GatewaysUnconfirmed
from libs.common.web import GEN0_THRESHOLD, base_application


async def test_a_started_service_freezes_what_it_started_with_and_restores_the_collector(
    aiohttp_client: AiohttpClient,
) -> None:
    """Started, a service's long-lived objects are frozen out of full collections (their walk
    was tens of milliseconds in the token endpoint's p99); stopped, the collector is as it
    was, because tests run many services in one process."""
    before = gc.get_threshold()
    client = await aiohttp_client(base_application("shell-test"))
    async with client:  # stopped at the block's end, so the collector is checked after
        assert gc.get_freeze_count() > 10_000
        assert gc.get_threshold()[0] == GEN0_THRESHOLD
        async with client.get("/healthz") as resp:
            assert resp.status == 200
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


async def test_a_store_that_did_not_answer_is_a_503_to_retry(
    aiohttp_client: AiohttpClient,
) -> None:
    """Redis away, or a revocation no gateway lease confirmed in time: RFC 6749's
    temporarily_unavailable with Retry-After, not an unexpected server error."""
    app = base_application("shell-test")

    async def redis_away(request: web.Request) -> web.Response:
        raise RedisConnectionError("Connection refused")

    async def unconfirmed(request: web.Request) -> web.Response:
        raise GatewaysUnconfirmed("1 gateway(s) did not confirm the revocation")

    app.router.add_get("/away", redis_away)
    app.router.add_get("/unconfirmed", unconfirmed)
    client = await aiohttp_client(app)
    for path in ("/away", "/unconfirmed"):
        async with client.get(path) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"
            body = await resp.json()
            assert body["error"] == "temporarily_unavailable"
            assert "gateway" not in body["error_description"]
