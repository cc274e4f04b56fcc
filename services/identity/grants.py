"""Grants: one user's consent for one client at one school, the root of every token.

Revoking a grant ends every token that descends from it. The revocation is written to
PostgreSQL, marked in Redis and announced on `connect:revocations`, and every gateway that
answers from memory has applied the announcement (libs/common/leases.py), before the caller
answers: no gateway accepts a token of the grant after the revoke has returned.

The two halves are ordered: PostgreSQL's (`record_revocations`: the grants marked revoked and
their audit records, in the caller's transaction) commits first; only then are they marked
and announced (`announce_revocations`). Announcing inside a transaction that could still roll
back told gateways and webhooks of revocations that then never happened (a deleted app's
grants revoked one by one, the k+1th failing: subscriptions disabled for good, the audit
saying "grant.revoked", PostgreSQL saying live). A crash between the commit and the
announcement leaves the grants revoked in PostgreSQL and unmarked in Redis for at most one
pass of identity's revocation marks (revocation_marks.py), which restores the marks of every
recent revoke; a client deleted with its grants is refused by gateways for being gone.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from uuid import UUID

import asyncpg
import redis.asyncio as redis

from libs.common import keys, leases, streams
from libs.common import scopes as catalogue
from libs.common.config import Settings
from libs.common.db import Connection, Executor
from services.identity import audit, store

if TYPE_CHECKING:
    # Only for annotations: schools.py sets a school's registration, which revokes grants.
    from services.identity.schools import Issuer

# Announcements kept on connect:revocations; a gateway whose unread entries were trimmed away
# registers again from the marks (libs/common/leases.py).
REVOCATIONS_MAXLEN = 50_000


def mark_ttl(settings: Settings) -> int:
    """How long a revocation mark lives after the revoke: past the expiry of every access
    token the grant could have (revocation_marks.py restores marks with what is left of it)."""
    return settings.tokens.access_token_ttl + 300


def issued_by(iss: Issuer, client: store.Client, grant_school_id: int) -> bool:
    """Whether `iss` issued the tokens of a grant of `client` at school `grant_school_id`: a
    platform client's grants are the platform's, whichever school the user picked; a school
    client's are its school's. Introspection and revocation at one issuer answer for its own
    tokens only."""
    if iss.school is None:
        return client.is_platform
    return client.school_id == iss.school.id == grant_school_id


def within_registration(granted: Iterable[str], registered: Iterable[str]) -> bool:
    """True when a client registered for `registered` may still hold every granted scope."""
    effective = catalogue.expand(registered)
    return all(s in catalogue.IDENTITY_SCOPES or s in effective for s in granted)


async def create_grant(
    db: Executor,
    *,
    school_id: int,
    client_id: str,
    user_id: UUID | None,
    scopes: Sequence[str],
) -> store.Grant:
    return await store.insert_grant(
        db, school_id=school_id, client_id=client_id, user_id=user_id, scopes=scopes
    )


async def revoke_grant(
    pool: Executor,
    redis_client: redis.Redis,
    settings: Settings,
    grant_id: UUID,
    *,
    reason: str,
    ip: str | None = None,
    records: Sequence[dict[str, Any]] = (),
) -> bool:
    """Revoke the grant everywhere; True if this call revoked it, False if it already was.
    `records`: audit records of what revoked it, committed with the revocation."""
    revoked = await revoke_grants(
        pool, redis_client, settings, [grant_id], reason=reason, ip=ip, records=records
    )
    return bool(revoked)


async def revoke_grants(
    pool: Executor,
    redis_client: redis.Redis,
    settings: Settings,
    grant_ids: Sequence[UUID],
    *,
    reason: str,
    ip: str | None = None,
    records: Sequence[dict[str, Any]] = (),
) -> list[store.Grant]:
    """Revoke the grants everywhere: committed in PostgreSQL, then one round trip for the
    marks and one for the announcements, one wait for the gateways, however many grants.
    Returns the grants this call revoked (not those that already were). `records` (audit
    records of the request that revoked them: a token revoked, a reuse detected) commit with
    the revocations, whether or not a grant was still live.

    Never inside a transaction of the caller's (it would announce before that commits):
    there, `record_revocations` in it and `announce_revocations` after it."""
    if not grant_ids:
        return []
    if not isinstance(pool, asyncpg.Pool):
        if pool.is_in_transaction():
            raise RuntimeError(
                "revoke_grants inside a transaction would announce before it commits"
            )
        async with pool.transaction():
            revoked = await record_revocations(pool, grant_ids, reason=reason, ip=ip)
            await audit.write_many(pool, list(records))
    else:
        async with pool.acquire() as conn, conn.transaction():
            revoked = await record_revocations(conn, grant_ids, reason=reason, ip=ip)
            await audit.write_many(conn, list(records))
    # Grants already revoked are not in `revoked`: their schools are looked up (none, unless
    # a revoke is retried after a crash between the halves).
    schools = {grant.id: grant.school_id for grant in revoked}
    missing = [g for g in grant_ids if g not in schools]
    if missing:
        schools.update(await store.schools_of_grants(pool, missing))
    await announce_revocations(redis_client, settings, schools, reason=reason)
    return revoked


async def record_revocations(
    conn: Connection, grant_ids: Sequence[UUID], *, reason: str, ip: str | None = None
) -> list[store.Grant]:
    """PostgreSQL's half, in the caller's transaction: the grants marked revoked, one
    statement, and a `grant.revoked` record of each, committed with them. Announce them
    (`announce_revocations`) once the transaction has committed."""
    if not grant_ids:
        return []
    revoked = await store.mark_grants_revoked(conn, grant_ids, reason)
    await audit.write_many(
        conn,
        [
            audit.record(
                "grant.revoked",
                school_id=grant.school_id,
                client_id=grant.client_id,
                subject=str(grant.user_id) if grant.user_id else grant.client_id,
                grant_id=str(grant.id),
                ip=ip,
                reason=reason,
            )
            for grant in revoked
        ],
    )
    return revoked


async def announce_revocations(
    redis_client: redis.Redis, settings: Settings, grants: Mapping[UUID, int], *, reason: str
) -> None:
    """Redis's half, after the commit: mark the grants (`grants`: each grant's school, whose
    slot its mark sits in, libs/common/keys.py), announce them on connect:revocations, and
    wait until every gateway answering from memory applied them. The schools are taken before
    the commit by the caller: a deleted client's grants are gone from PostgreSQL after it."""
    if not grants:
        return
    grant_ids = list(grants)
    # Marked and announced even when PostgreSQL says they were already revoked: a crash
    # between the two halves on an earlier attempt must not leave gateways uninformed.
    ttl = mark_ttl(settings)
    for _ in range(2):
        marks = redis_client.pipeline(transaction=False)
        for grant_id in grant_ids:
            marks.set(keys.revoked_mark(settings, grants[grant_id], grant_id), reason, ex=ttl)
        await marks.execute()
        at = time.time()
        announced = await streams.append_many(
            redis_client,
            settings.stream(streams.REVOCATIONS),
            [
                {"grant_id": str(grant_id), "reason": reason, "at": at, "ttl": ttl}
                for grant_id in grant_ids
            ],
            maxlen=REVOCATIONS_MAXLEN,
        )
        # Gateways answering from their own set under a lease must have heard them first;
        # they apply the stream in order, so hearing the last is hearing them all.
        if not await leases.wait_for_gateways(redis_client, settings, announced[-1]):
            break
        # Redis lost the leases, and may have lost these marks and announcements with them:
        # written again, and waited for again, before the answer.
