"""Revocations are announced only after they commit, identity's audit records commit with what
they record, and a narrowed registration (RFC 7592 PUT) leaves no wider grant that still yields
tokens: failures injected midway (a trigger of the test's own), and a grant made from a stale
registration after the narrowing."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

import pytest

from libs.common import keys, streams
from libs.common.config import Settings
from services.identity import store, users
from tests.support import identity_records
from tests.test_registration import (
    bearer,
    body,
    grants_of_new_users,
    new_school,
    origin,
    register,
    stream_entries,
)
from tests.token_helpers import REDIRECT_URI, code_grant

pytestmark = pytest.mark.timeout(60)


@asynccontextmanager
async def failing_revoke_of(pool: Any, grant_id: UUID) -> AsyncIterator[None]:
    """While open, revoking `grant_id` raises in PostgreSQL (as a lost connection, a
    constraint or a deadlock would partway through a run of revokes)."""
    name = f"fail_{secrets.token_hex(6)}"
    await pool.execute(
        f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN RAISE EXCEPTION 'injected failure'; END $$"
    )
    await pool.execute(
        f"CREATE TRIGGER {name} BEFORE UPDATE ON grants FOR EACH ROW"
        f" WHEN (OLD.id = '{grant_id}' AND NEW.revoked_at IS NOT NULL) EXECUTE FUNCTION {name}()"
    )
    try:
        yield
    finally:
        await pool.execute(f"DROP TRIGGER {name} ON grants")
        await pool.execute(f"DROP FUNCTION {name}()")


async def _announced(redis: Any, settings: Settings, grant_ids: Sequence[UUID]) -> set[str]:
    """Grants of `grant_ids` marked or announced in Redis."""
    wanted = {str(g) for g in grant_ids}
    entries = await stream_entries(redis, settings.stream(streams.REVOCATIONS))
    found = {e["grant_id"] for e in entries if e.get("grant_id") in wanted}
    async for mark in redis.scan_iter(match=keys.revoked_pattern(settings), count=1000):
        grant = (mark.decode() if isinstance(mark, bytes) else mark).rsplit(":", 1)[-1]
        if grant in wanted:
            found.add(grant)
    return found


async def test_a_delete_failing_midway_announces_nothing_and_revokes_nothing(
    identity_url: str,
    http: Any,
    pool: Any,
    redis: Any,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    """RFC 7592 DELETE of a client with three grants, the third's revoke failing: no gateway
    or webhook hears of the first two (they stay live in PostgreSQL); then it succeeds."""
    school = await new_school(pool, settings, unique, "rdel")
    _, made, _ = await register(http, origin(identity_port, school.subdomain), body())
    held = await grants_of_new_users(
        pool, school.id, made["client_id"], unique, {f"u{n}": ["courses:read"] for n in range(3)}
    )
    ids = [g.id for g in held.values()]
    uri, auth = made["registration_client_uri"], bearer(made["registration_access_token"])
    async with failing_revoke_of(pool, ids[2]), http.delete(uri, headers=auth) as resp:
        assert resp.status == 500
    assert await _announced(redis, settings, ids) == set()
    for g in ids:
        row = await store.grant_by_id(pool, g)
        assert row is not None and row.revoked_at is None
    assert await store.client_by_id(pool, made["client_id"]) is not None
    # Its registration's record only: no "grant.revoked" for a revoke that rolled back.
    audited = await identity_records(settings.database_url, client_id=made["client_id"])
    assert [r["action"] for r in audited] == ["client.registered"]

    async with http.delete(uri, headers=auth) as resp:
        assert resp.status == 204
    assert await _announced(redis, settings, ids) == {str(g) for g in ids}
    actions = [
        r["action"]
        for r in await identity_records(settings.database_url, client_id=made["client_id"])
    ]
    assert actions.count("grant.revoked") == 3 and actions[-1] == "client.deleted"


async def test_a_narrowing_failing_midway_changes_nothing(
    identity_url: str,
    http: Any,
    pool: Any,
    redis: Any,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    """RFC 7592 PUT narrowing the registration, the second wider grant's revoke failing: the
    registration, the grants and Redis stay as they were (the update used to commit first and
    the first wider grant was announced, the second left to refresh for ever)."""
    school = await new_school(pool, settings, unique, "rput")
    _, made, _ = await register(
        http, origin(identity_port, school.subdomain), body(scope="courses:read students:read")
    )
    wide = ["courses:read", "students:read"]
    held = await grants_of_new_users(
        pool, school.id, made["client_id"], unique, {"u0": wide, "u1": wide}
    )
    ids = [g.id for g in held.values()]
    doc = {
        "client_id": made["client_id"],
        "redirect_uris": made["redirect_uris"],
        "scope": "courses:read",
    }
    uri, auth = made["registration_client_uri"], bearer(made["registration_access_token"])
    async with failing_revoke_of(pool, ids[1]), http.put(uri, json=doc, headers=auth) as resp:
        assert resp.status == 500
    client = await store.client_by_id(pool, made["client_id"])
    assert client is not None and set(client.scopes) == set(wide)
    for g in ids:
        row = await store.grant_by_id(pool, g)
        assert row is not None and row.revoked_at is None
    assert await _announced(redis, settings, ids) == set()

    async with http.put(uri, json=doc, headers=auth) as resp:
        assert resp.status == 200
    for g in ids:
        row = await store.grant_by_id(pool, g)
        assert row is not None and row.revoked_at is not None
    assert await _announced(redis, settings, ids) == {str(g) for g in ids}
    revoked = {
        r["grant_id"]
        for r in await identity_records(settings.database_url, client_id=made["client_id"])
        if r["action"] == "grant.revoked"
    }
    assert revoked == {str(g) for g in ids}


async def test_a_grant_made_from_the_registration_before_a_narrowing_yields_no_token(
    identity_url: str,
    http: Any,
    pool: Any,
    redis: Any,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    """The race: authorize read the wider registration, the PUT committed, then the grant
    and its code were made (as issue_code racing the PUT would). Redeeming the code is
    refused and ends the grant; a refresh token of such a grant is refused too."""
    school = await new_school(pool, settings, unique, "rrace")
    base = origin(identity_port, school.subdomain)
    _, made, _ = await register(
        http,
        base,
        body(
            scope="courses:read students:read",
            redirect_uris=[REDIRECT_URI],
            grant_types=["authorization_code", "refresh_token"],
        ),
    )
    doc = {
        "client_id": made["client_id"],
        "redirect_uris": made["redirect_uris"],
        "grant_types": made["grant_types"],
        "scope": "courses:read",
    }
    async with http.put(
        made["registration_client_uri"],
        json=doc,
        headers=bearer(made["registration_access_token"]),
    ) as resp:
        assert resp.status == 200, await resp.text()
    user, _ = await users.create_user(
        pool,
        school_id=school.id,
        email=f"race{unique}@example.com",
        password="correct horse battery",
        role="admin",  # whose role allows every scope: only the registration bounds the grant
    )
    assert made["token_endpoint_auth_method"] == "none"  # a public client: no secret
    answer, grant_id = await code_grant(
        http,
        pool,
        settings,
        base,
        school_id=school.id,
        client_id=made["client_id"],
        secret=None,
        user_id=user.id,
        scopes=["courses:read", "students:read"],
    )
    assert answer.status == 400, answer.body
    assert answer.body["error"] == "invalid_grant"
    assert "no longer registered" in answer.body["error_description"], answer.body
    row = await store.grant_by_id(pool, grant_id)
    assert row is not None and row.revoked_at is not None
    assert await _announced(redis, settings, [grant_id]) == {str(grant_id)}
