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

A renewal is refused to a gateway that has not applied an entry older than half a lease, or
whose unread entries the stream may have trimmed: it registers again, from the marks. So a
follower that reads but does not keep up holds a revoke for half a lease at most.

What the leases stand on is fenced. Everything is ONE hash, and its epoch holds only on the
Redis instance that wrote it (its `run_id`): a restart, even from a snapshot that kept the
hash, a failover or a lost key loses every lease at once. A revoke that finds no epoch waits a
whole lease, longer than any gateway's own view of a lease it held, and gateways get no new
lease until identity writes a new epoch: a whole lease after the loss was noted in the hash
(`lost_at`, which holds on the instance that noted it only, and is lost if Redis loses data
again) and after a complete pass restoring the revocation marks that began after it. The lease
length is written with the epoch and no gateway is granted a longer one; identity's waits are
as long as its own setting, so every identity process must run with the same one.

Assumed of Redis, as of any lease: its clock is slewed, not stepped; it does not evict keys
(`maxmemory-policy noeviction`); a primary cut off by a failover stops serving; and it is 7.0
or later (the stream counters that tell a trimmed entry; before that no lease is renewed).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any, NamedTuple

import redis.asyncio as redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from libs.common import keys, streams
from libs.common.config import Settings

# In the slot of connect:revocations, which the TAKE script reads with it (libs/common/keys.py).
LEASES_KEY = "connect:revocation-leases"
# How much of a lease the gateway counts as its own: the rest covers the time a renewal's
# answer took to arrive and any difference between the two clocks' rates.
OWN_SHARE = 0.9
# Lease fields of a gateway that stopped renewing are deleted this long after they ran out.
FORGET_AFTER_US = 600_000_000

_PRELUDE = """
-- Stream ids compare as (milliseconds, sequence), not as text.
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
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
-- The epoch and lease length, if the hash has an epoch this Redis instance wrote; a hash that
-- came back from elsewhere (a snapshot, a replica) is dropped whole.
local function current_epoch(key)
  local held = redis.call('HMGET', key, 'epoch', 'run_id', 'lease_us')
  if held[1] and held[2] == run_id then return held[1], tonumber(held[3]) end
  if held[1] then redis.call('DEL', key) end
  return nil, nil
end
"""

# KEYS[1] the lease hash, KEYS[2] connect:revocations. ARGV[1] the gateway, ARGV[2] the lease it
# wants in microseconds, ARGV[3] the newest entry it applied ('' to register), ARGV[4] the epoch
# it holds. Answer {state, epoch, newest entry, lease granted in microseconds}: state 0 no
# epoch, 1 registered afresh (load the marks before serving), 2 renewed, 3 refused (register
# again).
_TAKE = (
    _PRELUDE
    + """
local epoch, lease_us = current_epoch(KEYS[1])
if not epoch then return {0, '', '', 0} end
lease_us = math.min(lease_us, tonumber(ARGV[2]))
local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local top = '0-0'
if #newest > 0 then top = newest[1][1] end
local until_us = string.format('%.0f', now + lease_us)
local expiry = tonumber(redis.call('HGET', KEYS[1], 'e:' .. ARGV[1]) or '0')
if ARGV[3] == '' or ARGV[4] ~= epoch or expiry <= now then
  redis.call('HSET', KEYS[1], 'e:' .. ARGV[1], until_us, 'a:' .. ARGV[1], top)
  return {1, epoch, top, lease_us}
end
-- The oldest entry it has not applied: older than half a lease, the gateway lags.
local behind = redis.call('XRANGE', KEYS[2], '(' .. ARGV[3], '+', 'COUNT', 1)
if #behind > 0 then
  local ms = tonumber(string.match(behind[1][1], '^(%d+)'))
  if ms * 1000 < now - lease_us / 2 then return {3, epoch, top, lease_us} end
end
-- Entries it never read may have been trimmed (or deleted) away since the position it last
-- reported, where its reads since began: refused when entries are gone from the stream and the
-- first one left, or the last one deleted, is past that position. Without the stream's
-- counters (no stream, a Redis before 7.0) nothing can be told: refused, unless it never read.
local from = redis.call('HGET', KEYS[1], 'a:' .. ARGV[1]) or '0-0'
local info = redis.pcall('XINFO', 'STREAM', KEYS[2])
if type(info) ~= 'table' or info.err then
  if from ~= '0-0' then return {3, epoch, top, lease_us} end
else
  local about = {}
  for i = 1, #info, 2 do about[info[i]] = info[i + 1] end
  local added, length = tonumber(about['entries-added']), tonumber(about['length'])
  if not added or not length then return {3, epoch, top, lease_us} end
  local first = about['first-entry']
  local past = function(id) return id and id ~= from and id_ge(id, from) end
  if (added > length and type(first) == 'table' and past(first[1]))
      or past(about['max-deleted-entry-id']) then
    return {3, epoch, top, lease_us}
  end
end
redis.call('HSET', KEYS[1], 'e:' .. ARGV[1], until_us, 'a:' .. ARGV[1], ARGV[3])
return {2, epoch, top, lease_us}
"""
)

# KEYS[1] the lease hash. ARGV[1] the announcement's entry id, ARGV[2] how long after running out
# a lease's fields are deleted (microseconds). Answer: -1 when there is no epoch, else how many
# live leases have not applied the entry.
_WAITING = (
    _PRELUDE
    + """
if not current_epoch(KEYS[1]) then return -1 end
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

# KEYS[1] the lease hash. ARGV[1] the lease in microseconds, ARGV[2] when (Redis time) the
# caller's complete pass restoring the marks began ('' when it has not made one), ARGV[3] a new
# epoch. Answer: 1 an epoch is there, 0 not yet (the loss is noted and not a lease old, or no
# pass began after it), 2 written now.
_EPOCH = (
    _PRELUDE
    + """
if current_epoch(KEYS[1]) then return 1 end
-- A note left by another Redis instance (a snapshot, a replica) is no note.
local noted = redis.call('HMGET', KEYS[1], 'lost_at', 'lost_run_id')
local lost = noted[2] == run_id and tonumber(noted[1]) or nil
if not lost then
  redis.call('HSET', KEYS[1], 'lost_at', string.format('%.0f', now), 'lost_run_id', run_id)
  return 0
end
if ARGV[2] == '' or now - lost < tonumber(ARGV[1]) or tonumber(ARGV[2]) < lost then
  return 0
end
redis.call('HSET', KEYS[1], 'epoch', ARGV[3], 'run_id', run_id, 'lease_us', ARGV[1])
redis.call('HDEL', KEYS[1], 'lost_at', 'lost_run_id')
return 2
"""
)

REGISTERED, RENEWED, REFUSED = 1, 2, 3
EPOCH_THERE, EPOCH_WRITTEN = 1, 2

_scripts: dict[str, AsyncScript] = {}


def _script(client: redis.Redis, source: str) -> AsyncScript:
    """One Script object per source (its SHA computed once), run on the given client."""
    script = _scripts.get(source)
    if script is None:
        script = _scripts[source] = client.register_script(source)
    return script


async def _run(client: redis.Redis, source: str, keys: list[str], args: list[Any]) -> Any:
    return await _script(client, source)(keys=keys, args=args, client=client)


class GatewaysUnconfirmed(RedisError):
    """A gateway kept a live lease without applying the revocation for longer than any
    follower should take: the revoke is stored, but cannot be confirmed immediate."""


class LeaseAnswer(NamedTuple):
    state: int  # 0 no epoch, 1 registered, 2 renewed, 3 refused
    epoch: str
    newest: str
    seconds: float  # the lease granted


def leases_key(settings: Settings) -> str:
    return keys.with_stream(settings, streams.REVOCATIONS, LEASES_KEY)


def _lease_us(settings: Settings) -> int:
    return round(settings.gateway.revocation_lease * 1_000_000)


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
    state, held, newest, granted = await _run(
        client,
        _TAKE,
        [leases_key(settings), stream],
        [gateway, _lease_us(settings), applied, epoch],
    )
    return LeaseAnswer(
        int(state), streams.text(held), streams.text(newest), int(granted) / 1_000_000
    )


async def release(client: redis.Redis, settings: Settings, gateway: str) -> None:
    """A stopping gateway's lease, given back so that no revoke waits for it to run out. The
    gateway must have stopped answering from memory first."""
    await client.hdel(leases_key(settings), "e:" + gateway, "a:" + gateway)


async def wait_for_gateways(client: redis.Redis, settings: Settings, entry_id: str) -> bool:
    """Return once every gateway with a live lease has applied `entry_id` or let its lease
    run out; GatewaysUnconfirmed if that takes far longer than a lease. True when the epoch
    was found lost (the entry, and what went before it, may have been lost with it)."""
    lease = settings.gateway.revocation_lease
    deadline = time.monotonic() + 3 * lease + 1.0
    key = leases_key(settings)
    pause = 0.001
    waited_out_epoch = False
    while True:
        left = int(await _run(client, _WAITING, [key], [entry_id, FORGET_AFTER_US]))
        if left == 0:
            return waited_out_epoch
        if left < 0:
            if waited_out_epoch:
                return True
            # The leases were lost with the epoch: a gateway may still count on one it held.
            await asyncio.sleep(lease)
            waited_out_epoch = True
            continue
        if time.monotonic() > deadline:
            raise GatewaysUnconfirmed(f"{left} gateway(s) did not confirm the revocation")
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.02)


async def epoch_state(
    client: redis.Redis, settings: Settings, *, pass_began_us: int | None = None
) -> int:
    """EPOCH_THERE; 0 (the loss noted, if it was not yet); or EPOCH_WRITTEN when the loss was
    noted a whole lease ago and `pass_began_us` (Redis time) is of a complete pass restoring
    the marks that began after it."""
    answer = await _run(
        client,
        _EPOCH,
        [leases_key(settings)],
        [
            _lease_us(settings),
            "" if pass_began_us is None else pass_began_us,
            secrets.token_hex(8),
        ],
    )
    return int(answer)


async def redis_now_us(client: redis.Redis) -> int:
    seconds, micros = await client.time()
    return int(seconds) * 1_000_000 + int(micros)
