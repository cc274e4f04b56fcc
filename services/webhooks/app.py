"""The webhooks service's aiohttp application: wiring only.

One process serves the API and, unless told not to, runs the workers: the dispatcher
(connect:events to deliveries), the revocation follower, the sender and the housekeeping.
Any number of processes can run; they share the work through the stream's consumer group
and PostgreSQL's row locks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import asyncpg
from aiohttp import web
from aiohttp.abc import AbstractResolver
from redis.exceptions import RedisError

from libs.common import db, streams, tasks
from libs.common.config import Settings
from libs.common.logging import get_logger
from libs.common.web import (
    METRICS,
    READINESS,
    base_application,
    json_http_errors,
    watch_background,
    watch_pool,
)
from services.webhooks import dispatcher, routes, secret_checks
from services.webhooks.context import CONTEXT, WebhooksContext
from services.webhooks.delivery import egress
from services.webhooks.delivery.sender import Sender
from services.webhooks.metrics import WebhookMetrics
from services.webhooks.ssrf import AddressPolicy
from services.webhooks.store import dead_letters as dead_letter_store
from services.webhooks.store import events as event_store
from services.webhooks.store import ordering as ordering_store
from services.webhooks.store import outcomes as outcome_store
from services.webhooks.store import queue as queue_store

log = get_logger(__name__)

# Delivery logs are kept this long (Svix keeps 90 days on paid plans, 30 by default).
RETENTION_SECONDS = 30 * 24 * 3600.0


def create_app(
    settings: Settings, *, workers: bool = True, resolver: AbstractResolver | None = None
) -> web.Application:
    """`workers=False` serves the API only (scale the two separately, or test the API
    without a sender claiming deliveries). `resolver` answers webhook host names (the
    system's by default)."""
    app = base_application(
        "webhooks",
        middlewares=[json_http_errors, routes.api_errors, routes.require_gateway],
        access_log=settings.observability.access_log,
    )
    app.cleanup_ctx.append(_resources(settings, workers, resolver))
    routes.setup(app)
    return app


async def _housekeeping(ctx: WebhooksContext) -> None:
    """Queue-depth and stream-lag gauges, endpoint.disabled events a crash left unannounced,
    retention."""
    tick = 0
    while True:
        try:
            due, pending = await queue_store.queue_depth(ctx.pool)
            ctx.metrics.queue_due.set(due)
            ctx.metrics.queue_pending.set(pending)
            await dispatcher.report_lag(ctx)
            if tick % 6 == 0:
                await dispatcher.announce(ctx, await outcome_store.unannounced_disabled(ctx.pool))
                stalled = await ordering_store.release_stalled(ctx.pool)
                if stalled:
                    log.warning("ordered_deliveries_released", resources=stalled)
            if tick % 720 == 0:
                purged = await event_store.purge_events(
                    ctx.pool, older_than_seconds=RETENTION_SECONDS
                )
                if purged:
                    log.info("events_purged", count=purged)
                await dead_letter_store.purge(ctx.pool, older_than_seconds=RETENTION_SECONDS)
        except (OSError, asyncpg.PostgresError, RedisError):
            log.warning("housekeeping_failed", exc_info=True)
        tick += 1
        await asyncio.sleep(5)


def _resources(
    settings: Settings, workers: bool, resolver: AbstractResolver | None
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        if workers:
            egress.check_egress(settings)
        pool: asyncpg.Pool = await db.create_pool(settings=settings)
        watch_pool(app[METRICS], "main", pool)
        try:
            # Before anything else, and so before listening: another key-encryption key would
            # fail every delivery's signing and seal new secrets that the right key cannot
            # open (SecretMismatch is a ConfigError: the CLI names the variable, exit 2).
            await secret_checks.verify(pool, settings)
        except BaseException:
            await pool.close()
            raise
        redis_client = streams.connect(settings.redis_url)
        context = WebhooksContext(
            settings=settings,
            pool=pool,
            redis=redis_client,
            metrics=WebhookMetrics(app[METRICS].registry),
            policy=AddressPolicy(allow_loopback=settings.webhooks.allow_loopback),
            resolver=resolver,
        )
        app[CONTEXT] = context

        async def postgres_ready() -> bool:
            return await db.ping(pool)

        async def redis_ready() -> bool:
            try:
                return bool(await redis_client.ping())
            except (OSError, RedisError):
                # "Not ready" in the answer's checks, not a bare 503 that names nothing.
                return False

        app[READINESS]["postgresql"] = postgres_ready
        app[READINESS]["redis"] = redis_ready

        sender: Sender | None = None
        background: list[asyncio.Task[None]] = []
        # Every worker loop restarts with backoff when it fails (Redis refusing at start or
        # READONLY after a failover included), and /healthz and /readyz say when one is dead
        # or has been failing for a while.
        supervisor = tasks.Supervisor(
            asyncio.Event(), on_restart=lambda name: context.metrics.restarts.labels(name).inc()
        )
        watch_background(app, supervisor)
        if workers:
            if not (settings.webhooks.egress_ip or settings.webhooks.egress_proxy):
                log.warning("no_egress_configured", hint="set WEBHOOK_EGRESS_IP or _PROXY")
            consumer = dispatcher.consumer_name()
            sender = Sender(context, consumer)
            await sender.start(supervisor)

            def progress(name: str) -> Callable[[], None]:
                return lambda: supervisor.ran_cleanly(name)

            background = [
                supervisor.start(
                    "webhooks-dispatch",
                    lambda: dispatcher.run(
                        context, consumer, on_progress=progress("webhooks-dispatch")
                    ),
                ),
                supervisor.start(
                    "webhooks-revocations",
                    lambda: dispatcher.follow_revocations(
                        context, consumer, on_progress=progress("webhooks-revocations")
                    ),
                ),
                supervisor.start("webhooks-housekeeping", lambda: _housekeeping(context)),
            ]
        try:
            yield
        finally:
            # Stop taking new work first; entries read but not acknowledged are claimed by
            # another dispatcher later.
            # Bounded, and a worker that died does not keep the rest from shutting down.
            supervisor.stop.set()
            await tasks.stop_all(background, grace=0)
            try:
                if sender is not None:
                    await sender.stop()
            finally:
                await redis_client.aclose()
                await pool.close()

    return ctx
