"""SQL for dynamic client registration management (RFC 7592): locking a client, its grants."""

from __future__ import annotations

from libs.common.db import Connection, Executor
from services.identity.store.grants import Grant, _grant


async def lock_client(db: Connection, client_id: str) -> bool:
    """Lock the client's row for the current transaction; False when it no longer exists.

    Creating a grant takes a key-share lock on its client (the foreign key), so while this
    lock is held no new grant of the client can appear behind the caller's back.
    """
    found = await db.fetchval("SELECT 1 FROM clients WHERE id = $1 FOR UPDATE", client_id)
    return found is not None


async def active_grants_of_client(db: Executor, client_id: str) -> list[Grant]:
    rows = await db.fetch(
        "SELECT * FROM grants WHERE client_id = $1 AND revoked_at IS NULL ORDER BY created_at",
        client_id,
    )
    return [_grant(r) for r in rows]
