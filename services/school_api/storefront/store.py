"""The storefront's SQL: one function per action, each one transaction that writes its rows
and enqueues its events (services/school_api/store.enqueue) together.

Rows are read back with the catalogue's columns, so an event's `data` is the row exactly as
the API answers it. An id left out (None) means "one that fits, at random": what the demo
activity and a quick CLI try want; a given id that does not fit is a StorefrontError.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from libs.common.db import Connection
from services.school_api import resources as r
from services.school_api import store
from services.school_api.resources.model import Resource

S = store.SCHEMA
Row = dict[str, Any]


class StorefrontError(Exception):
    """The action cannot happen as asked (nothing fits, or the given row does not)."""


@dataclass
class Outcome:
    """What an action did: the events it emitted, in order, and the rows it left."""

    events: list[str] = field(default_factory=list)
    rows: dict[str, Row] = field(default_factory=dict)


def _row(record: asyncpg.Record | None) -> Row:
    """The row an UPDATE of a row just locked returns (it cannot be missing)."""
    assert record is not None
    return dict(record)


def _cols(resource: Resource, alias: str = "") -> str:
    prefix = f"{alias}." if alias else ""
    return ", ".join(prefix + c for c in resource.columns)


async def _emit(
    conn: Connection,
    outcome: Outcome,
    school_id: int,
    event_type: str,
    row: Mapping[str, Any],
    key: str | None = None,
) -> None:
    await store.enqueue(conn, event_type, school_id, row, key=key)
    outcome.events.append(event_type)


async def _pick(
    conn: Connection,
    resource: Resource,
    school_id: int,
    row_id: int | None,
    where: str = "TRUE",
    args: Sequence[Any] = (),
    *,
    what: str,
) -> Row:
    """The row `row_id` if it fits `where`, else (None) a random one that does; locked."""
    n = len(args) + 2
    chosen = f"id = ${n}" if row_id is not None else "TRUE"
    order = "" if row_id is not None else " ORDER BY random() LIMIT 1"
    record = await conn.fetchrow(
        f"SELECT {_cols(resource)} FROM {S}.{resource.table}"  # noqa: S608
        f" WHERE school_id = $1 AND ({where}) AND {chosen}{order} FOR UPDATE",
        school_id,
        *args,
        *((row_id,) if row_id is not None else ()),
    )
    if record is None:
        raise StorefrontError(f"no {what}" + (f" with id {row_id}" if row_id is not None else ""))
    return dict(record)


async def _member(conn: Connection, school_id: int, member_id: int | None) -> Row:
    return await _pick(
        conn, r.MEMBERS, school_id, member_id, "status = 'active'", what="active member"
    )


# --- members ---------------------------------------------------------------------------------


async def signup(pool: asyncpg.Pool, school_id: int, *, name: str, email: str) -> Outcome:
    """Someone signs up on the school's site: a new member (member.created)."""
    outcome = Outcome()
    async with store.transaction(pool) as conn:
        try:
            row = await store.insert_row(conn, r.MEMBERS, school_id, {"name": name, "email": email})
        except store.Duplicate:
            raise StorefrontError(f"{email} is already a member") from None
        await _emit(conn, outcome, school_id, "member.created", row)
    outcome.rows["member"] = row
    return outcome


async def remove_member(pool: asyncpg.Pool, school_id: int, *, member_id: int | None) -> Outcome:
    """A member leaves the school (member.deleted). Their enrollments, registrations and
    comments' authorship go with them; a member with orders or subscriptions stays (the
    school keeps its books)."""
    outcome = Outcome()
    async with store.transaction(pool) as conn:
        row = await _pick(
            conn,
            r.MEMBERS,
            school_id,
            member_id,
            f"NOT EXISTS (SELECT 1 FROM {S}.orders o WHERE o.school_id = $1"  # noqa: S608
            f" AND o.member_id = members.id) AND NOT EXISTS (SELECT 1 FROM {S}.subscriptions s"
            " WHERE s.school_id = $1 AND s.member_id = members.id)",
            what="member without orders or subscriptions",
        )
        await conn.execute(
            f"DELETE FROM {S}.members WHERE school_id = $1 AND id = $2",  # noqa: S608
            school_id,
            row["id"],
        )
        await _emit(conn, outcome, school_id, "member.deleted", row)
    outcome.rows["member"] = row
    return outcome


# --- orders ----------------------------------------------------------------------------------


def _discounted(amount: int, coupon: Row) -> int:
    if coupon["discount_percent"] is not None:
        return amount - amount * int(coupon["discount_percent"]) // 100
    return max(0, amount - int(coupon["amount_off_cents"] or 0))


async def checkout(
    pool: asyncpg.Pool,
    school_id: int,
    *,
    member_id: int | None,
    course_id: int | None,
    coupon: str | None,
    paid: bool,
    declined: bool,
) -> Outcome:
    """A member buys a published course: the order is placed (order.created), then paid
    (order.paid: the coupon, if any, is redeemed, coupon.redeemed, and the buyer enrolled,
    enrollment.created unless already) or declined (order.failed), or left pending."""
    if paid and declined:
        raise StorefrontError("an order is paid or declined, not both")
    outcome = Outcome()
    async with store.transaction(pool) as conn:
        member = await _member(conn, school_id, member_id)
        course = await _pick(
            conn, r.COURSES, school_id, course_id, "status = 'published'", what="published course"
        )
        amount = int(course["price_cents"])
        redeemed: Row | None = None
        if coupon is not None:
            redeemed = await _pick(
                conn,
                r.COUPONS,
                school_id,
                None,
                "code = $2 AND active AND (expires_at IS NULL OR expires_at > now())"
                " AND (max_redemptions IS NULL OR redeemed_count < max_redemptions)",
                (coupon.upper(),),
                what=f"usable coupon {coupon!r}",
            )
            amount = _discounted(amount, redeemed)
        order = await store.insert_row(
            conn,
            r.ORDERS,
            school_id,
            {
                "member_id": member["id"],
                "course_id": course["id"],
                "amount_cents": amount,
                "currency": course["currency"],
                "status": "pending",
            },
        )
        await _emit(conn, outcome, school_id, "order.created", order)
        if paid or declined:
            order = await _set_order_status(
                conn, school_id, order["id"], "paid" if paid else "failed"
            )
            await _emit(conn, outcome, school_id, "order.paid" if paid else "order.failed", order)
        if paid and redeemed is not None:
            coupon_row = _row(
                await conn.fetchrow(
                    f"UPDATE {S}.coupons SET redeemed_count = redeemed_count + 1,"  # noqa: S608
                    f" updated_at = now() WHERE school_id = $1 AND id = $2"
                    f" RETURNING {_cols(r.COUPONS)}",
                    school_id,
                    redeemed["id"],
                )
            )
            await _emit(conn, outcome, school_id, "coupon.redeemed", coupon_row)
            outcome.rows["coupon"] = coupon_row
        if paid:
            enrolled = await conn.fetchrow(
                f"INSERT INTO {S}.enrollments (school_id, member_id, course_id)"  # noqa: S608
                " VALUES ($1, $2, $3) ON CONFLICT (school_id, member_id, course_id) DO NOTHING"
                f" RETURNING {_cols(r.ENROLLMENTS)}",
                school_id,
                member["id"],
                course["id"],
            )
            if enrolled is not None:
                await _emit(conn, outcome, school_id, "enrollment.created", dict(enrolled))
                outcome.rows["enrollment"] = dict(enrolled)
    outcome.rows["order"] = order
    return outcome


async def _set_order_status(conn: Connection, school_id: int, order_id: int, status: str) -> Row:
    record = await conn.fetchrow(
        f"UPDATE {S}.orders SET status = $3, updated_at = now()"  # noqa: S608
        f" WHERE school_id = $1 AND id = $2 RETURNING {_cols(r.ORDERS)}",
        school_id,
        order_id,
        status,
    )
    assert record is not None
    return dict(record)


async def refund(pool: asyncpg.Pool, school_id: int, *, order_id: int | None) -> Outcome:
    """A paid order is refunded (order.refunded)."""
    outcome = Outcome()
    async with store.transaction(pool) as conn:
        order = await _pick(
            conn, r.ORDERS, school_id, order_id, "status = 'paid'", what="paid order"
        )
        order = await _set_order_status(conn, school_id, order["id"], "refunded")
        await _emit(conn, outcome, school_id, "order.refunded", order)
    outcome.rows["order"] = order
    return outcome


# --- progress through courses ----------------------------------------------------------------


async def _enrollment(
    conn: Connection, school_id: int, member_id: int | None, course_id: int | None, where: str
) -> Row:
    conditions = [where]
    args: list[Any] = []
    for name, value in (("member_id", member_id), ("course_id", course_id)):
        if value is not None:
            args.append(value)
            conditions.append(f"{name} = ${len(args) + 1}")
    return await _pick(
        conn, r.ENROLLMENTS, school_id, None, " AND ".join(conditions), args, what="enrollment"
    )


async def progress(
    pool: asyncpg.Pool,
    school_id: int,
    *,
    member_id: int | None,
    course_id: int | None,
    percent: int | None,
    step: int = 25,
) -> Outcome:
    """A member gets further through a course (member.progressed and enrollment.updated,
    both carrying the enrollment); reaching 100 completes it (enrollment.completed)."""
    outcome = Outcome()
    async with store.transaction(pool) as conn:
        before = await _enrollment(conn, school_id, member_id, course_id, "status = 'active'")
        now = min(100, int(before["progress_percent"]) + step) if percent is None else percent
        if not 0 <= now <= 100:
            raise StorefrontError("progress is a percentage, 0 to 100")
        row = _row(
            await conn.fetchrow(
                f"UPDATE {S}.enrollments SET progress_percent = $3,"  # noqa: S608
                " status = CASE WHEN $3 = 100 THEN 'completed' ELSE status END,"
                " updated_at = now() WHERE school_id = $1 AND id = $2"
                f" RETURNING {_cols(r.ENROLLMENTS)}",
                school_id,
                before["id"],
                now,
            )
        )
        key = f"enrollment:{row['id']}"
        await _emit(conn, outcome, school_id, "enrollment.updated", row)
        await _emit(conn, outcome, school_id, "member.progressed", row, key)
        if row["status"] == "completed":
            await _emit(conn, outcome, school_id, "enrollment.completed", row)
    outcome.rows["enrollment"] = row
    return outcome


async def unenroll(
    pool: asyncpg.Pool, school_id: int, *, member_id: int | None, course_id: int | None
) -> Outcome:
    """A member leaves a course: the enrollment ends (enrollment.deleted, member.unenrolled,
    both carrying the enrollment as it was)."""
    outcome = Outcome()
    async with store.transaction(pool) as conn:
        row = await _enrollment(conn, school_id, member_id, course_id, "TRUE")
        await conn.execute(
            f"DELETE FROM {S}.enrollments WHERE school_id = $1 AND id = $2",  # noqa: S608
            school_id,
            row["id"],
        )
        await _emit(conn, outcome, school_id, "enrollment.deleted", row)
        await _emit(conn, outcome, school_id, "member.unenrolled", row, f"enrollment:{row['id']}")
    outcome.rows["enrollment"] = row
    return outcome


# --- comments and reviews --------------------------------------------------------------------


async def comment(
    pool: asyncpg.Pool, school_id: int, *, post_id: int | None, member_id: int | None, body: str
) -> Outcome:
    """A member comments on a published post (comment.created)."""
    outcome = Outcome()
    async with store.transaction(pool) as conn:
        post = await _pick(
            conn, r.POSTS, school_id, post_id, "status = 'published'", what="published post"
        )
        member = await _member(conn, school_id, member_id)
        row = await store.insert_row(
            conn,
            r.COMMENTS,
            school_id,
            {"post_id": post["id"], "member_id": member["id"], "body": body},
        )
        await _emit(conn, outcome, school_id, "comment.created", row)
    outcome.rows["comment"] = row
    return outcome


async def hide_comment(pool: asyncpg.Pool, school_id: int, *, comment_id: int | None) -> Outcome:
    """Moderation hides a visible comment (comment.updated)."""
    outcome = Outcome()
    async with store.transaction(pool) as conn:
        found = await _pick(
            conn, r.COMMENTS, school_id, comment_id, "status = 'visible'", what="visible comment"
        )
        row = _row(
            await conn.fetchrow(
                f"UPDATE {S}.comments SET status = 'hidden' WHERE school_id = $1"  # noqa: S608
                f" AND id = $2 RETURNING {_cols(r.COMMENTS)}",
                school_id,
                found["id"],
            )
        )
        await _emit(conn, outcome, school_id, "comment.updated", row)
    outcome.rows["comment"] = row
    return outcome


async def _delete(
    pool: asyncpg.Pool, resource: Resource, school_id: int, row_id: int | None, what: str
) -> Outcome:
    outcome = Outcome()
    async with store.transaction(pool) as conn:
        row = await _pick(conn, resource, school_id, row_id, what=what)
        await conn.execute(
            f"DELETE FROM {S}.{resource.table} WHERE school_id = $1 AND id = $2",  # noqa: S608
            school_id,
            row["id"],
        )
        await _emit(conn, outcome, school_id, f"{resource.singular}.deleted", row)
    outcome.rows[resource.singular] = row
    return outcome


async def delete_comment(pool: asyncpg.Pool, school_id: int, *, comment_id: int | None) -> Outcome:
    """Its author removes a comment (comment.deleted)."""
    return await _delete(pool, r.COMMENTS, school_id, comment_id, "comment")


async def review(
    pool: asyncpg.Pool,
    school_id: int,
    *,
    course_id: int | None,
    member_id: int | None,
    rating: int,
    body: str,
) -> Outcome:
    """A member reviews a published course (review.created)."""
    if not 1 <= rating <= 5:
        raise StorefrontError("a rating is 1 to 5 stars")
    outcome = Outcome()
    async with store.transaction(pool) as conn:
        course = await _pick(
            conn, r.COURSES, school_id, course_id, "status = 'published'", what="published course"
        )
        member = await _member(conn, school_id, member_id)
        row = await store.insert_row(
            conn,
            r.REVIEWS,
            school_id,
            {"course_id": course["id"], "member_id": member["id"], "rating": rating, "body": body},
        )
        await _emit(conn, outcome, school_id, "review.created", row)
    outcome.rows["review"] = row
    return outcome


async def edit_review(
    pool: asyncpg.Pool, school_id: int, *, review_id: int | None, rating: int, body: str | None
) -> Outcome:
    """Its author changes a review's stars (and words) (review.updated)."""
    if not 1 <= rating <= 5:
        raise StorefrontError("a rating is 1 to 5 stars")
    outcome = Outcome()
    async with store.transaction(pool) as conn:
        found = await _pick(conn, r.REVIEWS, school_id, review_id, what="review")
        row = _row(
            await conn.fetchrow(
                f"UPDATE {S}.reviews SET rating = $3, body = coalesce($4, body)"  # noqa: S608
                f" WHERE school_id = $1 AND id = $2 RETURNING {_cols(r.REVIEWS)}",
                school_id,
                found["id"],
                rating,
                body,
            )
        )
        await _emit(conn, outcome, school_id, "review.updated", row)
    outcome.rows["review"] = row
    return outcome


async def delete_review(pool: asyncpg.Pool, school_id: int, *, review_id: int | None) -> Outcome:
    """Its author removes a review (review.deleted)."""
    return await _delete(pool, r.REVIEWS, school_id, review_id, "review")


# --- the school's events ---------------------------------------------------------------------


async def register(
    pool: asyncpg.Pool, school_id: int, *, event_id: int | None, member_id: int | None
) -> Outcome:
    """A member registers for a scheduled event with a seat left (event.attendee_registered,
    carrying the attendee); registering again after cancelling registers anew."""
    outcome = Outcome()
    async with store.transaction(pool) as conn:
        event = await _pick(
            conn,
            r.EVENTS,
            school_id,
            event_id,
            "status = 'scheduled' AND starts_at > now() AND (capacity IS NULL OR capacity >"  # noqa: S608
            f" (SELECT count(*) FROM {S}.attendees a WHERE a.school_id = $1"
            " AND a.event_id = events.id AND a.status = 'registered'))",
            what="upcoming event with a seat left",
        )
        # One not registered yet, unless the caller named one.
        member = await _pick(
            conn,
            r.MEMBERS,
            school_id,
            member_id,
            "status = 'active' AND NOT EXISTS (SELECT 1 FROM"  # noqa: S608
            f" {S}.attendees a WHERE a.school_id = $1 AND a.event_id = $2"
            " AND a.member_id = members.id AND a.status = 'registered')",
            (event["id"],),
            what=f"active member not registered for event {event['id']}",
        )
        record = await conn.fetchrow(
            f"INSERT INTO {S}.attendees AS a (school_id, event_id, member_id)"  # noqa: S608
            " VALUES ($1, $2, $3) ON CONFLICT (school_id, event_id, member_id) DO UPDATE"
            " SET status = 'registered', registered_at = now() WHERE a.status = 'cancelled'"
            f" RETURNING {_cols(r.ATTENDEES)}",
            school_id,
            event["id"],
            member["id"],
        )
        if record is None:
            raise StorefrontError(f"member {member['id']} is already registered")
        row = dict(record)
        await _emit(
            conn, outcome, school_id, "event.attendee_registered", row, f"event:{event['id']}"
        )
    outcome.rows["attendee"] = row
    return outcome


async def cancel_registration(
    pool: asyncpg.Pool, school_id: int, *, event_id: int | None, member_id: int | None
) -> Outcome:
    """A member cancels their registration (event.attendee_cancelled, carrying the attendee)."""
    conditions = ["status = 'registered'"]
    args: list[Any] = []
    for name, value in (("event_id", event_id), ("member_id", member_id)):
        if value is not None:
            args.append(value)
            conditions.append(f"{name} = ${len(args) + 1}")
    outcome = Outcome()
    async with store.transaction(pool) as conn:
        found = await _pick(
            conn, r.ATTENDEES, school_id, None, " AND ".join(conditions), args, what="registration"
        )
        row = _row(
            await conn.fetchrow(
                f"UPDATE {S}.attendees SET status = 'cancelled' WHERE school_id = $1"  # noqa: S608
                f" AND id = $2 RETURNING {_cols(r.ATTENDEES)}",
                school_id,
                found["id"],
            )
        )
        await _emit(
            conn, outcome, school_id, "event.attendee_cancelled", row, f"event:{row['event_id']}"
        )
    outcome.rows["attendee"] = row
    return outcome


# --- subscriptions ---------------------------------------------------------------------------


async def renew(pool: asyncpg.Pool, school_id: int, *, subscription_id: int | None) -> Outcome:
    """An active or past-due subscription is paid for another period of its plan
    (subscription.renewed)."""
    outcome = Outcome()
    async with store.transaction(pool) as conn:
        found = await _pick(
            conn,
            r.SUBSCRIPTIONS,
            school_id,
            subscription_id,
            "status IN ('active', 'past_due')",
            what="active or past-due subscription",
        )
        row = _row(
            await conn.fetchrow(
                f"UPDATE {S}.subscriptions s SET status = 'active',"  # noqa: S608
                " current_period_end = greatest(coalesce(s.current_period_end, now()), now())"
                "   + CASE p.billing_interval WHEN 'year' THEN interval '1 year'"
                "     ELSE interval '1 month' END,"
                f" updated_at = now() FROM {S}.membership_plans p"
                " WHERE s.school_id = $1 AND s.id = $2 AND p.school_id = $1"
                f" AND p.id = s.membership_plan_id RETURNING {_cols(r.SUBSCRIPTIONS, 's')}",
                school_id,
                found["id"],
            )
        )
        await _emit(conn, outcome, school_id, "subscription.renewed", row)
    outcome.rows["subscription"] = row
    return outcome


async def cancel_subscription(
    pool: asyncpg.Pool, school_id: int, *, subscription_id: int | None
) -> Outcome:
    """A member cancels a subscription (subscription.cancelled)."""
    outcome = Outcome()
    async with store.transaction(pool) as conn:
        found = await _pick(
            conn,
            r.SUBSCRIPTIONS,
            school_id,
            subscription_id,
            "status <> 'cancelled'",
            what="subscription not yet cancelled",
        )
        row = _row(
            await conn.fetchrow(
                f"UPDATE {S}.subscriptions SET status = 'cancelled', cancelled_at = now(),"  # noqa: S608
                " updated_at = now() WHERE school_id = $1 AND id = $2"
                f" RETURNING {_cols(r.SUBSCRIPTIONS)}",
                school_id,
                found["id"],
            )
        )
        await _emit(conn, outcome, school_id, "subscription.cancelled", row)
    outcome.rows["subscription"] = row
    return outcome


async def demo_schools(db: Connection | asyncpg.Pool) -> list[int]:
    """The schools that were given sample data: the ones the demo activity acts in."""
    return [
        int(v)
        for (v,) in await db.fetch(f"SELECT school_id FROM {S}.seeded_schools ORDER BY school_id")  # noqa: S608
    ]
