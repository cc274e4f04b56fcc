"""The revocation mark and the client's rate limit: one Redis round trip, or none.

One Lua script answers, in the contract's order, whether the grant is revoked and whether the
client may make calls now (sent over the lean pipelined connection of redis_pipeline.py).
Without a revocation lease (revocation.py) every call runs it. Every call past the revocation
check is charged, one refused for scope too (contract 13): a token cannot make unlimited
refusals, each of which the audit trail records; the 403 is still answered before a 429
(contract 6's order).

Under a live lease the gateway's own set answers for revocation, and the script is needed only
for the rate limit: a call then takes a block of calls from the client's bucket at once and
leaves the rest for the calls after it (:class:`Guard`), so a busy client costs one round trip
per block. The bucket is still the one every gateway shares, and blocks are taken from it: a
client can be ahead of its limit by the calls of the blocks gateways hold for it (at most
burst / BLOCK_DIVISOR, and BLOCK_MAX, each), for at most BLOCK_LIFE. Calls of a block left
unspent when it runs out of time are given back with the next request.

The limiter is GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp):
a client may make `burst` calls at once and then one every 60/`per_minute` seconds. The time is
Redis's own (TIME), so every gateway process shares one clock. The bucket is per client and
school: a platform client's calls for two schools are limited separately.

Headers follow draft-ietf-httpapi-ratelimit-headers: `RateLimit-Limit` is the bucket (the
burst), `RateLimit-Remaining` what is left of it now, `RateLimit-Reset` the seconds until it is
full again, and `RateLimit-Policy` states the pace as `<burst>;w=<seconds to refill it>`.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from libs.common import tracing
from services.gateway.redis_pipeline import PipelinedRedis, RedisReplyError, pack
from services.gateway.revocation import Lease

# KEYS[1] the grant's revocation mark, KEYS[2] the client's bucket.
# ARGV[1] how many calls to take from the bucket (0: only the mark), ARGV[2] microseconds per
# call, ARGV[3] burst, ARGV[4] calls taken before and unspent, given back first, ARGV[5] the
# bucket's time (microseconds, Redis's clock) after they were taken.
# Answer: {revoked, granted, remaining, retry_after_us, reset_us, bucket time}; granted is
# as many of the calls asked for as the bucket holds now, 0 when it holds none.
_GUARD = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {1, 0, 0, 0, 0, 0}
end
local want = tonumber(ARGV[1])
if want < 1 then
  return {0, 1, 0, 0, 0, 0}
end
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local stored = tonumber(redis.call('GET', KEYS[2]))
local tat = stored or now
-- Of the unspent calls, only those whose charge is still ahead of now are given back: a bucket
-- that has refilled since owes nothing.
local unspent = tonumber(ARGV[4])
if stored and unspent > 0 then
  local owed = math.min(unspent, math.floor((tonumber(ARGV[5]) - now) / interval))
  if owed > 0 then
    tat = tat - interval * owed
  end
end
if tat < now then
  tat = now
end
local available = math.floor((now - tat) / interval) + burst
if available < 1 then
  return {0, 0, 0, tat + interval - interval * burst - now, tat - now, 0}
end
local granted = math.min(want, available)
local new_tat = tat + interval * granted
local ttl_ms = math.floor((new_tat - now) / 1000) + 1
redis.call('SET', KEYS[2], string.format('%.0f', new_tat), 'PX', ttl_ms)
return {0, granted, available - granted, 0, new_tat - now, new_tat}
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
    granted: int = 1  # calls taken from the bucket by this answer
    retry_after_us: int = 0  # Redis's own figure behind retry_after
    paid_through_us: int = 0  # the bucket's time after this answer took its calls

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
    def block(self) -> int:
        """Calls taken at once under a lease."""
        return max(1, min(BLOCK_MAX, self.burst // BLOCK_DIVISOR))

    @property
    def window(self) -> int:
        return max(1, math.ceil(self.burst * self.interval_us / 1_000_000))


# A block is at most this many calls, and at most burst / BLOCK_DIVISOR, so another gateway can
# always take the rest of a full bucket. Blocks are that large only for a client calling this
# gateway that often (each is twice what the last one served) while its bucket holds that
# many: near its limit, a client's blocks are as small as what its bucket holds.
BLOCK_MAX = 64
BLOCK_DIVISOR = 2
# How long the calls of a block (and a refusal) stay good. A refusal is kept until the next
# call is due at the latest.
BLOCK_LIFE = 1.0


class _Block:
    """The calls this gateway holds for one bucket, or the bucket's refusal."""

    __slots__ = ("calls", "paid_through_us", "refusal", "remaining", "reset_at", "taken", "until")

    def __init__(
        self,
        taken: int,
        remaining: int,
        reset_at: float,
        until: float,
        refusal: Verdict | None = None,
        paid_through_us: int = 0,
    ) -> None:
        self.taken = taken  # calls taken from the bucket for this block
        self.calls = taken  # of those, not yet spent
        self.paid_through_us = paid_through_us  # the bucket's time once they were taken
        self.remaining = remaining  # what the bucket held besides this block
        self.reset_at = reset_at
        self.until = until
        self.refusal = refusal


class Guard:
    """Runs the script over the pipelined connection (redis_pipeline.py): EVALSHA, loading it
    by EVAL the first time a Redis has not seen it; and, under a lease, spends blocks of calls.

    A block's size follows the bucket's use at this gateway: twice what the previous block
    served, from one up to `Pace.block`, so a client calling a gateway now and then takes one
    call at a time and a busy one takes blocks. Calls of a block left when it runs out of time
    are given back to the bucket with the next request, so a client is charged what it used.
    """

    def __init__(self, connection: PipelinedRedis, lease: Lease | None = None) -> None:
        self._redis = connection
        self._lease = lease
        self._sha = hashlib.sha1(_GUARD.encode(), usedforsecurity=False).hexdigest().encode()
        # The command's unchanging start (`EVALSHA <sha> 2`), packed once per sha.
        self._head = (self._sha, _evalsha_head(self._sha))
        self._blocks: dict[str, _Block] = {}
        # One block request in flight per bucket; the calls behind it wait for its answer.
        self._asking: dict[str, asyncio.Future[None]] = {}

    async def admit(
        self, revoked_key: str, bucket_key: str, *, consume: bool, pace: Pace
    ) -> Verdict:
        """The call's verdict; ConnectionError or RedisReplyError when Redis cannot answer.
        Under a live lease the revocation mark is not asked: the caller's own set answers."""
        lease = self._lease
        if lease is None or not lease.live():
            return await self.check(revoked_key, bucket_key, want=1 if consume else 0, pace=pace)
        if not consume:
            return Verdict(False, True, pace.burst, 0, 0, 0, pace.window)
        while True:
            verdict = self._from_block(bucket_key, pace)
            if verdict is not None:
                return verdict
            asking = self._asking.get(bucket_key)
            if asking is None:
                break
            await asyncio.shield(asking)
            if not lease.live():
                return await self.check(revoked_key, bucket_key, want=1, pace=pace)
        if len(self._blocks) >= _BLOCKS_MAX:
            self._sweep()
        asking = asyncio.get_running_loop().create_future()
        self._asking[bucket_key] = asking
        try:
            spent = self._blocks.pop(bucket_key, None)
            want, refund, paid_through = 1, 0, 0
            if spent is not None and spent.refusal is None:
                want = max(1, min(pace.block, 2 * (spent.taken - spent.calls)))
                refund, paid_through = spent.calls, spent.paid_through_us
            asked_at = time.monotonic()
            verdict = await self.check(
                revoked_key,
                bucket_key,
                want=want,
                pace=pace,
                refund=refund,
                paid_through_us=paid_through,
            )
            return self._keep(bucket_key, verdict, asked_at)
        finally:
            del self._asking[bucket_key]
            asking.set_result(None)

    def _from_block(self, bucket_key: str, pace: Pace) -> Verdict | None:
        block = self._blocks.get(bucket_key)
        if block is None:
            return None
        now = time.monotonic()
        if now >= block.until:
            # Left for the next request to size its block by, and give back what is unspent.
            return None
        if block.refusal is not None:
            return block.refusal
        if block.calls <= 0:
            return None
        block.calls -= 1
        return Verdict(
            False,
            True,
            pace.burst,
            block.remaining + block.calls,
            0,
            max(0, math.ceil(block.reset_at - now)),
            pace.window,
        )

    def _keep(self, bucket_key: str, verdict: Verdict, asked_at: float) -> Verdict:
        """Hold what the answer took for the calls after this one; this call's verdict."""
        if verdict.revoked:
            return verdict
        granted = verdict.granted
        if verdict.allowed:
            block = _Block(
                granted,
                verdict.remaining,
                asked_at + verdict.reset,
                asked_at + BLOCK_LIFE,
                paid_through_us=verdict.paid_through_us,
            )
            block.calls -= 1  # this call's
            self._blocks[bucket_key] = block
            # What the client may still call now counts the calls this gateway holds for it.
            return verdict._replace(remaining=verdict.remaining + block.calls)
        # Redis's clock says when the next call is due; this one's, counted from before the
        # request, says it a little early, never late.
        due = asked_at + min(BLOCK_LIFE, verdict.retry_after_us / 1_000_000)
        self._blocks[bucket_key] = _Block(0, 0, 0.0, due, verdict)
        return verdict

    def _sweep(self) -> None:
        now = time.monotonic()
        for key in [k for k, b in self._blocks.items() if b.until <= now]:
            del self._blocks[key]
        if len(self._blocks) >= _BLOCKS_MAX:
            self._blocks.clear()

    async def check(
        self,
        revoked_key: str,
        bucket_key: str,
        *,
        want: int,
        pace: Pace,
        refund: int = 0,
        paid_through_us: int = 0,
    ) -> Verdict:
        """One round trip, giving back `refund` calls taken before (the bucket's time then
        `paid_through_us`) and unspent, then taking up to `want`; ConnectionError or
        RedisReplyError when Redis cannot answer."""
        sha, head = self._head
        if sha is not self._sha:
            self._head = (self._sha, head := _evalsha_head(self._sha))
        # KEYS then ARGV, as the script reads them.
        parts = (
            revoked_key.encode(),
            bucket_key.encode(),
            b"%d" % want,
            b"%d" % pace.interval_us,
            b"%d" % pace.burst,
            b"%d" % refund,
            b"%d" % paid_through_us,
        )
        command = head + b"".join([b"$%d\r\n%s\r\n" % (len(p), p) for p in parts])
        if tracing.ENABLED:
            # The pipelined client is no redis-py the instrumentation sees: its span is here.
            with tracing.redis_span("EVALSHA", "guard"):
                answer = await self._round_trip(command, parts)
        else:
            answer = await self._round_trip(command, parts)
        is_revoked, granted, remaining, retry_us, reset_us, paid_through = answer
        allowed = granted >= 1
        return Verdict(
            is_revoked == 1,
            allowed,
            pace.burst,
            remaining if remaining > 0 else 0,
            0 if allowed else max(1, math.ceil(retry_us / 1_000_000)),
            max(0, math.ceil(reset_us / 1_000_000)),
            pace.window,
            granted if allowed else 0,
            retry_us if not allowed else 0,
            paid_through,
        )

    async def _round_trip(self, command: bytes, parts: tuple[bytes, ...]) -> Any:
        try:
            return await self._redis.execute(command)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            return await self._redis.execute(pack(b"EVAL", _GUARD.encode(), b"2", *parts))


# Buckets with a block or a refusal held at once; beyond it the stale ones are dropped.
_BLOCKS_MAX = 10_000


def _evalsha_head(sha: bytes) -> bytes:
    """`EVALSHA <sha> 2` of a ten-part command, the rest of which is added per call."""
    return pack(b"EVALSHA", sha, b"2", *[b""] * 7).split(b"$0\r\n", 1)[0]
