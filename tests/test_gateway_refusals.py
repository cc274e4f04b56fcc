"""Refused calls at the gateway (contract 13, Hardening), on real sockets.

A call refused for scope (403) is charged to the client's rate limit, still answered 403 (the
order of section 6 stays), so a token cannot make unlimited audited refusals.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from libs.common.config import Settings
from services.identity import keys, store
from tests.test_gateway_support import (
    World,
    access_claims,
    echo_upstream,
    extra_gateway,
    make_world,
    mint,
    user_grant,
)

__all__ = ["echo_upstream"]

pytestmark = [pytest.mark.usefixtures("echo_upstream"), pytest.mark.timeout(120)]

# A client's limit small enough to drain in a few calls: a burst of 6, one call per 10 s back.
PER_MINUTE = 6


@pytest.fixture(scope="module")
def keyring(pool: Any, gateway_settings: Settings) -> keys.KeyRing:
    return keys.KeyRing(pool, gateway_settings)


async def _token(
    keyring: keys.KeyRing, settings: Settings, pool: Any, world: World, scope: str
) -> str:
    grant_id = await user_grant(pool, world, scope.split())
    return await mint(keyring, world.school.id, access_claims(settings, world, grant_id, scope))


async def _call(
    http: Any,
    base: str,
    world: World,
    token: str,
    method: str = "GET",
    path: str = "/api/v1/courses",
    request_id: str | None = None,
) -> tuple[int, Any, Any]:
    headers = {"Host": world.host, "Authorization": f"Bearer {token}"}
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    body = None if method in ("GET", "DELETE") else {}
    async with http.request(method, base + path, headers=headers, json=body) as resp:
        text = await resp.text()
        decoded = orjson.loads(text) if text and resp.content_type == "application/json" else text
        return resp.status, resp.headers, decoded


async def _limited_world(pool: Any, settings: Settings, port: int, label: str) -> World:
    world = await make_world(pool, settings, label, port)
    await store.update_client(pool, world.client.id, rate_limit_per_minute=PER_MINUTE)
    return world


# Refusals for scope are charged -----------------------------------------------------------------

# Calls an `openid`-only token is refused for: routes and methods of the default route table,
# one of them with an any-of scope list (settings: school:read or appearance:read).
REFUSED = [
    ("GET", "/api/v1/courses", "courses:read"),
    ("POST", "/api/v1/members", "students:write"),
    ("GET", "/api/v1/settings", "school:read appearance:read"),
    ("DELETE", "/api/v1/courses/3", "courses:write"),
    ("PATCH", "/api/v1/members/7", "students:write"),
]


async def _drain_with_refusals(
    http: Any, base: str, world: World, openid: str, calls: list[tuple[str, str, str]]
) -> None:
    """Sends `calls` one after another: each is 403 naming its scope, and spends the bucket."""
    remaining = []
    for method, path, scope in calls:
        status, headers, body = await _call(http, base, world, openid, method, path)
        assert status == 403, (method, path, body)
        assert body["error"] == "insufficient_scope"
        assert f'scope="{scope}"' in headers["WWW-Authenticate"]
        remaining.append(int(headers["RateLimit-Remaining"]))
    assert remaining == list(range(PER_MINUTE - 1, PER_MINUTE - 1 - len(calls), -1))


@pytest.mark.parametrize(("method", "path", "scope"), REFUSED)
async def test_scope_refusals_spend_the_clients_bucket(
    gateway_url: str,
    http: Any,
    pool: Any,
    gateway_settings: Settings,
    gateway_port: int,
    keyring: keys.KeyRing,
    method: str,
    path: str,
    scope: str,
) -> None:
    """An openid-only token's refusals, all alike, drain its client's bucket: the client's next
    in-scope call is 429, while the refused token keeps getting 403 (scope before rate)."""
    world = await _limited_world(pool, gateway_settings, gateway_port, "refusals")
    openid = await _token(keyring, gateway_settings, pool, world, "openid")
    reader = await _token(keyring, gateway_settings, pool, world, "courses:read")
    await _drain_with_refusals(http, gateway_url, world, openid, [(method, path, scope)] * 6)

    status, headers, body = await _call(http, gateway_url, world, reader)
    assert status == 429, body
    assert body["error"] == "rate_limited"
    assert 1 <= int(headers["Retry-After"]) <= 10
    # The order of section 6 stays: out of scope is 403 even with the bucket empty.
    status, headers, _ = await _call(http, gateway_url, world, openid, method, path)
    assert status == 403
    assert headers["RateLimit-Remaining"] == "0"
    # Another client of the school has a bucket of its own.
    other_grant = await user_grant(pool, world, ["courses:read"], client_id=world.other.id)
    other = await mint(
        keyring,
        world.school.id,
        access_claims(
            gateway_settings, world, other_grant, "courses:read", client_id=world.other.id
        ),
    )
    assert (await _call(http, gateway_url, world, other))[0] == 200


async def test_mixed_refusals_drain_the_bucket_without_a_revocation_lease(
    http: Any,
    pool: Any,
    gateway_settings: Settings,
    gateway_env: dict[str, str],
    gateway_port: int,
    keyring: keys.KeyRing,
) -> None:
    """The same with every call asking Redis (no lease, so no blocks of calls), refusals of
    different routes and methods in turn, and an in-scope call among them counted too."""
    world = await _limited_world(pool, gateway_settings, gateway_port, "nolease")
    openid = await _token(keyring, gateway_settings, pool, world, "openid")
    reader = await _token(keyring, gateway_settings, pool, world, "courses:read")
    async with extra_gateway(gateway_env, GATEWAY_REVOCATION_LEASE="0") as base:
        await _drain_with_refusals(http, base, world, openid, REFUSED[:3])
        status, headers, _ = await _call(http, base, world, reader)
        assert status == 200
        assert headers["RateLimit-Remaining"] == "2"
        await _drain_with_refusals(http, base, world, openid, [])
        for method, path, _ in REFUSED[3:]:
            assert (await _call(http, base, world, openid, method, path))[0] == 403
        status, _, body = await _call(http, base, world, reader)
        assert status == 429, body


async def test_concurrent_refusals_are_each_charged(
    gateway_url: str,
    http: Any,
    pool: Any,
    gateway_settings: Settings,
    gateway_port: int,
    keyring: keys.KeyRing,
) -> None:
    """Refusals sent at once (the gateway asking Redis for one block while the rest wait)
    are charged one each, no more, no less."""
    world = await _limited_world(pool, gateway_settings, gateway_port, "race")
    openid = await _token(keyring, gateway_settings, pool, world, "openid")
    reader = await _token(keyring, gateway_settings, pool, world, "courses:read")
    # The school's keys fetched first, by a call of another client (another bucket).
    other_grant = await user_grant(pool, world, ["courses:read"], client_id=world.other.id)
    other = await mint(
        keyring,
        world.school.id,
        access_claims(
            gateway_settings, world, other_grant, "courses:read", client_id=world.other.id
        ),
    )
    assert (await _call(http, gateway_url, world, other))[0] == 200
    answers = await asyncio.gather(
        *(_call(http, gateway_url, world, openid, m, p) for m, p, _ in REFUSED[:4])
    )
    assert [status for status, _, _ in answers] == [403] * 4, answers
    statuses = [(await _call(http, gateway_url, world, reader))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
