"""Teaching: courses, their curriculum (chapters, lessons, materials) and reviews, and the
lecturers.

Scopes `courses:*`, `curriculum:*` and `lecturers:*`. Seed 002: `courses:read` reads "course
details, curriculum, and enrollment data", so the curriculum reads with either scope;
`curriculum:write` alone changes it.
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


# Reading the curriculum: its own scope, or the course's (seed 002).
_CURRICULUM_READ = ("curriculum:read", "courses:read")
_CURRICULUM_WRITE = ("curriculum:write",)


CHAPTERS = Resource(
    name="chapters",
    singular="chapter",
    table="chapters",
    summary="Chapters: the sections a course's lessons are grouped in",
    fields=(
        ref("course_id", "courses", "The course it belongs to", required=True, filterable=True),
        title(),
        Field("position", "integer", "Order within the course", minimum=0, maximum=100_000),
        description(),
        created(),
        updated(),
    ),
    read_scopes=_CURRICULUM_READ,
    write_scopes=_CURRICULUM_WRITE,
    operations=frozenset({"list", "get", "create", "update", "delete"}),
)


LESSONS = Resource(
    name="lessons",
    singular="lesson",
    table="lessons",
    summary="Lessons: the curriculum of each course",
    fields=(
        ref("course_id", "courses", "The course it belongs to", required=True, filterable=True),
        ref(
            "chapter_id",
            "chapters",
            "The chapter it is in (a chapter of the same course)",
            nullable=True,
            filterable=True,
        ),
        title(),
        Field("position", "integer", "Order within the course", minimum=0, maximum=100_000),
        Field("content", "text", "Lesson material", max_length=100_000),
        Field("duration_minutes", "integer", "Length", nullable=True, minimum=0, maximum=10_000),
        status(("draft", "published")),
        created(),
        updated(),
    ),
    read_scopes=_CURRICULUM_READ,
    write_scopes=_CURRICULUM_WRITE,
    operations=frozenset({"list", "get", "create", "update"}),
    transitions=(Transition("status", "published", "published"),),
)


MATERIALS = Resource(
    name="materials",
    singular="material",
    table="materials",
    summary="Materials: files, links and notes that go with a lesson",
    fields=(
        ref("lesson_id", "lessons", "The lesson it goes with", required=True, filterable=True),
        title(),
        Field(
            "kind",
            "enum",
            "What it is (default file)",
            choices=("file", "link", "text"),
        ),
        Field(
            "url", "string", "Where the file or link is", nullable=True, fmt="url", max_length=2000
        ),
        Field("body", "text", "The note, for a text material", max_length=100_000),
        Field("position", "integer", "Order within the lesson", minimum=0, maximum=100_000),
        created(),
        updated(),
    ),
    read_scopes=_CURRICULUM_READ,
    write_scopes=_CURRICULUM_WRITE,
    operations=frozenset({"list", "get", "create", "update", "delete"}),
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
