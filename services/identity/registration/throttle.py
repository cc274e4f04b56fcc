"""How often one address may register at one issuer: a window per issuer and address.

REGISTRATIONS_PER_WINDOW per REGISTRATION_WINDOW_SECONDS (IPv6 per /64); past it, 429
`slow_down` with `Retry-After`. If Redis cannot count, registration stays open (fail open):
PostgreSQL, not Redis, is what a registration needs.
"""

from __future__ import annotations

from redis.exceptions import RedisError

from libs.common.errors import SlowDown
from libs.common.logging import get_logger
from services.identity import ratelimit
from services.identity.context import IdentityContext
from services.identity.schools import Issuer

log = get_logger(__name__)

# Read at request time, so a test (or an operator's patch) can change them in-process.
REGISTRATIONS_PER_WINDOW = 10
REGISTRATION_WINDOW_SECONDS = 60


async def check_rate(ctx: IdentityContext, where: Issuer, address: str) -> None:
    bucket = ratelimit.key(
        ctx.settings,
        "register",
        str(where.school_id) if where.school_id is not None else "platform",
        ratelimit.address_bucket(address),
    )
    try:
        allowed, retry_after = await ratelimit.hit(
            ctx.redis, bucket, REGISTRATIONS_PER_WINDOW, REGISTRATION_WINDOW_SECONDS
        )
    except RedisError:
        log.warning("registration_rate_limit_unavailable")
        return
    if not allowed:
        raise SlowDown(
            "Too many registrations from this address; try again later.",
            headers={"Retry-After": str(retry_after)},
        )
