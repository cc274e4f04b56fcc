"""The published table of event types: what the system emits, the scope that gates each
(seed 003: subscribe webhooks to events the user authorized; never to events outside the
granted scopes), and what emits it.

`EVENT_TYPES` is the single source: subscriptions validate against it, `GET
/v1/webhooks/event-types` serves it, the docs read it, and tests/test_event_catalogue.py
triggers every entry through its `source` and sees it delivered. A type is listed only when
something emits it; a type added here without a trigger in that test's table fails the test.

A type is `family.action`. A subscription names exact types (`course.updated`) or a whole
family (`course.*`); both need the family's read scope, any-of where an entry lists two.
`source` names the API write (`POST /api/v1/courses`) or the storefront action
(`storefront checkout --paid`, services/school_api/storefront/) that emits the type.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from libs.common.scopes import satisfies

# Our own: an endpoint of the same client was disabled. Needs no scope, it concerns only the
# client's own subscriptions.
ENDPOINT_DISABLED = "endpoint.disabled"


@dataclass(frozen=True, slots=True)
class EventType:
    type: str
    # Any one of these, with the `read` umbrella expanded, allows subscribing; the first is
    # the one the catalogue names as `scope`.
    scopes: tuple[str, ...]
    source: str
    description: str

    @property
    def family(self) -> str:
        return self.type.split(".", 1)[0]


_COURSES = ("courses:read",)
_STUDENTS = ("students:read",)
_ORDERS = ("orders:read",)
_POSTS = ("posts:read",)
_EVENTS = ("events:read",)
# Seed 002: courses:read reads a course's curriculum and its enrollment data too.
_CURRICULUM = ("curriculum:read", "courses:read")
_ENROLLMENTS = ("courses:read", "students:read")
_COUPONS = ("coupons:read",)
_PLANS = ("membership_plans:read",)
_DOWNLOADS = ("digital_products:read",)
_COMMENTS = ("comments:read",)
_LECTURERS = ("lecturers:read",)
_SUBSCRIPTIONS = ("subscriptions:read",)
# The whole settings object is school:read's; appearance:read hears of the theme only.
_SETTINGS = ("school:read",)
_APPEARANCE = ("appearance:read", "school:read")
# Uploads have no read scope of their own: the scope that makes them sees them.
_UPLOADS = ("storage:write",)

E = EventType

# The catalogue, in the order it is served. Each `data` is the row as the API answers it
# (for member.progressed/unenrolled: the enrollment; for event.attendee_*: the attendee).
CATALOGUE: tuple[EventType, ...] = (
    E("course.created", _COURSES, "POST /api/v1/courses", "A course was created"),
    E("course.updated", _COURSES, "PATCH /api/v1/courses/{id}", "A course changed"),
    E("course.deleted", _COURSES, "DELETE /api/v1/courses/{id}", "A course was deleted"),
    E(
        "course.published",
        _COURSES,
        "PATCH /api/v1/courses/{id} with status published",
        "A course went from draft or archived to published (with course.updated)",
    ),
    E("review.created", _COURSES, "storefront review", "A member reviewed a course"),
    E("review.updated", _COURSES, "storefront edit-review", "A member changed their review"),
    E("review.deleted", _COURSES, "storefront delete-review", "A member removed their review"),
    E("member.created", _STUDENTS, "storefront signup", "Someone signed up on the storefront"),
    E("member.enrolled", _STUDENTS, "POST /api/v1/members", "The school enrolled a member"),
    E("member.updated", _STUDENTS, "PATCH /api/v1/members/{id}", "A member changed"),
    E(
        "member.deleted",
        _STUDENTS,
        "storefront remove-member",
        "A member without orders or subscriptions left the school; their enrollments and"
        " event registrations went with them (no event of their own)",
    ),
    E(
        "member.unenrolled",
        _STUDENTS,
        "storefront unenroll",
        "A member left a course (data: the enrollment as it was)",
    ),
    E(
        "member.progressed",
        _STUDENTS,
        "storefront progress",
        "A member progressed through a course (data: the enrollment)",
    ),
    E(
        "enrollment.created",
        _ENROLLMENTS,
        "POST /api/v1/members/{id}/enrollments",
        "A member was enrolled in a course (also by storefront checkout --paid)",
    ),
    E(
        "enrollment.updated",
        _ENROLLMENTS,
        "storefront progress",
        "An enrollment's progress or status changed",
    ),
    E("enrollment.deleted", _ENROLLMENTS, "storefront unenroll", "An enrollment ended"),
    E(
        "enrollment.completed",
        _ENROLLMENTS,
        "storefront progress --percent 100",
        "A member completed a course",
    ),
    E("order.created", _ORDERS, "storefront checkout", "An order was placed (pending payment)"),
    E("order.paid", _ORDERS, "storefront checkout --paid", "An order was paid"),
    E("order.failed", _ORDERS, "storefront checkout --declined", "An order's payment failed"),
    E("order.refunded", _ORDERS, "storefront refund", "A paid order was refunded"),
    E("post.created", _POSTS, "POST /api/v1/posts", "A post was created"),
    E("post.updated", _POSTS, "PATCH /api/v1/posts/{id}", "A post changed"),
    E("post.deleted", _POSTS, "DELETE /api/v1/posts/{id}", "A post was deleted"),
    E(
        "post.published",
        _POSTS,
        "PATCH /api/v1/posts/{id} with status published",
        "A post went from draft to published (with post.updated)",
    ),
    E("event.created", _EVENTS, "POST /api/v1/events", "A school event was created"),
    E("event.updated", _EVENTS, "PATCH /api/v1/events/{id}", "A school event changed"),
    E("event.deleted", _EVENTS, "DELETE /api/v1/events/{id}", "A school event was deleted"),
    E(
        "event.cancelled",
        _EVENTS,
        "PATCH /api/v1/events/{id} with status cancelled",
        "A school event was cancelled (with event.updated)",
    ),
    E(
        "event.attendee_registered",
        _EVENTS,
        "storefront register",
        "A member registered for a school event (data: the attendee)",
    ),
    E(
        "event.attendee_cancelled",
        _EVENTS,
        "storefront cancel-registration",
        "A member cancelled their registration (data: the attendee)",
    ),
    E("chapter.created", _CURRICULUM, "POST /api/v1/chapters", "A chapter was added to a course"),
    E("chapter.updated", _CURRICULUM, "PATCH /api/v1/chapters/{id}", "A chapter changed"),
    E(
        "chapter.deleted",
        _CURRICULUM,
        "DELETE /api/v1/chapters/{id}",
        "A chapter was deleted (its lessons stay, outside any chapter)",
    ),
    E("material.created", _CURRICULUM, "POST /api/v1/materials", "A lesson's material was added"),
    E("material.updated", _CURRICULUM, "PATCH /api/v1/materials/{id}", "A material changed"),
    E("material.deleted", _CURRICULUM, "DELETE /api/v1/materials/{id}", "A material was deleted"),
    E("lesson.created", _CURRICULUM, "POST /api/v1/lessons", "A lesson was created"),
    E("lesson.updated", _CURRICULUM, "PATCH /api/v1/lessons/{id}", "A lesson changed"),
    E(
        "lesson.published",
        _CURRICULUM,
        "PATCH /api/v1/lessons/{id} with status published",
        "A lesson went from draft to published (with lesson.updated)",
    ),
    E("coupon.created", _COUPONS, "POST /api/v1/coupons", "A coupon was created"),
    E("coupon.updated", _COUPONS, "PATCH /api/v1/coupons/{id}", "A coupon changed"),
    E(
        "coupon.redeemed",
        _COUPONS,
        "storefront checkout --coupon CODE",
        "A coupon was used at checkout",
    ),
    E(
        "membership_plan.created",
        _PLANS,
        "POST /api/v1/membership-plans",
        "A membership plan was created",
    ),
    E(
        "membership_plan.updated",
        _PLANS,
        "PATCH /api/v1/membership-plans/{id}",
        "A membership plan changed",
    ),
    E(
        "digital_download.created",
        _DOWNLOADS,
        "POST /api/v1/digital-downloads",
        "A digital download was created",
    ),
    E(
        "digital_download.updated",
        _DOWNLOADS,
        "PATCH /api/v1/digital-downloads/{id}",
        "A digital download changed",
    ),
    E(
        "digital_download.published",
        _DOWNLOADS,
        "PATCH /api/v1/digital-downloads/{id} with status published",
        "A digital download went from draft to published (with digital_download.updated)",
    ),
    E("comment.created", _COMMENTS, "storefront comment", "A member commented on a post"),
    E(
        "comment.updated",
        _COMMENTS,
        "storefront hide-comment",
        "A comment was hidden by moderation",
    ),
    E("comment.deleted", _COMMENTS, "storefront delete-comment", "A comment was removed"),
    E("lecturer.created", _LECTURERS, "POST /api/v1/lecturers", "A lecturer was added"),
    E("lecturer.updated", _LECTURERS, "PATCH /api/v1/lecturers/{id}", "A lecturer changed"),
    E(
        "subscription.created",
        _SUBSCRIPTIONS,
        "POST /api/v1/subscriptions",
        "A member subscribed to a membership plan",
    ),
    E(
        "subscription.updated",
        _SUBSCRIPTIONS,
        "PATCH /api/v1/subscriptions/{id}",
        "A subscription changed",
    ),
    E(
        "subscription.renewed",
        _SUBSCRIPTIONS,
        "storefront renew",
        "A subscription was paid for another period",
    ),
    E(
        "subscription.cancelled",
        _SUBSCRIPTIONS,
        "storefront cancel-subscription",
        "A member cancelled a subscription (also PATCH /api/v1/subscriptions/{id} with"
        " status cancelled, with subscription.updated)",
    ),
    E(
        "settings.updated",
        _SETTINGS,
        "PATCH /api/v1/settings",
        "The school's settings changed",
    ),
    E(
        "appearance.updated",
        _APPEARANCE,
        "PATCH /api/v1/settings/appearance",
        "The school's appearance or theme changed (data: the appearance fields only; also by"
        " PATCH /api/v1/settings when it changes them)",
    ),
    E("upload.created", _UPLOADS, "POST /api/v1/uploads", "An upload was announced"),
    E(
        "upload.confirmed",
        _UPLOADS,
        "POST /api/v1/uploads/{id}/confirm",
        "An upload was confirmed",
    ),
    E(
        ENDPOINT_DISABLED,
        (),
        "webhooks: an endpoint of this client answered 410 Gone or failed past its retries",
        "One of this client's webhook endpoints was disabled (only this client hears it)",
    ),
)

EVENT_TYPES: dict[str, EventType] = {e.type: e for e in CATALOGUE}


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    scopes: tuple[str, ...]


def _families() -> dict[str, Family]:
    found: dict[str, Family] = {}
    for entry in CATALOGUE:
        family = found.setdefault(entry.family, Family(entry.family, entry.scopes))
        # A wildcard is gated once for the whole family: its members must agree.
        if family.scopes != entry.scopes:
            raise ValueError(f"{entry.type}: scopes differ from the rest of {entry.family}.*")
    return found


FAMILIES: dict[str, Family] = _families()


class UnknownEventType(ValueError):
    def __init__(self, event_type: str) -> None:
        super().__init__(f"unknown event type {event_type!r}")
        self.event_type = event_type


class ScopeMissing(PermissionError):
    def __init__(self, event_type: str, scopes: Sequence[str]) -> None:
        super().__init__(f"{event_type} needs {' or '.join(scopes)}")
        self.event_type = event_type
        self.scopes = tuple(scopes)


def scopes_of(pattern: str) -> tuple[str, ...]:
    """The scopes an exact type or a `family.*` wildcard needs; UnknownEventType otherwise."""
    if pattern.endswith(".*"):
        family = FAMILIES.get(pattern[:-2])
        if family is not None:
            return family.scopes
    elif (entry := EVENT_TYPES.get(pattern)) is not None:
        return entry.scopes
    raise UnknownEventType(pattern)


def check_subscribable(patterns: Iterable[str], granted: Iterable[str]) -> None:
    """Every pattern known and allowed by the granted scopes, or the first problem raised."""
    granted = tuple(granted)
    for pattern in patterns:
        scopes = scopes_of(pattern)
        if scopes and not satisfies(granted, scopes):
            raise ScopeMissing(pattern, scopes)


def matches(pattern: str, event_type: str) -> bool:
    """The dispatcher's rule, in Python (the SQL in store/events.py applies the same one)."""
    if pattern.endswith(".*"):
        return event_type.split(".", 1)[0] == pattern[:-2]
    return pattern == event_type


def catalogue() -> dict[str, object]:
    """The published table: every type the system emits, each with the scope that gates it
    and its source, and every wildcard."""
    return {
        "data": [
            {
                "type": e.type,
                # The gating scope (null: none needed); `scopes` is the full any-of list.
                "scope": e.scopes[0] if e.scopes else None,
                "scopes": list(e.scopes),
                "source": e.source,
                "description": e.description,
            }
            for e in CATALOGUE
        ],
        "wildcards": [
            {"pattern": f"{f.name}.*", "scopes": list(f.scopes)} for f in FAMILIES.values()
        ],
        # An any-of list: one of the scopes is enough; `read` stands for every `:read` scope.
        "scope_rule": "any_of",
    }
