"""Grants: one user's consent for one client at one school, the root of every token.

Revoking a grant ends every token that descends from it. The revocation is written to
PostgreSQL, marked in Redis and announced on `connect:revocations`, and every gateway that
answers from memory has applied the announcement (libs/common/leases.py), before the caller
answers: no gateway accepts a token of the grant after the revoke has returned.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING
from uuid import UUID

import redis.asyncio as redis

from libs.common import keys, leases, streams
from libs.common.config import Settings
from libs.common.db import Executor
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
) -> bool:
    """Revoke the grant everywhere; True if this call revoked it, False if it already was."""
    revoked = await revoke_grants(pool, redis_client, settings, [grant_id], reason=reason, ip=ip)
    return bool(revoked)


async def revoke_grants(
    db: Executor,
    redis_client: redis.Redis,
    settings: Settings,
    grant_ids: Sequence[UUID],
    *,
    reason: str,
    ip: str | None = None,
) -> list[store.Grant]:
    """Revoke the grants everywhere: one statement, one round trip for the marks and one for
    the announcements, one wait for the gateways, however many grants. Returns the grants this
    call revoked (not those that already were)."""
    if not grant_ids:
        return []
    revoked = await store.mark_grants_revoked(db, grant_ids, reason)
    # Mark and announce even when PostgreSQL says it was already revoked: a crash between
    # the two writes on an earlier attempt must not leave gateways uninformed.
    ttl = mark_ttl(settings)
    # A mark sits in its school's slot (libs/common/keys.py); grants already revoked are not
    # in `revoked`, and their schools are looked up (none, unless a revoke is retried).
    schools = {grant.id: grant.school_id for grant in revoked}
    if len(schools) < len(set(grant_ids)):
        schools.update(
            await store.schools_of_grants(db, [g for g in grant_ids if g not in schools])
        )
    for _ in range(2):
        marks = redis_client.pipeline(transaction=False)
        for grant_id in grant_ids:
            if grant_id in schools:
                marks.set(keys.revoked_mark(settings, schools[grant_id], grant_id), reason, ex=ttl)
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
    # Appended together: the audit trail sends one turn's records in one round trip.
    await asyncio.gather(
        *(
            audit.append(
                redis_client,
                settings,
                audit.record(
                    "grant.revoked",
                    school_id=grant.school_id,
                    client_id=grant.client_id,
                    subject=str(grant.user_id) if grant.user_id else grant.client_id,
                    grant_id=str(grant.id),
                    ip=ip,
                    reason=reason,
                ),
            )
            for grant in revoked
        )
    )
    return revoked
