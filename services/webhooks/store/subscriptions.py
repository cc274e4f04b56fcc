"""A client's subscriptions (`webhooks.subscriptions`): the row every other module reads, and
what the owning client does to it through `/api/v1/webhooks` (create, list, change, delete,
rotate its signing secret). Every lookup is keyed by school and client.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from libs.common.db import Executor


@dataclass(frozen=True, slots=True)
class Subscription:
    id: UUID
    school_id: int
    client_id: str
    grant_id: UUID
    subject: str | None
    url: str
    event_types: list[str]
    description: str
    disabled_at: datetime | None
    disabled_reason: str | None
    failing_since: datetime | None
    previous_secret_expires_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @property
    def active(self) -> bool:
        return self.disabled_at is None


SUBSCRIPTION_COLUMNS = """
    id, school_id, client_id, grant_id, subject, url, event_types, description, disabled_at,
    disabled_reason, failing_since,
    CASE WHEN previous_secret_expires_at > now() THEN previous_secret_expires_at END
        AS previous_secret_expires_at,
    created_at, updated_at
"""


def subscription_from_row(row: asyncpg.Record) -> Subscription:
    return Subscription(
        id=row["id"],
        school_id=row["school_id"],
        client_id=row["client_id"],
        grant_id=row["grant_id"],
        subject=row["subject"],
        url=row["url"],
        event_types=list(row["event_types"]),
        description=row["description"],
        disabled_at=row["disabled_at"],
        disabled_reason=row["disabled_reason"],
        failing_since=row["failing_since"],
        previous_secret_expires_at=row["previous_secret_expires_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


async def count_subscriptions(db: Executor, school_id: int, client_id: str) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM webhooks.subscriptions WHERE school_id = $1 AND client_id = $2",
            school_id,
            client_id,
        )
    )


async def insert_subscription(
    db: Executor,
    *,
    id: UUID,
    school_id: int,
    client_id: str,
    grant_id: UUID,
    subject: str | None,
    url: str,
    event_types: Sequence[str],
    description: str,
    secret_enc: bytes,
    kek_id: str,
) -> Subscription:
    row = await db.fetchrow(
        f"""
        INSERT INTO webhooks.subscriptions
            (id, school_id, client_id, grant_id, subject, url, event_types, description,
             secret_enc, kek_id)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
        RETURNING {SUBSCRIPTION_COLUMNS}
        """,  # noqa: S608
        id,
        school_id,
        client_id,
        grant_id,
        subject,
        url,
        list(event_types),
        description,
        secret_enc,
        kek_id,
    )
    assert row is not None
    return subscription_from_row(row)


async def list_subscriptions(
    db: Executor,
    school_id: int,
    client_id: str,
    *,
    after: tuple[datetime, UUID] | None,
    limit: int,
) -> list[Subscription]:
    rows = await db.fetch(
        f"""
        SELECT {SUBSCRIPTION_COLUMNS} FROM webhooks.subscriptions
        WHERE school_id = $1 AND client_id = $2
          AND ($3::timestamptz IS NULL OR (created_at, id) > ($3, $4::uuid))
        ORDER BY created_at, id
        LIMIT $5
        """,  # noqa: S608
        school_id,
        client_id,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )
    return [subscription_from_row(r) for r in rows]


async def get_subscription(
    db: Executor, subscription_id: UUID, school_id: int, client_id: str
) -> Subscription | None:
    row = await db.fetchrow(
        f"""
        SELECT {SUBSCRIPTION_COLUMNS} FROM webhooks.subscriptions
        WHERE id = $1 AND school_id = $2 AND client_id = $3
        """,  # noqa: S608
        subscription_id,
        school_id,
        client_id,
    )
    return subscription_from_row(row) if row else None


async def update_subscription(
    db: Executor,
    subscription_id: UUID,
    school_id: int,
    client_id: str,
    *,
    grant_id: UUID,
    subject: str | None,
    url: str | None,
    event_types: Sequence[str] | None,
    description: str | None,
    disabled: bool | None,
) -> Subscription | None:
    """Change what was given (None keeps a field); the caller's grant becomes the
    subscription's, since what it delivers must stay within what that grant authorizes."""
    row = await db.fetchrow(
        f"""
        UPDATE webhooks.subscriptions SET
            grant_id = $4,
            subject = $5,
            url = coalesce($6, url),
            event_types = coalesce($7, event_types),
            description = coalesce($8, description),
            -- What the school's admin switched off, only the admin switches on again.
            disabled_at = CASE WHEN $9::boolean IS NULL THEN disabled_at
                               WHEN $9 THEN coalesce(disabled_at, now())
                               WHEN disabled_reason = 'admin' THEN disabled_at END,
            disabled_reason = CASE WHEN $9::boolean IS NULL THEN disabled_reason
                                   WHEN $9 THEN coalesce(disabled_reason, 'client')
                                   WHEN disabled_reason = 'admin' THEN disabled_reason END,
            failing_since = CASE WHEN $9 IS FALSE THEN NULL ELSE failing_since END,
            disabled_announced_at = CASE WHEN $9 IS FALSE THEN NULL
                                         ELSE disabled_announced_at END,
            updated_at = now()
        WHERE id = $1 AND school_id = $2 AND client_id = $3
        RETURNING {SUBSCRIPTION_COLUMNS}
        """,  # noqa: S608
        subscription_id,
        school_id,
        client_id,
        grant_id,
        subject,
        url,
        list(event_types) if event_types is not None else None,
        description,
        disabled,
    )
    return subscription_from_row(row) if row else None


async def delete_subscription(
    db: Executor, subscription_id: UUID, school_id: int, client_id: str
) -> bool:
    deleted = await db.fetchval(
        """
        DELETE FROM webhooks.subscriptions WHERE id = $1 AND school_id = $2 AND client_id = $3
        RETURNING id
        """,
        subscription_id,
        school_id,
        client_id,
    )
    return deleted is not None


async def rotate_secret(
    db: Executor,
    subscription_id: UUID,
    school_id: int,
    client_id: str,
    *,
    secret_enc: bytes,
    kek_id: str,
    overlap_seconds: float,
) -> Subscription | None:
    """The current secret becomes the previous one, honoured for `overlap_seconds` more."""
    row = await db.fetchrow(
        f"""
        UPDATE webhooks.subscriptions SET
            previous_secret_enc = CASE WHEN $6 > 0 THEN secret_enc END,
            previous_secret_expires_at =
                CASE WHEN $6 > 0 THEN now() + $6::float8 * interval '1 second' END,
            secret_enc = $4,
            kek_id = $5,
            updated_at = now()
        WHERE id = $1 AND school_id = $2 AND client_id = $3
        RETURNING {SUBSCRIPTION_COLUMNS}
        """,  # noqa: S608
        subscription_id,
        school_id,
        client_id,
        secret_enc,
        kek_id,
        overlap_seconds,
    )
    return subscription_from_row(row) if row else None


@dataclass(frozen=True, slots=True)
class SealedSecrets:
    """A subscription's signing secrets as sealed: what a rewrap re-seals."""

    id: UUID
    secret_enc: bytes
    previous_secret_enc: bytes | None
    kek_id: str


async def sealed_secrets(db: Executor, after: UUID | None, limit: int) -> list[SealedSecrets]:
    """The next `limit` subscriptions by id after `after`, disabled ones included (re-enabling
    one signs with its secret again)."""
    rows = await db.fetch(
        "SELECT id, secret_enc, previous_secret_enc, kek_id FROM webhooks.subscriptions"
        " WHERE $1::uuid IS NULL OR id > $1 ORDER BY id LIMIT $2",
        after,
        limit,
    )
    return [
        SealedSecrets(r["id"], r["secret_enc"], r["previous_secret_enc"], r["kek_id"]) for r in rows
    ]


async def reseal_secrets(
    db: Executor,
    before: SealedSecrets,
    *,
    secret_enc: bytes,
    previous_secret_enc: bytes | None,
    kek_id: str,
) -> bool:
    """Replace a subscription's sealed secrets if both are still as read (compare and set: a
    rotation of the secret in between wins, and the next rewrap takes its values); whether
    they were."""
    status = await db.execute(
        "UPDATE webhooks.subscriptions SET secret_enc = $4, previous_secret_enc = $5,"
        " kek_id = $6 WHERE id = $1 AND secret_enc = $2"
        " AND previous_secret_enc IS NOT DISTINCT FROM $3",
        before.id,
        before.secret_enc,
        before.previous_secret_enc,
        secret_enc,
        previous_secret_enc,
        kek_id,
    )
    return status == "UPDATE 1"
