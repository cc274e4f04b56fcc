"""Objects in an S3-compatible bucket through aiobotocore: one client for the process."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import IO, Any

from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import ClientError

from libs.common.config import ObjectStorage
from services.school_api.objectstore import CHUNK, StoredObject, check_key

_MISSING = frozenset({"404", "NoSuchKey", "NotFound"})


class S3Store:
    def __init__(self, storage: ObjectStorage) -> None:
        self.bucket = storage.bucket
        self.prefix = storage.prefix
        self._storage = storage
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None

    async def _s3(self) -> Any:
        # Made on first use, inside the running loop (aiohttp sessions belong to one loop).
        if self._client is None:
            config = Config(
                connect_timeout=5,
                read_timeout=30,
                retries={"max_attempts": 3, "mode": "standard"},
                # An endpoint such as MinIO's or moto's has no bucket subdomains.
                s3={"addressing_style": "path" if self._storage.endpoint else "auto"},
            )
            self._client = await self._stack.enter_async_context(
                get_session().create_client(
                    "s3",
                    endpoint_url=self._storage.endpoint,
                    region_name=self._storage.region,
                    config=config,
                )
            )
        return self._client

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    async def put(
        self, key: str, body: IO[bytes], *, size: int, content_type: str, name: str
    ) -> bool:
        s3 = await self._s3()
        try:
            await s3.put_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Body=body,
                ContentLength=size,
                ContentType=content_type,
                # S3 metadata is ASCII: the name goes hex-encoded.
                Metadata={"name": name.encode().hex()},
                # Written once: a second PUT of the same key fails instead of replacing it.
                IfNoneMatch="*",
            )
        except ClientError as exc:
            if _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise
        return True

    async def get(self, key: str) -> StoredObject | None:
        s3 = await self._s3()
        try:
            answer = await s3.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise
        name = bytes.fromhex(answer.get("Metadata", {}).get("name", "")).decode()
        return StoredObject(
            content_type=answer["ContentType"],
            size=answer["ContentLength"],
            name=name,
            chunks=_read(answer["Body"]),
        )

    async def exists(self, key: str) -> bool:
        s3 = await self._s3()
        try:
            await s3.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return False
            raise
        return True

    async def delete(self, key: str) -> None:
        s3 = await self._s3()
        await s3.delete_object(Bucket=self.bucket, Key=self._key(key))

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = None


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


async def _read(body: Any) -> AsyncGenerator[bytes, None]:
    try:
        async for chunk in body.iter_chunks(CHUNK):
            yield chunk
    finally:
        body.close()
