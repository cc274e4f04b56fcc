"""Image uploads: announced, their bytes PUT to `upload_url`, then confirmed (`storage:write`)."""

from __future__ import annotations

from services.school_api.resources.fields import created
from services.school_api.resources.model import Field, Resource

# Raster images only: an SVG is a document that can run script, never accepted as an image.
UPLOAD_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
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
            "pending until confirmed; expired when never PUT or confirmed in time",
            choices=("pending", "confirmed", "expired"),
            writable=False,
        ),
        Field("upload_url", "string", "Where to PUT the bytes before expires_at", writable=False),
        Field("url", "string", "Where the file is served once stored", writable=False),
        Field("expires_at", "timestamp", "When upload_url stops working", writable=False),
        Field("confirmed_at", "timestamp", "When it was confirmed", nullable=True, writable=False),
        created(),
    ),
    read_scopes=("storage:write",),
    write_scopes=("storage:write",),
    operations=frozenset({"create", "update"}),
    kind="upload",
    event_overrides=(("updated", "upload.confirmed"),),
)
