"""The resource catalogue: every resource the school API serves, in the seeds' words.

One entry per resource says its URL segment, table, fields (with their types and limits), the
scopes that read and write it (seed 002's table), which operations exist, and the names of the
events its changes publish. Validation, SQL, routes, scope checks and the OpenAPI document are
all derived from this one place, so they cannot drift apart.

`model` says what an entry is (`Resource`, `Field`, the limits) and `fields` the fields many
share; one module per family of seed 002 holds its entries: `teaching` (courses, chapters,
lessons, materials, reviews, lecturers), `students` (members, enrollments), `commerce` (orders,
plans, subscriptions, coupons, digital downloads), `events` (events, attendees), `community` (posts,
comments), `school` (settings, appearance, site info, analytics), `storage` (uploads). Here: the
catalogue itself, in the order routes and the OpenAPI document list it.
"""

from __future__ import annotations

from services.school_api.resources.commerce import (
    COUPONS,
    DIGITAL_DOWNLOADS,
    MEMBERSHIP_PLANS,
    ORDERS,
    SUBSCRIPTIONS,
)
from services.school_api.resources.community import COMMENTS, POSTS
from services.school_api.resources.events import ATTENDEES, EVENTS
from services.school_api.resources.model import Resource
from services.school_api.resources.school import (
    ANALYTICS,
    APPEARANCE,
    APPEARANCE_FIELDS,
    SETTINGS,
    SITE_INFO,
)
from services.school_api.resources.storage import UPLOADS
from services.school_api.resources.students import ENROLLMENTS, MEMBER_ENROLLMENTS, MEMBERS
from services.school_api.resources.teaching import (
    CHAPTERS,
    COURSES,
    LECTURERS,
    LESSONS,
    MATERIALS,
    REVIEWS,
)

__all__ = [
    "ANALYTICS",
    "APPEARANCE",
    "APPEARANCE_FIELDS",
    "ATTENDEES",
    "BY_NAME",
    "CATALOGUE",
    "CHAPTERS",
    "COLLECTIONS",
    "COMMENTS",
    "COUPONS",
    "COURSES",
    "DIGITAL_DOWNLOADS",
    "ENROLLMENTS",
    "EVENTS",
    "LECTURERS",
    "LESSONS",
    "MATERIALS",
    "MEMBERS",
    "MEMBERSHIP_PLANS",
    "MEMBER_ENROLLMENTS",
    "ORDERS",
    "POSTS",
    "REVIEWS",
    "SETTINGS",
    "SITE_INFO",
    "SUBSCRIPTIONS",
    "UPLOADS",
    "event_scopes",
]

CATALOGUE: tuple[Resource, ...] = (
    COURSES,
    REVIEWS,
    MEMBERS,
    MEMBER_ENROLLMENTS,
    ENROLLMENTS,
    ORDERS,
    CHAPTERS,
    LESSONS,
    MATERIALS,
    MEMBERSHIP_PLANS,
    EVENTS,
    ATTENDEES,
    COUPONS,
    POSTS,
    DIGITAL_DOWNLOADS,
    COMMENTS,
    LECTURERS,
    SETTINGS,
    APPEARANCE,
    SITE_INFO,
    SUBSCRIPTIONS,
    ANALYTICS,
    UPLOADS,
)
# By URL segment, top-level resources only: `enrollments` names the collection of its own, not
# the same rows listed under a member.
BY_NAME: dict[str, Resource] = {r.name: r for r in CATALOGUE if r.parent is None}
COLLECTIONS: tuple[Resource, ...] = tuple(r for r in CATALOGUE if r.kind == "collection")


def event_scopes() -> dict[str, tuple[str, ...]]:
    """Every event type this service publishes, with the read scopes that may see it.

    For the webhooks service: a subscription to a type needs one of these (contract 8).
    """
    found: dict[str, tuple[str, ...]] = {}
    for resource in CATALOGUE:
        for event_type in resource.event_types():
            found[event_type] = resource.read_scopes
    return found


def _check_references() -> None:
    for resource in CATALOGUE:
        for f in resource.fields:
            if f.references is not None and f.references not in BY_NAME:
                raise ValueError(f"{resource.name}.{f.name} references unknown {f.references}")


_check_references()
