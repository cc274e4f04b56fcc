"""Teaching: courses, their lessons (the curriculum) and reviews, and the lecturers.

Scopes `courses:*`, `curriculum:*` and `lecturers:*`.
"""

from __future__ import annotations

from services.school_api.resources.fields import (
    created,
    description,
    price,
    ref,
    status,
    title,
    updated,
)
from services.school_api.resources.model import Field, Parent, Resource, Transition

COURSES = Resource(
    name="courses",
    singular="course",
    table="courses",
    summary="Courses of the school",
    fields=(
        title(),
        description(),
        status(("draft", "published", "archived")),
        *price(),
        ref("lecturer_id", "lecturers", "The lecturer teaching it", nullable=True),
        created(),
        updated(),
    ),
    read_scopes=("courses:read",),
    write_scopes=("courses:write",),
    operations=frozenset({"list", "get", "create", "update", "delete"}),
    transitions=(Transition("status", "published", "published"),),
)


REVIEWS = Resource(
    name="reviews",
    singular="review",
    table="reviews",
    summary="Reviews of one course",
    fields=(
        ref("course_id", "courses", "The course reviewed", writable=False),
        ref("member_id", "members", "The member who wrote it", nullable=True, writable=False),
        Field("rating", "integer", "Stars, 1 to 5", writable=False, minimum=1, maximum=5),
        Field("body", "text", "The review", writable=False),
        created(),
    ),
    read_scopes=("courses:read",),
    parent=Parent("courses", "course_id"),
    operations=frozenset({"list"}),
)


LESSONS = Resource(
    name="lessons",
    singular="lesson",
    table="lessons",
    summary="Lessons: the curriculum of each course",
    fields=(
        ref("course_id", "courses", "The course it belongs to", required=True, filterable=True),
        title(),
        Field("position", "integer", "Order within the course", minimum=0, maximum=100_000),
        Field("content", "text", "Lesson material", max_length=100_000),
        Field("duration_minutes", "integer", "Length", nullable=True, minimum=0, maximum=10_000),
        status(("draft", "published")),
        created(),
        updated(),
    ),
    read_scopes=("curriculum:read",),
    write_scopes=("curriculum:write",),
    operations=frozenset({"list", "get", "create", "update"}),
    transitions=(Transition("status", "published", "published"),),
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
        created(),
        updated(),
    ),
    read_scopes=("lecturers:read",),
    write_scopes=("lecturers:write",),
    operations=frozenset({"list", "get", "create", "update"}),
)
