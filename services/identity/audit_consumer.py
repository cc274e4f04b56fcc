"""Stores `connect:audit` in PostgreSQL: one consumer group, batched inserts, at least once.

An entry is a batch of records (the gateway's, one entry per flush) or one record (as identity
wrote its own before they went straight to PostgreSQL); see audit.records_of. The gateway's
batches go to PostgreSQL as the JSON they are, expanded there (store.audit.insert_batches); the
rest, and any batch PostgreSQL will not take as it stands, become rows here, cleaned. Each
row's key, unique in audit_log, is the record's own: `r:<rid>` for the id it was given where it
was made, else `h:<digest of its content>` (record_key); never the entry id, which a Redis
restarted empty hands out again. So an entry delivered twice (a consumer died after inserting,
before acking) is stored once, and no record is ever taken for another. Entries are
acknowledged only after their rows committed (with the next read, in its round trip); entries
a dead consumer left pending are claimed after CLAIM_IDLE_MS.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson
import redis.asyncio as redis
from redis.exceptions import RedisError, ResponseError

from libs.common import streams
from libs.common.config import Settings
from libs.common.logging import get_logger
from services.identity import audit
from services.identity.store import audit as audit_store

log = get_logger(__name__)

GROUP = streams.AUDIT_GROUP
# After a batch smaller than the batch size, wait this long before reading again: under load
# entries trickle in one request at a time, and reading them as they come makes every batch
# (read, insert, ack) carry a handful of records for the fixed cost of three round trips.
# As long as the gateway's flush interval (services/gateway/audit.py FLUSH_INTERVAL, where the
# measurements are): shorter, and a cycle's fixed cost is paid for a gateway flush each; longer,
# and the insert grows into a burst of PostgreSQL's CPU that light API traffic waits behind.
GATHER_DELAY = 0.02
# Entries per read at most (identity's single records), and rows per read aimed at: a read of
# the gateway's batch entries asks for fewer entries, so that memory and one statement's size
# stay bounded even when a backlog of full batches waits.
BATCH = 500
ROWS = 2000
# The most records a batch entry holds (the gateway's audit.BATCH): the first read assumes a
# backlog of full batches, until a read shows what the stream holds.
ENTRY_RECORDS = 200
# Entries another consumer read and left unacknowledged this long are taken over (it died),
# looked for every CLAIM_EVERY seconds.
CLAIM_IDLE_MS = 30_000
CLAIM_EVERY = 5.0
# How often the stream is trimmed to what the group has stored and acknowledged.
TRIM_EVERY = 10.0


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


# What a value PostgreSQL will not store raises: its own refusal (DataError) or asyncpg's
# while encoding the arguments (a client-side DataError, a ValueError).
_REFUSED = (asyncpg.DataError, ValueError)


def to_rows(entry: streams.Entry) -> list[audit_store.AuditRow]:
    """The rows of one entry: one for a single record, one per record of a batch."""
    return [audit.row(record_key(d), d) for d in audit.records_of(entry.data)]


def _rid(record: dict[str, Any]) -> str | None:
    rid = record.get("rid")
    return rid if isinstance(rid, str) and 0 < len(rid) <= 64 else None


def record_key(record: dict[str, Any]) -> str:
    """A record's row key: the id it was given where it was made (the same however often it
    is delivered or sent), else the digest of its content, which is as stable: never its
    stream entry's id, which a Redis restarted empty or whose clock is behind hands out again.
    """
    rid = _rid(record)
    if rid is not None:
        return f"r:{rid}"
    canonical = orjson.dumps(record, option=orjson.OPT_SORT_KEYS, default=str)
    return "h:" + hashlib.sha256(canonical).hexdigest()


async def _store(pool: asyncpg.Pool, rows: list[audit_store.AuditRow]) -> None:
    """The batch in one statement; if PostgreSQL refuses a value in it, row by row, so one
    bad record costs itself (logged and counted) and never the batch around it, which would
    otherwise be claimed and refused again until the stream trims it away."""
    try:
        await audit_store.insert_many(pool, rows)
        return
    except _REFUSED:
        pass
    for row in rows:
        try:
            await audit_store.insert_many(pool, [row])
        except _REFUSED as exc:
            log.error("audit_record_dropped", record_id=row.record_id, reason=type(exc).__name__)


def _passes_whole(entry: streams.Entry) -> bool:
    """Whether PostgreSQL may expand the entry itself (store.audit.insert_batches): a batch
    of records, each an object with its id, as the gateway writes them."""
    batch = entry.data.get(audit.BATCH_MEMBER)
    return (
        bool(entry.payload)
        and isinstance(batch, list)
        and all(isinstance(r, dict) and _rid(r) is not None for r in batch)
    )


async def _store_entries(pool: asyncpg.Pool, entries: list[streams.Entry]) -> int:
    """Store the rows of `entries`; returns how many records they held. The gateway's
    batches go to PostgreSQL as they are; identity's own records, and batches PostgreSQL
    refuses as they stand, become rows here, where their values are cleaned."""
    whole: list[streams.Entry] = []
    by_row: list[streams.Entry] = []
    for e in entries:
        if _poison(e):
            continue  # set aside by the caller (dead_letters), never stored
        (whole if _passes_whole(e) else by_row).append(e)
    if whole:
        try:
            # A payload that is not UTF-8 raises UnicodeDecodeError, a ValueError: refused.
            await audit_store.insert_batches(pool, [e.payload.decode() for e in whole])
        except _REFUSED:
            whole, by_row = [], entries
    rows = [row for e in by_row for row in to_rows(e)]
    await _store(pool, rows)
    return len(rows) + sum(len(e.data[audit.BATCH_MEMBER]) for e in whole)


DEAD_LETTERS = "connect:audit:dead"


def _poison(entry: streams.Entry) -> bool:
    """Data that is not a JSON object (streams reads it as an empty, malformed entry)."""
    return entry.malformed or not isinstance(entry.data, dict)


async def dead_letters(
    client: redis.Redis,
    settings: Settings,
    entries: list[streams.Entry],
    on_dead_letter: Callable[[str], None] | None = None,
) -> None:
    """Entries whose data is not a JSON object hold no record: copied to the dead-letter
    stream (for an operator to look at) and acknowledged with the rest, so one bad entry
    neither stops the consumer nor is read again for ever."""
    for e in entries:
        if not _poison(e):
            continue
        await client.xadd(
            settings.stream(DEAD_LETTERS),
            {b"id": e.id, b"data": e.payload},
            maxlen=streams.DEFAULT_MAXLEN,
            approximate=True,
        )
        log.error("audit_entry_dead_lettered", entry_id=e.id)
        if on_dead_letter is not None:
            on_dead_letter(settings.stream(streams.AUDIT))


async def consume_once(
    pool: asyncpg.Pool,
    client: redis.Redis,
    settings: Settings,
    consumer: str,
    *,
    block_ms: int = 1000,
    claim_idle_ms: int = CLAIM_IDLE_MS,
    batch: int = BATCH,
) -> int:
    """Store one batch (claimed entries first) and acknowledge it; return how many entries
    were handled."""
    stream = settings.stream(streams.AUDIT)
    entries = await streams.claim_stale(
        client, stream, GROUP, consumer, min_idle_ms=claim_idle_ms, count=batch
    )
    if not entries:
        entries = await streams.read_group(
            client, stream, GROUP, consumer, count=batch, block_ms=block_ms
        )
    await dead_letters(client, settings, entries)
    await _store_entries(pool, entries)
    await streams.ack(client, stream, GROUP, [e.id for e in entries])
    return len(entries)


def _next_count(entries: int, rows: int, current: int) -> int:
    """Entries to ask for next: about ROWS rows, judged by the rows per entry just read."""
    if entries == 0:
        return current
    return max(1, min(BATCH, ROWS * entries // max(rows, 1)))


async def run(
    pool: asyncpg.Pool,
    client: redis.Redis,
    settings: Settings,
    stop: asyncio.Event,
    *,
    on_dead_letter: Callable[[str], None] | None = None,
    ran_cleanly: Callable[[], None] | None = None,
) -> None:
    """Consume until `stop` is set; transient store failures back off and retry.

    Under load the consumer makes a cycle per gateway flush, and a cycle's round trips are a
    fixed cost paid each time: a read's entries are acknowledged with the next read, in its
    round trip, and entries other consumers left pending are looked for every CLAIM_EVERY
    seconds, not every cycle.

    Shutdown is by event, not cancellation: a cancel can land inside redis-py's blocking
    XREADGROUP and be lost, while a set event is seen within one block period.
    """
    consumer = consumer_name()
    stream = settings.stream(streams.AUDIT)
    grouped = False
    delay = 0.5
    loop = asyncio.get_running_loop()
    next_trim = next_claim = loop.time()
    count = max(1, ROWS // ENTRY_RECORDS)
    stored: list[str] = []  # committed, not yet acknowledged
    try:
        while not stop.is_set():
            try:
                if not grouped:
                    # In the loop, not before it: a Redis not there yet (or READONLY after a
                    # failover) is retried like any other failure.
                    await streams.ensure_group(client, stream, GROUP)
                    grouped = True
                asked = count
                entries: list[streams.Entry] = []
                if loop.time() >= next_claim:
                    if stored:
                        # Acknowledged first: left pending, our own stored entries would be
                        # claimed back once idle as long as CLAIM_IDLE_MS, stored again, and
                        # their acknowledgement (riding on a read) put off for another cycle.
                        await streams.ack(client, stream, GROUP, stored)
                        stored = []
                    entries = await streams.claim_stale(
                        client, stream, GROUP, consumer, min_idle_ms=CLAIM_IDLE_MS, count=asked
                    )
                    if len(entries) < asked:
                        next_claim = loop.time() + CLAIM_EVERY
                if not entries:
                    entries = await streams.read_group(
                        client, stream, GROUP, consumer, count=asked, block_ms=1000, ack=stored
                    )
                    stored = []
                await dead_letters(client, settings, entries, on_dead_letter)
                rows = await _store_entries(pool, entries)
                stored.extend(e.id for e in entries)
                if ran_cleanly is not None:
                    ran_cleanly()
                count = _next_count(len(entries), rows, count)
                delay = 0.5
                if loop.time() >= next_trim:
                    next_trim = loop.time() + TRIM_EVERY
                    await streams.trim_consumed(client, stream)
                if 0 < len(entries) < asked:
                    await asyncio.sleep(GATHER_DELAY)
            except ResponseError as exc:
                # The stream was deleted under us (an operator, a test's cleanup): start
                # afresh; what was stored and not acknowledged went with it.
                if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                    raise
                stored = []
                grouped = False
            except (OSError, RedisError, asyncpg.PostgresError):
                log.warning("audit_consume_failed", exc_info=True)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 10)
    finally:
        if stored:
            # Left unacknowledged they would be claimed and stored again (harmlessly: rows are
            # keyed) by the next consumer; acknowledging now spares it that.
            with contextlib.suppress(OSError, RedisError):
                await streams.ack(client, stream, GROUP, stored)
