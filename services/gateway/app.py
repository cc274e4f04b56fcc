"""The gateway's aiohttp application: wiring only; the request path lives in routes.py and
checks.py.

The route table is read in :func:`create_app`, before anything listens: a bad route file stops
the process with an error naming its line. At start the process opens its stores (`_Stores`),
makes the context every handler shares (`_context`), registers its readiness checks and
follows the revocation and key announcements; at stop it lets go of them in reverse.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import orjson
import redis.asyncio as redis
from aiohttp import web

from libs.common import db, redis_client, streams, tasks
from libs.common.config import Settings
from libs.common.logging import get_logger
from libs.common.web import METRICS, READINESS, watch_background, watch_pool
from services.gateway import broadcasts, edge, mcp, openapi, revocation, routes, routetable
from services.gateway.audit import AuditBuffer
from services.gateway.audit_retention import AuditRetention
from services.gateway.context import CONTEXT, ROUTES, GatewayContext
from services.gateway.directory import Directory
from services.gateway.jwks import JwksCache
from services.gateway.mcp import tools as mcp_tools
from services.gateway.metrics import GatewayMetrics
from services.gateway.proxy import Upstreams
from services.gateway.ratelimit import Guard, Pace
from services.gateway.redis_pipeline import PipelinedRedis
from services.gateway.redis_routing import pipelined
from services.gateway.revocation import RevokedGrants
from services.gateway.validation import TokenVerifier

log = get_logger(__name__)

# The per-call Redis round trip must fail fast when Redis hangs: the call is refused (503)
# rather than held.
REDIS_TIMEOUT = 1.0
JWKS_TIMEOUT = aiohttp.ClientTimeout(total=5)


def create_app(settings: Settings, *, routes_file: str | None = None) -> web.Application:
    """The gateway; raises routetable.RouteTableError when the route file is wrong."""
    table = routetable.load(routes_file or settings.gateway.routes_file, settings)
    # The MCP tools ask what the route table asks of the same calls, or the gateway stops.
    drift = mcp_tools.disagreements(table)
    if drift:
        raise routetable.RouteTableError(table.source, None, "; ".join(drift))
    app = edge.application(
        "gateway",
        public=lambda host: settings.urls.subdomain_of(host) is not None,
        access_log=settings.observability.access_log,
    )
    app[ROUTES] = table
    document = orjson.dumps(openapi.document(settings, table))

    async def openapi_document(_request: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json")

    app.router.add_get("/openapi.json", openapi_document)
    mcp.setup(app)
    # [\s\S], not `.`: a path may hold a newline (%0A) and must still reach the checks.
    app.router.add_route("*", "/{tail:[\\s\\S]*}", routes.dispatch)
    app.cleanup_ctx.append(_resources(settings, table))
    return app


def _jwks_fetcher(upstreams: Upstreams, identity_url: str) -> Callable[[str], Any]:
    async def fetch(issuer: str) -> dict[str, Any]:
        parts = urlsplit(issuer)
        # Identity finds the issuer from the Host, exactly as for a caller of the public origin.
        headers = {
            "Host": parts.netloc,
            "X-Forwarded-Host": parts.netloc,
            "X-Forwarded-Proto": parts.scheme,
            "Accept": "application/json",
        }
        async with upstreams.session("identity").get(
            identity_url + "/v1/oauth/jwks", headers=headers, timeout=JWKS_TIMEOUT
        ) as resp:
            if resp.status != 200:
                raise RuntimeError(f"identity answered {resp.status} for the JWKS")
            document = orjson.loads(await resp.read())
            if not isinstance(document, dict):
                raise RuntimeError("the JWKS is not a JSON object")
            return document

    return fetch


@dataclass(frozen=True, slots=True)
class _Stores:
    """The gateway's connections to PostgreSQL and Redis, one for each kind of traffic."""

    pool: asyncpg.Pool
    # redis-py, for readiness: calls and audit batches go over the pipelined ones.
    client: redis.Redis
    # The per-call round trip, over a lean pipelined connection of its own
    # (redis_pipeline.py).
    guard: PipelinedRedis
    # Audit batches on another, so a batch never queues ahead of a call's check.
    audit: PipelinedRedis
    # Blocking XREADs hold a connection for a second at a time: a client of their own.
    followers: redis.Redis

    @classmethod
    async def open(cls, settings: Settings) -> _Stores:
        # Durable mode holds calls while their records are written: a write that hangs ends
        # soon (the calls answered 503, the records kept), as the guard's does.
        audit_timeout = 2 * REDIS_TIMEOUT if settings.gateway.audit_mode == "durable" else 5.0
        pool: asyncpg.Pool = await db.create_pool(settings=settings)
        client = redis_client.connect(
            settings.redis_url,
            decode_responses=False,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
            health_check_interval=30,
        )
        return cls(
            pool=pool,
            client=client,
            # The guard's "no mark" is "not revoked" only where identity restored the marks
            # for the node's run (libs/common/marks_fence.py); the audit's XADDs need no fence.
            guard=pipelined(settings.redis_url, timeout=REDIS_TIMEOUT, fenced_by=settings),
            audit=pipelined(settings.redis_url, timeout=audit_timeout),
            followers=streams.connect(settings.redis_url),
        )

    async def close(self) -> None:
        await self.followers.aclose()
        await self.guard.close()
        await self.audit.close()
        await self.client.aclose()
        await self.pool.close()


def _context(
    settings: Settings,
    table: routetable.RouteTable,
    stores: _Stores,
    metrics: GatewayMetrics,
    lease: revocation.Lease,
) -> GatewayContext:
    """Everything the handlers share, made from the stores and the route table's upstreams."""
    upstreams = Upstreams(
        table.upstreams,
        connect_timeout=settings.gateway.upstream_connect_timeout,
        total_timeout=settings.gateway.upstream_timeout,
    )
    directory = Directory(stores.pool)
    jwks = JwksCache(
        _jwks_fetcher(upstreams, table.upstreams["identity"]),
        refresh_interval=settings.gateway.jwks_refresh_interval,
        on_fetch=lambda _issuer: metrics.jwks_fetches.inc(),
    )
    # Written records kept until identity stored them: a Redis that loses them gets them
    # again (audit_retention.py).
    retention = AuditRetention(
        stores.client,
        settings.stream(streams.AUDIT),
        on_dropped=metrics.audit_unconfirmed_dropped.inc,
    )
    metrics.audit_unconfirmed.set_function(lambda: retention.records)
    audit_buffer = AuditBuffer(
        stores.audit,
        settings.stream(streams.AUDIT),
        capacity=settings.gateway.audit_buffer_size,
        on_drop=metrics.audit_dropped.inc,
        on_refuse=metrics.audit_refused.inc,
        durable=settings.gateway.audit_mode == "durable",
        retention=retention,
    )
    metrics.audit_buffer_used.set_function(lambda: len(audit_buffer) + audit_buffer.reserved)
    return GatewayContext(
        settings=settings,
        routes=table,
        pool=stores.pool,
        redis=stores.client,
        directory=directory,
        jwks=jwks,
        verifier=TokenVerifier(
            settings, jwks, directory, cache_ttl=settings.gateway.token_cache_ttl
        ),
        revoked=RevokedGrants(),
        guard=Guard(stores.guard, lease),
        default_pace=Pace.of(
            settings.gateway.rate_limit_per_minute, settings.gateway.rate_limit_burst
        ),
        upstreams=upstreams,
        audit=audit_buffer,
        metrics=metrics,
    )


def _register_readiness(app: web.Application, ctx: GatewayContext) -> None:
    """/readyz: PostgreSQL and Redis answer. Not identity: an identity outage must not take
    every gateway out of the balancer (calls with tokens already verified, or of issuers
    whose JWKS is cached, are still served)."""

    async def postgres_ready() -> bool:
        return await db.ping(ctx.pool)

    async def redis_ready() -> bool:
        try:
            return bool(await ctx.redis.ping())
        except redis.RedisError:
            return False

    app[READINESS]["postgresql"] = postgres_ready
    app[READINESS]["redis"] = redis_ready


def _follow_announcements(
    settings: Settings,
    ctx: GatewayContext,
    followers: redis.Redis,
    lease: revocation.Lease,
    supervisor: tasks.Supervisor,
) -> None:
    """Follow connect:revocations (holding the revocation lease) and connect:keys, each
    supervised: restarted with backoff whatever ends it (libs/common/tasks.py)."""

    def on_keys(entry: streams.Entry) -> None:
        school_id = entry.data.get("school_id")
        ctx.jwks.invalidate(school_id if isinstance(school_id, int) else None)
        # A rotation may have withdrawn a key: tokens it signed are judged afresh.
        ctx.verifier.forget()

    supervisor.start(
        "gateway-revocations",
        lambda: revocation.follow_revocations(followers, settings, ctx.revoked, lease),
    )
    supervisor.start(
        "gateway-keys",
        lambda: broadcasts.follow(followers, settings.stream(streams.KEYS), on_keys),
    )


def _resources(
    settings: Settings, table: routetable.RouteTable
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def resources(app: web.Application) -> AsyncIterator[None]:
        metrics = GatewayMetrics(app[METRICS].registry)
        stores = await _Stores.open(settings)
        lease = revocation.Lease(settings.gateway.revocation_lease)
        watch_pool(app[METRICS], "main", stores.pool)
        metrics.revocation_lease.set_function(lambda: 1 if lease.live() else 0)
        ctx = app[CONTEXT] = _context(settings, table, stores, metrics, lease)
        _register_readiness(app, ctx)
        supervisor = tasks.Supervisor(asyncio.Event())
        ctx.audit.start(supervisor)
        if ctx.audit.retention is not None:
            supervisor.start("gateway-audit-retention", ctx.audit.retention.run)
        _follow_announcements(settings, ctx, stores.followers, lease, supervisor)
        watch_background(app, supervisor)
        try:
            yield
        finally:
            # In-flight calls have finished by now (aiohttp's shutdown runs before cleanup):
            # write out their audit records (no loop is restarted once stop is set), then let go
            # of everything.
            supervisor.stop.set()
            await ctx.audit.stop()
            await supervisor.close(grace=0)
            await ctx.jwks.close()
            await ctx.upstreams.close()
            await stores.close()

    return resources
