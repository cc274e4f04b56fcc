"""Objects as files under a directory, one file per key: `{root}/{key}`, its first line the
object's metadata (JSON), then its bytes. One file, so writing it once (a hard link, which
fails when the name exists) covers the bytes and what they are together."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import IO, Any

from services.school_api.objectstore import CHUNK, StoredObject, check_key


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    async def put(
        self, key: str, body: IO[bytes], *, size: int, content_type: str, name: str
    ) -> bool:
        meta = {"content_type": content_type, "size": size, "name": name}
        return await asyncio.to_thread(self._put, self._path(key), body, meta)

    @staticmethod
    def _put(path: Path, body: IO[bytes], meta: dict[str, Any]) -> bool:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(json.dumps(meta).encode() + b"\n")
                shutil.copyfileobj(body, out, CHUNK)
            # Complete before it has its name, and never replaced: the first PUT wins, once.
            os.link(temporary, path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(temporary)

    async def get(self, key: str) -> StoredObject | None:
        try:
            handle = await asyncio.to_thread(open, self._path(key), "rb")
        except FileNotFoundError:
            return None
        try:
            meta = json.loads(await asyncio.to_thread(handle.readline))
        except BaseException:
            handle.close()
            raise
        return StoredObject(
            content_type=meta["content_type"],
            size=meta["size"],
            name=meta["name"],
            chunks=_read(handle),
        )

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._path(key).is_file)

    async def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.unlink, self._path(key))

    async def close(self) -> None:
        return None


async def _read(handle: IO[bytes]) -> AsyncGenerator[bytes, None]:
    try:
        while chunk := await asyncio.to_thread(handle.read, CHUNK):
            yield chunk
    finally:
        with contextlib.suppress(OSError):
            handle.close()
