"""Each issuer's signing keys: published, current, retiring, and the rotation's lock."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from libs.common.db import Connection, Executor


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    school_id: int | None
    alg: str
    state: str
    public_jwk: dict[str, Any]
    private_key_enc: bytes
    kek_id: str
    created_at: datetime
    activated_at: datetime | None
    retired_at: datetime | None
    expires_at: datetime | None


def _key(r: asyncpg.Record) -> SigningKey:
    return SigningKey(
        r["kid"],
        r["school_id"],
        r["alg"],
        r["state"],
        r["public_jwk"],
        r["private_key_enc"],
        r["kek_id"],
        r["created_at"],
        r["activated_at"],
        r["retired_at"],
        r["expires_at"],
    )


async def keys_of_issuer(db: Executor, school_id: int | None) -> list[SigningKey]:
    rows = await db.fetch(
        "SELECT * FROM signing_keys WHERE school_id IS NOT DISTINCT FROM $1"
        " AND (state <> 'retired' OR expires_at > now())"
        " ORDER BY alg, CASE state WHEN 'current' THEN 0 WHEN 'next' THEN 1 ELSE 2 END,"
        " created_at DESC",
        school_id,
    )
    return [_key(r) for r in rows]


async def key_by_kid(db: Executor, kid: str) -> SigningKey | None:
    row = await db.fetchrow("SELECT * FROM signing_keys WHERE kid = $1", kid)
    return _key(row) if row else None


async def insert_key(
    db: Executor,
    *,
    kid: str,
    school_id: int | None,
    alg: str,
    state: str,
    public_jwk: dict[str, Any],
    private_key_enc: bytes,
    kek_id: str,
) -> SigningKey:
    row = await db.fetchrow(
        "INSERT INTO signing_keys (kid, school_id, alg, state, public_jwk, private_key_enc,"
        " kek_id, activated_at) VALUES ($1, $2, $3, $4, $5, $6, $7,"
        " CASE WHEN $4 = 'current' THEN now() END) RETURNING *",
        kid,
        school_id,
        alg,
        state,
        public_jwk,
        private_key_enc,
        kek_id,
    )
    assert row is not None
    return _key(row)


async def retire_key(db: Executor, kid: str, keep_seconds: int) -> None:
    await db.execute(
        "UPDATE signing_keys SET state = 'retired', retired_at = now(),"
        " expires_at = now() + make_interval(secs => $2) WHERE kid = $1",
        kid,
        keep_seconds,
    )


async def promote_key(db: Executor, kid: str) -> None:
    await db.execute(
        "UPDATE signing_keys SET state = 'current', activated_at = now() WHERE kid = $1", kid
    )


async def lock_issuer_keys(db: Connection, school_id: int | None) -> None:
    """Serialise key changes of one issuer across processes for the current transaction."""
    await db.execute("SELECT pg_advisory_xact_lock(hashtext('signing_keys'), $1)", school_id or 0)


async def issuers_due_for_rotation(db: Executor, older_than_seconds: int) -> list[int | None]:
    rows = await db.fetch(
        "SELECT DISTINCT school_id FROM signing_keys WHERE state = 'current'"
        " AND activated_at < now() - make_interval(secs => $1)",
        older_than_seconds,
    )
    return [r["school_id"] for r in rows]


@dataclass(frozen=True, slots=True)
class SealedPrivateKey:
    kid: str
    private_key_enc: bytes
    kek_id: str


async def sealed_private_keys(db: Executor) -> list[SealedPrivateKey]:
    """Every issuer's private keys as sealed, retired ones included: what a rewrap re-seals.
    Issuers hold a handful each, so all of them at once is a few thousand rows at most."""
    rows = await db.fetch("SELECT kid, private_key_enc, kek_id FROM signing_keys ORDER BY kid")
    return [SealedPrivateKey(r["kid"], r["private_key_enc"], r["kek_id"]) for r in rows]


async def reseal_private_key(
    db: Executor, kid: str, *, old: bytes, new: bytes, kek_id: str
) -> bool:
    """Replace a key's sealed value if it is still `old` (compare and set); whether it was."""
    status = await db.execute(
        "UPDATE signing_keys SET private_key_enc = $3, kek_id = $4"
        " WHERE kid = $1 AND private_key_enc = $2",
        kid,
        old,
        new,
        kek_id,
    )
    return status == "UPDATE 1"


async def oldest_current_activation(db: Executor) -> datetime | None:
    """When the longest-serving current key of any issuer became current (the key age metric)."""
    value: datetime | None = await db.fetchval(
        "SELECT min(activated_at) FROM signing_keys WHERE state = 'current'"
    )
    return value
