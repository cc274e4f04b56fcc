"""What the gateway's handlers share for the life of the process."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import redis.asyncio as redis
from aiohttp import web

from libs.common.config import Settings
from services.gateway.audit import AuditBuffer
from services.gateway.directory import Directory
from services.gateway.jwks import JwksCache
from services.gateway.metrics import GatewayMetrics
from services.gateway.proxy import Upstreams
from services.gateway.ratelimit import Guard, Pace
from services.gateway.revocation import RevokedGrants
from services.gateway.routetable import RouteTable
from services.gateway.validation import TokenVerifier


@dataclass(frozen=True, slots=True)
class GatewayContext:
    settings: Settings
    routes: RouteTable
    pool: asyncpg.Pool
    redis: redis.Redis
    directory: Directory
    jwks: JwksCache
    verifier: TokenVerifier
    revoked: RevokedGrants
    guard: Guard
    default_pace: Pace
    upstreams: Upstreams
    audit: AuditBuffer
    metrics: GatewayMetrics


CONTEXT = web.AppKey("gateway", GatewayContext)
ROUTES = web.AppKey("gateway_routes", RouteTable)


def context(request: web.Request) -> GatewayContext:
    return request.app[CONTEXT]
