"""SQL of the audit trail: batched, idempotent inserts and the filtered reads pages need."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson

from libs.common.db import Executor


@dataclass(frozen=True, slots=True)
class AuditRow:
    record_id: str
    occurred_at: datetime
    school_id: int | None
    client_id: str | None
    subject: str | None
    grant_id: UUID | None
    action: str
    method: str | None
    path: str | None
    status: int | None
    scope: str | None
    ip: str | None
    detail: dict[str, Any]


_NAMES = [f.name for f in fields(AuditRow)]
_COLUMNS = ", ".join(_NAMES)
# Each column's parameter as insert_one takes it: address and detail as text, cast here (as in
# insert_many: the pool's jsonb codec would encode a str as a JSON string).
_CASTS = (
    "text", "timestamptz", "bigint", "text", "text", "uuid", "text", "text", "text", "int",
    "text", "text::inet", "text::jsonb",
)  # fmt: skip
assert len(_CASTS) == len(_NAMES)


def insert_one(first: int, *, when: str | None = None) -> str:
    """The INSERT of one record whose values are the parameters `$first`.. (`values(row)`),
    for a data-modifying CTE of the statement doing what it records: the record commits with
    it, in the same round trip. With `when` (another CTE of the statement), the record is
    inserted only if that CTE yields a row: a rotation that rotated nothing records nothing."""
    params = ", ".join(f"${first + i}::{cast}" for i, cast in enumerate(_CASTS))
    condition = f" WHERE EXISTS (SELECT 1 FROM {when})" if when else ""  # noqa: S608
    return f"INSERT INTO audit_log ({_COLUMNS}) SELECT {params}{condition}"


def values(row: AuditRow) -> list[Any]:
    """The parameters of insert_one for `row`, in order."""
    out = [getattr(row, n) for n in _NAMES]
    out[-1] = orjson.dumps(out[-1]).decode()
    return out


async def insert_many(db: Executor, rows: Sequence[AuditRow]) -> None:
    """One statement per batch; rows seen before (same record id) are skipped. The conflict
    target includes occurred_at because audit_log is partitioned by it, and a record keeps
    its occurred_at on every resend (migrations/012_audit_partitions.sql)."""
    await _insert(db, rows, _INSERT_ROWS)


async def insert_new(db: Executor, rows: Sequence[AuditRow]) -> None:
    """insert_many for rows whose ids were just made (identity's `i:<hex>`), so none can
    have been stored before: no `ON CONFLICT`, whose speculative insertion costs PostgreSQL
    an index probe and a WAL record more per row. A duplicate key fails the statement."""
    await _insert(db, rows, _INSERT_NEW_ROWS)


_INSERT_ROWS = (
    "INSERT INTO audit_log (record_id, occurred_at, school_id, client_id, subject, grant_id,"
    " action, method, path, status, scope, ip, detail)"
    " SELECT s, o, sc, c, su, g, a, m, p, st, sco, i::inet, d::jsonb"
    " FROM unnest($1::text[], $2::timestamptz[], $3::bigint[], $4::text[],"
    " $5::text[], $6::uuid[], $7::text[], $8::text[], $9::text[], $10::int[], $11::text[],"
    " $12::text[], $13::text[]) AS u(s, o, sc, c, su, g, a, m, p, st, sco, i, d)"
    " ON CONFLICT (record_id, occurred_at) DO NOTHING"
)
_INSERT_NEW_ROWS = _INSERT_ROWS.removesuffix(" ON CONFLICT (record_id, occurred_at) DO NOTHING")
assert _INSERT_NEW_ROWS != _INSERT_ROWS


async def _insert(db: Executor, rows: Sequence[AuditRow], statement: str) -> None:
    """The rows in one statement.

    Addresses and details travel as text, cast by PostgreSQL: asyncpg's inet[] and jsonb[]
    encoders (ipaddress objects, json.dumps per element) cost the consumer a third more CPU
    per row than orjson and a cast. Measured against COPY into a temporary table and an
    `INSERT ... SELECT ... ON CONFLICT DO NOTHING` (which conflicts need) at 150, 300 and 1000
    rows: COPY cost as much or more in identity and PostgreSQL together up to a few hundred
    rows, the consumer's usual batch, and wants a transaction and a temporary table besides.
    """
    if not rows:
        return
    # Plain attribute reads: dataclasses.astuple deep-copies every value, costly per record.
    columns = [[getattr(r, n) for r in rows] for n in _NAMES]
    columns[-1] = [orjson.dumps(d).decode() for d in columns[-1]]
    await db.execute(statement, *columns)


# The gateway's batch entries, expanded by PostgreSQL itself: the entry's JSON goes over as it
# sits in the stream, and no record becomes a Python object. Building the rows in the consumer
# (convert each field, encode thirteen arrays) cost about 25 µs of identity's CPU per record;
# this statement costs PostgreSQL about 4 µs more per record than insert_many. Every value is
# cast strictly: a record PostgreSQL will not take as it stands (a NUL in a path, an address or
# grant that does not parse, a time out of range) fails the statement with a DataError, and the
# caller stores those entries through insert_many, whose rows the consumer has cleaned. Only
# entries whose every record carries its id (`rid`) come here; each row is keyed `r:<rid>`, as
# the consumer keys it. The JSON goes as text and is cast here: the pool's jsonb codec would
# encode a str as a JSON string.
_INSERT_BATCHES = """
INSERT INTO audit_log (record_id, occurred_at, school_id, client_id, subject, grant_id,
    action, method, path, status, scope, ip, detail)
SELECT
    'r:' || (r->>'rid'),
    coalesce(to_timestamp((r->>'occurred_at')::float8), now()),
    (r->>'school_id')::bigint, r->>'client_id', r->>'subject', (r->>'grant_id')::uuid,
    coalesce(nullif(r->>'action', ''), 'unknown'), r->>'method', r->>'path',
    (r->>'status')::int, r->>'scope', (r->>'ip')::inet,
    CASE WHEN jsonb_typeof(r->'detail') = 'object' THEN r->'detail' ELSE '{}' END
FROM unnest($1::text[]) AS e(doc),
    jsonb_array_elements(e.doc::jsonb->'records') AS x(r)
ON CONFLICT (record_id, occurred_at) DO NOTHING
"""


# The usual case first: records seen before come only from an entry claimed again after a
# crash, or sent again after a lost reply, and `ON CONFLICT` makes PostgreSQL insert each row
# speculatively (an extra index probe and WAL record per row: about a fifth of the
# statement's cost) to allow for them.
_INSERT_NEW_BATCHES = _INSERT_BATCHES.replace("ON CONFLICT (record_id, occurred_at) DO NOTHING", "")


async def insert_batches(db: Executor, payloads: Sequence[str]) -> int:
    """Store batch entries (`{"records": [...]}` as JSON text, every record with its `rid`)
    in one statement; returns the rows inserted (records stored before are skipped).
    asyncpg.DataError when a value will not cast, and then nothing of the statement is
    stored."""
    if not payloads:
        return 0
    try:
        status = await db.execute(_INSERT_NEW_BATCHES, payloads)
    except asyncpg.UniqueViolationError:
        status = await db.execute(_INSERT_BATCHES, payloads)
    return int(status.rsplit(" ", 1)[-1])


async def for_school(
    db: Executor,
    school_id: int,
    *,
    client_id: str | None = None,
    subject: str | None = None,
    action: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT * FROM audit_log WHERE school_id = $1"
        " AND ($2::text IS NULL OR client_id = $2) AND ($3::text IS NULL OR subject = $3)"
        " AND ($4::text IS NULL OR action = $4)"
        " ORDER BY occurred_at DESC, id DESC LIMIT $5",
        school_id,
        client_id,
        subject,
        action,
        limit,
    )
    return [dict(r) for r in rows]
