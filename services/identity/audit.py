"""Identity's side of the audit trail: its own records, and the shape of every record.

Identity's records are rows of audit_log written in the same PostgreSQL transaction as what
they record (`write`): a grant revoked, a client registered, a code redeemed commit with their
record or not at all, so no crash between the action and its record can lose the record (they
used to be appended to Redis after the commit, where a SIGKILL in between, or a Redis that lost
the entry, lost it). `connect:audit` carries the gateway's records, which identity's consumer
stores (audit_consumer.py).

Every record has its own id, made where it is created: `rid` on the gateway's records (a prefix
random to the process and a counter), `i:<hex>` for identity's (128 random bits, as a UUID's
hex). Rows are keyed by it, so a record stored twice (an entry claimed again after a crash, a
batch sent again after a lost reply) is one row, and two records are never taken for one (a
stream entry id is not an identity: a Redis restarted empty, or one whose clock is behind the
old one's, hands out ids it handed out before).

Two shapes of entry share the stream: a record itself (one entry each, as identity wrote them
before its records went to PostgreSQL), and a batch, `{"records": [record, ...]}` (the
gateway's, one entry per flush). `records_of` reads both; a record never has a `records`
member, so the shapes cannot be confused.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import time
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from libs.common.db import Executor
from services.identity.store import audit as audit_store

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


async def write(db: Executor, entry: dict[str, Any]) -> None:
    """Store one of identity's records, in `db`'s transaction when it is a connection inside
    one: the record commits with what it records."""
    await audit_store.insert_new(db, [row(new_id(), entry)])


async def write_many(db: Executor, entries: list[dict[str, Any]]) -> None:
    """write() for several records, in one statement."""
    await audit_store.insert_new(db, [row(new_id(), e) for e in entries])


def new_id() -> str:
    """The row key of one of identity's records: `i:` and 128 random bits in hex (a UUID's
    text without the UUID object, which the token endpoint made once per token)."""
    return "i:" + os.urandom(16).hex()


# Parsing an address or a UUID is a third of the Python work per record, and the records of a
# busy client repeat the same few of each: parsed once, looked up after.
@functools.lru_cache(maxsize=4096)
def parse_uuid(text: str) -> UUID | None:
    try:
        return UUID(text)
    except ValueError:
        return None


@functools.lru_cache(maxsize=4096)
def parse_ip(text: str) -> str | None:
    # An IPv6 zone ("fe80::1%eth0") names the receiver's interface, not the caller, and
    # PostgreSQL's inet refuses it (the record, and the call recording it, failed).
    try:
        return str(ipaddress.ip_address(text.partition("%")[0]))
    except ValueError:
        return None


def _uuid(value: Any) -> UUID | None:
    return parse_uuid(str(value)) if value else None


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
    return parse_ip(str(value)) if value else None


_POSTGRES_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_POSTGRES_EPOCH_UNIX = 946_684_800.0


def from_unix_seconds(seconds: float) -> datetime:
    """The instant PostgreSQL's to_timestamp(float8) makes of `seconds`, to the microsecond.

    A record's occurred_at is part of its key in audit_log (partitioned by it), so a record
    stored once through insert_batches (PostgreSQL converts) and again through insert_many
    (this converts) must get the very same instant. datetime.fromtimestamp rounds otherwise
    for about one value in ten; this is PostgreSQL's arithmetic (float8_timestamptz): shift to
    its epoch, scale to microseconds, round half to even (rint; Python's round on a float)."""
    micros = round((seconds - _POSTGRES_EPOCH_UNIX) * 1_000_000.0)
    return _POSTGRES_EPOCH + timedelta(microseconds=micros)


def row(key: str, d: dict[str, Any]) -> audit_store.AuditRow:
    """The audit_log row of a record, keyed `key`, its values cleaned for PostgreSQL."""
    occurred = d.get("occurred_at")
    when = datetime.now(UTC)
    if isinstance(occurred, int | float):
        # Out of datetime's range, or NaN: the record is kept, stamped when it was stored.
        with contextlib.suppress(ValueError, OverflowError, OSError):
            when = from_unix_seconds(float(occurred))
    detail = d.get("detail") if isinstance(d.get("detail"), dict) else {}
    return audit_store.AuditRow(
        record_id=key,
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
