"""What the school API's handlers share for the life of the process."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import redis.asyncio as redis
from aiohttp import web

from libs.common.config import Settings
from services.school_api.objectstore import ObjectStore


@dataclass(frozen=True, slots=True)
class SchoolApiContext:
    settings: Settings
    pool: asyncpg.Pool
    redis: redis.Redis
    objects: ObjectStore  # where uploaded files are kept (STORAGE_URL)


CONTEXT = web.AppKey("school_api", SchoolApiContext)


def context(request: web.Request) -> SchoolApiContext:
    return request.app[CONTEXT]
