"""The identity service's aiohttp application: wiring only; the endpoints live in routes.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import structlog
from aiohttp import web
from prometheus_client import Counter
from redis.exceptions import RedisError

from libs.common import db, streams, tasks
from libs.common.config import Settings
from libs.common.errors import NotFound, OAuthError
from libs.common.logging import get_logger
from libs.common.web import (
    METRICS,
    READINESS,
    Handler,
    base_application,
    watch_background,
    watch_pool,
)
from services.identity import (
    audit_consumer,
    clients,
    cors,
    credentials,
    keys,
    revocation_marks,
    routes,
    secret_checks,
    sweep,
)
from services.identity.audit_commit import AuditCommitter
from services.identity.context import CONTEXT, ISSUER, IdentityContext
from services.identity.metrics import IdentityMetrics
from services.identity.schools import SchoolDirectory, UnknownSchool
from services.identity.store import signing_keys as signing_key_store

log = get_logger(__name__)

# Paths answered on any Host, school or not: probes and the service's own description.
_HOSTLESS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json"})


@web.middleware
async def resolve_issuer(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Find the school (or the platform) the Host names; an unknown school is 404."""
    if request.path in _HOSTLESS:
        return await handler(request)
    ctx = request.app[CONTEXT]
    host = request.host
    if ctx.settings.trust_forwarded_host:
        host = request.headers.get("X-Forwarded-Host", host).split(",")[0].strip()
    try:
        issuer = await ctx.schools.resolve(host)
    except UnknownSchool:
        return NotFound("No school answers at this address.").response()
    request[ISSUER] = issuer
    if issuer.school:
        structlog.contextvars.bind_contextvars(school=issuer.school.subdomain)
    return await handler(request)


@web.middleware
async def oauth_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Any OAuthError a handler raises (one class per code, libs/common/errors.py) becomes its
    RFC 6749 5.2 answer."""
    try:
        return await handler(request)
    except OAuthError as exc:
        return exc.response()


def create_app(settings: Settings) -> web.Application:
    app = base_application(
        "identity",
        middlewares=[resolve_issuer, cors.middleware, oauth_errors],
        access_log=settings.observability.access_log,
    )
    app.cleanup_ctx.append(_resources(settings))
    routes.setup(app)
    return app


async def _rotate_on_schedule(
    pool: asyncpg.Pool, redis_client: Any, settings: Settings, stop: asyncio.Event
) -> None:
    """Rotate signing keys that outlived KEY_ROTATION_INTERVAL; checked every few minutes."""
    period = min(300.0, settings.tokens.key_rotation_interval / 4)
    while not stop.is_set():
        try:
            rotated = await keys.rotate_due_issuers(pool, redis_client, settings)
            if rotated:
                log.info("keys_rotated_on_schedule", issuers=rotated)
        except (OSError, asyncpg.PostgresError, RedisError):
            log.warning("key_rotation_check_failed", exc_info=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), period)


# How often the gauges read from the stores (key age, audit stream lag) are refreshed.
METRICS_INTERVAL = 15.0


async def _observe(
    pool: asyncpg.Pool,
    redis_client: Any,
    settings: Settings,
    metrics: IdentityMetrics,
    stop: asyncio.Event,
    interval: float = METRICS_INTERVAL,
) -> None:
    """Refresh the gauges no request moves: the oldest current signing key's activation and
    the audit consumer group's lag on connect:audit."""
    while not stop.is_set():
        try:
            activated = await signing_key_store.oldest_current_activation(pool)
            metrics.oldest_key_activated = activated.timestamp() if activated else None
            found = await streams.group_lag(
                redis_client, settings.stream(streams.AUDIT), audit_consumer.GROUP
            )
            if found is not None:
                lag, pending = found
                if lag is not None:
                    metrics.audit_lag.set(lag)
                metrics.audit_pending.set(pending)
        except (OSError, asyncpg.PostgresError, RedisError):
            log.warning("metrics_refresh_failed", exc_info=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


def _resources(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        # Identity keeps no session state on pooled connections (its only advisory locks are
        # transaction-scoped), so releasing one need not cost a reset round trip.
        pool: asyncpg.Pool = await db.create_pool(settings=settings, keep_session=True)
        try:
            # Before anything else, and so before listening: a key-encryption key or pepper
            # other than the database's would fail every token request (SecretMismatch is a
            # ConfigError, which the CLI reports naming the variable, exit status 2).
            await secret_checks.verify(pool, settings)
        except BaseException:
            await pool.close()
            raise
        redis_client = streams.connect(settings.redis_url)
        metrics = IdentityMetrics(app[METRICS].registry)
        watch_pool(app[METRICS], "main", pool)
        context = IdentityContext(
            settings=settings,
            pool=pool,
            redis=redis_client,
            schools=SchoolDirectory(pool, settings),
            keyring=keys.KeyRing(pool, settings),
            passwords=credentials.PasswordGate(settings.identity.password_hash_concurrency),
            metrics=metrics,
            audit=AuditCommitter(pool),
        )
        app[CONTEXT] = context

        async def postgres_ready() -> bool:
            return await db.ping(pool)

        async def redis_ready() -> bool:
            return bool(await redis_client.ping())

        app[READINESS]["postgresql"] = postgres_ready
        app[READINESS]["redis"] = redis_ready
        # The platform issuer needs keys before its first token, like any school.
        await keys.ensure_issuer_keys(pool, settings, None)
        # The audit consumer's own connection. Its INSERT has the same shape every time, yet
        # PostgreSQL kept planning it afresh (a generic plan of `unnest` over parameter arrays
        # looks costlier to it than it is): planning was about a quarter of a flush's insert.
        audit_pool = await db.create_pool(
            settings=settings,
            min_size=1,
            max_size=1,
            keep_session=True,
            server_settings={"plan_cache_mode": "force_generic_plan"},
        )
        watch_pool(app[METRICS], "audit", audit_pool)
        stop = asyncio.Event()
        # Every loop supervised: restarted with backoff whatever ends it, and /healthz and
        # /readyz say when one is dead or keeps failing (libs/common/tasks.py).
        supervisor = tasks.Supervisor(stop)
        dead_letters = Counter(
            "stream_dead_letters_total",
            "Stream entries set aside unread (not a JSON object), by stream",
            ["stream"],
            registry=app[METRICS].registry,
        )
        supervisor.start(
            "identity-key-rotation",
            lambda: _rotate_on_schedule(pool, redis_client, settings, stop),
        )
        supervisor.start(
            "identity-audit-consumer",
            lambda: audit_consumer.run(
                audit_pool,
                redis_client,
                settings,
                stop,
                on_dead_letter=lambda stream: dead_letters.labels(stream).inc(),
                ran_cleanly=lambda: supervisor.ran_cleanly("identity-audit-consumer"),
            ),
        )
        supervisor.start("identity-sweep", lambda: sweep.run(pool, settings, stop))
        supervisor.start(
            "identity-metrics", lambda: _observe(pool, redis_client, settings, metrics, stop)
        )
        supervisor.start(
            "identity-revocation-marks",
            lambda: revocation_marks.run(pool, redis_client, settings, stop),
        )
        supervisor.start(
            "identity-client-changes",
            lambda: clients.follow_changes(redis_client, settings, stop),
        )
        watch_background(app, supervisor)
        try:
            yield
        finally:
            await supervisor.close()
            await context.audit.close()
            await redis_client.aclose()
            await audit_pool.close()
            await pool.close()

    return ctx
