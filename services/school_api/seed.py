"""Sample data for a school: lecturers, courses with their chapters, lessons and materials,
members, enrollments, orders, reviews, plans and subscriptions, events with attendees,
coupons, posts with comments, digital downloads and settings.

Every title carries the school's name, so two seeded schools are easy to tell apart (and a
leak between them easy to see). Seeding is idempotent and all-or-nothing: one transaction,
once per school. It publishes no events: nothing happened that a subscriber should hear of.

The rows are data (`_ROWS`, in the order they are inserted): strings are templates over the
school's `{name}` and `{slug}`, a `timedelta` is that long from now, and `_Seeded(resource, i)`
is the id of the i-th row of `resource` seeded before it.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from libs.common.db import Connection
from services.school_api import resources as r
from services.school_api import store
from services.school_api.resources.model import Resource

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
_CHAPTERS = ("Getting started", "Going further")
_LESSONS = ("Welcome and materials", "First steps", "Practice project", "Review and next steps")
_MEMBERS = (
    ("Ana Souza", "ana.souza"),
    ("Ben Carter", "ben.carter"),
    ("Chloé Martin", "chloe.martin"),
    ("Dev Patel", "dev.patel"),
    ("Emi Tanaka", "emi.tanaka"),
    ("Farah Haddad", "farah.haddad"),
)


# The first three courses are the ones on sale that members bought.
_PAID_COURSES = 3
_EVENTS = (
    (14, "Open Studio Night", 30, range(3)),
    (45, "Spring Showcase", None, range(2, 4)),
)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "school"


def _colour(name: str, salt: str) -> str:
    return "#" + hashlib.sha256(f"{salt}:{name}".encode()).hexdigest()[:6]


@dataclass(frozen=True, slots=True)
class _Seeded:
    """The id of the `index`-th row of `resource` seeded before the row that names it."""

    resource: Resource
    index: int


@dataclass(frozen=True, slots=True)
class _Colour:
    """A colour of the school's own, made from its name."""

    salt: str


Row = tuple[Resource, Mapping[str, Any]]


def _course(index: int) -> Iterator[Row]:
    """A course, its two chapters, then its lessons (published with it, drafts with a draft),
    two to a chapter, each with a material."""
    title, description, status, price, lecturer = _COURSES[index]
    yield (
        r.COURSES,
        {
            "title": f"{{name}}: {title}",
            "description": description,
            "status": status,
            "price_cents": price,
            "currency": "USD",
            "lecturer_id": _Seeded(r.LECTURERS, lecturer),
        },
    )
    for position, chapter in enumerate(_CHAPTERS, start=1):
        yield (
            r.CHAPTERS,
            {
                "course_id": _Seeded(r.COURSES, index),
                "title": f"{title}: {chapter}",
                "position": position,
                "description": f"{chapter} of {title} at {{name}}.",
            },
        )
    per_chapter = len(_LESSONS) // len(_CHAPTERS)
    for position, lesson in enumerate(_LESSONS, start=1):
        lesson_index = index * len(_LESSONS) + position - 1
        yield (
            r.LESSONS,
            {
                "course_id": _Seeded(r.COURSES, index),
                "chapter_id": _Seeded(
                    r.CHAPTERS, index * len(_CHAPTERS) + (position - 1) // per_chapter
                ),
                "title": f"{title}: {lesson}",
                "position": position,
                "content": f"{lesson} for {title} at {{name}}.",
                "duration_minutes": 10 + 5 * position,
                "status": "published" if status == "published" else "draft",
            },
        )
        yield (
            r.MATERIALS,
            {
                "lesson_id": _Seeded(r.LESSONS, lesson_index),
                "title": f"{lesson}: worksheet",
                "kind": "link",
                "url": f"https://files.loopwise.com/{{slug}}/c{index + 1}/lesson-{position}.pdf",
                "position": 1,
            },
        )


def _purchase(i: int) -> Iterator[Row]:
    """Member i enrolled in a course on sale, their order, and from the first three a review."""
    member, course = _Seeded(r.MEMBERS, i), _Seeded(r.COURSES, i % _PAID_COURSES)
    yield (
        r.ENROLLMENTS,
        {
            "member_id": member,
            "course_id": course,
            "status": "completed" if i == 0 else "active",
            "progress_percent": (i * 23) % 101,
        },
    )
    yield (
        r.ORDERS,
        {
            "member_id": member,
            "course_id": course,
            "amount_cents": _COURSES[i % _PAID_COURSES][3],
            "currency": "USD",
            "status": ("paid", "paid", "paid", "pending", "refunded")[i],
        },
    )
    if i < 3:
        body = "Loved learning at {name}." if i == 0 else "Helpful."
        yield r.REVIEWS, {"course_id": course, "member_id": member, "rating": 5 - i, "body": body}


def _event(index: int) -> Iterator[Row]:
    """An event some days ahead, then the members registered for it."""
    days, title, capacity, attendees = _EVENTS[index]
    yield (
        r.EVENTS,
        {
            "title": f"{{name}} {title}",
            "description": "Join {name} for an evening of painting together.",
            "starts_at": timedelta(days=days),
            "ends_at": timedelta(days=days, hours=2),
            "location": "{name} studio",
            "capacity": capacity,
        },
    )
    for member in attendees:
        yield (
            r.ATTENDEES,
            {"event_id": _Seeded(r.EVENTS, index), "member_id": _Seeded(r.MEMBERS, member)},
        )


_ROWS: tuple[Row, ...] = (
    *(
        (
            r.LECTURERS,
            {
                "name": who,
                "email": f"{_slug(who)}@{{slug}}.example.com",
                "bio": f"{bio} Teaches at {{name}}.",
            },
        )
        for who, bio in _LECTURERS
    ),
    *(row for index in range(len(_COURSES)) for row in _course(index)),
    *(
        (
            r.MEMBERS,
            {
                "name": who,
                "email": f"{local}@{{slug}}.example.com",
                "status": "suspended" if i == len(_MEMBERS) - 1 else "active",
            },
        )
        for i, (who, local) in enumerate(_MEMBERS)
    ),
    *(row for i in range(5) for row in _purchase(i)),
    (
        r.MEMBERSHIP_PLANS,
        {
            "name": "{name} Monthly",
            "description": "Every course, every month.",
            "price_cents": 1500,
            "currency": "USD",
            "billing_interval": "month",
        },
    ),
    (
        r.MEMBERSHIP_PLANS,
        {
            "name": "{name} Annual",
            "description": "Every course for a year, two months free.",
            "price_cents": 15000,
            "currency": "USD",
            "billing_interval": "year",
        },
    ),
    (
        r.SUBSCRIPTIONS,
        {
            "member_id": _Seeded(r.MEMBERS, 1),
            "membership_plan_id": _Seeded(r.MEMBERSHIP_PLANS, 0),
            "current_period_end": timedelta(days=30),
        },
    ),
    (
        r.SUBSCRIPTIONS,
        {
            "member_id": _Seeded(r.MEMBERS, 2),
            "membership_plan_id": _Seeded(r.MEMBERSHIP_PLANS, 1),
            "status": "cancelled",
            "cancelled_at": -timedelta(days=3),
        },
    ),
    *(row for index in range(len(_EVENTS)) for row in _event(index)),
    (
        r.COUPONS,
        {
            "code": "WELCOME10",
            "description": "10% off at {name}",
            "discount_percent": 10,
            "currency": "USD",
            "max_redemptions": 100,
        },
    ),
    (
        r.COUPONS,
        {
            "code": "SPRING20",
            "description": "$20 off any course",
            "amount_off_cents": 2000,
            "currency": "USD",
            "expires_at": timedelta(days=60),
        },
    ),
    (
        r.POSTS,
        {
            "title": "Welcome to {name}",
            "status": "published",
            "body": "We are glad you are here. Start with Watercolour Foundations.",
            "lecturer_id": _Seeded(r.LECTURERS, 0),
            "published_at": -timedelta(days=7),
        },
    ),
    (
        r.POSTS,
        {
            "title": "{name}: five tips for looser washes",
            "status": "published",
            "body": "1. Use more water than you think...",
            "lecturer_id": _Seeded(r.LECTURERS, 0),
            "published_at": -timedelta(days=2),
        },
    ),
    (
        r.POSTS,
        {
            "title": "{name} Spring Showcase: call for work",
            "body": "Draft.",
            "lecturer_id": _Seeded(r.LECTURERS, 1),
        },
    ),
    *(
        (
            r.COMMENTS,
            {
                "post_id": _Seeded(r.POSTS, i % 2),
                "member_id": _Seeded(r.MEMBERS, i),
                "body": "Thank you!" if i else "So happy to be part of {name}.",
            },
        )
        for i in range(3)
    ),
    (
        r.DIGITAL_DOWNLOADS,
        {
            "title": "{name} Brush Cheat Sheet",
            "description": "Which brush for which stroke, on one page (PDF).",
            "price_cents": 500,
            "currency": "USD",
            "file_url": "https://files.loopwise.com/{slug}/brush-cheat-sheet.pdf",
            "status": "published",
        },
    ),
    (
        r.DIGITAL_DOWNLOADS,
        {
            "title": "{name} Colour Mixing Charts",
            "description": "Printable charts to fill in as you practise.",
            "price_cents": 0,
            "currency": "USD",
            "status": "draft",
        },
    ),
)

_SETTINGS: Mapping[str, Any] = {
    "name": "{name}",
    "tagline": "Learn to paint with {name}",
    "description": "{name} teaches watercolour, illustration and colour online.",
    "contact_email": "hello@{slug}.example.com",
    "timezone": "UTC",
    "locale": "en",
    "currency": "USD",
    "primary_color": _Colour("primary"),
    "accent_color": _Colour("accent"),
}


@dataclass(frozen=True, slots=True)
class _School:
    """What the rows' values are made of for one school."""

    name: str
    slug: str
    now: datetime
    # By resource name, the ids seeded so far, in order.
    seeded: dict[str, list[int]]

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return value.format(name=self.name, slug=self.slug)
        if isinstance(value, timedelta):
            return self.now + value
        if isinstance(value, _Seeded):
            return self.seeded[value.resource.name][value.index]
        if isinstance(value, _Colour):
            return _colour(self.name, value.salt)
        return value

    def values(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return {key: self.value(value) for key, value in values.items()}


async def seed_school(pool: asyncpg.Pool, school_id: int, school_name: str) -> bool:
    """Give the school its sample data unless it has it; True when this call added it."""
    async with store.transaction(pool) as conn:
        if not await store.claim_seeding(conn, school_id):
            return False
        await _seed(conn, school_id, school_name)
    return True


async def _seed(conn: Connection, school_id: int, name: str) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    school = _School(name, _slug(name), now, defaultdict(list))
    for resource, values in _ROWS:
        row = await store.insert_row(conn, resource, school_id, school.values(values))
        school.seeded[resource.name].append(int(row["id"]))
    await store.save_settings(conn, school_id, school.values(_SETTINGS), publish=False)
