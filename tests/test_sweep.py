"""The periodic sweep: expired codes, sessions and refresh tokens go; whatever replay and reuse
detection still need stays, and detection still works after a sweep."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from typing import Any
from uuid import UUID

import pytest
from pytest_aiohttp import AiohttpServer

from libs.common.config import ConfigError, Settings, load_settings
from services.identity import credentials, grants, sweep
from services.identity.store import authorize as flow_store
from tests.support import free_port, without_handler_cancellation
from tests.token_helpers import (
    REDIRECT_URI,
    basic,
    code_flow,
    insert_code,
    make_world,
    pkce_pair,
    refresh,
    revocation_marked,
    token,
)


async def _expire(pool: Any, table: str, key: str, value: bytes) -> None:
    # Table and column names are this file's constants, never input.
    await pool.execute(
        f"UPDATE {table} SET expires_at = now() - interval '1 second' WHERE {key} = $1",
        value,
    )


async def _exists(pool: Any, table: str, key: str, value: bytes) -> bool:
    found = await pool.fetchval(f"SELECT 1 FROM {table} WHERE {key} = $1", value)
    return found is not None


def _code(code: str) -> tuple[str, str, bytes]:
    return "authorization_codes", "code_hash", credentials.token_hash(code)


def _refresh(value: str) -> tuple[str, str, bytes]:
    return "refresh_tokens", "token_hash", credentials.token_hash(value)


def _session(id_hash: bytes) -> tuple[str, str, bytes]:
    return "sessions", "id_hash", id_hash


async def _redeem(http: Any, world: Any, code: str, verifier: str) -> Any:
    return await token(
        http,
        world.origin,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
        },
        authorization=basic(world.confidential.id, world.secret),
    )


async def _new_session(pool: Any, user_id: UUID) -> bytes:
    id_hash = credentials.token_hash(credentials.new_secret(credentials.SESSION_PREFIX))
    await flow_store.insert_session(
        pool,
        id_hash=id_hash,
        user_id=user_id,
        csrf_secret=secrets.token_bytes(32),
        lifetime_seconds=3600,
        user_agent="test",
    )
    return id_hash


def _small_batches(settings: Settings) -> Settings:
    """The run's settings with two rows a batch, so one sweep has to go batch after batch."""
    return dataclasses.replace(
        settings, identity=dataclasses.replace(settings.identity, sweep_batch_size=2)
    )


async def test_one_sweep_removes_dead_rows_and_keeps_what_detection_needs(
    identity_url: str,
    http: Any,
    pool: Any,
    redis: Any,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    world = await make_world(pool, settings, unique, identity_port, label="sw")
    user_id, school_id = world.user.id, world.school.id
    gone: list[tuple[str, str, bytes]] = []
    kept: list[tuple[str, str, bytes]] = []

    # Codes: one never redeemed and expired, one redeemed and expired; both gone. One
    # redeemed and still live: replaying it must still end its grant after the sweep.
    for redeemed in (False, True):
        verifier, challenge = pkce_pair()
        code, _ = await insert_code(
            pool,
            settings,
            school_id=school_id,
            client_id=world.confidential.id,
            user_id=user_id,
            scopes=["read"],
            challenge=challenge,
        )
        if redeemed:
            assert (await _redeem(http, world, code, verifier)).status == 200
        await _expire(pool, *_code(code))
        gone.append(_code(code))
    verifier, challenge = pkce_pair()
    live_code, replay_grant = await insert_code(
        pool,
        settings,
        school_id=school_id,
        client_id=world.confidential.id,
        user_id=user_id,
        scopes=["read"],
        challenge=challenge,
    )
    assert (await _redeem(http, world, live_code, verifier)).status == 200
    kept.append(_code(live_code))

    # Refresh tokens: a rotated-away one still within its lifetime stays (reuse detection
    # matches it), as does its live successor; an expired one goes, rotated or not.
    first, reuse_grant = await code_flow(http, pool, settings, world)
    rotated_away = first.body["refresh_token"]
    successor = (await refresh(http, world, rotated_away)).body["refresh_token"]
    kept += [_refresh(rotated_away), _refresh(successor)]
    expired_chain, _ = await code_flow(http, pool, settings, world)
    expired_old = expired_chain.body["refresh_token"]
    expired_new = (await refresh(http, world, expired_old)).body["refresh_token"]
    for value in (expired_old, expired_new):
        await _expire(pool, *_refresh(value))
        gone.append(_refresh(value))
    # The tokens of a revoked grant go however long they had left; the grant's row stays.
    revoked, revoked_grant = await code_flow(http, pool, settings, world)
    await grants.revoke_grant(pool, redis, settings, revoked_grant, reason="test")
    gone.append(_refresh(revoked.body["refresh_token"]))

    # Sessions: five expired (more than one batch), one live.
    for _ in range(5):
        id_hash = await _new_session(pool, user_id)
        await _expire(pool, *_session(id_hash))
        gone.append(_session(id_hash))
    kept.append(_session(await _new_session(pool, user_id)))

    for row in gone + kept:
        assert await _exists(pool, *row), row
    deleted = await sweep.sweep_once(pool, _small_batches(settings))

    assert [row for row in gone if await _exists(pool, *row)] == []
    assert [row for row in kept if not await _exists(pool, *row)] == []
    # Other tests' rows may have gone too, never fewer than ours.
    assert deleted["authorization_codes"] >= 2
    assert deleted["sessions"] >= 5
    assert deleted["refresh_tokens"] >= 2
    assert deleted["revoked_grant_refresh_tokens"] >= 1
    assert await pool.fetchval("SELECT 1 FROM grants WHERE id = $1", revoked_grant) == 1

    # Detection still works on what was kept: the redeemed code's replay ends its grant ...
    replay = await _redeem(http, world, live_code, verifier)
    assert replay.status == 400 and replay.body["error"] == "invalid_grant"
    assert (await revocation_marked(redis, settings, replay_grant))[0]
    # ... and so does presenting the rotated-away refresh token outside the grace window.
    await pool.execute(
        "UPDATE refresh_tokens SET rotated_at = rotated_at - interval '1 hour'"
        " WHERE token_hash = $1",
        credentials.token_hash(rotated_away),
    )
    reused = await refresh(http, world, rotated_away)
    assert reused.status == 400 and reused.body["error"] == "invalid_grant"
    assert (await revocation_marked(redis, settings, reuse_grant))[0]


async def test_concurrent_sweepers_share_the_work(
    identity_url: str, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    world = await make_world(pool, settings, unique, identity_port, label="swc")
    hashes = []
    for _ in range(30):
        id_hash = await _new_session(pool, world.user.id)
        await _expire(pool, *_session(id_hash))
        hashes.append(id_hash)
    # Four sweepers on four connections at once, as four processes would: none waits on or
    # fails over another's rows, and together they take every one.
    small = _small_batches(settings)
    results = await asyncio.gather(*(sweep.sweep_once(pool, small) for _ in range(4)))
    assert sum(r["sessions"] for r in results) >= 30
    left = await pool.fetchval(
        "SELECT count(*) FROM sessions WHERE id_hash = ANY($1::bytea[])", hashes
    )
    assert left == 0


async def test_the_service_sweeps_on_its_interval(
    base_env: dict[str, str],
    migrated: None,
    pool: Any,
    settings: Settings,
    unique: str,
    aiohttp_server: AiohttpServer,
) -> None:
    from services.identity.app import create_app

    port = free_port()
    swept = load_settings({**base_env, "IDENTITY_SWEEP_INTERVAL_SECONDS": "1"})
    assert swept.identity.sweep_interval == 1.0
    world = await make_world(pool, settings, unique, port, label="swi")
    id_hash = await _new_session(pool, world.user.id)
    await _expire(pool, *_session(id_hash))
    server = await aiohttp_server(create_app(swept), port=port, access_log=None, shutdown_timeout=2)
    without_handler_cancellation(server)
    # Waits for the outcome, not for a time: the background sweep removes the row.
    for _ in range(200):
        if not await _exists(pool, *_session(id_hash)):
            break
        await asyncio.sleep(0.05)
    assert not await _exists(pool, *_session(id_hash))


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("IDENTITY_SWEEP_INTERVAL_SECONDS", "0"),
        ("IDENTITY_SWEEP_INTERVAL_SECONDS", "soon"),
        ("IDENTITY_SWEEP_INTERVAL_SECONDS", "100000"),
        ("IDENTITY_SWEEP_BATCH_SIZE", "0"),
        ("IDENTITY_SWEEP_BATCH_SIZE", "1000000"),
        ("PASSWORD_HASH_CONCURRENCY", "0"),
        ("PASSWORD_HASH_CONCURRENCY", "1000"),
    ],
)
def test_bad_identity_settings_name_their_variable(
    base_env: dict[str, str], variable: str, value: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**base_env, variable: value})
    assert caught.value.variable == variable


def test_identity_settings_defaults_and_overrides(base_env: dict[str, str]) -> None:
    defaults = load_settings(base_env).identity
    assert (defaults.sweep_interval, defaults.sweep_batch_size) == (300.0, 1000)
    assert defaults.password_hash_concurrency == 4
    chosen = load_settings(
        {
            **base_env,
            "IDENTITY_SWEEP_INTERVAL_SECONDS": "60",
            "IDENTITY_SWEEP_BATCH_SIZE": "500",
            "PASSWORD_HASH_CONCURRENCY": "2",
        }
    ).identity
    assert (chosen.sweep_interval, chosen.sweep_batch_size) == (60.0, 500)
    assert chosen.password_hash_concurrency == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        chosen.sweep_interval = 1.0  # type: ignore[misc]
