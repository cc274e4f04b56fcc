"""Redis Streams: the coordination between services (contract section 11).

Producers append with approximate trimming; consumers read as a group, acknowledge what they
have durably handled, and claim the pending entries of consumers that died (XAUTOCLAIM).
Fields are one `data` member holding JSON, so every stream entry is a plain document.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as redis
from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT

from libs.common import redis_client

EVENTS = "connect:events"
# The consumer group that turns connect:events into deliveries (webhooks' dispatcher). It
# acknowledges an entry only once its deliveries are in PostgreSQL, so the school API's outbox
# keeps an event until this group has acknowledged it (services/school_api/outbox.py).
EVENTS_GROUP = "webhooks"
# Identity's audit consumer: its acknowledgement is what makes a record on connect:audit safe.
AUDIT_GROUP = "identity-audit"
REVOCATIONS = "connect:revocations"
AUDIT = "connect:audit"
KEYS = "connect:keys"
# Identity to identity: a client changed (disabled, new secret, edited, deleted); every process
# drops its cached row (services/identity/clients.py).
CLIENTS = "connect:clients"
# Revocation marks and every other key beside the streams: libs/common/keys.py.

# A safety valve against a consumer that never comes back, not the way streams shrink: a
# stream read by groups is trimmed by its consumers to what every group has acknowledged
# (trim_consumed), so entries a lagging group has not handled yet are never trimmed away
# before this many pile up behind it.
DEFAULT_MAXLEN = 1_000_000


@dataclass(frozen=True, slots=True)
class Entry:
    id: str
    data: dict[str, Any]
    # The `data` member as stored: a consumer that hands it on whole (identity's audit
    # consumer, to PostgreSQL's JSON functions) need not serialize it again.
    payload: bytes = b""
    # The `data` member is missing, not JSON, or not a JSON object (`data` is then empty): a
    # poison entry, for the consumer to set aside rather than fail on for ever.
    malformed: bool = False


def connect(url: str) -> redis.Redis:
    """A client for REDIS_URL: one node, a Cluster or Sentinel (libs/common/redis_client.py)."""
    return redis_client.connect(url, decode_responses=False, health_check_interval=30)


# -- How far a consumer group has acknowledged a stream, on which run of Redis ----------------
# An entry on a stream is not safe until its consumer group has acknowledged it: a Redis that
# restarts empty, or fails over before replicating, loses it. A producer that must not lose
# what it appended (the outbox relay, the gateway's audit records) keeps its own copy until
# the group's acknowledged floor passes the entry on the run of Redis that took it.

# KEYS[1] the stream, ARGV[1] the group. Answers the run_id; with the group, also its last
# delivered id and its oldest pending one ('' when none).
_GROUP_PROGRESS = """
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
if redis.call('EXISTS', KEYS[1]) == 0 then return {run_id} end
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  if info['name'] == ARGV[1] then
    local oldest = ''
    if tonumber(info['pending']) > 0 then
      oldest = redis.call('XPENDING', KEYS[1], ARGV[1])[2]
    end
    return {run_id, info['last-delivered-id'], oldest}
  end
end
return {run_id}
"""

EntryKey = tuple[int, int]


def entry_key(entry_id: str | bytes) -> EntryKey:
    """A stream entry id (`<ms>-<seq>`) as a tuple that orders as Redis orders entries."""
    ms, _, seq = text(entry_id).partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class GroupProgress:
    run_id: str
    # Every entry below this key is acknowledged by the group (None: no such group yet).
    below: EntryKey | None

    def acknowledged(self, entry_id: str | bytes) -> bool:
        return self.below is not None and entry_key(entry_id) < self.below


async def group_progress(client: redis.Redis, stream: str, group: str) -> GroupProgress:
    """One round trip: the run of the Redis holding `stream`, and how far `group` acknowledged."""
    answer = await client.eval(_GROUP_PROGRESS, 1, stream, group)
    run_id = text(answer[0])
    if len(answer) < 3:
        return GroupProgress(run_id, None)
    last = entry_key(answer[1])
    below = (last[0], last[1] + 1)
    oldest = text(answer[2])
    if oldest:
        below = min(below, entry_key(oldest))
    return GroupProgress(run_id, below)


def _encode(data: Mapping[str, Any]) -> dict[FieldT, EncodableT]:
    return {b"data": orjson.dumps(data)}


def _decode(raw: Sequence[Any]) -> list[Entry]:
    """Never raises on an entry's content: one bad entry must not fail every read after it."""
    entries = []
    for entry_id, fields in raw:
        payload = fields.get(b"data") if fields else None
        try:
            data = orjson.loads(payload) if payload else None
        except orjson.JSONDecodeError:
            data = None
        eid = text(entry_id)
        if isinstance(data, dict):
            entries.append(Entry(eid, data, payload or b""))
        else:
            entries.append(Entry(eid, {}, payload or b"", malformed=True))
    return entries


def _first_stream(answer: Any) -> Sequence[Any]:
    """The entries of the one stream asked for: RESP2 answers a list, RESP3 a map."""
    if isinstance(answer, dict):
        return next(iter(answer.values()))[0] if answer else []
    entries: Sequence[Any] = answer[0][1]
    return entries


async def append(
    client: redis.Redis, stream: str, data: Mapping[str, Any], *, maxlen: int = DEFAULT_MAXLEN
) -> str:
    """XADD with `MAXLEN ~`: trimming whole macro-nodes keeps appends O(1)."""
    entry_id = await client.xadd(stream, _encode(data), maxlen=maxlen, approximate=True)
    return text(entry_id)


async def append_many(
    client: redis.Redis,
    stream: str,
    items: Sequence[Mapping[str, Any]],
    *,
    maxlen: int = DEFAULT_MAXLEN,
) -> list[str]:
    """Append a batch in one round trip; the entries' ids, in order."""
    if not items:
        return []
    pipe = client.pipeline(transaction=False)
    for data in items:
        pipe.xadd(stream, _encode(data), maxlen=maxlen, approximate=True)
    return [text(entry_id) for entry_id in await pipe.execute()]


async def ensure_group(client: redis.Redis, stream: str, group: str, *, start: str = "0") -> None:
    """Create the consumer group (and the stream) unless it exists; safe to call concurrently."""
    try:
        await client.xgroup_create(stream, group, id=start, mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def read_group(
    client: redis.Redis,
    stream: str,
    group: str,
    consumer: str,
    *,
    count: int = 100,
    block_ms: int | None = 1000,
    ack: Sequence[str] = (),
) -> list[Entry]:
    """New entries for this consumer; they stay pending until acknowledged. `ack`: entries
    handled since the last read, acknowledged in the same round trip, before the read."""
    if ack:
        pipe = client.pipeline(transaction=False)
        pipe.xack(stream, group, *ack)
        pipe.xreadgroup(group, consumer, {stream: ">"}, count=count, block=block_ms)
        answer = (await pipe.execute())[1]
    else:
        answer = await client.xreadgroup(
            group, consumer, {stream: ">"}, count=count, block=block_ms
        )
    if not answer:
        return []
    return _decode(_first_stream(answer))


async def ack(client: redis.Redis, stream: str, group: str, ids: Sequence[str]) -> int:
    if not ids:
        return 0
    return int(await client.xack(stream, group, *ids))


async def claim_stale(
    client: redis.Redis,
    stream: str,
    group: str,
    consumer: str,
    *,
    min_idle_ms: int,
    count: int = 100,
) -> list[Entry]:
    """Take over entries another consumer read but did not acknowledge within `min_idle_ms`."""
    claimed: list[Entry] = []
    cursor = "0-0"
    while True:
        # Ask only for what is still missing: pages with trimmed entries come back short.
        answer = await client.xautoclaim(
            stream,
            group,
            consumer,
            min_idle_time=min_idle_ms,
            start_id=cursor,
            count=count - len(claimed),
        )
        next_cursor, raw = answer[0], answer[1]
        # Entries deleted by trimming come back as nil fields; they cannot be handled.
        claimed.extend(_decode([r for r in raw if r and r[1] is not None]))
        cursor = text(next_cursor)
        if cursor == "0-0" or len(claimed) >= count:
            return claimed


async def claim(
    client: redis.Redis,
    stream: str,
    group: str,
    consumer: str,
    ids: Sequence[str],
    *,
    min_idle_ms: int = 0,
) -> list[Entry]:
    """Take over the pending entries `ids` (XCLAIM); entries trimmed meanwhile are left out."""
    if not ids:
        return []
    raw = await client.xclaim(
        stream, group, consumer, min_idle_time=min_idle_ms, message_ids=list(ids)
    )
    return _decode([r for r in raw if r and r[1] is not None])


async def read_tail(
    client: redis.Redis, stream: str, last_id: str, *, count: int = 500, block_ms: int = 1000
) -> list[Entry]:
    """Plain XREAD for broadcast streams every process follows (revocations, keys)."""
    answer = await client.xread({stream: last_id}, count=count, block=block_ms)
    if not answer:
        return []
    return _decode(_first_stream(answer))


async def last_id(client: redis.Redis, stream: str) -> str:
    """The id of the newest entry, "0-0" for an empty or missing stream."""
    entries = await client.xrevrange(stream, count=1)
    if not entries:
        return "0-0"
    eid = entries[0][0]
    return text(eid)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def text(value: Any) -> str:
    """A reply item as text: redis-py gives bytes without decode_responses, str with it."""
    return value.decode() if isinstance(value, bytes) else str(value)


async def group_lag(client: redis.Redis, stream: str, group: str) -> tuple[int | None, int] | None:
    """A consumer group's lag (entries it has not read; None when Redis cannot tell, after
    deletions mid-stream) and pending count (read, not acknowledged); None without the
    stream or the group."""
    try:
        groups = await client.xinfo_groups(stream)
    except ResponseError:
        return None
    for entry in groups:
        info = {text(k): v for k, v in entry.items()}
        if text(info["name"]) == group:
            lag = info.get("lag")
            return (int(lag) if lag is not None else None), int(info.get("pending", 0))
    return None


async def trim_consumed(client: redis.Redis, stream: str) -> str | None:
    """Trim the entries every consumer group has read and acknowledged (XTRIM MINID at the
    oldest entry some group still needs: its first pending one, else the one after its last
    delivered). Returns the MINID used, None when the stream has no group (nothing is known
    to be done with, so nothing is trimmed)."""
    try:
        groups = await client.xinfo_groups(stream)
    except ResponseError:
        return None  # no such stream
    floor: tuple[int, int] | None = None
    for group in groups:
        info = {text(k): v for k, v in group.items()}
        needed = _id_key(text(info["last-delivered-id"]))
        # Everything after the last delivered id is needed too: keep from the next one.
        needed = (needed[0], needed[1] + 1)
        if int(info.get("pending", 0)):
            summary = await client.xpending(stream, text(info["name"]))
            oldest = summary.get("min")
            if oldest is not None:
                needed = min(needed, _id_key(text(oldest)))
        floor = needed if floor is None else min(floor, needed)
    if floor is None:
        return None
    minid = f"{floor[0]}-{floor[1]}"
    await client.xtrim(stream, minid=minid, approximate=False)
    return minid
