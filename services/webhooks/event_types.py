"""The published table of event types and the scope that gates each (seed 003: subscribe
webhooks to events the user authorized; never to events outside the granted scopes).

A type is `family.action`. A subscription names exact types (`course.updated`) or a whole
family (`course.*`); both need the family's read scope, any-of where the table lists two.
The table is served at `GET /v1/webhooks/event-types`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from libs.common.scopes import satisfies

# Our own: an endpoint of the same client was disabled. Needs no scope, it concerns only the
# client's own subscriptions.
ENDPOINT_DISABLED = "endpoint.disabled"

_CRUD = ("created", "updated", "deleted")
_CURRICULUM_READ = ("curriculum:read", "courses:read")

# The API write that emits each type added with the curriculum and the scopes' split (issue 17
# section 3), for the `{type, scope, source, description}` catalogue.
SOURCES: dict[str, str] = {
    "chapter.created": "POST /api/v1/chapters",
    "chapter.updated": "PATCH /api/v1/chapters/{id}",
    "chapter.deleted": "DELETE /api/v1/chapters/{id}",
    "material.created": "POST /api/v1/materials",
    "material.updated": "PATCH /api/v1/materials/{id}",
    "material.deleted": "DELETE /api/v1/materials/{id}",
    "enrollment.created": "POST /api/v1/enrollments, POST /api/v1/members/{id}/enrollments",
    "enrollment.updated": "PATCH /api/v1/enrollments/{id}",
    "enrollment.deleted": "DELETE /api/v1/enrollments/{id}",
    "appearance.updated": "PATCH /api/v1/settings/appearance, PATCH /api/v1/settings",
}


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    # Any one of these, with the `read` umbrella expanded, allows subscribing.
    scopes: tuple[str, ...]
    actions: tuple[str, ...]
    description: str


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("course", ("courses:read",), (*_CRUD, "published"), "Courses"),
        Family("review", ("courses:read",), _CRUD, "Course reviews"),
        Family(
            "member",
            ("students:read",),
            (*_CRUD, "enrolled", "unenrolled", "progressed"),
            "Members (students) and their enrollments",
        ),
        # Seed 002: courses:read reads "enrollment data" too.
        Family(
            "enrollment",
            ("courses:read", "students:read"),
            (*_CRUD, "completed"),
            "Members' course enrollments",
        ),
        Family("order", ("orders:read",), (*_CRUD, "paid", "refunded", "failed"), "Orders"),
        Family("post", ("posts:read",), (*_CRUD, "published"), "Posts"),
        Family(
            "event",
            ("events:read",),
            (*_CRUD, "cancelled", "attendee_registered", "attendee_cancelled"),
            "School events and their attendees",
        ),
        # Seed 002: the curriculum reads with curriculum:read or a course's courses:read.
        Family("chapter", _CURRICULUM_READ, _CRUD, "Chapters of a course (curriculum)"),
        Family("lesson", _CURRICULUM_READ, (*_CRUD, "published"), "Lessons (curriculum)"),
        Family("material", _CURRICULUM_READ, _CRUD, "Materials of a lesson (curriculum)"),
        Family("coupon", ("coupons:read",), (*_CRUD, "redeemed"), "Coupons"),
        Family("membership_plan", ("membership_plans:read",), _CRUD, "Membership plans"),
        Family("digital_download", ("digital_products:read",), (*_CRUD, "published"), "Downloads"),
        Family("comment", ("comments:read",), _CRUD, "Comments"),
        Family("lecturer", ("lecturers:read",), _CRUD, "Lecturers"),
        Family(
            "subscription",
            ("subscriptions:read",),
            (*_CRUD, "renewed", "cancelled"),
            "Members' subscriptions to membership plans",
        ),
        # The whole settings object is school:read's; appearance:read hears of the theme only.
        Family("settings", ("school:read",), ("updated",), "School settings"),
        Family(
            "appearance",
            ("appearance:read", "school:read"),
            ("updated",),
            "School appearance and theme settings",
        ),
        # Uploads have no read scope of their own: the scope that makes them sees them.
        Family("upload", ("storage:write",), ("created", "confirmed"), "Uploaded files"),
        Family("endpoint", (), ("disabled",), "This client's own webhook endpoints"),
    )
}

EVENT_TYPES: dict[str, Family] = {
    f"{family.name}.{action}": family for family in FAMILIES.values() for action in family.actions
}


class UnknownEventType(ValueError):
    def __init__(self, event_type: str) -> None:
        super().__init__(f"unknown event type {event_type!r}")
        self.event_type = event_type


class ScopeMissing(PermissionError):
    def __init__(self, event_type: str, scopes: Sequence[str]) -> None:
        super().__init__(f"{event_type} needs {' or '.join(scopes)}")
        self.event_type = event_type
        self.scopes = tuple(scopes)


def family_of(pattern: str) -> Family:
    """The family an exact type or a `family.*` wildcard names; UnknownEventType otherwise."""
    family = FAMILIES.get(pattern[:-2]) if pattern.endswith(".*") else EVENT_TYPES.get(pattern)
    if family is None:
        raise UnknownEventType(pattern)
    return family


def check_subscribable(patterns: Iterable[str], granted: Iterable[str]) -> None:
    """Every pattern known and allowed by the granted scopes, or the first problem raised."""
    granted = tuple(granted)
    for pattern in patterns:
        family = family_of(pattern)
        if family.scopes and not satisfies(granted, family.scopes):
            raise ScopeMissing(pattern, family.scopes)


def matches(pattern: str, event_type: str) -> bool:
    """The dispatcher's rule, in Python (the SQL in store/events.py applies the same one)."""
    if pattern.endswith(".*"):
        return event_type.split(".", 1)[0] == pattern[:-2]
    return pattern == event_type


def catalogue() -> dict[str, object]:
    """The published table: every exact type and every wildcard, each with its scopes."""
    return {
        "data": [
            {
                "type": name,
                "scopes": list(family.scopes),
                "description": f"{family.description}: {name.split('.', 1)[1]}",
            }
            for name, family in EVENT_TYPES.items()
        ],
        "wildcards": [
            {"pattern": f"{family.name}.*", "scopes": list(family.scopes)}
            for family in FAMILIES.values()
        ],
        # An any-of list: one of the scopes is enough; `read` stands for every `:read` scope.
        "scope_rule": "any_of",
    }
