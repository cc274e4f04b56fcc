"""Authorization codes at the token endpoint: redemption, once.

The authorize flow inserts codes (`store.authorize.insert_authorization_code`); this module only
redeems them. A code is looked up by the SHA-256 of its value, never stored in clear.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from libs.common.db import Executor


@dataclass(frozen=True, slots=True)
class Redemption:
    """A code row as redemption found it."""

    grant_id: UUID
    client_id: str
    school_id: int
    user_id: UUID
    redirect_uri: str
    scopes: tuple[str, ...]
    code_challenge: str
    nonce: str | None
    resource: str | None
    auth_time: datetime
    expires_at: datetime
    # True when this call redeemed it; False when it had been redeemed before: a replay.
    fresh: bool
    expired: bool
    grant_revoked: bool
    # The user's role at the code's school now (None: no longer a member), read in the same
    # statement: a role lowered between consent and redemption must still bound the grant.
    user_role: str | None = None
    platform_admin: bool = False
    # The client registered itself (RFC 7591) and the code's school has closed registration
    # since: such a grant yields no token (schools.set_open_registration).
    shut_out: bool = False
    # The client's registered scopes now, read in the same statement: a registration narrowed
    # (RFC 7592 PUT) after the grant was made from an older one must still bound it.
    client_scopes: tuple[str, ...] | None = None


def _redemption(r: asyncpg.Record) -> Redemption:
    return Redemption(
        grant_id=r["grant_id"],
        client_id=r["client_id"],
        school_id=r["school_id"],
        user_id=r["user_id"],
        redirect_uri=r["redirect_uri"],
        scopes=tuple(r["scopes"]),
        code_challenge=r["code_challenge"],
        nonce=r["nonce"],
        resource=r["resource"],
        auth_time=r["auth_time"],
        expires_at=r["expires_at"],
        fresh=r["fresh"],
        expired=r["expired"],
        grant_revoked=r["grant_revoked"],
        user_role=r["user_role"],
        platform_admin=r["platform_admin"],
        shut_out=r["shut_out"],
        client_scopes=tuple(r["client_scopes"]) if r["client_scopes"] is not None else None,
    )


# One statement: redeem if unredeemed, else report the row as already redeemed. Under
# concurrency the UPDATE's row lock decides the single winner; the loser's UPDATE re-checks
# `redeemed_at IS NULL` after the winner commits, matches nothing, and falls to the second
# branch, which marks it a replay whatever its (older) snapshot shows.
_REDEEM = """
WITH redeemed AS (
    UPDATE authorization_codes SET redeemed_at = now()
    WHERE code_hash = $1 AND redeemed_at IS NULL
    RETURNING *
), found AS (
    SELECT r.*, true AS fresh FROM redeemed r
    UNION ALL
    SELECT c.*, false AS fresh FROM authorization_codes c
    WHERE c.code_hash = $1 AND NOT EXISTS (SELECT 1 FROM redeemed)
)
SELECT f.grant_id, f.client_id, f.school_id, f.user_id, f.redirect_uri, f.scopes,
       f.code_challenge, f.nonce, f.resource, f.auth_time, f.expires_at, f.fresh,
       f.expires_at <= now() AS expired, g.revoked_at IS NOT NULL AS grant_revoked,
       m.role AS user_role, coalesce(u.is_platform_admin, false) AS platform_admin,
       coalesce(c.created_via = 'registration' AND NOT s.open_registration, false) AS shut_out,
       c.scopes AS client_scopes
FROM found f JOIN grants g ON g.id = f.grant_id
LEFT JOIN school_memberships m ON m.user_id = f.user_id AND m.school_id = f.school_id
LEFT JOIN users u ON u.id = f.user_id
LEFT JOIN clients c ON c.id = f.client_id
LEFT JOIN schools s ON s.id = f.school_id
"""


async def redeem(db: Executor, code_hash: bytes) -> Redemption | None:
    """Mark the code redeemed; None for an unknown code.

    Run it inside the transaction that issues the tokens: if any check on the returned row
    fails, rolling back leaves the code unredeemed for its rightful client.
    """
    row = await db.fetchrow(_REDEEM, code_hash)
    return _redemption(row) if row else None
