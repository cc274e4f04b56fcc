"""The per-call Redis round trip: the revocation mark and the client's rate limit, together.

One Lua script, so a protected call costs exactly one Redis round trip (sent over the lean
pipelined connection of resp.py). It answers, in the
contract's order, whether the grant is revoked and, when the route's scope held, whether the
client may make one more call now.

The limiter is GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp):
a client may make `burst` calls at once and then one every 60/`per_minute` seconds. The time is
Redis's own (TIME), so every gateway process shares one clock. The bucket is per client and
school: a platform client's calls for two schools are limited separately.

Headers follow draft-ietf-httpapi-ratelimit-headers: `RateLimit-Limit` is the bucket (the
burst), `RateLimit-Remaining` what is left of it now, `RateLimit-Reset` the seconds until it is
full again, and `RateLimit-Policy` states the pace as `<burst>;w=<seconds to refill it>`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import NamedTuple

from services.gateway.resp import PipelinedRedis, RedisReplyError, pack

BUCKET_KEY = "connect:ratelimit:"

# KEYS[1] the grant's revocation mark, KEYS[2] the client's bucket.
# ARGV[1] "1" to take a call from the bucket, ARGV[2] microseconds per call, ARGV[3] burst.
# Answer: {revoked, allowed, remaining, retry_after_us, reset_us}.
_GUARD = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {1, 0, 0, 0, 0}
end
if ARGV[1] ~= '1' then
  return {0, 1, 0, 0, 0}
end
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[2])) or now
if tat < now then
  tat = now
end
local new_tat = tat + interval
local allow_at = new_tat - interval * burst
if allow_at > now then
  return {0, 0, 0, allow_at - now, tat - now}
end
local ttl_ms = math.floor((new_tat - now) / 1000) + 1
redis.call('SET', KEYS[2], string.format('%.0f', new_tat), 'PX', ttl_ms)
return {0, 1, math.floor((now - allow_at) / interval), 0, new_tat - now}
"""


class Verdict(NamedTuple):
    """One call's answer (a tuple: one is made per call, and cheaply)."""

    revoked: bool
    allowed: bool
    limit: int
    remaining: int
    retry_after: int  # seconds, 0 when allowed
    reset: int  # seconds until the bucket is full again
    window: int  # seconds a full bucket takes to refill

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset),
            "RateLimit-Policy": f"{self.limit};w={self.window}",
        }


@dataclass(frozen=True, slots=True)
class Pace:
    """A client's limit as the script wants it."""

    burst: int
    interval_us: int

    @classmethod
    def of(cls, per_minute: int, burst: int) -> Pace:
        per_minute = max(1, per_minute)
        # A burst above the per-minute limit would let a client exceed it in its first minute.
        return cls(max(1, min(burst, per_minute)), max(1, round(60_000_000 / per_minute)))

    @property
    def window(self) -> int:
        return max(1, math.ceil(self.burst * self.interval_us / 1_000_000))


class Guard:
    """Runs the script over the pipelined connection (resp.py): EVALSHA, loading it by EVAL
    the first time a Redis has not seen it."""

    def __init__(self, connection: PipelinedRedis) -> None:
        self._redis = connection
        self._sha = hashlib.sha1(_GUARD.encode(), usedforsecurity=False).hexdigest().encode()
        # The command's unchanging start (`EVALSHA <sha> 2`), packed once per sha.
        self._head = (self._sha, _evalsha_head(self._sha))

    async def check(
        self, revoked_key: str, bucket_key: str, *, consume: bool, pace: Pace
    ) -> Verdict:
        """One round trip; ConnectionError or RedisReplyError when Redis cannot answer."""
        sha, head = self._head
        if sha is not self._sha:
            self._head = (self._sha, head := _evalsha_head(self._sha))
        revoked = revoked_key.encode()
        bucket = bucket_key.encode()
        interval = b"%d" % pace.interval_us
        burst = b"%d" % pace.burst
        command = b"%s$%d\r\n%s\r\n$%d\r\n%s\r\n$1\r\n%s\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
            head,
            len(revoked),
            revoked,
            len(bucket),
            bucket,
            b"1" if consume else b"0",
            len(interval),
            interval,
            len(burst),
            burst,
        )
        try:
            answer = await self._redis.execute(command)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            answer = await self._redis.execute(
                pack(
                    b"EVAL",
                    _GUARD.encode(),
                    b"2",
                    revoked,
                    bucket,
                    b"1" if consume else b"0",
                    interval,
                    burst,
                )
            )
        is_revoked, allowed, remaining, retry_us, reset_us = answer
        return Verdict(
            is_revoked == 1,
            allowed == 1,
            pace.burst,
            remaining if remaining > 0 else 0,
            0 if allowed == 1 else max(1, math.ceil(retry_us / 1_000_000)),
            max(0, math.ceil(reset_us / 1_000_000)),
            pace.window,
        )


def _evalsha_head(sha: bytes) -> bytes:
    """`EVALSHA <sha> 2` of a seven-part command, the rest of which is added per call."""
    return pack(b"EVALSHA", sha, b"2", b"", b"", b"", b"", b"").split(b"$0\r\n", 1)[0]
