"""The school itself: its settings (one object per school), what its public site shows, and
the figures computed over its data.

Scopes `school:*`, `appearance:*` and `analytics:read`. Seed 002 gives `appearance:read` the
"school appearance and theme settings" only, so those fields are also a resource of their own
(`/settings/appearance`), the one `appearance:read` reads; the whole settings object is
`school:read`'s ("school configuration and settings").
"""

from __future__ import annotations

from services.school_api.resources.fields import updated
from services.school_api.resources.model import Field, Resource

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
        updated(),
    ),
    # Reading it whole is school:read's; appearance:read reads APPEARANCE below. Seed 002:
    # update_settings with either :write, each field needing its own (write_scopes above).
    read_scopes=("school:read",),
    write_scopes=("school:write", "appearance:write"),
    operations=frozenset({"get", "update"}),
    kind="singleton",
)


APPEARANCE_FIELDS = frozenset({"logo_url", "primary_color", "accent_color", "theme", "updated_at"})

APPEARANCE = Resource(
    name="settings/appearance",
    singular="appearance",
    table="settings",
    summary="The school's appearance and theme (part of its settings)",
    fields=tuple(f for f in SETTINGS.fields if f.name in APPEARANCE_FIELDS),
    # school:read reads the whole settings object, this part included.
    read_scopes=("appearance:read", "school:read"),
    write_scopes=_THEME_WRITE,
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
