"""From `connect:events` to pending deliveries, at least once.

A consumer group (`webhooks`) reads the stream. For each batch, one INSERT records a pending
delivery for every active subscription of the event's school whose types match and whose
grant is not revoked; only then is the batch acknowledged. A dispatcher that dies between
reading and acknowledging leaves its entries pending in the group, and another claims them
(XAUTOCLAIM) after `WEBHOOK_CLAIM_IDLE_SECONDS`; recording a batch twice records nothing new
(one delivery per subscription and event id), so the redelivery is harmless.

An acknowledgement is also what lets the school API's outbox forget an event (it republishes
what a restarted or failed-over Redis lost before this group acknowledged it; see
services/school_api/outbox.py): events are delivered at least once through a Redis that loses
data, and a republished event, having the same id, makes no second delivery.

Order per resource (what a subscriber may count on): the school API's events of one resource
(a course, a lesson, the school's settings: the entry's `ordering_key`) reach a subscription in
the order their changes committed (the entry's `sequence`), one at a time: the relay appends
them in that order, dispatchers record them in stream order (`in_order`: a batch waits for
older entries another live dispatcher holds), and a resource's next delivery to a subscription
is held until the previous one is delivered, dead (its retry schedule spent) or cancelled
(store/ordering.py). A failing delivery so holds back its resource's later events for that
subscription, never other resources' nor other subscriptions'. Events of different resources,
and events without an `ordering_key` (identity's, `endpoint.disabled`), have no order. A
manual retry of an old delivery is a replay: it goes out after newer events of its resource.

An entry no one can handle (its `data` not a JSON object, not an event, refused by
PostgreSQL) is dead-lettered (`webhooks.dead_letters`, `stream_dead_letters_total`, a log line
naming the entry id only) and acknowledged with its batch. The loops run under the service's
Supervisor: a Redis error ends one, and it is started again with backoff.

The same module follows `connect:revocations` (its own consumer group, so a revocation
published while every webhooks process was down is still applied) and announces disabled
endpoints as `endpoint.disabled` events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import secrets
import socket
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from redis.exceptions import RedisError, ResponseError

from libs.common import streams
from libs.common.logging import get_logger
from services.webhooks import event_types, store
from services.webhooks.context import WebhooksContext
from services.webhooks.store import dead_letters as dead_letter_store
from services.webhooks.store import events as event_store
from services.webhooks.store import outcomes as outcome_store
from services.webhooks.store import revocations as revocation_store
from services.webhooks.store.events import EventRow
from services.webhooks.store.outcomes import Disabled

log = get_logger(__name__)

# The events group (the outbox relay waits on it), and the revocations one too.
GROUP = streams.EVENTS_GROUP
BATCH = 500
_TYPE = re.compile(r"^[a-z][a-z0-9_]{0,63}(\.[a-z][a-z0-9_]{0,63}){1,3}$")
_EVENT_ID = re.compile(r"^[\x21-\x7e]{1,200}$")
_MAX_SCHOOL_ID = 2**63 - 1
# Names the endpoint.disabled events, so announcing one disablement twice is one event.
_ANNOUNCE_NAMESPACE = uuid.UUID("6d3c1b0e-51a4-4c55-9f0e-8f5b8c1c2a77")


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def to_event(entry: streams.Entry) -> EventRow | None:
    """The delivery body of a stream entry, or None when the entry is malformed."""
    d = entry.data
    kind = d.get("type")
    school_id = d.get("school_id")
    if isinstance(school_id, str) and school_id.isdigit():
        school_id = int(school_id)
    if (
        not isinstance(kind, str)
        or not _TYPE.match(kind)
        or not isinstance(school_id, int)
        or isinstance(school_id, bool)
        or not 0 < school_id <= _MAX_SCHOOL_ID
    ):
        return None
    event_id = d.get("id")
    if event_id is None:
        # Stable for the entry, so a redelivered entry keeps its webhook-id.
        event_id = f"evt_{entry.id}"
    if not isinstance(event_id, str) or not _EVENT_ID.match(event_id):
        return None
    occurred_at = d.get("occurred_at")
    if not isinstance(occurred_at, str):
        occurred_at = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    audience = d.get("audience_client_id")
    if audience is not None and not (isinstance(audience, str) and _EVENT_ID.match(audience)):
        return None
    # Ordering is the producer's to give (the school API's outbox): without a well-formed
    # key and sequence the event is delivered all the same, unordered.
    ordering_key, sequence = d.get("ordering_key"), d.get("sequence")
    if not (
        isinstance(ordering_key, str)
        and _EVENT_ID.match(ordering_key)
        and isinstance(sequence, int)
        and not isinstance(sequence, bool)
        and 0 <= sequence <= _MAX_SCHOOL_ID
    ):
        ordering_key, sequence = None, None
    # The bytes every attempt signs and sends: serialised once, stored, never rebuilt.
    body = orjson.dumps(
        {
            "id": event_id,
            "type": kind,
            "school_id": school_id,
            "occurred_at": occurred_at,
            "data": d.get("data", {}),
        }
    )
    return EventRow(
        id=event_id,
        school_id=school_id,
        type=kind,
        body=body,
        stream_id=entry.id,
        audience_client_id=audience,
        ordering_key=ordering_key,
        sequence=sequence,
    )


async def set_aside(
    ctx: WebhooksContext, name: str, letters: Sequence[dead_letter_store.DeadLetter]
) -> None:
    """Dead-letter entries no one can handle: recorded before they are acknowledged (a
    failure here leaves them pending, to be set aside on the next try), counted, and logged
    by id only, since an entry may carry personal data."""
    if not letters:
        return
    await dead_letter_store.record(ctx.pool, letters)
    ctx.metrics.dead_letters.labels(name).inc(len(letters))
    for letter in letters:
        log.error("stream_entry_dead_lettered", stream=name, stream_id=letter.entry_id,
                  reason=letter.reason)  # fmt: skip


def _letter(entry: streams.Entry, reason: str) -> dead_letter_store.DeadLetter:
    return dead_letter_store.DeadLetter(streams.EVENTS, entry.id, reason, entry.payload)


async def handle(ctx: WebhooksContext, entries: Sequence[streams.Entry]) -> int:
    """Record the deliveries of a batch durably, then acknowledge it; returns how many
    deliveries were made. Raises (leaving the batch unacknowledged) when PostgreSQL fails.
    Entries that are not events, or that PostgreSQL refuses, are dead-lettered."""
    events: list[tuple[streams.Entry, EventRow]] = []
    poison: list[dead_letter_store.DeadLetter] = []
    for entry in entries:
        if entry.malformed:
            poison.append(_letter(entry, "not a JSON object"))
            continue
        row = to_event(entry)
        if row is None:
            poison.append(_letter(entry, "not an event"))
        else:
            events.append((entry, row))
    try:
        made = await event_store.record_deliveries(ctx.pool, [row for _, row in events])
    except store.PERMANENT_ERRORS:
        # One entry PostgreSQL refuses must not hold up the stream: record them one by one
        # and set aside the ones refused.
        made = 0
        for entry, row in events:
            try:
                made += await event_store.record_deliveries(ctx.pool, [row])
            except store.PERMANENT_ERRORS as exc:
                # The class only: PostgreSQL's message may quote the entry's values.
                poison.append(_letter(entry, f"refused: {type(exc).__name__}"))
    if poison:
        ctx.metrics.events.labels("rejected").inc(len(poison))
        await set_aside(ctx, streams.EVENTS, poison)
    await streams.ack(
        ctx.redis, ctx.settings.stream(streams.EVENTS), GROUP, [e.id for e in entries]
    )
    ctx.metrics.events.labels("dispatched").inc(len(entries) - len(poison))
    if made:
        ctx.metrics.deliveries_created.inc(made)
        # This process's sender; the others heard the insert's NOTIFY (a trigger).
        ctx.due.set()
    return made


# How long a dispatcher waits before looking again whether another one has recorded the
# older entries it holds (it acknowledges them within a batch's INSERT).
ORDER_WAIT = 0.02


async def in_order(
    ctx: WebhooksContext,
    stream: str,
    consumer: str,
    entries: list[streams.Entry],
    *,
    claim_idle_ms: int,
) -> list[streams.Entry] | None:
    """The batch to record now, so that dispatchers record entries in stream order: none of
    another dispatcher's unacknowledged entries may be older than it (their deliveries would
    be recorded after ours, and a resource's later event could go out first). Older ones of
    ours (left by a restart of this loop) or of a dispatcher idle past the claim time are
    taken over and come first; while a live dispatcher still holds older ones, None: wait."""
    older = await ctx.redis.xpending_range(
        stream, GROUP, min="-", max="(" + entries[0].id, count=BATCH
    )
    if not older:
        return entries
    takeable = [
        streams.text(p["message_id"])
        for p in older
        if streams.text(p["consumer"]) == consumer
        or int(p["time_since_delivered"]) >= claim_idle_ms
    ]
    if len(takeable) < len(older):
        return None
    claimed = await streams.claim(ctx.redis, stream, GROUP, consumer, takeable)
    gone = set(takeable) - {e.id for e in claimed}
    if gone:
        # Trimmed before anyone handled them: nothing left to record.
        await streams.ack(ctx.redis, stream, GROUP, sorted(gone))
    return claimed + entries


async def _group_loop(
    ctx: WebhooksContext,
    stream: str,
    consumer: str,
    work: Any,
    *,
    name: str,
    trim: bool = False,
    ordered: bool = False,
    on_progress: Callable[[], None] | None = None,
) -> None:
    """Read a stream as group `webhooks` until cancelled: stale entries of dead consumers
    first, then new ones; a batch that fails is retried until it is handled. `ordered`: a
    batch waits for older entries other dispatchers hold (`in_order`).

    Run under a libs.common.tasks.Supervisor: a Redis that refuses (down, READONLY after a
    failover, OOM) ends the loop with its error, and the supervisor starts it again with
    backoff, group creation included, while readiness reports it. `on_progress` is called
    after each read that went through (the supervisor's `ran_cleanly`)."""
    claim_idle_ms = int(ctx.settings.webhooks.claim_idle * 1000)
    claim_every = max(ctx.settings.webhooks.claim_idle / 2, 0.2)
    loop = asyncio.get_running_loop()
    next_claim = 0.0
    delay = 0.2
    await streams.ensure_group(ctx.redis, stream, GROUP)
    while True:
        try:
            entries: list[streams.Entry] = []
            if loop.time() >= next_claim:
                next_claim = loop.time() + claim_every
                entries = await streams.claim_stale(
                    ctx.redis, stream, GROUP, consumer, min_idle_ms=claim_idle_ms, count=BATCH
                )
                if entries:
                    log.info("entries_claimed", stream=name, count=len(entries))
                if trim:
                    await streams.trim_consumed(ctx.redis, stream)
            if not entries:
                block = max(1, min(1000, int((next_claim - loop.time()) * 1000)))
                entries = await streams.read_group(
                    ctx.redis, stream, GROUP, consumer, count=BATCH, block_ms=block
                )
        except ResponseError as exc:
            # The stream or group was deleted under us (Redis restarted empty, an operator,
            # a test's cleanup): make it again. Any other refusal is the supervisor's.
            if "NOGROUP" not in str(exc) and "UNBLOCKED" not in str(exc):
                raise
            log.warning("stream_group_recreated", stream=name)
            await streams.ensure_group(ctx.redis, stream, GROUP)
            continue
        if on_progress is not None:
            on_progress()
        while entries:
            try:
                if ordered:
                    batch = await in_order(
                        ctx, stream, consumer, entries, claim_idle_ms=claim_idle_ms
                    )
                    if batch is None:
                        await asyncio.sleep(ORDER_WAIT)
                        continue
                    entries = batch
                await work(ctx, entries)
                entries = []
                delay = 0.2
            except (OSError, asyncpg.PostgresError, RedisError):
                # Still ours and unacknowledged: retry here rather than wait to claim it.
                log.warning("batch_failed", stream=name, exc_info=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5)


async def run(
    ctx: WebhooksContext,
    consumer: str | None = None,
    *,
    on_progress: Callable[[], None] | None = None,
) -> None:
    """Dispatch `connect:events` until cancelled (or a Redis error ends it)."""
    await _group_loop(
        ctx,
        ctx.settings.stream(streams.EVENTS),
        consumer or consumer_name(),
        handle,
        name="events",
        # Trimmed to what every group acknowledged. Not connect:revocations: gateways follow
        # it without a group, and our progress says nothing of theirs.
        trim=True,
        ordered=True,
        on_progress=on_progress,
    )


async def report_lag(ctx: WebhooksContext) -> None:
    """The group's lag on connect:events and connect:revocations (XINFO GROUPS `lag`: entries
    not yet read by it) and its pending count (read, not yet acknowledged), as gauges."""
    for name in (streams.EVENTS, streams.REVOCATIONS):
        try:
            groups = await ctx.redis.xinfo_groups(ctx.settings.stream(name))
        except ResponseError:
            continue  # no such stream (yet)
        for group in groups:
            info = {streams.text(k): v for k, v in group.items()}
            if streams.text(info["name"]) != GROUP:
                continue
            # Redis cannot always tell (after deletions in the middle of the stream): nil.
            if info.get("lag") is not None:
                ctx.metrics.stream_lag.labels(name).set(int(info["lag"]))
            ctx.metrics.stream_pending.labels(name).set(int(info["pending"]))


# ---------------------------------------------------------------------------------------------
# Revocations


async def handle_revocations(ctx: WebhooksContext, entries: Sequence[streams.Entry]) -> None:
    grants: list[tuple[uuid.UUID, str]] = []
    poison: list[dead_letter_store.DeadLetter] = []
    for entry in entries:
        try:
            grant_id = uuid.UUID(str(entry.data.get("grant_id")))
        except ValueError:
            poison.append(
                dead_letter_store.DeadLetter(
                    streams.REVOCATIONS, entry.id, "not a revocation", entry.payload
                )
            )
            continue
        grants.append((grant_id, str(entry.data.get("reason") or "")))
    disabled = await revocation_store.revoke_grants(ctx.pool, grants)
    if disabled:
        ctx.metrics.disabled.labels("grant_revoked").inc(len(disabled))
        log.info("subscriptions_disabled", reason="grant_revoked", count=len(disabled))
    await set_aside(ctx, streams.REVOCATIONS, poison)
    await streams.ack(
        ctx.redis, ctx.settings.stream(streams.REVOCATIONS), GROUP, [e.id for e in entries]
    )


async def follow_revocations(
    ctx: WebhooksContext,
    consumer: str | None = None,
    *,
    on_progress: Callable[[], None] | None = None,
) -> None:
    """Disable the subscriptions of every revoked grant, until cancelled (or a Redis error
    ends it)."""
    await _group_loop(
        ctx,
        ctx.settings.stream(streams.REVOCATIONS),
        consumer or consumer_name(),
        handle_revocations,
        name="revocations",
        on_progress=on_progress,
    )


# ---------------------------------------------------------------------------------------------
# endpoint.disabled


def disabled_event(d: Disabled) -> dict[str, Any]:
    when = d.disabled_at.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return {
        "id": str(uuid.uuid5(_ANNOUNCE_NAMESPACE, f"{d.subscription_id}:{when}")),
        "type": event_types.ENDPOINT_DISABLED,
        "school_id": d.school_id,
        "occurred_at": when,
        # Only the owner's other endpoints hear it: another client has no business knowing.
        "audience_client_id": d.client_id,
        "data": {"id": str(d.subscription_id), "url": d.url, "reason": d.reason,
                 "disabled_at": when},
    }  # fmt: skip


def _announcement(d: Disabled) -> EventRow:
    event = disabled_event(d)
    row = to_event(streams.Entry(id="", data=event))
    assert row is not None  # built here, well-formed
    return dataclasses.replace(row, stream_id=None)


async def announce(ctx: WebhooksContext, disabled: Sequence[Disabled]) -> None:
    """Record endpoint.disabled deliveries for each, then remember they were announced. Made
    and heard here, so recorded here: not through connect:events, where a Redis that restarts
    empty before a dispatcher reads the entry would take the announcement along. A crash in
    between announces again later (same event id, so one delivery per endpoint)."""
    if not disabled:
        return
    made = await event_store.record_deliveries(ctx.pool, [_announcement(d) for d in disabled])
    await outcome_store.mark_announced(ctx.pool, disabled)
    if made:
        ctx.metrics.deliveries_created.inc(made)
        # This process's sender; the others heard the insert's NOTIFY (a trigger).
        ctx.due.set()
    for d in disabled:
        log.warning(
            "subscription_disabled",
            subscription_id=str(d.subscription_id),
            school_id=d.school_id,
            client_id=d.client_id,
            reason=d.reason,
        )
