"""Sample data for a school: lecturers, courses and their lessons, members, enrollments,
orders, reviews, plans and subscriptions, events with attendees, coupons, posts with comments,
digital downloads and settings.

Every title carries the school's name, so two seeded schools are easy to tell apart (and a
leak between them easy to see). Seeding is idempotent and all-or-nothing: one transaction,
once per school. It publishes no events: nothing happened that a subscriber should hear of.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from libs.common.db import Connection
from services.school_api import resources as r
from services.school_api import store

_LECTURERS = (
    ("Maya Lindqvist", "Paints loose, luminous watercolours and has taught for fifteen years."),
    ("Tomás Okafor", "Illustrator and animator; teaches digital drawing and composition."),
)
_COURSES = (
    (
        "Watercolour Foundations",
        "Materials, washes, wet-in-wet and glazing, step by step.",
        "published",
        4900,
        0,
    ),
    (
        "Digital Illustration with Procreate",
        "From first sketch to finished piece on an iPad.",
        "published",
        7900,
        1,
    ),
    (
        "Colour Theory Essentials",
        "Hue, value and temperature, and how to mix what you see.",
        "published",
        2900,
        1,
    ),
    (
        "Portfolio Review Clinic",
        "Bring your work; leave with a plan. Opens next term.",
        "draft",
        0,
        0,
    ),
)
_LESSONS = ("Welcome and materials", "First steps", "Practice project", "Review and next steps")
_MEMBERS = (
    ("Ana Souza", "ana.souza"),
    ("Ben Carter", "ben.carter"),
    ("Chloé Martin", "chloe.martin"),
    ("Dev Patel", "dev.patel"),
    ("Emi Tanaka", "emi.tanaka"),
    ("Farah Haddad", "farah.haddad"),
)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "school"


def _colour(name: str, salt: str) -> str:
    return "#" + hashlib.sha256(f"{salt}:{name}".encode()).hexdigest()[:6]


async def _add(conn: Connection, resource: r.Resource, school_id: int, **values: Any) -> int:
    row = await store.insert_row(conn, resource, school_id, values)
    return int(row["id"])


async def seed_school(pool: asyncpg.Pool, school_id: int, school_name: str) -> bool:
    """Give the school its sample data unless it has it; True when this call added it."""
    async with store.transaction(pool) as conn:
        if not await store.claim_seeding(conn, school_id):
            return False
        await _seed(conn, school_id, school_name)
    return True


async def _seed(conn: Connection, school_id: int, name: str) -> None:
    slug = _slug(name)
    now = datetime.now(UTC).replace(microsecond=0)

    lecturers = [
        await _add(
            conn,
            r.LECTURERS,
            school_id,
            name=who,
            email=f"{_slug(who)}@{slug}.example.com",
            bio=f"{bio} Teaches at {name}.",
        )
        for who, bio in _LECTURERS
    ]
    courses = []
    for title, description, status, price, lecturer in _COURSES:
        course = await _add(
            conn,
            r.COURSES,
            school_id,
            title=f"{name}: {title}",
            description=description,
            status=status,
            price_cents=price,
            currency="USD",
            lecturer_id=lecturers[lecturer],
        )
        courses.append(course)
        for position, lesson in enumerate(_LESSONS, start=1):
            await _add(
                conn,
                r.LESSONS,
                school_id,
                course_id=course,
                title=f"{title}: {lesson}",
                position=position,
                content=f"{lesson} for {title} at {name}.",
                duration_minutes=10 + 5 * position,
                status="published" if status == "published" else "draft",
            )
    members = [
        await _add(
            conn,
            r.MEMBERS,
            school_id,
            name=who,
            email=f"{local}@{slug}.example.com",
            status="suspended" if i == len(_MEMBERS) - 1 else "active",
        )
        for i, (who, local) in enumerate(_MEMBERS)
    ]
    paid = courses[:3]
    for i, member in enumerate(members[:5]):
        course = paid[i % len(paid)]
        await _add(
            conn,
            r.ENROLLMENTS,
            school_id,
            member_id=member,
            course_id=course,
            status="completed" if i == 0 else "active",
            progress_percent=(i * 23) % 101,
        )
        await _add(
            conn,
            r.ORDERS,
            school_id,
            member_id=member,
            course_id=course,
            amount_cents=_COURSES[i % len(paid)][3],
            currency="USD",
            status=("paid", "paid", "paid", "pending", "refunded")[i],
        )
        if i < 3:
            await _add(
                conn,
                r.REVIEWS,
                school_id,
                course_id=course,
                member_id=member,
                rating=5 - i,
                body=f"Loved learning at {name}." if i == 0 else "Helpful.",
            )
    plans = [
        await _add(
            conn,
            r.MEMBERSHIP_PLANS,
            school_id,
            name=f"{name} Monthly",
            description="Every course, every month.",
            price_cents=1500,
            currency="USD",
            billing_interval="month",
        ),
        await _add(
            conn,
            r.MEMBERSHIP_PLANS,
            school_id,
            name=f"{name} Annual",
            description="Every course for a year, two months free.",
            price_cents=15000,
            currency="USD",
            billing_interval="year",
        ),
    ]
    await _add(
        conn,
        r.SUBSCRIPTIONS,
        school_id,
        member_id=members[1],
        membership_plan_id=plans[0],
        current_period_end=now + timedelta(days=30),
    )
    await _add(
        conn,
        r.SUBSCRIPTIONS,
        school_id,
        member_id=members[2],
        membership_plan_id=plans[1],
        status="cancelled",
        cancelled_at=now - timedelta(days=3),
    )
    for days, title, capacity, who in (
        (14, "Open Studio Night", 30, members[:3]),
        (45, "Spring Showcase", None, members[2:4]),
    ):
        event = await _add(
            conn,
            r.EVENTS,
            school_id,
            title=f"{name} {title}",
            description=f"Join {name} for an evening of painting together.",
            starts_at=now + timedelta(days=days),
            ends_at=now + timedelta(days=days, hours=2),
            location=f"{name} studio",
            capacity=capacity,
        )
        for member in who:
            await _add(conn, r.ATTENDEES, school_id, event_id=event, member_id=member)
    await _add(
        conn,
        r.COUPONS,
        school_id,
        code="WELCOME10",
        description=f"10% off at {name}",
        discount_percent=10,
        currency="USD",
        max_redemptions=100,
    )
    await _add(
        conn,
        r.COUPONS,
        school_id,
        code="SPRING20",
        description="$20 off any course",
        amount_off_cents=2000,
        currency="USD",
        expires_at=now + timedelta(days=60),
    )
    posts = [
        await _add(
            conn,
            r.POSTS,
            school_id,
            title=f"Welcome to {name}",
            status="published",
            body="We are glad you are here. Start with Watercolour Foundations.",
            lecturer_id=lecturers[0],
            published_at=now - timedelta(days=7),
        ),
        await _add(
            conn,
            r.POSTS,
            school_id,
            title=f"{name}: five tips for looser washes",
            status="published",
            body="1. Use more water than you think...",
            lecturer_id=lecturers[0],
            published_at=now - timedelta(days=2),
        ),
        await _add(
            conn,
            r.POSTS,
            school_id,
            title=f"{name} Spring Showcase: call for work",
            body="Draft.",
            lecturer_id=lecturers[1],
        ),
    ]
    for i, member in enumerate(members[:3]):
        await _add(
            conn,
            r.COMMENTS,
            school_id,
            post_id=posts[i % 2],
            member_id=member,
            body="Thank you!" if i else f"So happy to be part of {name}.",
        )
    await _add(
        conn,
        r.DIGITAL_DOWNLOADS,
        school_id,
        title=f"{name} Brush Cheat Sheet",
        description="Which brush for which stroke, on one page (PDF).",
        price_cents=500,
        currency="USD",
        file_url=f"https://files.loopwise.com/{slug}/brush-cheat-sheet.pdf",
        status="published",
    )
    await _add(
        conn,
        r.DIGITAL_DOWNLOADS,
        school_id,
        title=f"{name} Colour Mixing Charts",
        description="Printable charts to fill in as you practise.",
        price_cents=0,
        currency="USD",
        status="draft",
    )
    await store.save_settings(
        conn,
        school_id,
        {
            "name": name,
            "tagline": f"Learn to paint with {name}",
            "description": f"{name} teaches watercolour, illustration and colour online.",
            "contact_email": f"hello@{slug}.example.com",
            "timezone": "UTC",
            "locale": "en",
            "currency": "USD",
            "primary_color": _colour(name, "primary"),
            "accent_color": _colour(name, "accent"),
        },
        publish=False,
    )
