"""Students: the school's members and their enrollments in courses (`students:*`).

Enrollments are reachable two ways: under their member (`/members/{id}/enrollments`, as the
member's record) and on their own (`/enrollments`), where seed 002's `courses:read` ("course
details, curriculum, and enrollment data") reads them too and `students:write` ("manage
enrollments") creates, updates and ends them. Both publish the same `enrollment.*` events.
"""

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


_ENROLLMENT_STATUS = status(
    ("active", "completed", "cancelled"), "active, or how it ended: completed or cancelled"
)
_PROGRESS = Field(
    "progress_percent", "integer", "Progress through the course", minimum=0, maximum=100
)

MEMBER_ENROLLMENTS = Resource(
    name="enrollments",
    singular="enrollment",
    table="enrollments",
    summary="A member's enrollments in courses",
    fields=(
        ref("member_id", "members", "The member", writable=False),
        ref("course_id", "courses", "The course", required=True, updatable=False, unique=True),
        _ENROLLMENT_STATUS,
        _PROGRESS,
        Field("enrolled_at", "timestamp", "When the enrollment began", writable=False),
        updated(),
    ),
    # Under /api/v1/members/, which the gateway's route table gates with students:*.
    read_scopes=("students:read",),
    write_scopes=("students:write",),
    parent=Parent("members", "member_id"),
    operations=frozenset({"list", "create"}),
)


ENROLLMENTS = Resource(
    name="enrollments",
    singular="enrollment",
    table="enrollments",
    summary="Enrollments of members in courses",
    fields=(
        ref("member_id", "members", "The member", required=True, updatable=False, filterable=True),
        ref(
            "course_id",
            "courses",
            "The course",
            required=True,
            updatable=False,
            unique=True,
            filterable=True,
        ),
        _ENROLLMENT_STATUS,
        _PROGRESS,
        Field("enrolled_at", "timestamp", "When the enrollment began", writable=False),
        updated(),
    ),
    # Seed 002: courses:read reads "enrollment data", students:read "progress data";
    # students:write "manage enrollments": create, update (progress, status) and end (delete).
    read_scopes=("courses:read", "students:read"),
    write_scopes=("students:write",),
    operations=frozenset({"list", "get", "create", "update", "delete"}),
)
