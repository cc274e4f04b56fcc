"""What the webhooks service's handlers and workers share for the life of the process."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import asyncpg
import redis.asyncio as redis
from aiohttp import web
from aiohttp.abc import AbstractResolver

from libs.common.config import Settings
from services.webhooks.metrics import WebhookMetrics
from services.webhooks.ssrf import AddressPolicy


@dataclass(slots=True)
class WebhooksContext:
    settings: Settings
    pool: asyncpg.Pool
    redis: redis.Redis
    metrics: WebhookMetrics
    policy: AddressPolicy
    # Set whenever deliveries may have become due in this process (new ones recorded, a
    # retry asked for, an outcome recorded); the sender waits on it between claims.
    due: asyncio.Event = field(default_factory=asyncio.Event)
    # Answers webhook host names, for the subscription checks and the sender alike; None is
    # the system resolver.
    resolver: AbstractResolver | None = None


CONTEXT = web.AppKey("webhooks", WebhooksContext)


def context(request: web.Request) -> WebhooksContext:
    return request.app[CONTEXT]
