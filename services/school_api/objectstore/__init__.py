"""Where uploaded files are kept: a small object store interface and its two backends.

`local` keeps objects under a directory (`make dev`: `.data/uploads`), `s3` in an
S3-compatible bucket (production). STORAGE_URL (libs/common/config.ObjectStorage) picks one.
Objects are written once and never rewritten: `put` of a key that exists answers False and
leaves the stored object as it was, so a file's URL can be cached as immutable.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import IO, Protocol

from libs.common.config import ConfigError, ObjectStorage, Settings

CHUNK = 64 * 1024
# Keys are ours (`{school_id}/{upload_id}`), never a caller's text: no path can escape a root.
_KEY = re.compile(r"^[0-9]{1,20}/[0-9a-f-]{36}$")


def check_key(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise ValueError(f"not an object key: {key!r}")
    return key


@dataclass(frozen=True, slots=True)
class StoredObject:
    """A stored object being read: what it is, and its bytes as they come."""

    content_type: str
    size: int
    name: str  # the file name it was uploaded under
    chunks: AsyncGenerator[bytes, None]


class ObjectStore(Protocol):
    async def put(
        self, key: str, body: IO[bytes], *, size: int, content_type: str, name: str
    ) -> bool:
        """Store `size` bytes read from `body`; False (nothing written) when `key` exists."""

    async def get(self, key: str) -> StoredObject | None:
        """The object, streamed; None when there is none. Read `chunks` to the end (or close
        it) to release what it holds."""

    async def exists(self, key: str) -> bool: ...

    async def delete(self, key: str) -> None:
        """Remove the object; no error when there is none."""

    async def close(self) -> None: ...


def open_store(settings: Settings) -> ObjectStore:
    """The store STORAGE_URL names; ConfigError naming the variable when there is none."""
    storage: ObjectStorage | None = settings.storage
    if storage is None:
        raise ConfigError("STORAGE_URL", "is required in production (file:///dir or s3://bucket)")
    if storage.kind == "file":
        from services.school_api.objectstore.local import LocalStore

        assert storage.root is not None
        return LocalStore(storage.root)
    from services.school_api.objectstore.s3 import S3Store

    return S3Store(storage)
