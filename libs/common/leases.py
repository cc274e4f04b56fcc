"""Revocation leases: when a gateway may answer "not revoked" from its own memory.

The contract's rule is that once a revoke has answered, no call with a token of the grant
succeeds at any gateway. Asking Redis for the grant's mark on every call keeps it, at one round
trip per call. A lease keeps it without the round trip:

- A gateway holds a lease while it follows `connect:revocations`: after each read of the stream
  it renews the lease and reports the newest entry it has applied to its own set. The lease
  runs for `GATEWAY_REVOCATION_LEASE` seconds from the renewal by Redis's clock; the gateway
  counts 90% of that from before it sent the renewal, by its own clock, so its view always
  ends first.
- Identity's revoke, after marking the grant and appending the announcement X, waits until
  every gateway whose lease is live has applied X or has let its lease run out, and only then
  answers (`wait_for_gateways`).
- A gateway without a live lease (starting, cut off from Redis, its follower stalled, paused)
  asks Redis on every call, as without leases.

Registering (or coming back after a lapse) sets the gateway's applied entry to the stream's
newest entry T at that moment; the gateway then loads every revocation mark (identity sets the
mark before it announces) before it answers from memory. Revocations up to T are in the marks;
identity waits for the gateway to apply any later one.

A renewal is refused to a gateway that has not applied an entry older than half a lease, so a
follower that reads but never catches up cannot hold a revoke's answer for longer than that.

Everything is ONE hash, epoch included: Redis losing it (restart without persistence, eviction,
a failover that lagged) loses every lease at once. A revoke that finds no epoch waits a whole
lease, long enough for any gateway's own view of a lost lease to end, and gateways get no new
lease until identity writes a new epoch (`establish_epoch`), which it does only after a
complete pass restoring the revocation marks and a whole lease after it found the epoch gone.

Every service must run with the same lease length.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import NamedTuple

import redis.asyncio as redis
from redis.exceptions import RedisError

from libs.common.config import Settings

LEASES_KEY = "connect:revocation-leases"
# How much of a lease the gateway counts as its own: the rest covers the time a renewal's
# answer took to arrive and any difference between the two clocks' rates.
OWN_SHARE = 0.9
# Lease fields of a gateway that stopped renewing are deleted this long after they ran out.
FORGET_AFTER_US = 600_000_000

# Stream ids compare as (milliseconds, sequence), not as text.
_ID_GE = """
local function id_ge(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  if not am or not bm then return false end
  am, bm = tonumber(am), tonumber(bm)
  if am ~= bm then return am > bm end
  return tonumber(as) >= tonumber(bs)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""

# KEYS[1] the lease hash, KEYS[2] connect:revocations. ARGV[1] the gateway, ARGV[2] the lease in
# microseconds, ARGV[3] the newest entry it applied ('' to register), ARGV[4] the epoch it holds.
# Answer {state, epoch, newest entry}: 0 no epoch (no lease), 1 registered afresh (load the
# marks before serving), 2 renewed, 3 refused (lagging; the lease runs out).
_TAKE = (
    _ID_GE
    + """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then return {0, '', ''} end
local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local top = '0-0'
if #newest > 0 then top = newest[1][1] end
local until_us = string.format('%.0f', now + tonumber(ARGV[2]))
local expiry = tonumber(redis.call('HGET', KEYS[1], 'e:' .. ARGV[1]) or '0')
if ARGV[3] == '' or ARGV[4] ~= epoch or expiry <= now then
  redis.call('HSET', KEYS[1], 'e:' .. ARGV[1], until_us, 'a:' .. ARGV[1], top)
  return {1, epoch, top}
end
if not id_ge(ARGV[3], top) then
  local ms = tonumber(string.match(top, '^(%d+)'))
  if ms * 1000 < now - tonumber(ARGV[2]) / 2 then return {3, epoch, top} end
end
redis.call('HSET', KEYS[1], 'e:' .. ARGV[1], until_us, 'a:' .. ARGV[1], ARGV[3])
return {2, epoch, top}
"""
)

# KEYS[1] the lease hash. ARGV[1] the announcement's entry id, ARGV[2] how long after running out
# a lease's fields are deleted (microseconds). Answer: -1 when there is no epoch, else how many
# live leases have not applied the entry.
_WAITING = (
    _ID_GE
    + """
if redis.call('HEXISTS', KEYS[1], 'epoch') == 0 then return -1 end
local fields = redis.call('HGETALL', KEYS[1])
local waiting = 0
for i = 1, #fields, 2 do
  local field = fields[i]
  if string.sub(field, 1, 2) == 'e:' then
    local gateway = string.sub(field, 3)
    local expiry = tonumber(fields[i + 1])
    if expiry > now then
      local applied = redis.call('HGET', KEYS[1], 'a:' .. gateway)
      if not applied or not id_ge(applied, ARGV[1]) then waiting = waiting + 1 end
    elseif expiry < now - tonumber(ARGV[2]) then
      redis.call('HDEL', KEYS[1], field, 'a:' .. gateway)
    end
  end
end
return waiting
"""
)

REGISTERED, RENEWED = 1, 2


class GatewaysUnconfirmed(RedisError):
    """A gateway kept a live lease without applying the revocation for longer than any
    follower should take: the revoke is stored, but cannot be confirmed immediate."""


class LeaseAnswer(NamedTuple):
    state: int  # 0 no epoch, 1 registered, 2 renewed, 3 refused
    epoch: str
    newest: str


def leases_key(settings: Settings) -> str:
    return settings.stream(LEASES_KEY)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def take(
    client: redis.Redis,
    settings: Settings,
    stream: str,
    gateway: str,
    *,
    applied: str,
    epoch: str,
) -> LeaseAnswer:
    """Register (`applied` empty) or renew a gateway's lease."""
    lease_us = round(settings.gateway.revocation_lease * 1_000_000)
    answer = await client.register_script(_TAKE)(
        keys=[leases_key(settings), stream], args=[gateway, lease_us, applied, epoch]
    )
    state, held, newest = answer
    return LeaseAnswer(int(state), _text(held), _text(newest))


async def release(client: redis.Redis, settings: Settings, gateway: str) -> None:
    """A stopping gateway's lease, given back so that no revoke waits for it to run out. The
    gateway must have stopped answering from memory first."""
    await client.hdel(leases_key(settings), "e:" + gateway, "a:" + gateway)


async def wait_for_gateways(client: redis.Redis, settings: Settings, entry_id: str) -> None:
    """Return once every gateway with a live lease has applied `entry_id` or let its lease
    run out; GatewaysUnconfirmed if that takes far longer than a lease."""
    lease = settings.gateway.revocation_lease
    waiting = client.register_script(_WAITING)
    deadline = time.monotonic() + 3 * lease + 1.0
    key = leases_key(settings)
    pause = 0.001
    waited_out_epoch = False
    while True:
        left = int(await waiting(keys=[key], args=[entry_id, FORGET_AFTER_US]))
        if left == 0:
            return
        if left < 0:
            if waited_out_epoch:
                return
            # The leases were lost with the epoch: a gateway may still count on one it held.
            await asyncio.sleep(lease)
            waited_out_epoch = True
            continue
        if time.monotonic() > deadline:
            raise GatewaysUnconfirmed(f"{left} gateway(s) did not confirm the revocation")
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.02)


async def epoch_missing(client: redis.Redis, settings: Settings) -> bool:
    return not await client.hexists(leases_key(settings), "epoch")


async def establish_epoch(client: redis.Redis, settings: Settings) -> bool:
    """Write a new epoch unless one is there (see the module's last paragraph for when)."""
    return bool(await client.hsetnx(leases_key(settings), "epoch", secrets.token_hex(8)))
