"""What the gateway's handlers share for the life of the process."""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg
import redis.asyncio as redis
from aiohttp import web

from libs.common import keys
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

# Hosts are the caller's to choose: the memo of their subdomains is bounded.
_HOSTS_MAX = 4096


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
    # Derived once rather than per call (each is a few string operations on every call).
    revoked_prefix: str = field(init=False)
    bucket_prefix: str = field(init=False)
    _subdomains: dict[str, str | None] = field(init=False, default_factory=dict)
    _paces: dict[int, Pace] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        # Each key is completed per call with `{s<school>}:<grant>` / `{s<school>}:<client>`
        # (libs/common/keys.py: both in the school's slot).
        object.__setattr__(self, "revoked_prefix", self.settings.stream(keys.REVOKED))
        object.__setattr__(self, "bucket_prefix", keys.gateway_bucket_prefix(self.settings))

    def subdomain_of(self, host: str) -> str | None:
        """settings.urls.subdomain_of, memoized per Host."""
        memo = self._subdomains
        try:
            return memo[host]
        except KeyError:
            pass
        found = self.settings.urls.subdomain_of(host)
        if len(memo) >= _HOSTS_MAX:
            memo.clear()
        memo[host] = found
        return found

    def pace(self, per_minute: int | None) -> Pace:
        """A client's pace: its own limit per minute, or the gateway's default."""
        if not per_minute:
            return self.default_pace
        pace = self._paces.get(per_minute)
        if pace is None:
            if len(self._paces) >= _HOSTS_MAX:
                self._paces.clear()
            pace = Pace.of(per_minute, self.settings.gateway.rate_limit_burst)
            self._paces[per_minute] = pace
        return pace


CONTEXT = web.AppKey("gateway", GatewayContext)
ROUTES = web.AppKey("gateway_routes", RouteTable)


def context(request: web.Request) -> GatewayContext:
    return request.app[CONTEXT]
