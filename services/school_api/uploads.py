"""Upload URLs in the style of an object store's presigned URLs, and their check.

The school API records an upload and hands back where to PUT the bytes: a URL naming the
school, the upload id, the announced size and type, and an expiry, signed with a key derived
from SECRET_PEPPER. The storage edge (storage_edge.py) checks it from the URL alone, without
the database: what the signature covers is all it needs to accept or refuse the bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import quote, urlencode
from uuid import UUID

from libs.common.config import Settings

UPLOAD_URL_TTL = timedelta(minutes=15)
UPLOADS_PATH = "/storage/uploads"
FILES_PATH = "/storage/files"
_HEX_SIGNATURE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class UploadUrls:
    upload_url: str  # PUT the bytes here before expires_at
    url: str  # where the file is served once stored
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Grant:
    """What a valid upload URL allows: these bytes, under this key, until `expires`."""

    school_id: int
    upload_id: UUID
    name: str
    content_type: str
    size: int
    expires: int

    @property
    def key(self) -> str:
        return object_key(self.school_id, self.upload_id)


def object_key(school_id: int, upload_id: UUID) -> str:
    return f"{school_id}/{upload_id}"


def _signing_key(pepper: bytes) -> bytes:
    # Derived, so the pepper's other uses and this one never share a key.
    return hmac.new(pepper, b"school-api upload url", hashlib.sha256).digest()


def _signed(path: str, expires: int, content_type: str, size: int) -> bytes:
    # surrogatepass: a decoded path may hold any code point; it is refused by the MAC, not here.
    return f"PUT\n{path}\n{expires}\n{content_type}\n{size}".encode("utf-8", "surrogatepass")


def signature(path: str, expires: int, content_type: str, size: int, pepper: bytes) -> str:
    return hmac.new(
        _signing_key(pepper), _signed(path, expires, content_type, size), hashlib.sha256
    ).hexdigest()


def urls_for(
    settings: Settings,
    school_id: int,
    upload_id: UUID,
    filename: str,
    content_type: str,
    size: int,
    now: datetime,
) -> UploadUrls:
    expires_at = now + UPLOAD_URL_TTL
    expires = int(expires_at.timestamp())
    name = quote(filename, safe="")
    path = f"{UPLOADS_PATH}/{school_id}/{upload_id}/{name}"
    # Signed decoded: clients (and proxies) may re-encode a path ('%28' or '('), never change
    # what it decodes to.
    signed = f"{UPLOADS_PATH}/{school_id}/{upload_id}/{filename}"
    query = urlencode(
        {
            "expires": expires,
            "size": size,
            "type": content_type,
            "signature": signature(signed, expires, content_type, size, settings.secret_pepper),
        }
    )
    base = settings.urls.platform_url
    return UploadUrls(
        upload_url=f"{base}{path}?{query}",
        url=f"{base}{FILES_PATH}/{school_id}/{upload_id}/{name}",
        expires_at=expires_at,
    )


def good_filename(name: str) -> bool:
    """A name that stays one plain path segment in the URLs: no separators, no dot segment,
    no control characters (the gateway refuses paths that could resolve elsewhere)."""
    return (
        name not in (".", "..")
        and "/" not in name
        and "\\" not in name
        and all(ch.isprintable() for ch in name)
    )


class Refused(Exception):
    """The upload URL does not allow this PUT; `error` says why (never which part differed)."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


def check(
    settings: Settings,
    path: str,
    school: str,
    upload: str,
    name: str,
    query: dict[str, str],
    now: float,
) -> Grant:
    """The grant a PUT to `path?query` (`path` decoded) carries, or Refused (bad signature,
    expired)."""
    try:
        expires = int(query["expires"])
        size = int(query["size"])
        content_type = query["type"]
        given = query["signature"]
        school_id = int(school)
        upload_id = UUID(upload)
    except (KeyError, ValueError):
        raise Refused("invalid_signature") from None
    if not _HEX_SIGNATURE.fullmatch(given):
        raise Refused("invalid_signature")
    # Either pepper of a rotation's overlap: URLs handed out just before it stay good.
    if not any(
        hmac.compare_digest(signature(path, expires, content_type, size, pepper), given)
        for pepper in settings.secret_peppers
    ):
        raise Refused("invalid_signature")
    if now >= expires:
        raise Refused("upload_url_expired")
    return Grant(school_id, upload_id, name, content_type, size, expires)
