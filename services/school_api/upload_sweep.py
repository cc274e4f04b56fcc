"""The sweep of uploads never PUT or never confirmed: their bytes deleted, their rows expired."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import timedelta
from uuid import UUID

import asyncpg

from libs.common.logging import get_logger
from services.school_api import store, uploads
from services.school_api.objectstore import ObjectStore

log = get_logger(__name__)

# Bytes PUT just before the URL expired may still be confirmed for this long after it.
CONFIRM_GRACE = timedelta(minutes=15)


async def sweep_once(
    pool: asyncpg.Pool, objects: ObjectStore, *, grace: timedelta = CONFIRM_GRACE
) -> int:
    """Expire every upload pending `grace` past its URL's expiry; how many were expired."""

    async def delete_bytes(school_id: int, upload_id: UUID) -> None:
        await objects.delete(uploads.object_key(school_id, upload_id))

    total = 0
    while swept := await store.sweep_uploads(pool, grace, delete_bytes):
        total += swept
    if total:
        log.info("uploads_expired", count=total)
    return total


async def run(
    pool: asyncpg.Pool,
    objects: ObjectStore,
    interval: float,
    stop: asyncio.Event,
    on_progress: Callable[[], None],
) -> None:
    """Sweep every `interval` seconds until `stop` (supervised: an error restarts it). The
    first pass waits an interval too: nothing is urgent at start, when the relay and the
    first requests want the pool."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
        if stop.is_set():
            return
        await sweep_once(pool, objects)
        on_progress()
