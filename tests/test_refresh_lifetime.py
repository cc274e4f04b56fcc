"""Refresh token lifetimes (issue 17 section 4): REFRESH_TOKEN_IDLE_TTL ends a token left
unused, REFRESH_TOKEN_MAX_TTL ends the chain of rotations one authorization began, each as RFC
6749's `invalid_grant`; a token used within its idle limit lives on (seed 003: "long-lived
refresh tokens keep your app working until the user revokes").

Time passes by moving the chain's timestamps into the past, as `_age_rotation` does in
test_refresh_rotation.py: the token endpoint decides with the database clock.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any
from uuid import UUID

import pytest

from libs.common.config import ConfigError, load_settings
from services.identity import credentials
from services.identity.store import refresh_tokens as refresh_store
from tests.support import free_port, running
from tests.token_helpers import World, code_flow, make_world, refresh

IDLE = 600
LONGEST = 1500


@pytest.fixture(scope="module")
async def limited(base_env: dict[str, str], migrated: None) -> AsyncIterator[int]:
    """An identity instance with a 10-minute idle and 25-minute absolute limit."""
    from services.identity.app import create_app

    port = free_port()
    settings = load_settings(
        {
            **base_env,
            "REFRESH_TOKEN_IDLE_TTL": str(IDLE),
            "REFRESH_TOKEN_MAX_TTL": str(LONGEST),
            "PUBLIC_URL_TEMPLATE": f"http://{{school}}.localhost:{port}",
            "PLATFORM_URL": f"http://localhost:{port}",
            "IDENTITY_PORT": str(port),
        }
    )
    async with running(create_app(settings), port):
        yield port


@pytest.fixture
async def world(pool: Any, settings: Any, unique: str, limited: int) -> World:
    return await make_world(pool, settings, unique, limited)


async def _later(pool: Any, grant_id: UUID, seconds: int) -> None:
    """As if `seconds` had passed for the grant's refresh tokens."""
    await pool.execute(
        "UPDATE refresh_tokens SET created_at = created_at - make_interval(secs => $2),"
        " expires_at = expires_at - make_interval(secs => $2),"
        " family_expires_at = family_expires_at - make_interval(secs => $2),"
        " rotated_at = rotated_at - make_interval(secs => $2) WHERE grant_id = $1",
        grant_id,
        seconds,
    )


async def _row(pool: Any, token: str) -> Any:
    return await pool.fetchrow(
        "SELECT created_at, expires_at, family_expires_at FROM refresh_tokens"
        " WHERE token_hash = $1",
        credentials.token_hash(token),
    )


def _refused_as_expired(answer: Any) -> None:
    assert answer.status == 400, answer.body
    assert answer.body["error"] == "invalid_grant"
    assert answer.body["error_description"] == "the refresh token has expired"


async def test_a_token_unused_past_the_idle_limit_is_invalid_grant(
    world: World, http: Any, pool: Any, settings: Any
) -> None:
    first, grant_id = await code_flow(http, pool, settings, world)
    token = first.body["refresh_token"]
    row = await _row(pool, token)
    assert row["expires_at"] - row["created_at"] == timedelta(seconds=IDLE)
    assert row["family_expires_at"] - row["created_at"] == timedelta(seconds=LONGEST)
    await _later(pool, grant_id, IDLE + 1)
    _refused_as_expired(await refresh(http, world, token))
    # Expiry ends the token, not the grant: the user's consent stands.
    assert await pool.fetchval("SELECT revoked_at FROM grants WHERE id = $1", grant_id) is None


async def test_a_token_in_use_stays_alive_past_the_idle_limit(
    world: World, http: Any, pool: Any, settings: Any
) -> None:
    first, grant_id = await code_flow(http, pool, settings, world)
    token = first.body["refresh_token"]
    # Used at 400 s and 800 s, past the first token's 600-s idle limit (and well within the
    # chain's 1500 s, so that no token here is cut short by it).
    for _ in range(2):
        await _later(pool, grant_id, 400)
        answer = await refresh(http, world, token)
        assert answer.status == 200, answer.body
        token = answer.body["refresh_token"]
        row = await _row(pool, token)
        # Each rotation starts the idle limit again.
        assert row["expires_at"] - row["created_at"] == timedelta(seconds=IDLE)


async def test_a_chain_in_use_ends_at_the_absolute_limit(
    world: World, http: Any, pool: Any, settings: Any
) -> None:
    first, grant_id = await code_flow(http, pool, settings, world)
    token = first.body["refresh_token"]
    begun = (await _row(pool, token))["family_expires_at"]
    for _ in range(2):  # at 500 s, then 1000 s: alive
        await _later(pool, grant_id, 500)
        answer = await refresh(http, world, token)
        assert answer.status == 200, answer.body
        token = answer.body["refresh_token"]
    row = await _row(pool, token)
    # 500 s left of the chain, less than the idle limit: the chain's end is the token's.
    assert row["expires_at"] == row["family_expires_at"] == begun - timedelta(seconds=1000)
    await _later(pool, grant_id, 400)  # 1400 s: still within both limits
    answer = await refresh(http, world, token)
    assert answer.status == 200, answer.body
    token = answer.body["refresh_token"]
    await _later(pool, grant_id, 200)  # 1600 s: used 200 s ago, but past the chain's end
    _refused_as_expired(await refresh(http, world, token))


async def test_by_default_a_token_has_no_absolute_limit_and_a_year_of_idle(
    pool: Any, settings: Any, unique: str, identity_url: str, identity_port: int, http: Any
) -> None:
    assert settings.tokens.refresh_token_idle_ttl == 365 * 24 * 3600
    assert settings.tokens.refresh_token_max_ttl == 0
    world = await make_world(pool, settings, unique, identity_port, label="rl")
    first, _ = await code_flow(http, pool, settings, world)
    row = await _row(pool, first.body["refresh_token"])
    assert row["expires_at"] - row["created_at"] == timedelta(days=365)
    assert row["family_expires_at"] is None


async def test_with_no_idle_limit_a_token_never_expires(pool: Any, settings: Any) -> None:
    grant = await pool.fetchval("SELECT id FROM grants LIMIT 1")
    assert grant is not None
    token_hash = credentials.token_hash("lcr_" + secrets.token_urlsafe(32))
    await refresh_store.insert_refresh_token(
        pool,
        token_hash=token_hash,
        grant_id=grant,
        client_id="nobody",
        scopes=["openid"],
        resource=None,
        auth_time=None,
        ttl_seconds=0,
    )
    state = await refresh_store.refresh_token_state(pool, token_hash)
    assert state is not None and state.expired is False
    assert state.expires_at.year == 9999
    await pool.execute("DELETE FROM refresh_tokens WHERE token_hash = $1", token_hash)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"REFRESH_TOKEN_IDLE_TTL": "a year"}, "REFRESH_TOKEN_IDLE_TTL"),
        ({"REFRESH_TOKEN_IDLE_TTL": "-1"}, "REFRESH_TOKEN_IDLE_TTL"),
        ({"REFRESH_TOKEN_IDLE_TTL": "30"}, "REFRESH_TOKEN_IDLE_TTL"),
        ({"REFRESH_TOKEN_MAX_TTL": "59"}, "REFRESH_TOKEN_MAX_TTL"),
        ({"REFRESH_TOKEN_MAX_TTL": "1.5"}, "REFRESH_TOKEN_MAX_TTL"),
        # An idle limit beyond the absolute one would never apply.
        (
            {"REFRESH_TOKEN_IDLE_TTL": "7200", "REFRESH_TOKEN_MAX_TTL": "3600"},
            "REFRESH_TOKEN_IDLE_TTL",
        ),
    ],
)
def test_a_bad_lifetime_stops_the_start_naming_the_variable(
    base_env: dict[str, str], env: dict[str, str], variable: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**base_env, **env})
    assert caught.value.variable == variable


def test_lifetimes_are_read_from_the_environment(base_env: dict[str, str]) -> None:
    tokens = load_settings(
        {**base_env, "REFRESH_TOKEN_IDLE_TTL": "0", "REFRESH_TOKEN_MAX_TTL": "86400"}
    ).tokens
    assert (tokens.refresh_token_idle_ttl, tokens.refresh_token_max_ttl) == (0, 86400)
    assert tokens.revoked_refresh_sweep_window == 86400
