"""Identity's side of the audit trail: appending its own events to `connect:audit`.

Records are appended, never awaited by anything but Redis: storing them in PostgreSQL is the
audit consumer's job, batched, off the request path.
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from libs.common import streams
from libs.common.config import Settings
from libs.common.logging import get_logger

log = get_logger(__name__)


def record(
    action: str,
    *,
    school_id: int | None = None,
    client_id: str | None = None,
    subject: str | None = None,
    grant_id: str | None = None,
    scope: str | None = None,
    ip: str | None = None,
    method: str | None = None,
    path: str | None = None,
    status: int | None = None,
    **detail: Any,
) -> dict[str, Any]:
    return {
        "occurred_at": time.time(),
        "action": action,
        "school_id": school_id,
        "client_id": client_id,
        "subject": subject,
        "grant_id": grant_id,
        "scope": scope,
        "ip": ip,
        "method": method,
        "path": path,
        "status": status,
        "detail": detail,
    }


async def append(client: redis.Redis, settings: Settings, entry: dict[str, Any]) -> None:
    """Append one record; a Redis hiccup is logged, never turned into a failed request."""
    try:
        await streams.append(client, settings.stream(streams.AUDIT), entry)
    except RedisError:
        log.warning("audit_append_failed", action=entry.get("action"))
