"""Webhooks refuses to start with a KEY_ENCRYPTION_KEY that is not the database's (issue 13).

The webhooks service, started for real as `loopwise-connect serve webhooks` (API and workers),
exits 2 before listening, naming KEY_ENCRYPTION_KEY, when the key does not open the stored
subscription secrets or is not the key whose check value identity recorded; the right key
spelled another way (the other base64 alphabet, unpadded) starts; and a database with neither
starts with any key. Each test has a database of its own, so what it stores is all there is.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from libs.common import db
from libs.common.config import load_settings
from services.identity import secret_checks as identity_secret_checks
from services.webhooks import signing
from services.webhooks.store import subscriptions
from tests.support import connect, database_env
from tests.test_secret_checks import Exit, b64, decoded, refused, serving

pytestmark = pytest.mark.timeout(120)


async def _starts(env: dict[str, str]) -> None:
    """Webhooks starts and listens with `env`; stopped (SIGTERM) afterwards."""
    async with serving(env, "webhooks"):
        pass


def _assert_refused(run: Exit, right: str, wrong: str) -> None:
    assert run.code == 2, run.err
    assert not run.listened
    assert '"listening"' not in run.err
    assert "configuration error: KEY_ENCRYPTION_KEY: " in run.err, run.err
    assert "start with the KEY_ENCRYPTION_KEY this database was set up with" in run.err
    assert "Traceback" not in run.err
    for key in (right, wrong):
        assert key.rstrip("=") not in run.err


def _wrong_keys(right: bytes) -> list[str]:
    """A random key, and the right one with one bit flipped, in either base64 alphabet."""
    flipped = bytes([right[0] ^ 0x01]) + right[1:]
    return [
        b64(secrets.token_bytes(32)),
        b64(flipped),
        base64.b64encode(flipped).decode().rstrip("="),
    ]


@pytest.fixture
async def own_env(webhooks_env: dict[str, str], run_id: str) -> AsyncIterator[dict[str, str]]:
    """The run's webhooks environment on a migrated database of its own, dropped afterwards."""
    url = urlunsplit(
        urlsplit(webhooks_env["DATABASE_URL"])._replace(
            path=f"/{run_id}_wsc_{secrets.token_hex(4)}"
        )
    )
    await db.migrate(url)
    yield {
        **webhooks_env,
        **database_env(webhooks_env, url),
        "REDIS_KEY_PREFIX": f"{webhooks_env['REDIS_KEY_PREFIX']}wsc{secrets.token_hex(3)}:",
    }
    await db.drop_database(url)


async def _store_subscriptions(url: str, kek: bytes, count: int) -> None:
    conn = await connect(url)
    try:
        for n in range(count):
            sid = uuid.uuid4()
            _, key = signing.new_secret()
            await subscriptions.insert_subscription(
                conn,
                id=sid,
                school_id=42,
                client_id="lc_sc_client",
                grant_id=uuid.uuid4(),
                subject=None,
                url=f"https://hooks.example/{n}",
                event_types=["course.updated"],
                description="",
                secret_enc=signing.seal(kek, sid, key),
                kek_id=signing.kek_id(kek),
            )
    finally:
        await conn.close()


async def _wrong_keys_refused_right_key_starts(own_env: dict[str, str], because: str) -> None:
    """Every wrong key stops webhooks at start, naming the variable and `because`; the right
    key, spelled otherwise (standard base64, no padding), starts."""
    right_text = own_env["KEY_ENCRYPTION_KEY"]
    right = decoded(right_text)
    wrong_keys = _wrong_keys(right)
    runs = await asyncio.gather(
        *(refused({**own_env, "KEY_ENCRYPTION_KEY": key}, "webhooks") for key in wrong_keys)
    )
    for key, run in zip(wrong_keys, runs, strict=True):
        _assert_refused(run, right_text, key)
        assert because in run.err

    await _starts({**own_env, "KEY_ENCRYPTION_KEY": base64.b64encode(right).decode().rstrip("=")})


async def test_webhooks_refuses_a_key_that_does_not_open_the_subscription_secrets(
    own_env: dict[str, str],
) -> None:
    """Subscriptions sealed under the right key and no check value recorded (identity never
    started on this database): another key stops webhooks with exit 2 before it listens;
    the right key in the other base64 alphabet, unpadded, starts."""
    right_text = own_env["KEY_ENCRYPTION_KEY"]
    right = decoded(right_text)
    await _store_subscriptions(own_env["DATABASE_URL"], right, 4)
    conn = await connect(own_env["DATABASE_URL"])
    try:
        assert await conn.fetchval("SELECT count(*) FROM secret_checks") == 0
    finally:
        await conn.close()

    await _wrong_keys_refused_right_key_starts(
        own_env, "does not open the webhook signing secrets stored in the database"
    )


async def test_webhooks_refuses_a_key_other_than_identitys_recorded_one(
    own_env: dict[str, str],
) -> None:
    """No subscription yet, but identity recorded the key's check value: another key stops
    webhooks the same way (before it would seal the first secret under it); the right key
    spelled otherwise starts."""
    # Identity's own start-up check records the check values on a database that has none.
    conn = await connect(own_env["DATABASE_URL"])
    try:
        await identity_secret_checks.verify(conn, load_settings(own_env))
        assert await conn.fetchval("SELECT count(*) FROM webhooks.subscriptions") == 0
    finally:
        await conn.close()

    await _wrong_keys_refused_right_key_starts(
        own_env, "is not the key this database's secrets are sealed under"
    )


async def test_webhooks_starts_with_any_key_on_a_database_with_nothing_sealed(
    own_env: dict[str, str],
) -> None:
    """No check value and no subscription: nothing says which key is the database's, so any
    key starts, and webhooks did not record one (identity owns the check values)."""
    await _starts({**own_env, "KEY_ENCRYPTION_KEY": b64(secrets.token_bytes(32))})
    conn = await connect(own_env["DATABASE_URL"])
    try:
        assert await conn.fetchval("SELECT count(*) FROM secret_checks") == 0
    finally:
        await conn.close()


async def test_a_damaged_secret_does_not_stop_a_start_that_a_wrong_key_does(
    own_env: dict[str, str],
) -> None:
    """One subscription's sealed secret damaged (copied from another row, or cut short) is
    that subscription's trouble, not a wrong key: the right key still starts, another key is
    still refused."""
    right_text = own_env["KEY_ENCRYPTION_KEY"]
    await _store_subscriptions(own_env["DATABASE_URL"], decoded(right_text), 3)
    conn = await connect(own_env["DATABASE_URL"])
    try:
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM webhooks.subscriptions")]
        await conn.execute(
            "UPDATE webhooks.subscriptions SET secret_enc ="
            " (SELECT secret_enc FROM webhooks.subscriptions WHERE id = $2) WHERE id = $1",
            ids[0],
            ids[1],
        )
        await conn.execute(
            "UPDATE webhooks.subscriptions SET secret_enc = '\\x0102'::bytea WHERE id = $1",
            ids[2],
        )
    finally:
        await conn.close()
    await _starts(own_env)
    wrong = b64(secrets.token_bytes(32))
    _assert_refused(
        await refused({**own_env, "KEY_ENCRYPTION_KEY": wrong}, "webhooks"), right_text, wrong
    )
