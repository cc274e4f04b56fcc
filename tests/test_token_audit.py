"""The token endpoint's audit records: one for every access token answered, committed with what
granted it (the code's redemption, the refresh token's rotation), so a redemption or rotation
that rolls back leaves no record and one that commits cannot lose its record."""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

import asyncpg
import orjson
import pytest

from services.identity import audit, clients, credentials
from services.identity.audit_commit import AuditCommitter
from tests.token_helpers import (
    REDIRECT_URI,
    World,
    basic,
    code_flow,
    code_grant,
    insert_code,
    make_world,
    pkce_pair,
    post_form,
    refresh,
    revocation_marked,
    token,
)


@pytest.fixture
async def world(
    identity_url: str, pool: Any, settings: Any, unique: str, identity_port: int
) -> World:
    return await make_world(pool, settings, unique, identity_port, label="aud")


def _claims(access_token: str) -> dict[str, Any]:
    """The payload of a JWT (its signature is the token endpoint's tests' business)."""
    payload = access_token.split(".")[1]
    return dict(orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


async def _records_of(pool: Any, jti: str) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT action, client_id, subject, grant_id, scope, detail::text AS detail"
        " FROM audit_log WHERE record_id LIKE 'i:%' AND detail->>'jti' = $1",
        jti,
    )
    return [{**dict(r), "detail": orjson.loads(r["detail"])} for r in rows]


async def _assert_recorded(pool: Any, body: dict[str, Any], action: str) -> dict[str, Any]:
    """The one record of the access token in a token answer."""
    claims = _claims(body["access_token"])
    found = await _records_of(pool, claims["jti"])
    assert len(found) == 1, (action, found)
    record = found[0]
    assert record["action"] == action
    assert record["client_id"] == claims["client_id"]
    assert record["subject"] == claims["sub"]
    assert str(record["grant_id"]) == claims["grant_id"]
    assert record["scope"] == claims["scope"]
    return record


@asynccontextmanager
async def _audit_refused(pool: Any, client_id: str, action: str = "") -> AsyncIterator[None]:
    """While open, PostgreSQL refuses every audit_log row of `client_id` (of `action` only,
    if given), by a trigger of this test's own: the statement, and the transaction, storing
    one fails."""
    name = f"refuse_audit_{secrets.token_hex(4)}"
    await pool.execute(
        f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN IF NEW.client_id = TG_ARGV[0] AND TG_ARGV[1] IN ('', NEW.action) THEN"
        " RAISE EXCEPTION 'audit_log refused by the test'; END IF; RETURN NEW; END $$"
    )
    await pool.execute(
        f"CREATE TRIGGER {name} BEFORE INSERT ON audit_log FOR EACH ROW"
        f" EXECUTE FUNCTION {name}('{client_id}', '{action}')"
    )
    try:
        yield
    finally:
        await pool.execute(f"DROP TRIGGER {name} ON audit_log")
        await pool.execute(f"DROP FUNCTION {name}()")


async def test_every_token_answered_has_its_record(
    world: World, http: Any, pool: Any, settings: Any
) -> None:
    # authorization_code, then a refresh (the fast path: one statement rotates and records).
    first, grant_id = await code_flow(http, pool, settings, world)
    assert first.status == 200, first.body
    issued = await _assert_recorded(pool, first.body, "token.issued")
    assert issued["detail"]["grant_type"] == "authorization_code"
    old = first.body["refresh_token"]
    rotated = await refresh(http, world, old)
    assert rotated.status == 200, rotated.body
    assert (await _assert_recorded(pool, rotated.body, "token.refreshed"))["detail"] == {
        "jti": _claims(rotated.body["access_token"])["jti"],
        "retry": False,
    }

    # The same token again within the grace window: a retry, answered with the same successor
    # and a new access token, recorded as such (the locked path, which rotates nothing).
    retried = await refresh(http, world, old)
    assert retried.status == 200, retried.body
    assert retried.body["refresh_token"] == rotated.body["refresh_token"]
    assert (await _assert_recorded(pool, retried.body, "token.refreshed"))["detail"]["retry"]

    # Concurrent refreshes of one token: whichever path each took, each answer has its record.
    answers = await asyncio.gather(
        *(refresh(http, world, rotated.body["refresh_token"]) for _ in range(4))
    )
    assert all(a.status == 200 for a in answers), [a.body for a in answers]
    for answer in answers:
        await _assert_recorded(pool, answer.body, "token.refreshed")

    # A public client's exchange (no refresh_token grant here: the other statement).
    no_refresh = await clients.create_client(
        pool,
        settings,
        school=world.school,
        name="Code Only",
        redirect_uris=[REDIRECT_URI],
        scopes=["read"],
        grant_types=["authorization_code"],
    )
    assert no_refresh.client_secret is not None
    exchanged, _ = await code_grant(
        http,
        pool,
        settings,
        world.origin,
        school_id=world.school.id,
        client_id=no_refresh.client.id,
        secret=no_refresh.client_secret,
        user_id=world.user.id,
        scopes=["read"],
    )
    assert exchanged.status == 200 and "refresh_token" not in exchanged.body, exchanged.body
    await _assert_recorded(pool, exchanged.body, "token.issued")

    # client_credentials: the standing grant's creation and each token, recorded.
    service = await clients.create_client(
        pool,
        settings,
        school=world.school,
        name="Service",
        redirect_uris=[],
        scopes=["read"],
        grant_types=["client_credentials"],
    )
    assert service.client_secret is not None
    for _ in range(2):
        cc = await token(
            http,
            world.origin,
            {"grant_type": "client_credentials"},
            authorization=basic(service.client.id, service.client_secret),
        )
        assert cc.status == 200, cc.body
        record = await _assert_recorded(pool, cc.body, "token.issued")
        assert record["detail"]["grant_type"] == "client_credentials"
    created = await pool.fetchval(
        "SELECT count(*) FROM audit_log WHERE action = 'grant.created' AND client_id = $1",
        service.client.id,
    )
    assert created == 1
    assert grant_id is not None


async def test_a_redemption_whose_record_fails_rolls_back_whole(
    world: World, http: Any, pool: Any, settings: Any
) -> None:
    verifier, challenge = pkce_pair()
    code, grant_id = await insert_code(
        pool,
        settings,
        school_id=world.school.id,
        client_id=world.confidential.id,
        user_id=world.user.id,
        scopes=["read", "courses:read"],
        challenge=challenge,
    )
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier,
    }
    auth = basic(world.confidential.id, world.secret)

    async with _audit_refused(pool, world.confidential.id):
        failed = await token(http, world.origin, form, authorization=auth)
    assert failed.status == 500, failed.body
    # Nothing of the redemption committed: the code is still unused, no refresh token was
    # stored, and no record says a token was issued.
    code_hash = credentials.token_hash(code)
    assert (
        await pool.fetchval(
            "SELECT redeemed_at FROM authorization_codes WHERE code_hash = $1", code_hash
        )
        is None
    )
    assert (
        await pool.fetchval("SELECT count(*) FROM refresh_tokens WHERE grant_id = $1", grant_id)
        == 0
    )
    assert await _grant_actions(pool, grant_id) == []

    # So the client's retry is a first redemption, not a replay that would end the grant.
    retried = await token(http, world.origin, form, authorization=auth)
    assert retried.status == 200, retried.body
    await _assert_recorded(pool, retried.body, "token.issued")
    assert await _grant_actions(pool, grant_id) == ["token.issued"]


async def test_a_rotation_whose_record_fails_rolls_back_whole(
    world: World, http: Any, pool: Any, settings: Any
) -> None:
    first, grant_id = await code_flow(http, pool, settings, world)
    assert first.status == 200, first.body
    old = first.body["refresh_token"]

    async with _audit_refused(pool, world.confidential.id):
        failed = await refresh(http, world, old)
    assert failed.status == 500, failed.body
    state = await pool.fetchrow(
        "SELECT rotated_at, successor_hash FROM refresh_tokens WHERE token_hash = $1",
        credentials.token_hash(old),
    )
    assert state["rotated_at"] is None and state["successor_hash"] is None
    assert await _grant_actions(pool, grant_id) == ["token.issued"]

    # The token was never rotated: presented again, it rotates (no retry, no reuse).
    again = await refresh(http, world, old)
    assert again.status == 200, again.body
    await _assert_recorded(pool, again.body, "token.refreshed")
    assert await _grant_actions(pool, grant_id) == ["token.issued", "token.refreshed"]


async def _grant_actions(pool: Any, grant_id: UUID) -> list[str]:
    rows = await pool.fetch(
        "SELECT action FROM audit_log WHERE grant_id = $1 ORDER BY id", grant_id
    )
    return [r["action"] for r in rows]


async def test_a_revocation_whose_record_fails_is_not_announced(
    world: World, http: Any, pool: Any, redis: Any, settings: Any
) -> None:
    """RFC 7009: the token.revoked record commits with the revocation, which is announced only
    after it; a record that cannot be stored leaves the grant live and unannounced."""
    first, grant_id = await code_flow(http, pool, settings, world)
    assert first.status == 200, first.body
    form = {"token": first.body["refresh_token"]}
    url = world.origin + "/v1/oauth/revoke"
    auth = basic(world.confidential.id, world.secret)

    # Only the token.revoked record is refused: the grant.revoked one is not what is tested.
    async with _audit_refused(pool, world.confidential.id, "token.revoked"):
        failed = await post_form(http, url, form, authorization=auth)
    assert failed.status == 500, failed.body
    assert await pool.fetchval("SELECT revoked_at FROM grants WHERE id = $1", grant_id) is None
    assert await revocation_marked(redis, settings, grant_id) == (False, False)
    assert await _grant_actions(pool, grant_id) == ["token.issued"]

    done = await post_form(http, url, form, authorization=auth)
    assert done.status == 200, done.body
    assert await revocation_marked(redis, settings, grant_id) == (True, True)
    assert await _grant_actions(pool, grant_id) == [
        "token.issued",
        "grant.revoked",
        "token.revoked",
    ]


def _record_of(client_id: str, n: int) -> dict[str, Any]:
    return audit.record("token.issued", client_id=client_id, subject=client_id, n=n)


async def _commits_of(pool: Any, client_id: str) -> tuple[int, int]:
    """Rows of `client_id`, and the transactions that inserted them (rows inserted by one
    transaction share its xmin)."""
    row = await pool.fetchrow(
        "SELECT count(*) AS rows, count(DISTINCT xmin::text) AS commits"
        " FROM audit_log WHERE client_id = $1",
        client_id,
    )
    return row["rows"], row["commits"]


async def test_concurrent_records_share_one_commit(pool: Any, unique: str) -> None:
    """Records with no transaction of their own (client_credentials tokens, failed sign-ins)
    arriving together are stored by one statement, in batches of at most max_batch."""
    client_id = f"gc-{unique}"
    committer = AuditCommitter(pool)
    await asyncio.gather(*(committer.write(_record_of(client_id, n)) for n in range(40)))
    rows, commits = await _commits_of(pool, client_id)
    assert rows == 40
    assert commits == 1

    bounded = AuditCommitter(pool, max_batch=10)
    other = f"gc-b-{unique}"
    await asyncio.gather(*(bounded.write(_record_of(other, n)) for n in range(40)))
    assert await _commits_of(pool, other) == (40, 4)

    # A lone record goes at once, alone; every write has returned with its row committed.
    await committer.write(_record_of(client_id, 40))
    assert await _commits_of(pool, client_id) == (41, 2)


async def test_a_refused_record_fails_its_own_request_only(pool: Any, unique: str) -> None:
    """A batch PostgreSQL refuses fails its requests (nothing of it stored); a row refused for
    itself fails only the request that wrote it, the others of its batch are stored."""
    refused, fine = f"gc-r-{unique}", f"gc-f-{unique}"
    committer = AuditCommitter(pool)
    async with _audit_refused(pool, refused):
        outcomes = await asyncio.gather(
            *(committer.write(_record_of(fine, n)) for n in range(5)),
            committer.write(_record_of(refused, 0)),
            *(committer.write(_record_of(fine, n)) for n in range(5, 10)),
            return_exceptions=True,
        )
        alone = await asyncio.gather(
            committer.write(_record_of(refused, 1)), return_exceptions=True
        )
    assert outcomes[:5] == [None] * 5 and outcomes[6:] == [None] * 5, outcomes
    assert isinstance(outcomes[5], asyncpg.RaiseError), outcomes[5]
    assert isinstance(alone[0], asyncpg.RaiseError), alone
    assert (await _commits_of(pool, fine))[0] == 10
    assert (await _commits_of(pool, refused))[0] == 0


async def test_a_client_credentials_token_is_answered_only_with_its_record(
    world: World, http: Any, pool: Any, settings: Any
) -> None:
    service = await clients.create_client(
        pool,
        settings,
        school=world.school,
        name="Service",
        redirect_uris=[],
        scopes=["read"],
        grant_types=["client_credentials"],
    )
    assert service.client_secret is not None
    auth = basic(service.client.id, service.client_secret)
    form = {"grant_type": "client_credentials"}
    # The standing grant made first (its own transaction, its grant.created record).
    first = await token(http, world.origin, form, authorization=auth)
    assert first.status == 200, first.body

    async with _audit_refused(pool, service.client.id, "token.issued"):
        failed = await asyncio.gather(
            *(token(http, world.origin, form, authorization=auth) for _ in range(8))
        )
    for answer in failed:
        assert answer.status == 500, answer.body
        assert answer.body["error"] == "server_error" and "access_token" not in answer.body
    issued = await pool.fetchval(
        "SELECT count(*) FROM audit_log WHERE action = 'token.issued' AND client_id = $1",
        service.client.id,
    )
    assert issued == 1

    # Concurrent requests once the records are taken again: every token has its record.
    answers = await asyncio.gather(
        *(token(http, world.origin, form, authorization=auth) for _ in range(8))
    )
    for answer in answers:
        assert answer.status == 200, answer.body
        await _assert_recorded(pool, answer.body, "token.issued")
