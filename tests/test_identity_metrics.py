"""Identity's /metrics moves when its events happen: tokens issued by grant type, sign-in
failures, refresh token reuse; and it carries the signing key age, the pools and the process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as redis_asyncio
from prometheus_client.parser import text_string_to_metric_families

from libs.common.config import Settings
from services.identity import credentials, sessions
from tests.test_account_pages import sign_in
from tests.test_authorize import Browser
from tests.token_helpers import World, code_flow, make_world, refresh


@pytest.fixture(autouse=True)
async def _fresh_address_counter(redis: redis_asyncio.Redis, settings: Settings) -> Any:
    """Failed sign-ins from 127.0.0.1 must not throttle another module's tests."""
    key = sessions.address_throttle_key(settings, "127.0.0.1")
    await redis.delete(key)
    yield
    await redis.delete(key)


@pytest.fixture
async def world(
    identity_url: str, pool: Any, settings: Settings, unique: str, identity_port: int
) -> World:
    return await make_world(pool, settings, unique, identity_port, label="met")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    b = Browser()
    yield b
    await b.close()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(http: Any, identity_url: str) -> Samples:
    """Every sample of identity's /metrics by (name, sorted labels)."""
    async with http.get(f"{identity_url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_tokens_issued_and_refresh_reuse_are_counted(
    world: World, http: Any, pool: Any, settings: Settings, identity_url: str
) -> None:
    before = await scrape(http, identity_url)
    first, _ = await code_flow(http, pool, settings, world)
    old = first.body["refresh_token"]
    rotated = await refresh(http, world, old)
    assert rotated.status == 200, rotated.body
    middle = await scrape(http, identity_url)
    issued = "identity_tokens_issued_total"
    assert value(middle, issued, grant_type="authorization_code") == (
        value(before, issued, grant_type="authorization_code") + 1
    )
    assert value(middle, issued, grant_type="refresh_token") == (
        value(before, issued, grant_type="refresh_token") + 1
    )

    # The rotated-away token again, past the grace window: reuse detected, the grant ends.
    await pool.execute(
        "UPDATE refresh_tokens SET rotated_at = rotated_at - make_interval(secs => $2)"
        " WHERE token_hash = $1",
        credentials.token_hash(old),
        settings.tokens.refresh_reuse_grace + 5,
    )
    reused = await refresh(http, world, old)
    assert reused.status == 400 and reused.body["error"] == "invalid_grant"
    after = await scrape(http, identity_url)
    reuse = "identity_refresh_reuse_detected_total"
    assert value(after, reuse) == value(middle, reuse) + 1
    # A refused refresh issues nothing.
    assert value(after, issued, grant_type="refresh_token") == (
        value(middle, issued, grant_type="refresh_token")
    )


async def test_a_wrong_password_counts_as_a_sign_in_failure(
    world: World, http: Any, browser: Browser, identity_url: str
) -> None:
    before = await scrape(http, identity_url)
    status, _, _ = await sign_in(browser, world.origin, world.user.email, "not the password")
    assert status == 400
    after = await scrape(http, identity_url)
    failures = "identity_sign_in_failures_total"
    assert value(after, failures, reason="bad_credentials") == (
        value(before, failures, reason="bad_credentials") + 1
    )


async def test_key_age_pools_and_process_are_reported(
    world: World, http: Any, identity_url: str, settings: Settings
) -> None:
    samples = await scrape(http, identity_url)
    # The platform issuer's keys exist from the start: their age is read at each scrape.
    age = value(samples, "identity_signing_key_age_seconds")
    assert 0 < age < settings.tokens.key_rotation_interval
    assert value(samples, "db_pool_max_connections", pool="main") == settings.db_pool_max
    assert value(samples, "db_pool_connections", pool="main", state="idle") >= 0
    assert ("db_pool_connections", (("pool", "audit"), ("state", "in_use"))) in samples
    assert value(samples, "process_resident_memory_bytes") > 0
    assert value(samples, "process_open_fds") > 0
    assert ("python_info", ()) not in samples  # labelled: implementation, version, ...
    assert any(name == "python_info" for name, _ in samples)
    # The audit consumer group's lag on connect:audit (the group exists once it has read).
    assert any(name == "identity_audit_stream_pending" for name, _ in samples)
