"""Every SQL statement of the school API, as plain async functions over asyncpg.

Statements are built from the catalogue (table and column names come from `resources/` and
nowhere else, checked to be plain identifiers) and cached as text, so asyncpg prepares each
once per connection and reuses it. Every statement that touches school data carries
`school_id = $1`: a caller never reads, changes or even learns of another school's rows.

Changes go through `create_row`, `update_row`, `delete_row`, `save_settings` and the upload
functions: each writes its event to the outbox in the change's own transaction, so a change
that commits always has its event and one that rolls back never does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from typing import Any
from uuid import UUID

import asyncpg
import orjson

from libs.common.config import Settings
from libs.common.db import Connection, Executor, connect_options, pool_target
from services.school_api import resources
from services.school_api.resources.model import Resource
from services.school_api.responses import dumps

SCHEMA = "school_api"
NOTIFY_CHANNEL = "school_api_outbox"

Row = dict[str, Any]


class ReferenceNotFound(Exception):
    """A reference field names a row this school does not have."""

    def __init__(self, field: str) -> None:
        super().__init__(field)
        self.field = field


class Duplicate(Exception):
    """A field that is unique within the school already has this value."""

    def __init__(self, field: str) -> None:
        super().__init__(field)
        self.field = field


class StillReferenced(Exception):
    """The row cannot go: other rows still point at it."""


def _table(resource: Resource) -> str:
    return f"{SCHEMA}.{resource.table}"


@cache
def _columns(resource: Resource) -> str:
    return ", ".join(resource.columns)


@cache
def _constraint_fields(resource: Resource) -> dict[str, str]:
    """Constraint name -> the field it guards; the migration names constraints this way."""
    found: dict[str, str] = {}
    for f in resource.fields:
        if f.references is not None:
            found[f"{resource.table}_{f.name}_fkey"] = f.name
        if f.unique:
            found[f"{resource.table}_{f.name}_key"] = f.name
    return found


async def _init_connection(conn: asyncpg.Connection) -> None:
    # json/jsonb as Python values through orjson (the outbox's `data` comes back a dict).
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name,
            encoder=lambda value: orjson.dumps(value).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Releasing a connection to the pool skips asyncpg's default reset query (one more round
    trip per request). That is safe here because nothing in this service changes session
    state on a pooled connection: no SET, no LISTEN (the relay listens on a connection of its
    own), no session-level advisory locks. asyncpg still rolls back a transaction left open."""


async def create_pool(
    dsn: str | None = None,
    *,
    settings: Settings | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
    statement_cache: int | None = None,
) -> asyncpg.Pool:
    """The school API's pool: on `settings`' database with its statement cache and pool sizes,
    or on a bare `dsn` (libs.common.db.pool_target)."""
    target = pool_target(
        dsn, settings, statement_cache=statement_cache, min_size=min_size, max_size=max_size
    )
    pool = await asyncpg.create_pool(
        target.dsn,
        min_size=target.min_size,
        max_size=target.max_size,
        init=_init_connection,
        reset=_keep_session,
        command_timeout=30,
        **connect_options(
            target.statement_cache, {"application_name": "loopwise-connect-school-api"}
        ),
    )
    assert pool is not None
    return pool


@asynccontextmanager
async def transaction(pool: asyncpg.Pool) -> AsyncIterator[Connection]:
    async with pool.acquire() as conn, conn.transaction():
        yield conn


@asynccontextmanager
async def _translated(resource: Resource) -> AsyncIterator[None]:
    """Constraint violations as the field errors callers can act on."""
    try:
        yield
    except asyncpg.ForeignKeyViolationError as exc:
        name = _constraint_fields(resource).get(exc.constraint_name or "")
        if name is None:
            raise StillReferenced() from exc
        raise ReferenceNotFound(name) from exc
    except asyncpg.UniqueViolationError as exc:
        name = _constraint_fields(resource).get(exc.constraint_name or "")
        raise Duplicate(name or "id") from exc


# --- the outbox -----------------------------------------------------------------------------


def ordering_key(event_type: str, data: Mapping[str, Any]) -> str | None:
    """The resource an event is about, within its school (`course:12`): events of one
    resource are published and delivered in commit order."""
    row_id = data.get("id")
    if row_id is None:
        return None
    return f"{event_type.rpartition('.')[0]}:{row_id}"


async def enqueue(
    conn: Connection,
    event_type: str,
    school_id: int,
    data: Mapping[str, Any],
    *,
    key: str | None = None,
) -> None:
    """Write an event in the caller's transaction. `data` is encoded exactly as the API answers
    (`responses.dumps`); passing it as text keeps the pool's json codec from re-encoding it.

    Called after the change's own write, whose row lock the transaction holds until commit:
    so a later change of the same resource waits, and gets a later outbox id. The relay's
    order per resource rests on this. `key`: the ordering key, when the event's resource is
    not the row it carries (an attendee's events are its event's: `event:7`)."""
    await conn.execute(
        f"INSERT INTO {SCHEMA}.outbox (type, school_id, data, ordering_key)"  # noqa: S608
        " VALUES ($1, $2, $3::text::jsonb, $4)",
        event_type,
        school_id,
        dumps(data).decode(),
        key or ordering_key(event_type, data),
    )


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    id: int
    event_id: UUID
    type: str
    school_id: int
    occurred_at: datetime
    data: dict[str, Any]
    ordering_key: str | None = None


_CLAIM_OUTBOX = f"""
WITH claimed AS (
    SELECT id, event_id, type, school_id, occurred_at, data, ordering_key FROM {SCHEMA}.outbox
    WHERE published_at IS NULL ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
)
SELECT c.*, c.ordering_key IS NOT NULL AND EXISTS (
    -- An older event of the same resource that is not ours to publish now: another relay
    -- has it in flight (its lock made us skip it), or it is waiting to be published again.
    SELECT 1 FROM {SCHEMA}.outbox p
    WHERE p.published_at IS NULL AND p.school_id = c.school_id
      AND p.ordering_key = c.ordering_key AND p.id < c.id
      AND p.id NOT IN (SELECT id FROM claimed)
) AS held
FROM claimed c ORDER BY c.id
"""  # noqa: S608


async def claim_outbox(conn: Connection, limit: int) -> tuple[list[OutboxEvent], int]:
    """Lock the oldest unpublished events for this transaction; rows another relay holds are
    skipped, so relays share the backlog without publishing anything twice. Returns the
    events to publish, in id order, and how many more were locked but held back: a resource's
    event waits while an older one of that resource is unpublished elsewhere."""
    rows = await conn.fetch(_CLAIM_OUTBOX, limit)
    events = [
        OutboxEvent(**{k: v for k, v in r.items() if k != "held"}) for r in rows if not r["held"]
    ]
    return events, len(rows) - len(events)


async def mark_published(
    conn: Connection, ids: Sequence[int], stream_ids: Sequence[str], run_id: str
) -> None:
    """Published as entries `stream_ids` of the Redis whose run is `run_id`; settled later."""
    await conn.execute(
        f"UPDATE {SCHEMA}.outbox o SET published_at = now(), stream_id = p.stream_id,"  # noqa: S608
        " published_run = $3"
        " FROM unnest($1::bigint[], $2::text[]) AS p(id, stream_id) WHERE o.id = p.id",
        list(ids),
        list(stream_ids),
        run_id,
    )


async def settle(db: Executor, run_id: str, below: tuple[int, int]) -> int:
    """Settle what the Redis of `run_id` holds below entry id `below`: its consumer group has
    acknowledged it, so the deliveries are recorded and the row need not be published again."""
    status = await db.execute(
        f"UPDATE {SCHEMA}.outbox SET settled_at = now()"  # noqa: S608
        " WHERE published_at IS NOT NULL AND settled_at IS NULL AND published_run = $1"
        " AND (split_part(stream_id, '-', 1)::bigint, split_part(stream_id, '-', 2)::bigint)"
        " < ($2::bigint, $3::bigint)",
        run_id,
        below[0],
        below[1],
    )
    return int(status.split()[-1])


async def rewind(db: Executor, run_id: str) -> int:
    """Unpublish what a Redis other than the one of `run_id` took and its consumers never
    acknowledged: that Redis restarted (or failed over) since, and may have lost it. The rows
    go out again in id order, before anything of the same resources that is newer."""
    status = await db.execute(
        f"UPDATE {SCHEMA}.outbox SET published_at = NULL, stream_id = NULL,"  # noqa: S608
        " published_run = NULL"
        " WHERE published_at IS NOT NULL AND settled_at IS NULL"
        " AND published_run IS DISTINCT FROM $1",
        run_id,
    )
    return int(status.split()[-1])


async def purge_published(db: Executor, older_than_seconds: float, batch: int = 10_000) -> int:
    """Delete published events past retention, a bounded batch at a time."""
    status = await db.execute(
        f"DELETE FROM {SCHEMA}.outbox WHERE id IN (SELECT id FROM {SCHEMA}.outbox"  # noqa: S608
        " WHERE published_at < now() - make_interval(secs => $1) LIMIT $2)",
        float(older_than_seconds),
        batch,
    )
    return int(status.split()[-1])


async def outbox_backlog(db: Executor) -> int:
    count = await db.fetchval(
        f"SELECT count(*) FROM {SCHEMA}.outbox WHERE published_at IS NULL"  # noqa: S608
    )
    return int(count)


async def outbox_unsettled(db: Executor) -> int:
    """Published, not yet acknowledged by the dispatcher: what a Redis loss would republish."""
    count = await db.fetchval(
        f"SELECT count(*) FROM {SCHEMA}.outbox"  # noqa: S608
        " WHERE published_at IS NOT NULL AND settled_at IS NULL"
    )
    return int(count)


async def outbox_event(db: Executor, event_id: UUID) -> dict[str, Any] | None:
    row = await db.fetchrow(
        f"SELECT id, event_id, type, school_id, occurred_at, data, published_at,"  # noqa: S608
        " settled_at"
        f" FROM {SCHEMA}.outbox WHERE event_id = $1",
        event_id,
    )
    return dict(row) if row is not None else None


async def outbox_events_for(db: Executor, school_id: int) -> list[dict[str, Any]]:
    """A school's events still in the outbox, oldest first (operations and tests)."""
    rows = await db.fetch(
        f"SELECT id, event_id, type, school_id, occurred_at, data, published_at,"  # noqa: S608
        " settled_at"
        f" FROM {SCHEMA}.outbox WHERE school_id = $1 ORDER BY id",
        school_id,
    )
    return [dict(r) for r in rows]


# --- collections ----------------------------------------------------------------------------


@cache
def _list_sql(resource: Resource, filters: tuple[str, ...]) -> str:
    where = "".join(f" AND {name} = ${i}" for i, name in enumerate(filters, start=4))
    return (
        f"SELECT {_columns(resource)} FROM {_table(resource)}"  # noqa: S608
        f" WHERE school_id = $1 AND id > $2{where} ORDER BY id LIMIT $3"
    )


async def list_rows(
    db: Executor,
    resource: Resource,
    school_id: int,
    *,
    after: int,
    limit: int,
    filters: Mapping[str, Any],
) -> list[Row]:
    """Up to `limit` rows with ids above `after`, in id order (keyset pagination)."""
    records = await db.fetch(
        _list_sql(resource, tuple(filters)), school_id, after, limit, *filters.values()
    )
    return [dict(r) for r in records]


@cache
def _get_sql(resource: Resource) -> str:
    return f"SELECT {_columns(resource)} FROM {_table(resource)} WHERE school_id = $1 AND id = $2"  # noqa: S608


async def get_row(db: Executor, resource: Resource, school_id: int, row_id: int) -> Row | None:
    record = await db.fetchrow(_get_sql(resource), school_id, row_id)
    return dict(record) if record is not None else None


async def exists(db: Executor, resource: Resource, school_id: int, row_id: int) -> bool:
    return bool(
        await db.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM {_table(resource)}"  # noqa: S608
            " WHERE school_id = $1 AND id = $2)",
            school_id,
            row_id,
        )
    )


@cache
def _insert_sql(resource: Resource, names: tuple[str, ...]) -> str:
    columns = ", ".join(("school_id", *names))
    params = ", ".join(f"${i}" for i in range(1, len(names) + 2))
    return (
        f"INSERT INTO {_table(resource)} ({columns}) VALUES ({params})"  # noqa: S608
        f" RETURNING {_columns(resource)}"
    )


async def insert_row(
    conn: Connection, resource: Resource, school_id: int, values: Mapping[str, Any]
) -> Row:
    """Insert without an event: for seeding, and inside `create_row`'s transaction."""
    async with _translated(resource):
        record = await conn.fetchrow(
            _insert_sql(resource, tuple(values)), school_id, *values.values()
        )
    assert record is not None
    return dict(record)


async def create_row(
    pool: asyncpg.Pool, resource: Resource, school_id: int, values: Mapping[str, Any]
) -> Row:
    async with transaction(pool) as conn:
        row = await insert_row(conn, resource, school_id, values)
        await enqueue(conn, resource.event_type("created"), school_id, row)
    return row


@cache
def _update_sql(resource: Resource, names: tuple[str, ...]) -> str:
    sets = [f"{name} = ${i}" for i, name in enumerate(names, start=3)]
    if resource.has_updated_at:
        sets.append("updated_at = now()")
    return (
        f"UPDATE {_table(resource)} SET {', '.join(sets)}"  # noqa: S608
        f" WHERE school_id = $1 AND id = $2 RETURNING {_columns(resource)}"
    )


@cache
def _transition_update_sql(resource: Resource, names: tuple[str, ...]) -> str:
    """`_update_sql` that also returns, as `was_{field}`, the value each transition's field
    had before, read under the update's own row lock."""
    fields = sorted({t.field for t in resource.transitions})
    sets = [f"{name} = ${i}" for i, name in enumerate(names, start=3)]
    if resource.has_updated_at:
        sets.append("updated_at = now()")
    returning = [*(f"t.{c}" for c in resource.columns), *(f"o.{f} AS was_{f}" for f in fields)]
    return (
        f"UPDATE {_table(resource)} AS t SET {', '.join(sets)}"  # noqa: S608
        f" FROM (SELECT id, {', '.join(fields)} FROM {_table(resource)}"
        " WHERE school_id = $1 AND id = $2 FOR UPDATE) AS o"
        f" WHERE t.school_id = $1 AND t.id = o.id RETURNING {', '.join(returning)}"
    )


async def update_row(
    pool: asyncpg.Pool,
    resource: Resource,
    school_id: int,
    row_id: int,
    values: Mapping[str, Any],
) -> Row | None:
    """Change a row and publish `.updated`; when the change moves a transition's field to its
    value (a course to `published`), publish the transition's event after it."""
    transitions = [t for t in resource.transitions if values.get(t.field) == t.value]
    sql = (
        _transition_update_sql(resource, tuple(values))
        if transitions
        else _update_sql(resource, tuple(values))
    )
    async with transaction(pool) as conn:
        async with _translated(resource):
            record = await conn.fetchrow(sql, school_id, row_id, *values.values())
        if record is None:
            return None
        row = dict(record)
        # Only the transition statement returns the `was_` columns.
        before = (
            {f: row.pop(f"was_{f}") for f in {t.field for t in resource.transitions}}
            if transitions
            else {}
        )
        await enqueue(conn, resource.event_type("updated"), school_id, row)
        for t in transitions:
            if before[t.field] != t.value:
                await enqueue(conn, f"{resource.singular}.{t.action}", school_id, row)
    return row


async def delete_row(
    pool: asyncpg.Pool, resource: Resource, school_id: int, row_id: int
) -> Row | None:
    """Delete and publish the row as it was. Rows that belong to it (a course's lessons, an
    event's attendees, a post's comments) go with it, as the migration's cascades say."""
    async with transaction(pool) as conn:
        async with _translated(resource):
            record = await conn.fetchrow(
                f"DELETE FROM {_table(resource)} WHERE school_id = $1 AND id = $2"  # noqa: S608
                f" RETURNING {_columns(resource)}",
                school_id,
                row_id,
            )
        if record is None:
            return None
        row = dict(record)
        await enqueue(conn, resource.event_type("deleted"), school_id, row)
    return row


# --- settings and the computed objects ------------------------------------------------------

_SETTINGS_COLUMNS = ", ".join(f.name for f in resources.SETTINGS.fields)


async def _ensure_settings(conn: Executor, school_id: int) -> None:
    # A school reads its defaults until it first saves; making the row on first read keeps
    # one source for those defaults (the migration's column defaults).
    await conn.execute(
        f"INSERT INTO {SCHEMA}.settings (school_id) VALUES ($1)"  # noqa: S608
        " ON CONFLICT (school_id) DO NOTHING",
        school_id,
    )


async def get_settings(pool: asyncpg.Pool, school_id: int) -> Row:
    sql = (
        f"SELECT school_id AS id, school_id, {_SETTINGS_COLUMNS}"  # noqa: S608
        f" FROM {SCHEMA}.settings WHERE school_id = $1"
    )
    record = await pool.fetchrow(sql, school_id)
    if record is None:
        await _ensure_settings(pool, school_id)
        record = await pool.fetchrow(sql, school_id)
    assert record is not None
    return dict(record)


@cache
def _settings_upsert_sql(names: tuple[str, ...]) -> str:
    columns = ", ".join(("school_id", *names))
    params = ", ".join(f"${i}" for i in range(1, len(names) + 2))
    sets = ", ".join([*(f"{n} = EXCLUDED.{n}" for n in names), "updated_at = now()"])
    return (
        f"INSERT INTO {SCHEMA}.settings ({columns}) VALUES ({params})"  # noqa: S608
        f" ON CONFLICT (school_id) DO UPDATE SET {sets}"
        f" RETURNING school_id AS id, school_id, {_SETTINGS_COLUMNS}"
    )


async def save_settings(
    conn: Connection, school_id: int, values: Mapping[str, Any], *, publish: bool = True
) -> Row:
    record = await conn.fetchrow(_settings_upsert_sql(tuple(values)), school_id, *values.values())
    assert record is not None
    row = dict(record)
    if publish:
        await enqueue(conn, resources.SETTINGS.event_type("updated"), school_id, row)
        # appearance:read's subscribers hear of the theme only, never the whole settings.
        if any(name in resources.APPEARANCE_FIELDS for name in values):
            await enqueue(
                conn, resources.APPEARANCE.event_type("updated"), school_id, appearance_of(row)
            )
    return row


def appearance_of(settings: Row) -> Row:
    """The appearance part of a settings row: what appearance:read may see."""
    return {
        "id": settings["id"],
        "school_id": settings["school_id"],
        **{f.name: settings[f.name] for f in resources.APPEARANCE.fields},
    }


async def update_settings(pool: asyncpg.Pool, school_id: int, values: Mapping[str, Any]) -> Row:
    async with transaction(pool) as conn:
        return await save_settings(conn, school_id, values)


async def settings_exist(db: Executor, school_id: int) -> bool:
    return bool(
        await db.fetchval(
            f"SELECT EXISTS (SELECT 1 FROM {SCHEMA}.settings WHERE school_id = $1)",  # noqa: S608
            school_id,
        )
    )


async def site_info(pool: asyncpg.Pool, school_id: int) -> Row:
    sql = f"""
        SELECT s.school_id AS id, s.school_id, s.name, s.tagline, s.description, s.logo_url,
               s.primary_color, s.locale, s.timezone, s.currency, s.contact_email,
               (SELECT count(*) FROM {SCHEMA}.courses c
                 WHERE c.school_id = $1 AND c.status = 'published') AS published_courses,
               (SELECT count(*) FROM {SCHEMA}.lecturers l WHERE l.school_id = $1) AS lecturers
          FROM {SCHEMA}.settings s WHERE s.school_id = $1
    """  # noqa: S608
    record = await pool.fetchrow(sql, school_id)
    if record is None:
        await _ensure_settings(pool, school_id)
        record = await pool.fetchrow(sql, school_id)
    assert record is not None
    return dict(record)


_ANALYTICS_SQL = f"""
    SELECT $1::bigint AS id, $1::bigint AS school_id,
      (SELECT count(*) FROM {SCHEMA}.members WHERE school_id = $1) AS members,
      (SELECT count(*) FROM {SCHEMA}.members WHERE school_id = $1 AND status = 'active')
        AS active_members,
      (SELECT count(*) FROM {SCHEMA}.courses WHERE school_id = $1) AS courses,
      (SELECT count(*) FROM {SCHEMA}.courses WHERE school_id = $1 AND status = 'published')
        AS published_courses,
      (SELECT count(*) FROM {SCHEMA}.lessons WHERE school_id = $1) AS lessons,
      (SELECT count(*) FROM {SCHEMA}.enrollments WHERE school_id = $1) AS enrollments,
      (SELECT count(*) FROM {SCHEMA}.orders WHERE school_id = $1) AS orders,
      (SELECT count(*) FROM {SCHEMA}.orders WHERE school_id = $1 AND status = 'paid')
        AS paid_orders,
      (SELECT coalesce(jsonb_object_agg(currency, total), '{{}}'::jsonb)
         FROM (SELECT currency, sum(amount_cents) AS total FROM {SCHEMA}.orders
                WHERE school_id = $1 AND status = 'paid' GROUP BY currency) r) AS revenue_cents,
      (SELECT count(*) FROM {SCHEMA}.events WHERE school_id = $1) AS events,
      (SELECT count(*) FROM {SCHEMA}.events
        WHERE school_id = $1 AND status = 'scheduled' AND starts_at > now()) AS upcoming_events,
      (SELECT count(*) FROM {SCHEMA}.posts WHERE school_id = $1) AS posts,
      (SELECT count(*) FROM {SCHEMA}.subscriptions WHERE school_id = $1 AND status = 'active')
        AS active_subscriptions,
      (SELECT round(avg(rating), 2)::float8 FROM {SCHEMA}.reviews WHERE school_id = $1)
        AS average_rating,
      now() AS generated_at
"""  # noqa: S608


async def analytics(db: Executor, school_id: int) -> Row:
    record = await db.fetchrow(_ANALYTICS_SQL, school_id)
    assert record is not None
    return dict(record)


# --- uploads --------------------------------------------------------------------------------

_UPLOAD_COLUMNS = ", ".join(resources.UPLOADS.columns)


async def create_upload(
    pool: asyncpg.Pool,
    school_id: int,
    upload_id: UUID,
    values: Mapping[str, Any],
    *,
    upload_url: str,
    url: str,
    expires_at: datetime,
) -> Row:
    async with transaction(pool) as conn:
        record = await conn.fetchrow(
            f"INSERT INTO {SCHEMA}.uploads"  # noqa: S608
            " (id, school_id, filename, content_type, size_bytes, upload_url, url, expires_at)"
            f" VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING {_UPLOAD_COLUMNS}",
            upload_id,
            school_id,
            values["filename"],
            values["content_type"],
            values["size_bytes"],
            upload_url,
            url,
            expires_at,
        )
        assert record is not None
        row = dict(record)
        await enqueue(conn, resources.UPLOADS.event_type("created"), school_id, _public(row))
    return row


def _public(upload: Row) -> Row:
    """An upload as events carry it: without the presigned URL, a capability to write the
    file that belongs to the app that asked for it, not to every webhook subscriber."""
    return {k: v for k, v in upload.items() if k != "upload_url"}


async def get_upload(db: Executor, school_id: int, upload_id: UUID) -> Row | None:
    record = await db.fetchrow(
        f"SELECT {_UPLOAD_COLUMNS} FROM {SCHEMA}.uploads"  # noqa: S608
        " WHERE school_id = $1 AND id = $2",
        school_id,
        upload_id,
    )
    return dict(record) if record is not None else None


async def confirm_upload(pool: asyncpg.Pool, school_id: int, upload_id: UUID) -> Row | None:
    """Mark a pending upload confirmed (the caller saw its bytes stored); None when nothing
    changed. No expiry test: bytes stored before the URL expired may be confirmed until the
    sweep takes the upload, whose row lock makes the two exclusive."""
    async with transaction(pool) as conn:
        record = await conn.fetchrow(
            f"UPDATE {SCHEMA}.uploads SET status = 'confirmed', confirmed_at = now()"  # noqa: S608
            " WHERE school_id = $1 AND id = $2 AND status = 'pending'"
            f" RETURNING {_UPLOAD_COLUMNS}",
            school_id,
            upload_id,
        )
        if record is None:
            return None
        row = dict(record)
        await enqueue(conn, resources.UPLOADS.event_type("updated"), school_id, _public(row))
    return row


async def sweep_uploads(
    pool: asyncpg.Pool,
    grace: timedelta,
    delete_bytes: Callable[[int, UUID], Awaitable[None]],
    *,
    batch: int = 100,
) -> int:
    """Expire up to `batch` uploads still pending `grace` after their URL expired, deleting
    their bytes (if any were PUT) while their rows are locked; how many were expired.
    SKIP LOCKED: sweeps in several processes share the work, and a confirm in progress
    keeps its upload."""
    async with transaction(pool) as conn:
        rows = await conn.fetch(
            f"SELECT school_id, id FROM {SCHEMA}.uploads"  # noqa: S608
            " WHERE status = 'pending' AND expires_at < now() - $1::interval"
            " ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED",
            grace,
            batch,
        )
        for row in rows:
            await delete_bytes(row["school_id"], row["id"])
        if rows:
            await conn.execute(
                f"UPDATE {SCHEMA}.uploads SET status = 'expired'"  # noqa: S608
                " WHERE id = ANY($1::uuid[])",
                [row["id"] for row in rows],
            )
    return len(rows)


# --- seeding --------------------------------------------------------------------------------


async def claim_seeding(conn: Connection, school_id: int) -> bool:
    """In the caller's transaction: True when this school has no sample data yet, and it is
    this transaction's to add. A concurrent seeder of the same school waits on this insert
    until the first commits (then finds the row) or rolls back (then seeds itself)."""
    inserted = await conn.fetchval(
        f"INSERT INTO {SCHEMA}.seeded_schools (school_id) VALUES ($1)"  # noqa: S608
        " ON CONFLICT (school_id) DO NOTHING RETURNING true",
        school_id,
    )
    return bool(inserted)
