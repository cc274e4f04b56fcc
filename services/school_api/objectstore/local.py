"""Objects as files under a directory: `{root}/{key}/data` and its `meta.json` beside it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import IO

from services.school_api.objectstore import CHUNK, StoredObject, check_key


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _dir(self, key: str) -> Path:
        return self.root / check_key(key)

    async def put(
        self, key: str, body: IO[bytes], *, size: int, content_type: str, name: str
    ) -> bool:
        return await asyncio.to_thread(self._put, self._dir(key), body, size, content_type, name)

    @staticmethod
    def _put(folder: Path, body: IO[bytes], size: int, content_type: str, name: str) -> bool:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "meta.json").write_text(
            json.dumps({"content_type": content_type, "size": size, "name": name})
        )
        fd, temporary = tempfile.mkstemp(dir=folder, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(body, out, CHUNK)
            # A hard link fails when the target exists: the first complete PUT wins, once.
            os.link(temporary, folder / "data")
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(temporary)

    async def get(self, key: str) -> StoredObject | None:
        folder = self._dir(key)
        try:
            meta = json.loads(await asyncio.to_thread((folder / "meta.json").read_text))
            handle = await asyncio.to_thread(open, folder / "data", "rb")
        except FileNotFoundError:
            return None
        return StoredObject(
            content_type=meta["content_type"],
            size=meta["size"],
            name=meta["name"],
            chunks=_read(handle),
        )

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread((self._dir(key) / "data").is_file)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(shutil.rmtree, self._dir(key), True)

    async def close(self) -> None:
        return None


async def _read(handle: IO[bytes]) -> AsyncGenerator[bytes, None]:
    try:
        while chunk := await asyncio.to_thread(handle.read, CHUNK):
            yield chunk
    finally:
        with contextlib.suppress(OSError):
            handle.close()
