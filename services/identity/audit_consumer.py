"""Stores `connect:audit` in PostgreSQL: one consumer group, batched inserts, at least once.

An entry is one record (identity's own appends) or a batch of records (the gateway's, one
entry per flush; see audit.records_of). The gateway's batches go to PostgreSQL as the JSON
they are, expanded there (store.audit.insert_batches); the rest, and any batch PostgreSQL will
not take as it stands, become rows here, cleaned. Each row's key, unique in audit_log, is
`r:<id>` for a record the gateway gave an id, else the entry id for a single record and
`<entry id>:<index>` for the records of a batch: derived from the entry alone, so an entry
delivered twice (a consumer died after inserting, before acking) is stored once. Entries are
acknowledged only after their rows committed (with the next read, in its round trip); entries
a dead consumer left pending are claimed after CLAIM_IDLE_MS.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import os
import socket
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg
import redis.asyncio as redis
from redis.exceptions import RedisError, ResponseError

from libs.common import streams
from libs.common.config import Settings
from libs.common.logging import get_logger
from services.identity import audit
from services.identity.store import audit as audit_store

log = get_logger(__name__)

GROUP = "identity-audit"
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


# Parsing an address or a UUID is a third of the Python work per record, and the records of a
# busy client repeat the same few of each: parsed once, looked up after.
@functools.lru_cache(maxsize=4096)
def _parse_uuid(text: str) -> UUID | None:
    try:
        return UUID(text)
    except ValueError:
        return None


@functools.lru_cache(maxsize=4096)
def _parse_ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _uuid(value: Any) -> UUID | None:
    return _parse_uuid(str(value)) if value else None


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _text(value: Any) -> str | None:
    """A value PostgreSQL's text and jsonb take: NUL is the one character both refuse, and a
    caller controls some of these fields (a request path can carry `%00`)."""
    if value is None:
        return None
    return str(value).replace("\x00", "\ufffd")


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_clean(str(k)): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _ip(value: Any) -> str | None:
    return _parse_ip(str(value)) if value else None


# What a value PostgreSQL will not store raises: its own refusal (DataError) or asyncpg's
# while encoding the arguments (a client-side DataError, a ValueError).
_REFUSED = (asyncpg.DataError, ValueError)


def to_rows(entry: streams.Entry) -> list[audit_store.AuditRow]:
    """The rows of one entry: one for a single record, one per record of a batch."""
    if audit.BATCH_MEMBER not in entry.data:
        return [_row(entry.id, entry.data)]
    return [_row(_key(entry.id, i, d), d) for i, d in enumerate(audit.records_of(entry.data))]


def _key(entry_id: str, index: int, record: dict[str, Any]) -> str:
    """A batched record's row key: the id the gateway gave it (the same when a lost reply made
    it send the record again in another entry), else its place in this entry."""
    rid = record.get("rid")
    if isinstance(rid, str) and 0 < len(rid) <= 64:
        return f"r:{rid}"
    return f"{entry_id}:{index}"


def _row(key: str, d: dict[str, Any]) -> audit_store.AuditRow:
    occurred = d.get("occurred_at")
    when = datetime.now(UTC)
    if isinstance(occurred, int | float):
        # Out of datetime's range, or NaN: the record is kept, stamped when it was stored.
        with contextlib.suppress(ValueError, OverflowError, OSError):
            when = datetime.fromtimestamp(float(occurred), UTC)
    detail = d.get("detail") if isinstance(d.get("detail"), dict) else {}
    return audit_store.AuditRow(
        stream_id=key,
        occurred_at=when,
        school_id=_int(d.get("school_id")),
        client_id=_text(d.get("client_id")),
        subject=_text(d.get("subject")),
        grant_id=_uuid(d.get("grant_id")),
        action=_text(d.get("action")) or "unknown",
        method=_text(d.get("method")),
        path=_text(d.get("path")),
        status=_int(d.get("status")),
        scope=_text(d.get("scope")),
        ip=_ip(d.get("ip")),
        detail=_clean(detail) if detail else {},
    )


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
            log.error("audit_record_dropped", stream_id=row.stream_id, reason=type(exc).__name__)


def _passes_whole(entry: streams.Entry) -> bool:
    """Whether PostgreSQL may expand the entry itself (store.audit.insert_batches): a batch
    of records, each an object, as the gateway writes them."""
    batch = entry.data.get(audit.BATCH_MEMBER)
    return (
        bool(entry.payload) and isinstance(batch, list) and all(isinstance(r, dict) for r in batch)
    )


async def _store_entries(pool: asyncpg.Pool, entries: list[streams.Entry]) -> int:
    """Store the rows of `entries`; returns how many records they held. The gateway's
    batches go to PostgreSQL as they are; identity's own records, and batches PostgreSQL
    refuses as they stand, become rows here, where their values are cleaned."""
    whole: list[streams.Entry] = []
    by_row: list[streams.Entry] = []
    for e in entries:
        (whole if _passes_whole(e) else by_row).append(e)
    if whole:
        try:
            # A payload that is not UTF-8 raises UnicodeDecodeError, a ValueError: refused.
            await audit_store.insert_batches(
                pool, [e.id for e in whole], [e.payload.decode() for e in whole]
            )
        except _REFUSED:
            whole, by_row = [], entries
    rows = [row for e in by_row for row in to_rows(e)]
    await _store(pool, rows)
    return len(rows) + sum(len(e.data[audit.BATCH_MEMBER]) for e in whole)


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
    await _store_entries(pool, entries)
    await streams.ack(client, stream, GROUP, [e.id for e in entries])
    return len(entries)


def _next_count(entries: int, rows: int, current: int) -> int:
    """Entries to ask for next: about ROWS rows, judged by the rows per entry just read."""
    if entries == 0:
        return current
    return max(1, min(BATCH, ROWS * entries // max(rows, 1)))


async def run(
    pool: asyncpg.Pool, client: redis.Redis, settings: Settings, stop: asyncio.Event
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
    await streams.ensure_group(client, stream, GROUP)
    delay = 0.5
    loop = asyncio.get_running_loop()
    next_trim = next_claim = loop.time()
    count = max(1, ROWS // ENTRY_RECORDS)
    stored: list[str] = []  # committed, not yet acknowledged
    try:
        while not stop.is_set():
            try:
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
                rows = await _store_entries(pool, entries)
                stored.extend(e.id for e in entries)
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
                await streams.ensure_group(client, stream, GROUP)
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
