"""Live events and the members registered for them (`events:*`)."""

from __future__ import annotations

from services.school_api.resources.fields import created, description, ref, status, title, updated
from services.school_api.resources.model import MAX_INT, Field, Parent, Resource, Transition

EVENTS = Resource(
    name="events",
    singular="event",
    table="events",
    summary="Live events: workshops, webinars, meetups",
    fields=(
        title(),
        description(),
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
        status(("scheduled", "cancelled", "completed")),
        created(),
        updated(),
    ),
    read_scopes=("events:read",),
    write_scopes=("events:write",),
    operations=frozenset({"list", "get", "create", "update", "delete"}),
    transitions=(Transition("status", "cancelled", "cancelled"),),
)


ATTENDEES = Resource(
    name="attendees",
    singular="attendee",
    table="attendees",
    summary="Members registered for one event",
    fields=(
        ref("event_id", "events", "The event", writable=False),
        ref("member_id", "members", "The member", writable=False),
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
