"""Refresh token rotation: one use per token, the same successor for a concurrent retry
within the grace window, and reuse outside it ending the whole grant."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import pytest

from libs.common.config import load_settings
from services.identity import credentials
from services.identity.store.refresh_tokens import RefreshTokenState
from services.identity.token.refresh_token import Refusal, refusal
from tests.support import free_port, running
from tests.token_helpers import (
    World,
    audit_actions,
    basic,
    code_flow,
    introspect,
    make_world,
    origin_of,
    post_form,
    refresh,
    revocation_marked,
    verify_with_jwks,
)


@pytest.fixture
async def world(
    identity_url: str, pool: Any, settings: Any, unique: str, identity_port: int
) -> World:
    """The school, user and clients of one test, served by this run's identity."""
    return await make_world(pool, settings, unique, identity_port)


async def _age_rotation(pool: Any, refresh_token: str, seconds: int) -> None:
    """Move a rotation into the past, as if the token were presented `seconds` later."""
    await pool.execute(
        "UPDATE refresh_tokens SET rotated_at = rotated_at - make_interval(secs => $2)"
        " WHERE token_hash = $1",
        credentials.token_hash(refresh_token),
        seconds,
    )


async def test_refresh_rotates_and_reuse_after_the_window_ends_the_grant(
    world: World, http: Any, pool: Any, redis: Any, settings: Any
) -> None:
    first, grant_id = await code_flow(http, pool, settings, world)
    old = first.body["refresh_token"]

    rotated = await refresh(http, world, old)
    assert rotated.status == 200, rotated.body
    new = rotated.body["refresh_token"]
    assert new != old and new.startswith("lcr_")
    assert rotated.body["access_token"] != first.body["access_token"]
    assert rotated.body["scope"] == first.body["scope"]
    assert rotated.body["school_id"] == world.school.id
    assert "id_token" not in rotated.body
    assert rotated.headers["Cache-Control"] == "no-store"
    _, claims = await verify_with_jwks(http, world.origin, rotated.body["access_token"])
    assert claims["grant_id"] == str(grant_id) and "auth_time" in claims
    assert (await introspect(http, world, old)) == {"active": False}
    assert (await introspect(http, world, new))["active"] is True

    # The old token again, long after its rotation: theft. The grant ends, the new chain too.
    await _age_rotation(pool, old, settings.tokens.refresh_reuse_grace + 5)
    reused = await refresh(http, world, old)
    assert reused.status == 400 and reused.body["error"] == "invalid_grant"
    assert await revocation_marked(redis, settings, grant_id) == (True, True)
    reason = await pool.fetchval("SELECT revoked_reason FROM grants WHERE id = $1", grant_id)
    assert reason == "refresh_token_reuse"
    after = await refresh(http, world, new)
    assert after.status == 400 and after.body["error"] == "invalid_grant"
    assert (await introspect(http, world, rotated.body["access_token"])) == {"active": False}
    actions = await audit_actions(redis, settings, grant_id)
    assert {"token.issued", "token.refreshed", "refresh.reuse_detected", "grant.revoked"} <= set(
        actions
    )


async def test_concurrent_refreshes_within_the_window_get_the_same_successor(
    world: World, http: Any, pool: Any, settings: Any
) -> None:
    first, grant_id = await code_flow(http, pool, settings, world)
    old = first.body["refresh_token"]
    answers = await asyncio.gather(*(refresh(http, world, old) for _ in range(4)))
    assert all(a.status == 200 for a in answers), [a.body for a in answers]
    successors = {a.body["refresh_token"] for a in answers}
    assert len(successors) == 1
    assert len({a.body["access_token"] for a in answers}) == 4
    # One chain: exactly one successor row, and it is live.
    count = await pool.fetchval("SELECT count(*) FROM refresh_tokens WHERE grant_id = $1", grant_id)
    assert count == 2
    (successor,) = successors
    onwards = await refresh(http, world, successor)
    assert onwards.status == 200, onwards.body


async def test_sequential_retry_within_the_window_gets_the_same_successor(
    world: World, http: Any, pool: Any, settings: Any
) -> None:
    first, _ = await code_flow(http, pool, settings, world)
    old = first.body["refresh_token"]
    one = await refresh(http, world, old)
    two = await refresh(http, world, old)  # the answer to `one` was lost, say
    assert one.status == two.status == 200
    assert one.body["refresh_token"] == two.body["refresh_token"]


async def test_retry_after_the_successor_was_used_is_reuse(
    world: World, http: Any, pool: Any, redis: Any, settings: Any
) -> None:
    first, grant_id = await code_flow(http, pool, settings, world)
    old = first.body["refresh_token"]
    successor = (await refresh(http, world, old)).body["refresh_token"]
    assert (await refresh(http, world, successor)).status == 200
    # Within the window by time, but the chain has moved on: not a retry.
    replay = await refresh(http, world, old)
    assert replay.status == 400 and replay.body["error"] == "invalid_grant"
    assert (await revocation_marked(redis, settings, grant_id))[0]


@pytest.fixture(scope="module")
async def no_grace(base_env: dict[str, str], migrated: None) -> AsyncIterator[int]:
    """A second identity instance with REFRESH_REUSE_GRACE_SECONDS=0, on its own port."""
    from services.identity.app import create_app

    port = free_port()
    settings = load_settings(
        {
            **base_env,
            "REFRESH_REUSE_GRACE_SECONDS": "0",
            "PUBLIC_URL_TEMPLATE": f"http://{{school}}.localhost:{port}",
            "PLATFORM_URL": f"http://localhost:{port}",
            "IDENTITY_PORT": str(port),
        }
    )
    assert settings.tokens.refresh_reuse_grace == 0
    async with running(create_app(settings), port):
        yield port


def _at(world: World, port: int) -> World:
    return World(
        world.school,
        world.user,
        world.confidential,
        world.secret,
        world.public,
        origin_of(world.school.subdomain, port),
    )


async def test_without_grace_racing_refreshes_leave_no_live_chain(
    world: World, no_grace: int, http: Any, pool: Any, redis: Any, settings: Any
) -> None:
    world = _at(world, no_grace)
    first, grant_id = await code_flow(http, pool, settings, world)
    assert first.status == 200, first.body
    old = first.body["refresh_token"]
    answers = await asyncio.gather(*(refresh(http, world, old) for _ in range(3)))
    statuses = sorted(a.status for a in answers)
    assert statuses.count(200) <= 1
    assert statuses.count(400) >= 2
    # The losers were taken as reuse: the grant is gone, so is any winner's new token.
    assert (await revocation_marked(redis, settings, grant_id))[0]
    for a in answers:
        if a.status == 200:
            again = await refresh(http, world, a.body["refresh_token"])
            assert again.status == 400 and again.body["error"] == "invalid_grant"


async def test_without_grace_a_sequential_retry_is_reuse(
    world: World, no_grace: int, http: Any, pool: Any, redis: Any, settings: Any
) -> None:
    world = _at(world, no_grace)
    first, grant_id = await code_flow(http, pool, settings, world)
    old = first.body["refresh_token"]
    assert (await refresh(http, world, old)).status == 200
    retry = await refresh(http, world, old)
    assert retry.status == 400 and retry.body["error"] == "invalid_grant"
    assert await revocation_marked(redis, settings, grant_id) == (True, True)


async def test_refresh_after_revocation_fails(
    world: World, http: Any, pool: Any, settings: Any
) -> None:
    first, _ = await code_flow(http, pool, settings, world)
    revoked = await post_form(
        http,
        world.origin + "/v1/oauth/revoke",
        {"token": first.body["access_token"]},
        authorization=basic(world.confidential.id, world.secret),
    )
    assert revoked.status == 200
    after = await refresh(http, world, first.body["refresh_token"])
    assert after.status == 400 and after.body["error"] == "invalid_grant"


async def test_scope_may_narrow_but_never_widen(
    world: World, http: Any, pool: Any, settings: Any
) -> None:
    first, _ = await code_flow(http, pool, settings, world, scopes=["openid", "read"])
    token = first.body["refresh_token"]
    for wider in ("write", "read students:write", "admin:read", "profile", "nonsense"):
        escalated = await refresh(http, world, token, scope=wider)
        assert escalated.status == 400 and escalated.body["error"] == "invalid_scope", wider
    # The refused attempts did not spend the token. `courses:read` is inside `read`.
    narrowed = await refresh(http, world, token, scope="courses:read")
    assert narrowed.status == 200, narrowed.body
    assert narrowed.body["scope"] == "courses:read"
    _, claims = await verify_with_jwks(http, world.origin, narrowed.body["access_token"])
    assert claims["scope"] == "courses:read"
    # The successor keeps what was granted (RFC 6749 6), not the narrowed ask.
    full = await refresh(http, world, narrowed.body["refresh_token"])
    assert full.status == 200 and full.body["scope"] == "openid read"


async def test_refresh_token_of_another_client_or_expired_is_invalid_grant(
    world: World,
    http: Any,
    pool: Any,
    redis: Any,
    settings: Any,
    unique: str,
    identity_port: int,
) -> None:
    first, grant_id = await code_flow(http, pool, settings, world)
    token = first.body["refresh_token"]
    stolen = await post_form(
        http,
        world.origin + "/v1/oauth/token",
        {"grant_type": "refresh_token", "refresh_token": token, "client_id": world.public.id},
    )
    assert stolen.status == 400 and stolen.body["error"] == "invalid_grant"
    # Another client holding it does not end the owner's grant.
    assert not (await revocation_marked(redis, settings, grant_id))[0]
    other = await make_world(pool, settings, unique, identity_port, label="rb")
    elsewhere = await post_form(
        http,
        other.origin + "/v1/oauth/token",
        {"grant_type": "refresh_token", "refresh_token": token},
        authorization=basic(other.confidential.id, other.secret),
    )
    assert elsewhere.status == 400 and elsewhere.body["error"] == "invalid_grant"
    missing = await refresh(http, world, "")
    assert missing.status == 400 and missing.body["error"] == "invalid_request"
    unknown = await refresh(http, world, "lcr_" + "x" * 43)
    assert unknown.status == 400 and unknown.body["error"] == "invalid_grant"

    await pool.execute(
        "UPDATE refresh_tokens SET expires_at = now() - interval '1 second' WHERE token_hash = $1",
        credentials.token_hash(token),
    )
    expired = await refresh(http, world, token)
    assert expired.status == 400 and expired.body["error"] == "invalid_grant"


async def test_refresh_needs_the_grant_type_and_touches_the_grant(
    world: World, http: Any, pool: Any, settings: Any, unique: str, identity_port: int
) -> None:
    first, grant_id = await code_flow(http, pool, settings, world)
    await pool.execute(
        "UPDATE grants SET last_used_at = now() - interval '1 day' WHERE id = $1", grant_id
    )
    assert (await refresh(http, world, first.body["refresh_token"])).status == 200
    age = await pool.fetchval(
        "SELECT extract(epoch FROM now() - last_used_at) FROM grants WHERE id = $1", grant_id
    )
    assert age < 60

    no_refresh = await make_world(
        pool, settings, unique, identity_port, label="nr", grant_types=["authorization_code"]
    )
    answer, _ = await code_flow(http, pool, settings, no_refresh)
    assert answer.status == 200 and "refresh_token" not in answer.body


# The one refusal rule both rotation paths apply (token/refresh_token.py), case by case --------

_SUCCESSOR = b"s" * 32


def _token_state(**changes: Any) -> RefreshTokenState:
    """A refresh token row as the store reads it: live, never rotated, of an admin's grant."""
    now = datetime.now(UTC)
    live = RefreshTokenState(
        token_hash=b"t" * 32,
        grant_id=uuid4(),
        client_id="client",
        scopes=("openid", "courses:read", "students:read"),
        resource=None,
        auth_time=now,
        created_at=now,
        expires_at=now + timedelta(days=30),
        rotated_at=None,
        successor_hash=None,
        school_id=1,
        user_id=uuid4(),
        grant_revoked=False,
        expired=False,
        seconds_since_rotation=None,
        successor_rotated=False,
        user_role="admin",
        platform_admin=False,
    )
    return replace(live, **changes)


def _rotated(seconds_ago: float, **changes: Any) -> RefreshTokenState:
    rotation: dict[str, Any] = {
        "rotated_at": datetime.now(UTC) - timedelta(seconds=seconds_ago),
        "seconds_since_rotation": seconds_ago,
        "successor_hash": _SUCCESSOR,
    }
    return _token_state(**(rotation | changes))


@pytest.mark.parametrize(
    ("token", "grace", "refused"),
    [
        (_token_state(), 10, None),
        (_token_state(), 0, None),
        # A retry of the same rotation within the window: answered again, not refused.
        (_rotated(0.5), 10, None),
        (_rotated(10), 10, None),
        # Reuse: outside the window, with no window, after the successor itself was used, or
        # for another successor than the one handed out.
        (_rotated(10.5), 10, Refusal.REUSED),
        (_rotated(3600), 10, Refusal.REUSED),
        (_rotated(0.5), 0, Refusal.REUSED),
        (_rotated(0.5, successor_rotated=True), 10, Refusal.REUSED),
        (_rotated(0.5, successor_hash=b"o" * 32), 10, Refusal.REUSED),
        (_rotated(0.5, seconds_since_rotation=None), 10, Refusal.REUSED),
        (_token_state(grant_revoked=True), 10, Refusal.GRANT_REVOKED),
        (_token_state(expired=True), 10, Refusal.EXPIRED),
        (_token_state(user_id=None), 10, Refusal.NO_USER),
        # The grant holds students:read, which a lecturer's or a member's role does not allow,
        # nor a membership that is gone; a platform administrator's ceiling is the admin's.
        (_token_state(user_role="lecturer"), 10, Refusal.OUTGROWN),
        (_token_state(user_role="member"), 10, Refusal.OUTGROWN),
        (_token_state(user_role=None), 10, Refusal.OUTGROWN),
        (_token_state(user_role=None, platform_admin=True), 10, None),
        (_token_state(user_role="member", scopes=("openid", "events:read")), 10, None),
        # The first reason in the rule's order is the one told.
        (_rotated(3600, grant_revoked=True, expired=True), 10, Refusal.GRANT_REVOKED),
        (_rotated(3600, expired=True, user_role=None), 10, Refusal.EXPIRED),
        (_rotated(3600, user_role="member"), 10, Refusal.OUTGROWN),
    ],
)
def test_the_refusal_rule(token: RefreshTokenState, grace: float, refused: Refusal | None) -> None:
    assert refusal(token, _SUCCESSOR, grace) is refused


def test_each_refusal_is_told_in_its_own_words() -> None:
    assert {r.value for r in Refusal} == {
        "the grant has been revoked",
        "the refresh token has expired",
        "the refresh token has no user",
        "the user's role at the school no longer allows this grant",
        "the refresh token has already been used",
        "the client is no longer registered for this grant's scopes",
    }
