"""The resource catalogue: every resource the school API serves, in the seeds' words.

One entry per resource says its URL segment, table, fields (with their types and limits), the
scopes that read and write it (seed 002's table), which operations exist, and the names of the
events its changes publish. Validation, SQL, routes, scope checks and the OpenAPI document are
all derived from this one place, so they cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

# `number` and `object` only appear in computed answers (analytics), never in input.
FieldKind = Literal[
    "string", "text", "integer", "number", "boolean", "timestamp", "enum", "reference", "object"
]
Operation = Literal["list", "get", "create", "update", "delete"]
ResourceKind = Literal["collection", "singleton", "computed", "upload"]
Change = Literal["created", "updated", "deleted"]

# Formats a string field may demand; validation.py holds their checks.
Format = Literal["email", "url", "color", "currency", "timezone", "locale", "coupon_code"]

MAX_BIGINT = 2**63 - 1
MAX_INT = 2**31 - 1
# Money is whole cents in a bigint; a trillion dollars is enough for any school.
MAX_CENTS = 10**14

_IDENTIFIER = re.compile(r"^[a-z_]+$")


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    kind: FieldKind
    description: str = ""
    required: bool = False  # must be given on create
    nullable: bool = False  # null is a value clients may send and read
    writable: bool = True  # False: the service manages it (timestamps, counters)
    updatable: bool = True  # False: set on create only
    min_length: int = 0
    max_length: int | None = None
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple[str, ...] = ()
    fmt: Format | None = None
    references: str | None = None  # a resource name: the id must name a row of the same school
    filterable: bool = False  # `?name=value` on the list
    unique: bool = False  # unique per school; a clash answers 409
    # Narrower than the resource's write scopes (settings: a theme field needs appearance:write).
    write_scopes: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Parent:
    """A nested collection: `/api/v1/{resource}/{id}/{name}`, rows tied by `field`."""

    resource: str
    field: str


# eq=False: resources are singletons of this module, compared and hashed by identity, which
# keeps the statement caches keyed by them cheap on every request.
@dataclass(frozen=True, slots=True, eq=False)
class Resource:
    name: str  # the URL segment: "membership-plans"
    singular: str  # the event prefix: "membership_plan"
    table: str
    summary: str
    fields: tuple[Field, ...]
    read_scopes: tuple[str, ...]
    write_scopes: tuple[str, ...] = ()
    operations: frozenset[Operation] = frozenset({"list", "get"})
    kind: ResourceKind = "collection"
    parent: Parent | None = None
    # Event names that differ from `{singular}.{created|updated|deleted}`.
    event_overrides: tuple[tuple[str, str], ...] = ()
    # Derived in __post_init__: the fields by name, for validation's lookups per request.
    field_map: dict[str, Field] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "field_map", {f.name: f for f in self.fields})
        # Table and column names are interpolated into SQL; they come from this file only,
        # and this guard keeps it that way.
        for identifier in (self.table, *(f.name for f in self.fields)):
            if not _IDENTIFIER.match(identifier):
                raise ValueError(f"{identifier!r} is not a plain SQL identifier")

    @property
    def columns(self) -> tuple[str, ...]:
        """What a row shows, in order: `id`, `school_id`, then the fields."""
        return ("id", "school_id", *(f.name for f in self.fields))

    @property
    def has_updated_at(self) -> bool:
        return any(f.name == "updated_at" for f in self.fields)

    @property
    def path(self) -> str:
        if self.parent is not None:
            return f"/api/v1/{self.parent.resource}/{{id}}/{self.name}"
        return f"/api/v1/{self.name}"

    def event_type(self, change: Change) -> str:
        return dict(self.event_overrides).get(change, f"{self.singular}.{change}")

    def event_types(self) -> list[str]:
        changes: list[Change] = []
        if "create" in self.operations:
            changes.append("created")
        if "update" in self.operations:
            changes.append("updated")
        if "delete" in self.operations:
            changes.append("deleted")
        return [self.event_type(c) for c in changes]


def _created() -> Field:
    return Field("created_at", "timestamp", "When the row was created", writable=False)


def _updated() -> Field:
    return Field("updated_at", "timestamp", "When the row last changed", writable=False)


def _title(required: bool = True) -> Field:
    return Field("title", "string", "Title", required=required, min_length=1, max_length=200)


def _description() -> Field:
    return Field("description", "text", "Description", max_length=20_000)


def _price() -> tuple[Field, Field]:
    return (
        Field(
            "price_cents",
            "integer",
            "Price in the currency's minor unit",
            minimum=0,
            maximum=MAX_CENTS,
        ),
        Field("currency", "string", "ISO 4217 code", fmt="currency", min_length=3, max_length=3),
    )


def _status(default_first: tuple[str, ...], description: str = "Status") -> Field:
    return Field(
        "status", "enum", f"{description} (default {default_first[0]})", choices=default_first
    )


def _ref(
    name: str,
    resource: str,
    description: str,
    *,
    required: bool = False,
    nullable: bool = False,
    writable: bool = True,
    updatable: bool = True,
    filterable: bool = False,
    unique: bool = False,
) -> Field:
    return Field(
        name,
        "reference",
        description,
        references=resource,
        required=required,
        nullable=nullable,
        writable=writable,
        updatable=updatable,
        filterable=filterable,
        unique=unique,
    )


COURSES = Resource(
    name="courses",
    singular="course",
    table="courses",
    summary="Courses of the school",
    fields=(
        _title(),
        _description(),
        _status(("draft", "published", "archived")),
        *_price(),
        _ref("lecturer_id", "lecturers", "The lecturer teaching it", nullable=True),
        _created(),
        _updated(),
    ),
    read_scopes=("courses:read",),
    write_scopes=("courses:write",),
    operations=frozenset({"list", "get", "create", "update", "delete"}),
)

REVIEWS = Resource(
    name="reviews",
    singular="review",
    table="reviews",
    summary="Reviews of one course",
    fields=(
        _ref("course_id", "courses", "The course reviewed", writable=False),
        _ref("member_id", "members", "The member who wrote it", nullable=True, writable=False),
        Field("rating", "integer", "Stars, 1 to 5", writable=False, minimum=1, maximum=5),
        Field("body", "text", "The review", writable=False),
        _created(),
    ),
    read_scopes=("courses:read",),
    parent=Parent("courses", "course_id"),
    operations=frozenset({"list"}),
)

MEMBERS = Resource(
    name="members",
    singular="member",
    table="members",
    summary="Students enrolled at the school",
    fields=(
        Field("name", "string", "Full name", required=True, min_length=1, max_length=200),
        Field(
            "email",
            "string",
            "Email address, unique within the school",
            required=True,
            fmt="email",
            max_length=254,
            unique=True,
        ),
        _status(("active", "suspended")),
        Field("enrolled_at", "timestamp", "When the member joined the school", writable=False),
        _created(),
        _updated(),
    ),
    read_scopes=("students:read",),
    write_scopes=("students:write",),
    operations=frozenset({"list", "get", "create", "update"}),
    event_overrides=(("created", "member.enrolled"),),
)

ENROLLMENTS = Resource(
    name="enrollments",
    singular="enrollment",
    table="enrollments",
    summary="A member's enrollments in courses",
    fields=(
        _ref("member_id", "members", "The member", writable=False),
        _ref("course_id", "courses", "The course", required=True, updatable=False, unique=True),
        _status(("active", "completed", "cancelled")),
        Field("progress_percent", "integer", "Progress through the course", minimum=0, maximum=100),
        Field("enrolled_at", "timestamp", "When the enrollment began", writable=False),
        _updated(),
    ),
    # Under /api/v1/members/, which the gateway's route table gates with students:*.
    read_scopes=("students:read",),
    write_scopes=("students:write",),
    parent=Parent("members", "member_id"),
    operations=frozenset({"list", "create"}),
)

ORDERS = Resource(
    name="orders",
    singular="order",
    table="orders",
    summary="Orders and payments",
    fields=(
        _ref("member_id", "members", "The buyer", filterable=True),
        _ref("course_id", "courses", "The course bought, if a course", nullable=True),
        Field(
            "amount_cents",
            "integer",
            "Amount in the currency's minor unit",
            minimum=0,
            maximum=MAX_CENTS,
        ),
        Field("currency", "string", "ISO 4217 code", fmt="currency", min_length=3, max_length=3),
        Field(
            "status",
            "enum",
            "Payment status",
            choices=("pending", "paid", "refunded", "failed"),
            filterable=True,
        ),
        _created(),
        _updated(),
    ),
    read_scopes=("orders:read",),
    operations=frozenset({"list", "get"}),
)

LESSONS = Resource(
    name="lessons",
    singular="lesson",
    table="lessons",
    summary="Lessons: the curriculum of each course",
    fields=(
        _ref("course_id", "courses", "The course it belongs to", required=True, filterable=True),
        _title(),
        Field("position", "integer", "Order within the course", minimum=0, maximum=100_000),
        Field("content", "text", "Lesson material", max_length=100_000),
        Field("duration_minutes", "integer", "Length", nullable=True, minimum=0, maximum=10_000),
        _status(("draft", "published")),
        _created(),
        _updated(),
    ),
    read_scopes=("curriculum:read",),
    write_scopes=("curriculum:write",),
    operations=frozenset({"list", "get", "create", "update"}),
)

MEMBERSHIP_PLANS = Resource(
    name="membership-plans",
    singular="membership_plan",
    table="membership_plans",
    summary="Membership plans members subscribe to",
    fields=(
        Field("name", "string", "Plan name", required=True, min_length=1, max_length=200),
        _description(),
        *_price(),
        Field("billing_interval", "enum", "How often it bills", choices=("month", "year")),
        _status(("active", "archived")),
        _created(),
        _updated(),
    ),
    read_scopes=("membership_plans:read",),
    write_scopes=("membership_plans:write",),
    operations=frozenset({"list", "get", "create", "update"}),
)

SUBSCRIPTIONS = Resource(
    name="subscriptions",
    singular="subscription",
    table="subscriptions",
    summary="Members' subscriptions to membership plans",
    fields=(
        _ref(
            "member_id",
            "members",
            "The subscriber",
            required=True,
            updatable=False,
            filterable=True,
        ),
        _ref("membership_plan_id", "membership-plans", "The plan", required=True),
        _status(("active", "past_due", "cancelled")),
        Field("started_at", "timestamp", "When it began", writable=False),
        Field("current_period_end", "timestamp", "End of the paid period", nullable=True),
        Field("cancelled_at", "timestamp", "When it was cancelled", nullable=True),
        _created(),
        _updated(),
    ),
    read_scopes=("subscriptions:read",),
    write_scopes=("subscriptions:write",),
    operations=frozenset({"list", "get", "create", "update"}),
)

EVENTS = Resource(
    name="events",
    singular="event",
    table="events",
    summary="Live events: workshops, webinars, meetups",
    fields=(
        _title(),
        _description(),
        Field("starts_at", "timestamp", "Start (ISO 8601 with offset)", required=True),
        Field("ends_at", "timestamp", "End", nullable=True),
        Field("location", "string", "Where, or the meeting link", max_length=500),
        Field(
            "capacity",
            "integer",
            "Seats; null for unlimited",
            nullable=True,
            minimum=0,
            maximum=MAX_INT,
        ),
        _status(("scheduled", "cancelled", "completed")),
        _created(),
        _updated(),
    ),
    read_scopes=("events:read",),
    write_scopes=("events:write",),
    operations=frozenset({"list", "get", "create", "update", "delete"}),
)

ATTENDEES = Resource(
    name="attendees",
    singular="attendee",
    table="attendees",
    summary="Members registered for one event",
    fields=(
        _ref("event_id", "events", "The event", writable=False),
        _ref("member_id", "members", "The member", writable=False),
        Field(
            "status",
            "enum",
            "Attendance",
            choices=("registered", "attended", "cancelled"),
            writable=False,
        ),
        Field("registered_at", "timestamp", "When they registered", writable=False),
    ),
    read_scopes=("events:read",),
    parent=Parent("events", "event_id"),
    operations=frozenset({"list"}),
)

COUPONS = Resource(
    name="coupons",
    singular="coupon",
    table="coupons",
    summary="Discount coupons",
    fields=(
        Field(
            "code",
            "string",
            "What buyers type: A-Z, 0-9, - and _, unique in the school",
            required=True,
            fmt="coupon_code",
            min_length=3,
            max_length=32,
            unique=True,
        ),
        _description(),
        Field("discount_percent", "integer", "Percent off", nullable=True, minimum=1, maximum=100),
        Field(
            "amount_off_cents",
            "integer",
            "Fixed amount off",
            nullable=True,
            minimum=1,
            maximum=MAX_CENTS,
        ),
        Field("currency", "string", "ISO 4217 code", fmt="currency", min_length=3, max_length=3),
        Field(
            "max_redemptions",
            "integer",
            "Use limit; null for unlimited",
            nullable=True,
            minimum=1,
            maximum=MAX_INT,
        ),
        Field("redeemed_count", "integer", "Times used", writable=False),
        Field("expires_at", "timestamp", "Expiry", nullable=True),
        Field("active", "boolean", "Whether it can be used"),
        _created(),
        _updated(),
    ),
    read_scopes=("coupons:read",),
    write_scopes=("coupons:write",),
    operations=frozenset({"list", "get", "create", "update"}),
)

POSTS = Resource(
    name="posts",
    singular="post",
    table="posts",
    summary="Blog and community posts",
    fields=(
        _title(),
        Field("body", "text", "Content (Markdown)", max_length=100_000),
        _status(("draft", "published")),
        _ref("lecturer_id", "lecturers", "The author", nullable=True),
        Field("published_at", "timestamp", "When it was published", nullable=True),
        _created(),
        _updated(),
    ),
    read_scopes=("posts:read",),
    write_scopes=("posts:write",),
    operations=frozenset({"list", "get", "create", "update", "delete"}),
)

DIGITAL_DOWNLOADS = Resource(
    name="digital-downloads",
    singular="digital_download",
    table="digital_downloads",
    summary="Digital products: e-books, templates, recordings",
    fields=(
        _title(),
        _description(),
        *_price(),
        Field("file_url", "string", "Where the file is", nullable=True, fmt="url", max_length=2000),
        _status(("draft", "published")),
        _created(),
        _updated(),
    ),
    read_scopes=("digital_products:read",),
    write_scopes=("digital_products:write",),
    operations=frozenset({"list", "get", "create", "update"}),
)

COMMENTS = Resource(
    name="comments",
    singular="comment",
    table="comments",
    summary="Comments on posts",
    fields=(
        _ref("post_id", "posts", "The post", writable=False, filterable=True),
        _ref("member_id", "members", "The author", nullable=True, writable=False),
        Field("body", "text", "The comment", writable=False),
        Field("status", "enum", "Moderation", choices=("visible", "hidden"), writable=False),
        _created(),
    ),
    read_scopes=("comments:read",),
    operations=frozenset({"list", "get"}),
)

LECTURERS = Resource(
    name="lecturers",
    singular="lecturer",
    table="lecturers",
    summary="Lecturer profiles",
    fields=(
        Field("name", "string", "Full name", required=True, min_length=1, max_length=200),
        Field("email", "string", "Contact email", nullable=True, fmt="email", max_length=254),
        Field("bio", "text", "Biography", max_length=20_000),
        Field("avatar_url", "string", "Portrait", nullable=True, fmt="url", max_length=2000),
        _created(),
        _updated(),
    ),
    read_scopes=("lecturers:read",),
    write_scopes=("lecturers:write",),
    operations=frozenset({"list", "get", "create", "update"}),
)

_SCHOOL_WRITE = ("school:write",)
_THEME_WRITE = ("appearance:write",)

SETTINGS = Resource(
    name="settings",
    singular="settings",
    table="settings",
    summary="The school's configuration and appearance (one object per school)",
    fields=(
        Field("name", "string", "School name", max_length=200, write_scopes=_SCHOOL_WRITE),
        Field(
            "tagline",
            "string",
            "One line under the name",
            max_length=300,
            write_scopes=_SCHOOL_WRITE,
        ),
        Field(
            "description", "text", "About the school", max_length=20_000, write_scopes=_SCHOOL_WRITE
        ),
        Field(
            "contact_email",
            "string",
            "Where students write",
            nullable=True,
            fmt="email",
            max_length=254,
            write_scopes=_SCHOOL_WRITE,
        ),
        Field(
            "timezone",
            "string",
            "IANA time zone",
            fmt="timezone",
            max_length=64,
            write_scopes=_SCHOOL_WRITE,
        ),
        Field(
            "locale",
            "string",
            "Language, e.g. en or pt-BR",
            fmt="locale",
            max_length=16,
            write_scopes=_SCHOOL_WRITE,
        ),
        Field(
            "currency",
            "string",
            "Default ISO 4217 code",
            fmt="currency",
            min_length=3,
            max_length=3,
            write_scopes=_SCHOOL_WRITE,
        ),
        Field(
            "logo_url",
            "string",
            "Logo image",
            nullable=True,
            fmt="url",
            max_length=2000,
            write_scopes=_THEME_WRITE,
        ),
        Field("primary_color", "string", "#rrggbb", fmt="color", write_scopes=_THEME_WRITE),
        Field("accent_color", "string", "#rrggbb", fmt="color", write_scopes=_THEME_WRITE),
        Field(
            "theme", "enum", "Colour scheme", choices=("light", "dark"), write_scopes=_THEME_WRITE
        ),
        _updated(),
    ),
    # Seed 002: get_settings with school:read or appearance:read; update with either :write.
    read_scopes=("school:read", "appearance:read"),
    write_scopes=("school:write", "appearance:write"),
    operations=frozenset({"get", "update"}),
    kind="singleton",
)

SITE_INFO = Resource(
    name="site-info",
    singular="site_info",
    table="settings",
    summary="What the school's public site shows about it",
    fields=(
        Field("name", "string", "School name"),
        Field("tagline", "string", "One line under the name"),
        Field("description", "text", "About the school"),
        Field("logo_url", "string", "Logo image", nullable=True),
        Field("primary_color", "string", "#rrggbb"),
        Field("locale", "string", "Language"),
        Field("timezone", "string", "IANA time zone"),
        Field("currency", "string", "Default currency"),
        Field("contact_email", "string", "Where students write", nullable=True),
        Field("published_courses", "integer", "Courses on sale"),
        Field("lecturers", "integer", "Lecturers teaching"),
    ),
    read_scopes=("school:read",),
    operations=frozenset({"get"}),
    kind="computed",
)

ANALYTICS = Resource(
    name="analytics",
    singular="analytics",
    table="settings",
    summary="Figures computed over the school's data",
    fields=(
        Field("members", "integer", "Members"),
        Field("active_members", "integer", "Members not suspended"),
        Field("courses", "integer", "Courses"),
        Field("published_courses", "integer", "Courses published"),
        Field("lessons", "integer", "Lessons"),
        Field("enrollments", "integer", "Enrollments"),
        Field("orders", "integer", "Orders"),
        Field("paid_orders", "integer", "Orders paid"),
        Field("revenue_cents", "object", "Paid order amounts in minor units, by currency"),
        Field("events", "integer", "Events"),
        Field("upcoming_events", "integer", "Scheduled events still ahead"),
        Field("posts", "integer", "Posts"),
        Field("active_subscriptions", "integer", "Subscriptions active"),
        Field("average_rating", "number", "Mean course review rating", nullable=True),
        Field("generated_at", "timestamp", "When the figures were computed"),
    ),
    read_scopes=("analytics:read",),
    operations=frozenset({"get"}),
    kind="computed",
)

UPLOAD_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp", "image/svg+xml")
MAX_UPLOAD_BYTES = 20 * 1024 * 1024

UPLOADS = Resource(
    name="uploads",
    singular="upload",
    table="uploads",
    summary="Image uploads: announce, PUT the bytes to upload_url, confirm",
    fields=(
        Field(
            "filename",
            "string",
            "The file's name",
            required=True,
            min_length=1,
            max_length=255,
            updatable=False,
        ),
        Field(
            "content_type",
            "enum",
            "The image's media type",
            required=True,
            choices=UPLOAD_TYPES,
            updatable=False,
        ),
        Field(
            "size_bytes",
            "integer",
            "The file's size",
            required=True,
            minimum=1,
            maximum=MAX_UPLOAD_BYTES,
            updatable=False,
        ),
        Field(
            "status",
            "enum",
            "pending until confirmed",
            choices=("pending", "confirmed"),
            writable=False,
        ),
        Field("upload_url", "string", "Where to PUT the bytes before expires_at", writable=False),
        Field("url", "string", "Where the file is served once confirmed", writable=False),
        Field("expires_at", "timestamp", "When upload_url stops working", writable=False),
        Field("confirmed_at", "timestamp", "When it was confirmed", nullable=True, writable=False),
        _created(),
    ),
    read_scopes=("storage:write",),
    write_scopes=("storage:write",),
    operations=frozenset({"create", "update"}),
    kind="upload",
    event_overrides=(("updated", "upload.confirmed"),),
)

CATALOGUE: tuple[Resource, ...] = (
    COURSES,
    REVIEWS,
    MEMBERS,
    ENROLLMENTS,
    ORDERS,
    LESSONS,
    MEMBERSHIP_PLANS,
    EVENTS,
    ATTENDEES,
    COUPONS,
    POSTS,
    DIGITAL_DOWNLOADS,
    COMMENTS,
    LECTURERS,
    SETTINGS,
    SITE_INFO,
    SUBSCRIPTIONS,
    ANALYTICS,
    UPLOADS,
)
BY_NAME: dict[str, Resource] = {r.name: r for r in CATALOGUE}
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
