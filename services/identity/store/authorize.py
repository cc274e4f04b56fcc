"""SQL of the authorization flow: browser sessions, remembered consent, authorization codes.

The token endpoint redeems what :func:`insert_authorization_code` writes; everything else here
serves the authorize, login, school picker and consent steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from libs.common.db import Executor
from services.identity import store


@dataclass(frozen=True, slots=True)
class Session:
    id_hash: bytes
    user_id: UUID
    csrf_secret: bytes
    authenticated_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class AuthorizeState:
    """Everything the authorize endpoint needs to answer a signed-in user, from one query."""

    client: store.Client | None
    session: Session | None
    # Whether the session's user may act at the issuer's school: a member or a platform admin.
    # Always False on the platform origin, where no school is known yet.
    session_may_use_school: bool
    # What the session's user already consented to for this client at this school.
    consented: tuple[str, ...] | None
    # The session's user's role at the school (None without a membership), and whether they
    # are a platform administrator: together they set the user's scope ceiling (roles.py).
    role: str | None = None
    platform_admin: bool = False


def _session(r: asyncpg.Record, prefix: str = "") -> Session:
    return Session(
        r[f"{prefix}id_hash"],
        r[f"{prefix}user_id"],
        r[f"{prefix}csrf_secret"],
        r[f"{prefix}authenticated_at"],
        r[f"{prefix}expires_at"],
    )


# Sessions --------------------------------------------------------------------------------


async def insert_session(
    db: Executor,
    *,
    id_hash: bytes,
    user_id: UUID,
    csrf_secret: bytes,
    lifetime_seconds: int,
    user_agent: str | None,
) -> Session:
    row = await db.fetchrow(
        "INSERT INTO sessions (id_hash, user_id, csrf_secret, expires_at, user_agent)"
        " VALUES ($1, $2, $3, now() + make_interval(secs => $4), $5)"
        " RETURNING id_hash, user_id, csrf_secret, authenticated_at, expires_at",
        id_hash,
        user_id,
        csrf_secret,
        lifetime_seconds,
        user_agent,
    )
    assert row is not None
    return _session(row)


async def session_by_hash(db: Executor, id_hash: bytes) -> Session | None:
    row = await db.fetchrow(
        "SELECT id_hash, user_id, csrf_secret, authenticated_at, expires_at FROM sessions"
        " WHERE id_hash = $1 AND expires_at > now()",
        id_hash,
    )
    return _session(row) if row else None


async def delete_session(db: Executor, id_hash: bytes) -> None:
    await db.execute("DELETE FROM sessions WHERE id_hash = $1", id_hash)


async def may_use_school(db: Executor, user_id: UUID, school_id: int) -> bool:
    """A member of the school, or a platform administrator."""
    allowed: bool | None = await db.fetchval(
        "SELECT u.is_platform_admin OR EXISTS (SELECT 1 FROM school_memberships m"
        " WHERE m.user_id = u.id AND m.school_id = $2) FROM users u WHERE u.id = $1",
        user_id,
        school_id,
    )
    return bool(allowed)


# The authorize fast path -------------------------------------------------------------------


async def authorize_state(
    db: Executor, *, client_id: str, session_hash: bytes | None, school_id: int | None
) -> AuthorizeState:
    """The client, the live session, membership and remembered consent in one round trip.

    Every sign-in of a returning user passes through here, so the joins replace what would
    otherwise be four sequential queries.
    """
    row = await db.fetchrow(
        "SELECT c.*, s.id_hash AS s_id_hash, s.user_id AS s_user_id,"
        " s.csrf_secret AS s_csrf_secret, s.authenticated_at AS s_authenticated_at,"
        " s.expires_at AS s_expires_at,"
        " (u.is_platform_admin OR m.user_id IS NOT NULL) AS s_may_use_school,"
        " m.role AS s_role, coalesce(u.is_platform_admin, false) AS s_platform_admin,"
        " co.scopes AS consented"
        " FROM (SELECT 1) AS one"
        " LEFT JOIN clients c ON c.id = $1"
        " LEFT JOIN sessions s ON s.id_hash = $2 AND s.expires_at > now()"
        " LEFT JOIN users u ON u.id = s.user_id"
        " LEFT JOIN school_memberships m ON m.user_id = s.user_id AND m.school_id = $3"
        " LEFT JOIN consents co ON co.user_id = s.user_id AND co.client_id = c.id"
        " AND co.school_id = $3",
        # An id no client can have joins no client (rather than failing the query).
        client_id if store.possible_client_id(client_id) else None,
        session_hash,
        school_id,
    )
    assert row is not None
    client = store._client(row) if row["id"] is not None else None
    session = _session(row, "s_") if row["s_id_hash"] is not None else None
    return AuthorizeState(
        client=client,
        session=session,
        session_may_use_school=bool(session and school_id is not None and row["s_may_use_school"]),
        consented=tuple(row["consented"]) if row["consented"] is not None else None,
        role=row["s_role"] if session else None,
        platform_admin=bool(session and row["s_platform_admin"]),
    )


# Consents --------------------------------------------------------------------------------


async def consented_scopes(
    db: Executor, *, user_id: UUID, client_id: str, school_id: int
) -> tuple[str, ...] | None:
    scopes: list[str] | None = await db.fetchval(
        "SELECT scopes FROM consents WHERE user_id = $1 AND client_id = $2 AND school_id = $3",
        user_id,
        client_id,
        school_id,
    )
    return tuple(scopes) if scopes is not None else None


async def upsert_consent(
    db: Executor, *, user_id: UUID, client_id: str, school_id: int, scopes: Sequence[str]
) -> tuple[str, ...]:
    """Add `scopes` to what the user already agreed to; returns the union, first-seen order."""
    row = await db.fetchval(
        "INSERT INTO consents AS c (user_id, client_id, school_id, scopes)"
        " VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (user_id, client_id, school_id) DO UPDATE SET"
        " scopes = ARRAY(SELECT s FROM unnest(c.scopes || EXCLUDED.scopes)"
        " WITH ORDINALITY AS t(s, n) GROUP BY s ORDER BY min(n)),"
        " granted_at = now()"
        " RETURNING scopes",
        user_id,
        client_id,
        school_id,
        list(scopes),
    )
    return tuple(row)


async def held_consent(
    db: Executor, *, user_id: UUID, client_id: str, school_id: int
) -> tuple[str, ...] | None:
    """The remembered consent's scopes, its row held (FOR SHARE) until the transaction ends:
    a Revoke deleting it waits for the grant made on its strength, and then sees that grant."""
    row = await db.fetchval(
        "SELECT scopes FROM consents WHERE user_id = $1 AND client_id = $2 AND school_id = $3"
        " FOR SHARE",
        user_id,
        client_id,
        school_id,
    )
    return tuple(row) if row is not None else None


async def delete_consent(db: Executor, *, user_id: UUID, client_id: str, school_id: int) -> bool:
    """Forget a remembered consent (the account page's Revoke should call this too)."""
    result: str = await db.execute(
        "DELETE FROM consents WHERE user_id = $1 AND client_id = $2 AND school_id = $3",
        user_id,
        client_id,
        school_id,
    )
    return result.endswith(" 1")


# Authorization codes -----------------------------------------------------------------------


async def insert_authorization_code(
    db: Executor,
    *,
    code_hash: bytes,
    grant_id: UUID,
    client_id: str,
    school_id: int,
    user_id: UUID,
    redirect_uri: str,
    scopes: Sequence[str],
    code_challenge: str,
    nonce: str | None,
    resource: str | None,
    auth_time: datetime,
    ttl_seconds: int,
) -> datetime:
    """Store a code by its hash; returns when it expires."""
    expires_at: datetime = await db.fetchval(
        "INSERT INTO authorization_codes (code_hash, grant_id, client_id, school_id, user_id,"
        " redirect_uri, scopes, code_challenge, nonce, resource, auth_time, expires_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,"
        " now() + make_interval(secs => $12)) RETURNING expires_at",
        code_hash,
        grant_id,
        client_id,
        school_id,
        user_id,
        redirect_uri,
        list(scopes),
        code_challenge,
        nonce,
        resource,
        auth_time,
        ttl_seconds,
    )
    return expires_at
