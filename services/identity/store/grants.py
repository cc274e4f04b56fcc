"""Grants as the token endpoints read them: the client_credentials standing grant, made on
first use, and a grant's status for the endpoints that take an access token back.

The grant row itself (insert, lookup, revocation) is in the store's package module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

from libs.common.db import Executor

# The live standing grant, touched; or a new one. ON CONFLICT on the partial unique index
# (003_tokens.sql) makes concurrent first requests agree: the loser inserts nothing and
# finds the winner's row on its retry.
_STANDING = """
WITH existing AS (
    UPDATE grants SET last_used_at = now()
    WHERE client_id = $1 AND school_id = $2 AND user_id IS NULL AND revoked_at IS NULL
    RETURNING id, false AS created
), created AS (
    INSERT INTO grants (school_id, client_id, user_id, scopes, last_used_at)
    SELECT $2, $1, NULL, $3, now() WHERE NOT EXISTS (SELECT 1 FROM existing)
    ON CONFLICT (client_id, school_id) WHERE user_id IS NULL AND revoked_at IS NULL
    DO NOTHING
    RETURNING id, true AS created
)
SELECT id, created FROM existing UNION ALL SELECT id, created FROM created
"""


async def standing_grant(
    db: Executor, *, client_id: str, school_id: int, scopes: Sequence[str]
) -> tuple[UUID, bool]:
    """The client's live user-less grant at the school, made on first use; (id, created)."""
    for _ in range(3):
        row = await db.fetchrow(_STANDING, client_id, school_id, list(scopes))
        if row is not None:
            return row["id"], row["created"]
    raise RuntimeError("could not find or create the standing grant")


@dataclass(frozen=True, slots=True)
class GrantStatus:
    school_id: int
    client_id: str
    user_id: UUID | None
    revoked: bool


async def grant_status(db: Executor, grant_id: UUID) -> GrantStatus | None:
    row = await db.fetchrow(
        "SELECT school_id, client_id, user_id, revoked_at IS NOT NULL AS revoked"
        " FROM grants WHERE id = $1",
        grant_id,
    )
    if row is None:
        return None
    return GrantStatus(row["school_id"], row["client_id"], row["user_id"], row["revoked"])
