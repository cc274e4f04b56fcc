"""Rotating KEY_ENCRYPTION_KEY and SECRET_PEPPER (issue 16 §4; README "Key rotation").

Each test has a database of its own and serves identity for real (its app on a socket, or the
`loopwise-connect serve` process for the start-up checks), so what it sealed and hashed is all
there is:

- the key-encryption key: seal under the old key, start with the new one and the old as
  KEY_ENCRYPTION_KEYS_PREVIOUS (everything still opens; tokens are signed), `keys rewrap` while
  identity serves tokens (none fails; every private key and webhook secret, a rotated-away one
  included, is now sealed under the new key, the same secrets as before; a second rewrap
  changes nothing), then drop the old key (identity and webhooks start and sign); the old key
  alone, or two wrong ones, stop the start naming KEY_ENCRYPTION_KEY;
- the pepper: client secrets, registration access tokens, device cookies and a refresh retry
  made under the old pepper still work with SECRET_PEPPER_PREVIOUS set, and the secrets used
  are hashed again under the new pepper; once the previous pepper is dropped, what was used
  in the overlap still works and what was not does not; the old pepper alone is refused.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from pytest_aiohttp import AiohttpServer

from libs.common import db
from libs.common.config import ConfigError, load_settings
from libs.common.logging import configure_logging
from libs.common.secret_checks import check_value
from services.identity import clients, credentials, keys, secret_checks, sessions
from services.identity.app import create_app
from services.webhooks import signing
from services.webhooks.store import subscriptions as subscription_store
from tests.support import connect, database_env, free_port, without_handler_cancellation
from tests.test_secret_checks import refused, serving
from tests.token_helpers import (
    PASSWORD,
    basic,
    code_flow,
    make_world,
    refresh,
    token,
    verify_with_jwks,
)

CLI = str(Path(sys.executable).with_name("loopwise-connect"))

pytestmark = pytest.mark.timeout(240)


def _key() -> tuple[bytes, str]:
    raw = secrets.token_bytes(32)
    return raw, base64.urlsafe_b64encode(raw).decode()


@pytest.fixture
async def own_database(base_env: dict[str, str], run_id: str) -> AsyncIterator[str]:
    url = urlunsplit(
        urlsplit(base_env["DATABASE_URL"])._replace(path=f"/{run_id}_rot_{secrets.token_hex(4)}")
    )
    await db.migrate(url)
    yield url
    await db.drop_database(url)


def _env(base_env: dict[str, str], url: str, port: int, **secrets_: str) -> dict[str, str]:
    """The run's environment on `url`, served on `port`, with these secrets (names as the
    variables, e.g. KEY_ENCRYPTION_KEY=...)."""
    env = {
        **base_env,
        **database_env(base_env, url),
        "PUBLIC_URL_TEMPLATE": f"http://{{school}}.localhost:{port}",
        "PLATFORM_URL": f"http://localhost:{port}",
        "IDENTITY_PORT": str(port),
        "REDIS_KEY_PREFIX": f"{base_env['REDIS_KEY_PREFIX']}rot{secrets.token_hex(3)}:",
        # Long enough that a server restart between a refresh and its retry stays within it.
        "REFRESH_REUSE_GRACE_SECONDS": "120",
    }
    for name in ("KEY_ENCRYPTION_KEYS_PREVIOUS", "SECRET_PEPPER_PREVIOUS"):
        env.pop(name, None)
    env.update(secrets_)
    return env


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        CLI,
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _sealed_keys(url: str) -> list[asyncpg.Record]:
    conn = await connect(url)
    try:
        return list(
            await conn.fetch("SELECT kid, state, private_key_enc, kek_id FROM signing_keys")
        )
    finally:
        await conn.close()


async def _sealed_secrets(url: str) -> list[asyncpg.Record]:
    conn = await connect(url)
    try:
        return list(
            await conn.fetch(
                "SELECT id, secret_enc, previous_secret_enc, kek_id FROM webhooks.subscriptions"
            )
        )
    finally:
        await conn.close()


async def _recorded(url: str, variable: str) -> bytes:
    conn = await connect(url)
    try:
        value: bytes = await conn.fetchval(
            "SELECT check_value FROM secret_checks WHERE variable = $1", variable
        )
        return value
    finally:
        await conn.close()


async def _store_webhook_secrets(pool: asyncpg.Pool, kek: bytes) -> dict[uuid.UUID, set[bytes]]:
    """Three subscriptions sealed under `kek`, one with a rotated-away secret still honoured;
    each subscription's secrets' key bytes."""
    made: dict[uuid.UUID, set[bytes]] = {}
    for n in range(3):
        sid = uuid.uuid4()
        _, key = signing.new_secret()
        await subscription_store.insert_subscription(
            pool,
            id=sid,
            school_id=42,
            client_id="lc_rot_client",
            grant_id=uuid.uuid4(),
            subject=None,
            url=f"https://hooks.example/{n}",
            event_types=["course.updated"],
            description="",
            secret_enc=signing.seal(kek, sid, key),
            kek_id=signing.kek_id(kek),
        )
        made[sid] = {key}
    rotated = next(iter(made))
    _, fresh = signing.new_secret()
    sub = await subscription_store.rotate_secret(
        pool,
        rotated,
        42,
        "lc_rot_client",
        secret_enc=signing.seal(kek, rotated, fresh),
        kek_id=signing.kek_id(kek),
        overlap_seconds=3600,
    )
    assert sub is not None
    made[rotated].add(fresh)
    return made


def _opened_under(kek: bytes, rows: list[asyncpg.Record]) -> dict[uuid.UUID, set[bytes]]:
    """Each subscription's secrets opened under `kek` alone (InvalidTag if one does not)."""
    return {
        r["id"]: {
            signing.unseal(kek, r["id"], enc)
            for enc in (r["secret_enc"], r["previous_secret_enc"])
            if enc is not None
        }
        for r in rows
    }


async def test_key_encryption_key_rotation_end_to_end(
    base_env: dict[str, str],
    own_database: str,
    http: Any,
    aiohttp_server: AiohttpServer,
    unique: str,
) -> None:
    configure_logging("warning")
    port = free_port()
    old, old_text = _key()
    new, new_text = _key()
    env_old = _env(base_env, own_database, port, KEY_ENCRYPTION_KEY=old_text)
    before = load_settings(env_old)

    # Sealed under the old key: a school's keys (one retired by a rotation), the platform's,
    # webhook secrets (one with a rotated-away secret still honoured).
    pool = await db.create_pool(settings=before, min_size=1, max_size=4)
    try:
        await secret_checks.verify(pool, before)
        world = await make_world(
            pool,
            before,
            unique,
            port,
            label="rot",
            grant_types=("authorization_code", "refresh_token", "client_credentials"),
        )
        await keys.ensure_issuer_keys(pool, before, None)
        await keys.rotate(pool, before, world.school.id)
        webhook_keys = await _store_webhook_secrets(pool, old)
    finally:
        await pool.close()
    sealed_before = await _sealed_keys(own_database)
    assert {r["kek_id"] for r in sealed_before} == {keys.kek_id(old)}
    pems = {r["kid"]: keys.unseal(old, r["kid"], r["private_key_enc"]) for r in sealed_before}
    webhook_rows_before = await _sealed_secrets(own_database)
    auth = basic(world.confidential.id, world.secret)
    machine = {"grant_type": "client_credentials"}

    # The new key seals, the old one still opens: identity starts and signs.
    env_both = {**env_old, "KEY_ENCRYPTION_KEY": new_text, "KEY_ENCRYPTION_KEYS_PREVIOUS": old_text}
    both = load_settings(env_both)
    assert both.key_encryption_keys == (new, old)
    server = await aiohttp_server(create_app(both), port=port, access_log=None)
    async with without_handler_cancellation(server):
        answer = await token(http, world.origin, machine, authorization=auth)
        assert answer.status == 200, answer.body
        await verify_with_jwks(http, world.origin, answer.body["access_token"])

        # Webhooks starts with both too, and its sender opens every secret sealed under the old.
        async with serving(env_both, "webhooks"):
            pass
        cache = signing.KeyCache(both.key_encryption_keys)
        assert {
            r["id"]: {
                cache.key(r["id"], enc)
                for enc in (r["secret_enc"], r["previous_secret_enc"])
                if enc is not None
            }
            for r in webhook_rows_before
        } == webhook_keys

        # Rewrap while identity serves: every token request meanwhile is answered.
        async def tokens_meanwhile(stop: asyncio.Event) -> list[int]:
            statuses = []
            while not stop.is_set() or not statuses:
                got = await token(http, world.origin, machine, authorization=auth)
                statuses.append(got.status)
            return statuses

        stop = asyncio.Event()
        meanwhile = asyncio.ensure_future(tokens_meanwhile(stop))
        try:
            code, out, err = await _cli(env_both, "keys", "rewrap", "--json")
        finally:
            stop.set()
        statuses = await meanwhile
        assert code == 0, err
        assert set(statuses) == {200}
        result = json.loads(out)
        assert result["kek_id"] == keys.kek_id(new)
        assert result["signing_keys"]["resealed"] == len(sealed_before)
        assert result["signing_keys"]["unopenable"] == 0
        assert result["webhook_subscriptions"]["resealed"] == len(webhook_keys)
    await server.close()

    # Everything is sealed under the new key alone: the same private keys, the same webhook
    # secrets (the rotated-away one too), and the database records the new key.
    sealed_after = await _sealed_keys(own_database)
    assert {r["kek_id"] for r in sealed_after} == {keys.kek_id(new)}
    assert {r["kid"]: keys.unseal(new, r["kid"], r["private_key_enc"]) for r in sealed_after} == (
        pems
    )
    webhook_rows = await _sealed_secrets(own_database)
    assert {r["kek_id"] for r in webhook_rows} == {signing.kek_id(new)}
    assert _opened_under(new, webhook_rows) == webhook_keys
    assert await _recorded(own_database, "KEY_ENCRYPTION_KEY") == check_value(
        "KEY_ENCRYPTION_KEY", new
    )

    # Idempotent: a second rewrap re-seals nothing.
    code, out, err = await _cli(env_both, "keys", "rewrap", "--json")
    assert code == 0, err
    again = json.loads(out)
    assert again["signing_keys"]["resealed"] == 0
    assert again["signing_keys"]["already"] == len(sealed_before)
    assert again["webhook_subscriptions"]["resealed"] == 0
    assert await _sealed_keys(own_database) == sealed_after

    # The old key dropped: identity starts and signs with keys only the new key opens;
    # webhooks starts too.
    env_new = {k: v for k, v in env_both.items() if k != "KEY_ENCRYPTION_KEYS_PREVIOUS"}
    server = await aiohttp_server(create_app(load_settings(env_new)), port=port, access_log=None)
    async with without_handler_cancellation(server):
        answer = await token(http, world.origin, machine, authorization=auth)
        assert answer.status == 200, answer.body
        header, _ = await verify_with_jwks(http, world.origin, answer.body["access_token"])
        assert header["kid"] in pems
    await server.close()
    async with serving(env_new, "webhooks"):
        pass

    # The old key alone, or two wrong keys, stop identity and webhooks before they listen,
    # naming the variable.
    _, wrong_text = _key()
    env_wrong = {
        **env_old,
        "KEY_ENCRYPTION_KEY": wrong_text,
        "KEY_ENCRYPTION_KEYS_PREVIOUS": _key()[1],
    }
    runs = await asyncio.gather(
        refused(env_old),
        refused(env_old, "webhooks"),
        refused(env_wrong),
        refused(env_wrong, "webhooks"),
    )
    for run in runs:
        assert run.code == 2, run.err
        assert not run.listened
        assert "configuration error: KEY_ENCRYPTION_KEY: " in run.err, run.err
        for text in (old_text, new_text, wrong_text):
            assert text.rstrip("=") not in run.err
    assert "nor does any of KEY_ENCRYPTION_KEYS_PREVIOUS" in runs[2].err


async def test_rewrap_refuses_to_finish_while_a_value_opens_under_no_key(
    base_env: dict[str, str], own_database: str, unique: str
) -> None:
    """A private key sealed under a key no longer configured is counted, left as it is, and
    the command fails (exit 1) without recording the new key: dropping the old one would
    lose it."""
    port = free_port()
    old, old_text = _key()
    lost, _ = _key()
    new, new_text = _key()
    env_old = _env(base_env, own_database, port, KEY_ENCRYPTION_KEY=old_text)
    before = load_settings(env_old)
    pool = await db.create_pool(settings=before, min_size=1, max_size=2)
    try:
        await secret_checks.verify(pool, before)
        await keys.ensure_issuer_keys(pool, before, None)
        # A retired key (not sampled at start) sealed under a key nobody has any more.
        await pool.execute(
            "INSERT INTO signing_keys (kid, school_id, alg, state, public_jwk, private_key_enc,"
            " kek_id, retired_at, expires_at) VALUES ($1, NULL, 'ES256', 'retired', '{}',"
            " $2, $3, now(), now() + interval '1 hour')",
            "lost-" + unique,
            keys.seal(lost, "lost-" + unique, b"pem"),
            keys.kek_id(lost),
        )
    finally:
        await pool.close()
    env_both = {**env_old, "KEY_ENCRYPTION_KEY": new_text, "KEY_ENCRYPTION_KEYS_PREVIOUS": old_text}
    code, out, err = await _cli(env_both, "keys", "rewrap", "--json")
    assert code == 1, (out, err)
    assert "1 sealed values open under none of the configured keys" in out
    assert await _recorded(own_database, "KEY_ENCRYPTION_KEY") == check_value(
        "KEY_ENCRYPTION_KEY", old
    )
    rows = {r["kid"]: r for r in await _sealed_keys(own_database)}
    assert rows.pop("lost-" + unique)["kek_id"] == keys.kek_id(lost)
    assert {r["kek_id"] for r in rows.values()} == {keys.kek_id(new)}


async def test_pepper_rotation_end_to_end(
    base_env: dict[str, str],
    own_database: str,
    http: Any,
    aiohttp_server: AiohttpServer,
    unique: str,
) -> None:
    configure_logging("warning")
    port = free_port()
    p1, p1_text = _key()
    p2, p2_text = _key()
    env_p1 = _env(base_env, own_database, port, SECRET_PEPPER=p1_text)
    first = load_settings(env_p1)
    pool = await db.create_pool(settings=first, min_size=1, max_size=4)
    try:
        await secret_checks.verify(pool, first)
        world = await make_world(
            pool,
            first,
            unique,
            port,
            label="pep",
            grant_types=("authorization_code", "refresh_token", "client_credentials"),
        )
        idle = await clients.create_client(
            pool,
            first,
            school=world.school,
            name="Not used in the overlap",
            redirect_uris=[],
            grant_types=["client_credentials"],
        )
        registered = await clients.create_client(
            pool,
            first,
            school=world.school,
            name="Registered",
            redirect_uris=["https://app.example.com/callback"],
            created_via="registration",
            with_registration_token=True,
        )
        assert idle.client_secret and registered.registration_access_token
        device_cookie = sessions.remember_device(first, world.user.id, [])
        # A sign-in form served before the rotation: its CSRF token is a MAC under the pepper.
        presession = secrets.token_urlsafe(32)
        form_token = sessions.login_csrf_token(first, presession, "account-login")

        # A refresh under the old pepper: its successor is derived under it.
        server = await aiohttp_server(create_app(first), port=port, access_log=None)
        async with without_handler_cancellation(server):
            issued, _ = await code_flow(http, pool, first, world)
            assert issued.status == 200, issued.body
            presented = issued.body["refresh_token"]
            refreshed = await refresh(http, world, presented)
            assert refreshed.status == 200, refreshed.body
            successor = refreshed.body["refresh_token"]
        await server.close()
    finally:
        await pool.close()

    machine = {"grant_type": "client_credentials"}
    auth = basic(world.confidential.id, world.secret)
    idle_auth = basic(idle.client.id, idle.client_secret)
    registration_uri = f"{world.origin}/v1/oauth/register/{registered.client.id}"

    async def sign_in_with_that_form() -> int:
        async with http.post(
            f"{world.origin}/account/login",
            data={
                "csrf_token": form_token,
                "email": world.user.email,
                "password": PASSWORD,
                "return_to": "/account",
            },
            headers={"Cookie": f"{sessions.PRESESSION_COOKIE}={presession}"},
            allow_redirects=False,
        ) as resp:
            return resp.status

    bearer = {"Authorization": f"Bearer {registered.registration_access_token}"}

    async def secret_hashes() -> dict[str, bytes | None]:
        conn = await connect(own_database)
        try:
            rows = await conn.fetch(
                "SELECT id, secret_hash, registration_token_hash FROM clients WHERE school_id = $1",
                world.school.id,
            )
        finally:
            await conn.close()
        return {
            **{r["id"]: r["secret_hash"] for r in rows},
            "registration": next(
                r["registration_token_hash"] for r in rows if r["id"] == registered.client.id
            ),
        }

    # The overlap: SECRET_PEPPER is the new one, the old is SECRET_PEPPER_PREVIOUS.
    env_overlap = {**env_p1, "SECRET_PEPPER": p2_text, "SECRET_PEPPER_PREVIOUS": p1_text}
    overlap = load_settings(env_overlap)
    assert overlap.secret_peppers == (p2, p1)
    server = await aiohttp_server(create_app(overlap), port=port, access_log=None)
    async with without_handler_cancellation(server):
        # The database's pepper is the new one from the first start in the overlap.
        assert await _recorded(own_database, "SECRET_PEPPER") == check_value("SECRET_PEPPER", p2)
        answer = await token(http, world.origin, machine, authorization=auth)
        assert answer.status == 200, answer.body
        async with http.get(registration_uri, headers=bearer) as read:
            assert read.status == 200, await read.text()
        hashes = await secret_hashes()
        assert hashes[world.confidential.id] == credentials.keyed_hash(p2, world.secret)
        assert hashes["registration"] == credentials.keyed_hash(
            p2, registered.registration_access_token
        )
        assert hashes[idle.client.id] == credentials.keyed_hash(p1, idle.client_secret)

        # A retry of the refresh made under the old pepper is a retry (the same successor),
        # not reuse that would end the grant.
        retried = await refresh(http, world, presented)
        assert retried.status == 200, retried.body
        assert retried.body["refresh_token"] == successor

        # A device cookie made under the old pepper still names its account.
        assert sessions.devices(overlap, device_cookie)
        assert await sign_in_with_that_form() == 303
        remade = sessions.remember_device(
            overlap, world.user.id, sessions.devices(overlap, device_cookie)
        )
        assert len(sessions.devices(overlap, remade)) == 1
    await server.close()

    # The overlap over: what was used in it works, what was not does not.
    env_p2 = {k: v for k, v in env_overlap.items() if k != "SECRET_PEPPER_PREVIOUS"}
    after = load_settings(env_p2)
    server = await aiohttp_server(create_app(after), port=port, access_log=None)
    async with without_handler_cancellation(server):
        answer = await token(http, world.origin, machine, authorization=auth)
        assert answer.status == 200, answer.body
        async with http.get(registration_uri, headers=bearer) as read:
            assert read.status == 200, await read.text()
        unused = await token(http, world.origin, machine, authorization=idle_auth)
        assert unused.status == 401, unused.body
        assert unused.body["error"] == "invalid_client"
        # Refresh tokens are not peppered (a plain SHA-256 finds them): the successor works.
        onwards = await refresh(http, world, successor)
        assert onwards.status == 200, onwards.body
        # A form from before the overlap no longer passes.
        assert await sign_in_with_that_form() == 403
    await server.close()
    assert sessions.devices(after, device_cookie) == []
    assert len(sessions.devices(after, remade)) == 1

    # The old pepper alone is refused, naming the variable.
    run = await refused(env_p1)
    assert run.code == 2, run.err
    assert "configuration error: SECRET_PEPPER: " in run.err, run.err
    assert p1_text.rstrip("=") not in run.err and p2_text.rstrip("=") not in run.err


def test_bad_rotation_variables_name_themselves(base_env: dict[str, str]) -> None:
    """Every malformed previous key or pepper stops the load naming its variable (and which
    key of the list), never its value."""
    kek = base_env["KEY_ENCRYPTION_KEY"]
    pepper = base_env["SECRET_PEPPER"]
    good = _key()[1]
    cases = {
        ("KEY_ENCRYPTION_KEYS_PREVIOUS", "key 2: must be base64"): f"{good},not*base64",
        ("KEY_ENCRYPTION_KEYS_PREVIOUS", "key 1: must decode to 32 bytes"): "c2hvcnQ=",
        ("KEY_ENCRYPTION_KEYS_PREVIOUS", "key 2 is KEY_ENCRYPTION_KEY itself"): f"{good},{kek}",
        ("SECRET_PEPPER_PREVIOUS", "must be base64"): "%%%",
        ("SECRET_PEPPER_PREVIOUS", "must decode to 32 bytes"): "c2hvcnQ=",
        ("SECRET_PEPPER_PREVIOUS", "is SECRET_PEPPER itself"): pepper,
    }
    for (variable, problem), value in cases.items():
        with pytest.raises(ConfigError) as caught:
            load_settings({**base_env, variable: value})
        assert caught.value.variable == variable
        assert problem in caught.value.problem, caught.value.problem
        assert value not in str(caught.value)

    loaded = load_settings(
        {
            **base_env,
            "KEY_ENCRYPTION_KEYS_PREVIOUS": f" {good} ,, {good}",
            "SECRET_PEPPER_PREVIOUS": good,
        }
    )
    assert len(loaded.key_encryption_keys) == 2  # the duplicate counted once
    assert len(loaded.secret_peppers) == 2
    assert good not in repr(loaded)


async def test_a_bad_previous_key_stops_the_process_naming_it(base_env: dict[str, str]) -> None:
    run = await refused({**base_env, "KEY_ENCRYPTION_KEYS_PREVIOUS": "x" * 10})
    assert run.code == 2, run.err
    assert "configuration error: KEY_ENCRYPTION_KEYS_PREVIOUS: key 1: " in run.err, run.err
