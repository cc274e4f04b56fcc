"""Upload URLs in the style of an object store's presigned URLs.

The school API records an upload and hands back where to PUT the bytes: a URL naming the
school, the upload id and an expiry, signed with a key derived from SECRET_PEPPER, so the
storage edge that accepts the PUT can check it without asking this service. (The storage edge
itself is not part of this repository yet.)
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import quote
from uuid import UUID

from libs.common.config import Settings

UPLOAD_URL_TTL = timedelta(minutes=15)


@dataclass(frozen=True, slots=True)
class UploadUrls:
    upload_url: str  # PUT the bytes here before expires_at
    url: str  # where the file is served once confirmed
    expires_at: datetime


def _signing_key(settings: Settings) -> bytes:
    # Derived, so the pepper's other uses and this one never share a key.
    return hmac.new(settings.secret_pepper, b"school-api upload url", hashlib.sha256).digest()


def signature(settings: Settings, path: str, expires: int) -> str:
    return hmac.new(
        _signing_key(settings), f"PUT\n{path}\n{expires}".encode(), hashlib.sha256
    ).hexdigest()


def urls_for(
    settings: Settings, school_id: int, upload_id: UUID, filename: str, now: datetime
) -> UploadUrls:
    expires_at = now + UPLOAD_URL_TTL
    expires = int(expires_at.timestamp())
    name = quote(filename, safe="")
    path = f"/storage/uploads/{school_id}/{upload_id}/{name}"
    base = settings.urls.platform_url
    return UploadUrls(
        upload_url=f"{base}{path}?expires={expires}&signature={signature(settings, path, expires)}",
        url=f"{base}/storage/files/{school_id}/{upload_id}/{name}",
        expires_at=expires_at,
    )
