"""Students: the school's members and their enrollments in courses (`students:*`)."""

from __future__ import annotations

from services.school_api.resources.fields import created, ref, status, updated
from services.school_api.resources.model import Field, Parent, Resource

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
        status(("active", "suspended")),
        Field("enrolled_at", "timestamp", "When the member joined the school", writable=False),
        created(),
        updated(),
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
        ref("member_id", "members", "The member", writable=False),
        ref("course_id", "courses", "The course", required=True, updatable=False, unique=True),
        status(("active", "completed", "cancelled")),
        Field("progress_percent", "integer", "Progress through the course", minimum=0, maximum=100),
        Field("enrolled_at", "timestamp", "When the enrollment began", writable=False),
        updated(),
    ),
    # Under /api/v1/members/, which the gateway's route table gates with students:*.
    read_scopes=("students:read",),
    write_scopes=("students:write",),
    parent=Parent("members", "member_id"),
    operations=frozenset({"list", "create"}),
)
