"""The application shell every service shares (libs/common/web.py)."""

from __future__ import annotations

import gc

import aiohttp
from aiohttp.test_utils import TestServer

from libs.common.web import GEN0_THRESHOLD, base_application


async def test_a_started_service_freezes_what_it_started_with_and_restores_the_collector() -> None:
    """Started, a service's long-lived objects are frozen out of full collections (their walk
    was tens of milliseconds in the token endpoint's p99); stopped, the collector is as it
    was, because tests run many services in one process."""
    before = gc.get_threshold()
    server = TestServer(base_application("shell-test"))
    await server.start_server()
    try:
        assert gc.get_freeze_count() > 10_000
        assert gc.get_threshold()[0] == GEN0_THRESHOLD
        async with aiohttp.ClientSession() as http, http.get(server.make_url("/healthz")) as resp:
            assert resp.status == 200
    finally:
        await server.close()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
