"""The community: posts and the comments on them (`posts:*`, `comments:read`)."""

from __future__ import annotations

from services.school_api.resources.fields import created, ref, status, title, updated
from services.school_api.resources.model import Field, Resource, Transition

POSTS = Resource(
    name="posts",
    singular="post",
    table="posts",
    summary="Blog and community posts",
    fields=(
        title(),
        Field("body", "text", "Content (Markdown)", max_length=100_000),
        status(("draft", "published")),
        ref("lecturer_id", "lecturers", "The author", nullable=True),
        Field("published_at", "timestamp", "When it was published", nullable=True),
        created(),
        updated(),
    ),
    read_scopes=("posts:read",),
    write_scopes=("posts:write",),
    operations=frozenset({"list", "get", "create", "update", "delete"}),
    transitions=(Transition("status", "published", "published"),),
)


COMMENTS = Resource(
    name="comments",
    singular="comment",
    table="comments",
    summary="Comments on posts",
    fields=(
        ref("post_id", "posts", "The post", writable=False, filterable=True),
        ref("member_id", "members", "The author", nullable=True, writable=False),
        Field("body", "text", "The comment", writable=False),
        Field("status", "enum", "Moderation", choices=("visible", "hidden"), writable=False),
        created(),
    ),
    read_scopes=("comments:read",),
    operations=frozenset({"list", "get"}),
)
