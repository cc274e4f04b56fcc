"""SQL of the revocation-mark re-assertion (services/identity/revocation_marks.py): the grants
whose Redis marks must still exist, read in pages so no statement grows with a backlog."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from uuid import UUID

from libs.common.db import Executor

# The first page starts before every real revocation.
START: tuple[datetime, UUID] = (datetime(1970, 1, 1, tzinfo=UTC), UUID(int=0))


@dataclass(frozen=True, slots=True)
class RecentRevocation:
    grant_id: UUID
    school_id: int
    reason: str
    revoked_at: datetime
    # Seconds the mark has left, counted from the revoke as grants.revoke_grant counts them,
    # so a restored mark expires when the original would have.
    ttl_left: int


# Keyset pagination on (revoked_at, id): the grants_revoked partial index (004_sweep.sql) serves
# the range, and a revoke committed between two pages can only land after the cursor (its
# revoked_at is later), so no page is skipped. The remaining life uses PostgreSQL's clock, the
# same one that wrote revoked_at.
_PAGE = """
SELECT id, school_id, coalesce(revoked_reason, 'revoked') AS reason, revoked_at,
       ceil(extract(epoch FROM revoked_at + make_interval(secs => $1) - now()))::int AS ttl_left
FROM grants
WHERE revoked_at IS NOT NULL
  AND revoked_at > now() - make_interval(secs => $1)
  AND (revoked_at, id) > ($2, $3)
ORDER BY revoked_at, id
LIMIT $4
"""


async def revoked_since(
    db: Executor, *, window_seconds: int, after: tuple[datetime, UUID], limit: int
) -> list[RecentRevocation]:
    """Grants revoked within the last `window_seconds`, oldest first, after the cursor."""
    rows = await db.fetch(_PAGE, window_seconds, after[0], after[1], limit)
    return [
        RecentRevocation(
            r["id"], r["school_id"], r["reason"], r["revoked_at"], max(1, int(r["ttl_left"]))
        )
        for r in rows
    ]
