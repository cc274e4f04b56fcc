"""Fixed-window rate limits in Redis, shared by every identity process.

One counter per key and window: the first hit creates it with the window as its expiry, later
hits count up. The increment and the expiry run in one Lua script, so no crash or race can
leave a counter without an expiry (which would block its key for good) and concurrent hits
never over-admit. A fixed window can let through up to twice the limit across a window's
edge; for the abuse limits identity needs (registrations per address) that is acceptable,
and it costs one round trip and one small key per bucket.
"""

from __future__ import annotations

import ipaddress
import math

import redis.asyncio as redis
from aiohttp import web

from libs.common.config import Settings

PREFIX = "connect:ratelimit:"

_HIT = """
local count = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {count, ttl}
"""


def key(settings: Settings, *parts: str) -> str:
    """The Redis key of one bucket: `connect:ratelimit:<part>:<part>...`, run-prefixed."""
    return settings.stream(PREFIX + ":".join(parts))


async def hit(client: redis.Redis, key: str, limit: int, window_seconds: int) -> tuple[bool, int]:
    """Count one hit on `key`; (allowed, seconds until the window resets when refused).

    `key` is the full Redis key (see :func:`key`). Hits past the limit still count, so a
    caller hammering a closed window does not get a fresh one sooner.
    """
    script = client.register_script(_HIT)
    count, ttl_ms = await script(keys=[key], args=[window_seconds * 1000])
    if int(count) <= limit:
        return True, 0
    return False, max(1, math.ceil(int(ttl_ms) / 1000))


def client_address(request: web.Request, settings: Settings) -> str:
    """The caller's IP address: the peer, or the edge's `X-Forwarded-For` when trusted.

    Trust follows TRUST_FORWARDED_HOST, as the Host does: behind the gateway the peer is the
    gateway, and the first X-Forwarded-For entry is the client the edge saw (the edge must
    set the header, not append to one the caller sent).
    """
    if settings.trust_forwarded_host:
        forwarded = request.headers.get("X-Forwarded-For", "").split(",")[0].strip()
        try:
            return str(ipaddress.ip_address(forwarded))
        except ValueError:
            pass
    return request.remote or "unknown"


def address_bucket(address: str) -> str:
    """The part of an address one caller controls: the IPv4 address, or the IPv6 /64.

    One IPv6 subscriber usually holds a whole /64 and can rotate addresses inside it at will,
    so per-address IPv6 limits would limit nothing. An IPv4-mapped address is its IPv4
    address, and a zone (`%eth0`) or another spelling of the same address changes nothing.
    Every per-address limit of identity (registration, sign-in) counts by this.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
