"""SQL of the start-up check that KEY_ENCRYPTION_KEY is the database's own
(services/webhooks/secret_checks.py)."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from libs.common.db import Executor


@dataclass(frozen=True, slots=True)
class SealedSecret:
    """One subscription's signing secret, of those sealed under one key-encryption key."""

    kek_id: str
    # How many subscriptions that key-encryption key sealed.
    subscriptions: int
    subscription_id: UUID
    secret_enc: bytes


# A few of the newest secrets per key-encryption key (kek_id): a wrong key opens none of them,
# and opening one of a group is as good as opening all, without reading every subscription at
# each start. Disabled subscriptions count too: re-enabling one signs with its secret again.
_SEALED_SAMPLES = """
SELECT g.kek_id, g.subscriptions, s.id, s.secret_enc
FROM (SELECT kek_id, count(*) AS subscriptions FROM webhooks.subscriptions
      GROUP BY kek_id) g
CROSS JOIN LATERAL (
    SELECT id, secret_enc FROM webhooks.subscriptions w
    WHERE w.kek_id = g.kek_id
    ORDER BY w.created_at DESC, w.id LIMIT $1) s
ORDER BY g.kek_id
"""


async def sealed_samples(db: Executor, per_kek: int) -> list[SealedSecret]:
    rows = await db.fetch(_SEALED_SAMPLES, per_kek)
    return [SealedSecret(r["kek_id"], r["subscriptions"], r["id"], r["secret_enc"]) for r in rows]


async def recorded_check_value(db: Executor, variable: str) -> bytes | None:
    """The check value identity recorded for `variable` (identity owns the row: webhooks only
    reads it), or None before identity first started on this database."""
    value: bytes | None = await db.fetchval(
        "SELECT check_value FROM secret_checks WHERE variable = $1", variable
    )
    return value
