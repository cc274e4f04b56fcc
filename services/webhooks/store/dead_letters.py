"""Stream entries set aside (`webhooks.dead_letters`): what no consumer can handle, kept for
an operator to look at, and purged with the delivery log."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from libs.common.db import Executor


@dataclass(frozen=True, slots=True)
class DeadLetter:
    stream: str
    entry_id: str
    # Why it was set aside, in our words (never the payload, nor a message quoting it).
    reason: str
    payload: bytes


async def record(db: Executor, letters: Sequence[DeadLetter]) -> None:
    if not letters:
        return
    await db.execute(
        """
        INSERT INTO webhooks.dead_letters (stream, entry_id, reason, payload)
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[])
        ON CONFLICT ON CONSTRAINT dead_letters_once DO NOTHING
        """,
        [d.stream for d in letters],
        [d.entry_id for d in letters],
        [d.reason for d in letters],
        [d.payload for d in letters],
    )


async def purge(db: Executor, *, older_than_seconds: float) -> int:
    deleted = await db.execute(
        "DELETE FROM webhooks.dead_letters"
        " WHERE received_at < now() - $1::float8 * interval '1 second'",
        older_than_seconds,
    )
    return int(deleted.split()[-1])
