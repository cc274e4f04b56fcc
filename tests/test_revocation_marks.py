"""Revocation marks re-asserted from PostgreSQL: a Redis that lost its data (a restart
without persistence, a failover) must not bring revoked tokens back to life."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from libs.common import keys as redis_keys
from libs.common import marks_fence, streams
from libs.common.config import Settings
from services.identity import grants, keys, revocation_marks
from tests.test_gateway_support import (
    access_claims,
    echo_upstream,
    extra_gateway,
    make_world,
    mint,
    user_grant,
)
from tests.token_helpers import make_world as make_token_world

__all__ = ["echo_upstream"]


def _mark(settings: Settings, school_id: int, grant_id: Any) -> str:
    return redis_keys.revoked_mark(settings, school_id, grant_id)


@pytest.mark.usefixtures("echo_upstream")
async def test_a_lost_mark_comes_back_and_the_gateway_refuses_the_token_again(
    gateway_url: str,
    http: Any,
    pool: Any,
    redis: Any,
    gateway_settings: Settings,
    gateway_env: dict[str, str],
    gateway_port: int,
) -> None:
    settings = gateway_settings
    world = await make_world(pool, settings, "rm", gateway_port)
    grant_id = await user_grant(pool, world, ["courses:read"])
    keyring = keys.KeyRing(pool, settings)
    token = await mint(
        keyring, world.school.id, access_claims(settings, world, grant_id, "courses:read")
    )
    headers = {"Host": world.host, "Authorization": f"Bearer {token}"}

    assert await grants.revoke_grant(pool, redis, settings, grant_id, reason="user_revocation")
    # Redis loses its data: the mark is gone.
    await redis.delete(_mark(settings, world.school.id, grant_id))
    assert not await redis.exists(_mark(settings, world.school.id, grant_id))

    await revocation_marks.reassert_once(pool, redis, settings)
    assert await redis.get(_mark(settings, world.school.id, grant_id)) == b"user_revocation"
    # Announced again: a gateway answering from memory learns of it only from the stream.
    newest = await redis.xrevrange(settings.stream(streams.REVOCATIONS), count=20)
    restored = [orjson.loads(fields[b"data"]) for _, fields in newest]
    assert {"grant_id": str(grant_id), "restored": True}.items() <= next(
        r for r in restored if r["grant_id"] == str(grant_id)
    ).items()
    assert (
        0 < await redis.ttl(_mark(settings, world.school.id, grant_id)) <= grants.mark_ttl(settings)
    )
    assert not await marks_fence.unrestored(redis, settings)

    # A gateway started after the loss never heard the announcement: only the mark stops it.
    live_grant = await user_grant(pool, world, ["courses:read"])
    live = await mint(
        keyring, world.school.id, access_claims(settings, world, live_grant, "courses:read")
    )
    async with extra_gateway(gateway_env) as fresh:
        url = fresh + "/api/v1/courses"
        async with http.get(url, headers={**headers, "Authorization": f"Bearer {live}"}) as ok:
            assert ok.status == 200
        async with http.get(url, headers=headers) as resp:
            assert resp.status == 401
            assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]


async def test_restored_marks_keep_their_original_expiry_and_old_revocations_stay_gone(
    identity_url: str, pool: Any, redis: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    world = await make_token_world(pool, settings, unique, identity_port, label="rm")
    made = []
    for _ in range(3):
        grant = await grants.create_grant(
            pool,
            school_id=world.school.id,
            client_id=world.confidential.id,
            user_id=world.user.id,
            scopes=["openid", "read"],
        )
        await grants.revoke_grant(pool, redis, settings, grant.id, reason="client_revocation")
        made.append(grant.id)
    recent, hour_ago, long_ago = made
    window = grants.mark_ttl(settings)
    await pool.execute(
        "UPDATE grants SET revoked_at = now() - interval '1 hour' WHERE id = $1", hour_ago
    )
    await pool.execute(
        "UPDATE grants SET revoked_at = now() - make_interval(secs => $2) WHERE id = $1",
        long_ago,
        window + 60,
    )
    await redis.delete(*(_mark(settings, world.school.id, g) for g in made))

    # Several processes may run the pass at once; the outcome is the same.
    await asyncio.gather(
        revocation_marks.reassert_once(pool, redis, settings),
        revocation_marks.reassert_once(pool, redis, settings),
    )

    assert 0 < await redis.ttl(_mark(settings, world.school.id, recent)) <= window
    # What was left of its lifetime, not a fresh one: it expires when the original would have.
    assert 0 < await redis.ttl(_mark(settings, world.school.id, hour_ago)) <= window - 3600 + 1
    # Its access tokens have all expired: nothing to restore.
    assert not await redis.exists(_mark(settings, world.school.id, long_ago))


async def test_a_pass_pages_through_more_grants_than_one_page(
    identity_url: str,
    pool: Any,
    redis: Any,
    settings: Settings,
    unique: str,
    identity_port: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world = await make_token_world(pool, settings, unique, identity_port, label="rp")
    monkeypatch.setattr(revocation_marks, "PAGE_SIZE", 2)
    made = []
    for _ in range(5):
        grant = await grants.create_grant(
            pool,
            school_id=world.school.id,
            client_id=world.confidential.id,
            user_id=world.user.id,
            scopes=["openid"],
        )
        await grants.revoke_grant(pool, redis, settings, grant.id, reason="user_revocation")
        made.append(grant.id)
    await redis.delete(*(_mark(settings, world.school.id, g) for g in made))
    await revocation_marks.reassert_once(pool, redis, settings)
    for grant_id in made:
        assert await redis.exists(_mark(settings, world.school.id, grant_id)), grant_id
