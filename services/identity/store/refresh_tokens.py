"""Refresh tokens (RFC 6749 6): their rows, their rotation, the first one of a code's grant.

Refresh tokens are stored only as the SHA-256 of their value. Each one rotates once: the row
records when, and the hash of the successor handed out, so a retry within the grace window
can be answered with the same successor and anything later is recognised as reuse. What a
presented token's state means (refused, rotated, retried) is decided in
`token/refresh_token.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from libs.common.db import Connection, Executor
from services.identity.store import audit as audit_store


@dataclass(frozen=True, slots=True)
class RefreshTokenState:
    """A refresh token row joined with what deciding on it needs from its grant."""

    token_hash: bytes
    grant_id: UUID
    client_id: str
    scopes: tuple[str, ...]
    resource: str | None
    auth_time: datetime | None
    created_at: datetime
    expires_at: datetime
    rotated_at: datetime | None
    successor_hash: bytes | None
    school_id: int
    user_id: UUID | None
    grant_revoked: bool
    expired: bool
    # Seconds since rotation by the database clock; None when not rotated.
    seconds_since_rotation: float | None
    successor_rotated: bool
    # The grant's user's role at the grant's school now (None: no longer a member), and
    # whether they are a platform administrator: the refresh path checks the grant against
    # the ceiling these set (roles.py) without another round trip.
    user_role: str | None = None
    platform_admin: bool = False
    # The client's registered scopes now: a grant wider than a registration narrowed since
    # (RFC 7592 PUT) is not refreshed.
    client_scopes: tuple[str, ...] | None = None


def _state(r: asyncpg.Record) -> RefreshTokenState:
    return RefreshTokenState(
        token_hash=r["token_hash"],
        grant_id=r["grant_id"],
        client_id=r["client_id"],
        scopes=tuple(r["scopes"]),
        resource=r["resource"],
        auth_time=r["auth_time"],
        created_at=r["created_at"],
        expires_at=r["expires_at"],
        rotated_at=r["rotated_at"],
        successor_hash=r["successor_hash"],
        school_id=r["school_id"],
        client_scopes=tuple(r["client_scopes"]) if r["client_scopes"] is not None else None,
        user_id=r["user_id"],
        grant_revoked=r["grant_revoked"],
        expired=r["expired"],
        seconds_since_rotation=r["seconds_since_rotation"],
        successor_rotated=r["successor_rotated"],
        user_role=r["user_role"],
        platform_admin=r["platform_admin"],
    )


# clock_timestamp(), not now(): a transaction that waited on the row lock started before the
# rotation it is now looking at, and now() would make the rotation seem to lie in the future.
_STATE_COLUMNS = """
    rt.token_hash, rt.grant_id, rt.client_id, rt.scopes, rt.resource, rt.auth_time,
    rt.created_at, rt.expires_at, rt.rotated_at, rt.successor_hash,
    g.school_id, g.user_id, g.revoked_at IS NOT NULL AS grant_revoked,
    rt.expires_at <= clock_timestamp() AS expired,
    extract(epoch FROM clock_timestamp() - rt.rotated_at)::float8 AS seconds_since_rotation,
    coalesce(s.rotated_at IS NOT NULL, false) AS successor_rotated,
    m.role AS user_role, coalesce(u.is_platform_admin, false) AS platform_admin,
    c.scopes AS client_scopes
FROM refresh_tokens rt
JOIN grants g ON g.id = rt.grant_id
LEFT JOIN clients c ON c.id = rt.client_id
LEFT JOIN refresh_tokens s ON s.token_hash = rt.successor_hash
LEFT JOIN school_memberships m ON m.user_id = g.user_id AND m.school_id = g.school_id
LEFT JOIN users u ON u.id = g.user_id
WHERE rt.token_hash = $1
"""

_LOCK = "SELECT" + _STATE_COLUMNS + " FOR UPDATE OF rt"
_PEEK = "SELECT" + _STATE_COLUMNS


async def lock_refresh_token(conn: Connection, token_hash: bytes) -> RefreshTokenState | None:
    """The presented token, locked until the transaction ends: rotations of one token queue."""
    row = await conn.fetchrow(_LOCK, token_hash)
    return _state(row) if row else None


async def refresh_token_state(db: Executor, token_hash: bytes) -> RefreshTokenState | None:
    """The token as it stands, unlocked: for introspection and revocation."""
    row = await db.fetchrow(_PEEK, token_hash)
    return _state(row) if row else None


_INFINITY = "'infinity'::timestamptz"


def _until(seconds: str, unlimited: str) -> str:
    """SQL: `seconds` (a parameter) from now, or `unlimited` when it is 0."""
    return (
        f"(CASE WHEN {seconds}::float8 > 0 THEN now() + make_interval(secs => {seconds}::float8)"
        f" ELSE {unlimited} END)"
    )


# A first token: idle limit $idle, chain limit $max (both seconds, 0: none). LEAST ignores NULL.
def _first_expiry(idle: str, longest: str) -> tuple[str, str]:
    family = _until(longest, "NULL::timestamptz")
    return f"LEAST({_until(idle, _INFINITY)}, {family})", family


async def insert_refresh_token(
    db: Executor,
    *,
    token_hash: bytes,
    grant_id: UUID,
    client_id: str,
    scopes: Sequence[str],
    resource: str | None,
    auth_time: datetime | None,
    ttl_seconds: int,
    max_seconds: int = 0,
) -> None:
    expires, family = _first_expiry("$7", "$8")
    await db.execute(
        "INSERT INTO refresh_tokens (token_hash, grant_id, client_id, scopes, resource,"  # noqa: S608
        f" auth_time, expires_at, family_expires_at) VALUES ($1, $2, $3, $4, $5, $6,"
        f" {expires}, {family})",
        token_hash,
        grant_id,
        client_id,
        list(scopes),
        resource,
        auth_time,
        ttl_seconds,
        max_seconds,
    )


# Rotation, the grant's last use and the record of the access token answered for it
# (`token.refreshed`, $4..) in one statement: one round trip on the hot path, and no rotation
# committed without its record (nor a record without its rotation: it is inserted only if the
# successor was).
_ROTATE = f"""
WITH rotated AS (
    UPDATE refresh_tokens SET rotated_at = clock_timestamp(), successor_hash = $2
    WHERE token_hash = $1 AND rotated_at IS NULL
    RETURNING grant_id, client_id, scopes, resource, auth_time, family_expires_at
), successor AS (
    -- The idle limit starts again; the chain's own end stays where it was.
    INSERT INTO refresh_tokens (token_hash, grant_id, client_id, scopes, resource, auth_time,
                                expires_at, family_expires_at)
    SELECT $2, grant_id, client_id, scopes, resource, auth_time,
           LEAST({_until("$3", _INFINITY)}, family_expires_at), family_expires_at
    FROM rotated
    RETURNING grant_id
), touched AS (
    UPDATE grants SET last_used_at = now() WHERE id IN (SELECT grant_id FROM successor)
), recorded AS (
    {audit_store.insert_one(4, when="successor")}
)
SELECT count(*) FROM successor
"""  # noqa: S608 (constant SQL: insert_one only numbers parameters)


async def rotate_refresh_token(
    conn: Connection,
    token_hash: bytes,
    successor_hash: bytes,
    ttl_seconds: int,
    record: audit_store.AuditRow,
) -> bool:
    """Rotate the (locked) token to its successor, storing `record` with the rotation; False
    (and no record) if it had been rotated already."""
    inserted: int = await conn.fetchval(
        _ROTATE, token_hash, successor_hash, ttl_seconds, *audit_store.values(record)
    )
    return inserted == 1


# The same rotation as one autocommitted statement, for a token a moment ago seen live: the
# UPDATE's row lock and its re-checked WHERE (rotated_at IS NULL, unexpired, grant not revoked)
# make it win for exactly one of any concurrent callers, without BEGIN, SELECT ... FOR UPDATE
# and COMMIT round trips. A caller that loses takes the locked path to tell retry from reuse.
_ROTATE_LIVE = _ROTATE.replace(
    "WHERE token_hash = $1 AND rotated_at IS NULL",
    "WHERE token_hash = $1 AND rotated_at IS NULL AND expires_at > clock_timestamp()"
    " AND EXISTS (SELECT 1 FROM grants g WHERE g.id = refresh_tokens.grant_id"
    " AND g.revoked_at IS NULL)",
)
assert _ROTATE_LIVE != _ROTATE


async def rotate_live_refresh_token(
    db: Executor,
    token_hash: bytes,
    successor_hash: bytes,
    ttl_seconds: int,
    record: audit_store.AuditRow,
) -> bool:
    """Rotate the token if it is still unrotated, unexpired and its grant live, storing
    `record` with the rotation; else False, and nothing stored."""
    inserted: int = await db.fetchval(
        _ROTATE_LIVE, token_hash, successor_hash, ttl_seconds, *audit_store.values(record)
    )
    return inserted == 1


# After a code redemption, in its transaction: the grant's last use, the record of the access
# token answered for it ($2.. without a refresh token, $8.. with one), and the first refresh
# token if any, in one statement.
_TOUCH_RECORDED = f"""
WITH recorded AS ({audit_store.insert_one(2)})
UPDATE grants SET last_used_at = now() WHERE id = $1
"""  # noqa: S608
_FIRST_REFRESH_TOKEN = f"""
WITH touched AS (UPDATE grants SET last_used_at = now() WHERE id = $2),
recorded AS ({audit_store.insert_one(9)})
INSERT INTO refresh_tokens (token_hash, grant_id, client_id, scopes, resource, auth_time,
                            expires_at, family_expires_at)
VALUES ($1, $2, $3, $4, $5, $6, {", ".join(_first_expiry("$7", "$8"))})
"""  # noqa: S608


async def issue_code_tokens(
    conn: Connection,
    *,
    grant_id: UUID,
    refresh_token_hash: bytes | None,
    client_id: str,
    scopes: Sequence[str],
    resource: str | None,
    auth_time: datetime | None,
    ttl_seconds: int,
    record: audit_store.AuditRow,
    max_seconds: int = 0,
) -> None:
    """After a code redemption: the first refresh token (if any), the grant's last use and
    `record`, the audit record of the access token about to be answered. `ttl_seconds` is
    the idle limit, `max_seconds` the chain's (0: none)."""
    if refresh_token_hash is None:
        await conn.execute(_TOUCH_RECORDED, grant_id, *audit_store.values(record))
        return
    await conn.execute(
        _FIRST_REFRESH_TOKEN,
        refresh_token_hash,
        grant_id,
        client_id,
        list(scopes),
        resource,
        auth_time,
        ttl_seconds,
        max_seconds,
        *audit_store.values(record),
    )
