"""Identity's side of the audit trail: appending its own events to `connect:audit`.

Records are appended, never awaited by anything but Redis: storing them in PostgreSQL is the
audit consumer's job, batched, off the request path.

Appends made in the same event-loop turn share one pipelined round trip: a single XADD through
redis-py costs about as much CPU as signing the token it records. Each caller still waits until
its own record is in Redis, so a response is never sent before its audit record is stored.

Two shapes of entry share the stream: a record itself (identity's appends, one entry each), and
a batch, `{"records": [record, ...]}` (the gateway's, one entry per flush). `records_of` reads
both; a record never has a `records` member, so the shapes cannot be confused.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from libs.common import streams
from libs.common.config import Settings
from libs.common.logging import get_logger

log = get_logger(__name__)

BATCH_MEMBER = "records"


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


def records_of(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of one `connect:audit` entry's data, in order (one for a single record)."""
    batch = data.get(BATCH_MEMBER)
    if batch is None:
        return [data]
    # A malformed member must not stall the consumer: what is not a record is left out.
    return [r for r in batch if isinstance(r, dict)] if isinstance(batch, list) else []


class _Batch:
    """The records waiting for the next pipelined XADD to one stream of one client."""

    def __init__(self, client: redis.Redis, stream: str) -> None:
        self._client = client
        self._stream = stream
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def add(self, entry: dict[str, Any]) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((entry, done))
        if self._flusher is None:
            # Started now, run next turn: every append of this turn is in the pipeline.
            self._flusher = asyncio.create_task(self._flush())
        # Shielded: a cancelled request must not cancel the flush its neighbours wait on.
        await asyncio.shield(done)

    async def _flush(self) -> None:
        try:
            while self._pending:
                taken, self._pending = self._pending, []
                try:
                    await streams.append_many(self._client, self._stream, [e for e, _ in taken])
                except BaseException as exc:
                    failure = exc if isinstance(exc, Exception) else RedisError("flush stopped")
                    for _, done in taken:
                        if not done.done():
                            done.set_exception(failure)
                    if not isinstance(exc, Exception):
                        raise
                else:
                    for _, done in taken:
                        if not done.done():
                            done.set_result(None)
        finally:
            self._flusher = None
            # Cancelled with records still queued (shutdown): fail them, never leave a waiter.
            for _, done in self._pending:
                if not done.done():
                    done.set_exception(RedisError("the audit flush was stopped"))
            self._pending = []


_batches: weakref.WeakKeyDictionary[redis.Redis, dict[str, _Batch]] = weakref.WeakKeyDictionary()


async def append(client: redis.Redis, settings: Settings, entry: dict[str, Any]) -> None:
    """Append one record; a Redis hiccup is logged, never turned into a failed request."""
    stream = settings.stream(streams.AUDIT)
    per_client = _batches.get(client)
    if per_client is None:
        per_client = _batches[client] = {}
    batch = per_client.get(stream)
    if batch is None:
        batch = per_client[stream] = _Batch(client, stream)
    try:
        await batch.add(entry)
    except RedisError:
        log.warning("audit_append_failed", action=entry.get("action"))
