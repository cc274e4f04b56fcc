"""Grants: one user's consent for one client at one school, the root of every token.

Revoking a grant ends every token that descends from it. The revocation is written to
PostgreSQL, marked in Redis and announced on `connect:revocations`, and every gateway that
answers from memory has applied the announcement (libs/common/leases.py), before the caller
answers: no gateway accepts a token of the grant after the revoke has returned.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from uuid import UUID

import redis.asyncio as redis

from libs.common import leases, streams
from libs.common.config import Settings
from libs.common.db import Executor
from services.identity import audit, store
from services.identity.schools import Issuer

# A gateway asks `EXISTS connect:revoked:<grant id>`; the mark outlives every access token.
REVOKED_KEY = "connect:revoked:"
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
    grant = await store.mark_grant_revoked(pool, grant_id, reason)
    # Mark and announce even when PostgreSQL says it was already revoked: a crash between
    # the two writes on an earlier attempt must not leave gateways uninformed.
    ttl = mark_ttl(settings)
    for _ in range(2):
        await redis_client.set(settings.stream(REVOKED_KEY) + str(grant_id), reason, ex=ttl)
        announced = await streams.append(
            redis_client,
            settings.stream(streams.REVOCATIONS),
            {"grant_id": str(grant_id), "reason": reason, "at": time.time(), "ttl": ttl},
            maxlen=REVOCATIONS_MAXLEN,
        )
        # Gateways answering from their own set under a lease must have heard it first.
        if not await leases.wait_for_gateways(redis_client, settings, announced):
            break
        # Redis lost the leases, and may have lost this mark and announcement with them:
        # written again, and waited for again, before the answer.
    if grant is not None:
        await audit.append(
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
    return grant is not None
