"""SQL of the start-up check that the configured secrets are the database's own
(services/identity/secret_checks.py)."""

from __future__ import annotations

from dataclasses import dataclass

from libs.common.db import Executor


@dataclass(frozen=True, slots=True)
class SealedSample:
    """One signing key that signs or will sign, of those sealed under one key-encryption key."""

    kek_id: str
    # How many current and next keys that key-encryption key sealed.
    keys: int
    kid: str
    private_key_enc: bytes


# A few of the newest current and next keys per key-encryption key (kek_id): a wrong key opens
# none of them, and opening one of each group is as good as opening all, without reading every
# issuer's keys at each start. Retired keys never sign again, so they are not asked.
_SEALED_SAMPLES = """
SELECT g.kek_id, g.keys, s.kid, s.private_key_enc
FROM (SELECT kek_id, count(*) AS keys FROM signing_keys
      WHERE state IN ('current', 'next') GROUP BY kek_id) g
CROSS JOIN LATERAL (
    SELECT kid, private_key_enc FROM signing_keys k
    WHERE k.kek_id = g.kek_id AND k.state IN ('current', 'next')
    ORDER BY k.created_at DESC, k.kid LIMIT $1) s
ORDER BY g.kek_id
"""


async def sealed_samples(db: Executor, per_kek: int) -> list[SealedSample]:
    rows = await db.fetch(_SEALED_SAMPLES, per_kek)
    return [SealedSample(r["kek_id"], r["keys"], r["kid"], r["private_key_enc"]) for r in rows]


async def recorded_check_value(db: Executor, variable: str, check_value: bytes) -> bytes:
    """The check value the database holds for `variable`: `check_value` itself when no process
    recorded one before. Of processes starting at once, the first insert wins and the others
    read it (two statements: the second sees a row committed while the first waited)."""
    await db.execute(
        "INSERT INTO secret_checks (variable, check_value) VALUES ($1, $2)"
        " ON CONFLICT (variable) DO NOTHING",
        variable,
        check_value,
    )
    stored: bytes = await db.fetchval(
        "SELECT check_value FROM secret_checks WHERE variable = $1", variable
    )
    return stored


async def move_check_value(db: Executor, variable: str, old: bytes, new: bytes) -> bool:
    """Record `new` for `variable` if `old` is still what is recorded; whether it was."""
    status = await db.execute(
        "UPDATE secret_checks SET check_value = $3 WHERE variable = $1 AND check_value = $2",
        variable,
        old,
        new,
    )
    return status == "UPDATE 1"
