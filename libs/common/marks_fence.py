"""Whether identity has restored the revocation marks on a Redis node since its run began.

A gateway reads "no mark" as "not revoked" only from a node whose marks identity has written
again (services/identity/revocation_marks.py) since that node's `run_id` began: a node
restarted empty or from an old snapshot, or a replica promoted after missing writes, serves
under a new run_id, and until identity's next pass it may lack marks of revoked grants.

Per node, because on a Cluster the marks are spread over the primaries by school: each primary
holds one record, `<prefix>connect:marks-restored{<tag>}`, whose tag hashes to the first slot
that primary serves, so the record sits on it. Identity's pass reads every primary's run_id
before it begins (:func:`run_ids`) and, once every mark is written again, records that run_id
on each primary that still runs it (:func:`record`, a script comparing on the node itself). A
record copied to a replica or loaded from a snapshot names another run_id and counts for
nothing, as the revocation leases' epoch does (libs/common/leases.py).

The gateway checks the record on each (re)connection to a node (a new run_id is a new
connection), and on a Cluster again whenever its slot map changes or a MOVED names a node (a
replica promoted keeps its run_id and the gateway's connection to it), and until it holds,
fails closed: services/gateway/redis_pipeline.py, redis_routing.py.

A promoted replica is never trusted before identity's pass records it, even after a failover
that lost nothing: replication is asynchronous and marks are written without WAIT, so nothing
the gateway can read proves the replica took every mark its primary had (the dead primary's
offset is gone with it). The cost is a refusal (503) on that primary's slots until identity's
next check (CHECK_INTERVAL, 5 s) and pass.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any

import redis.asyncio as redis
from redis.crc import key_slot

from libs.common import redis_client
from libs.common.config import Settings

RESTORED_KEY = "connect:marks-restored"

# KEYS[1] the node's record. Answer {the node's run_id, the run_id recorded ('' for none)}.
STATE = """
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
return {run_id, redis.call('GET', KEYS[1]) or ''}
"""

# KEYS[1] the node's record, ARGV[1] the run_id read before the pass began. Records it only on
# the node still running it: 1 recorded, 0 the node changed since (the next pass will do).
_RECORD = """
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
if run_id ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], run_id)
return 1
"""


@functools.cache
def tag_for_slot(slot: int) -> str:
    """A short hash tag whose slot is `slot`."""
    for n in itertools.count():
        tag = f"m{n}"
        if key_slot(tag.encode()) == slot:
            return tag
    raise AssertionError("unreachable")


def restored_key(settings: Settings, slot: int) -> str:
    return f"{settings.redis_prefix}{RESTORED_KEY}{{{tag_for_slot(slot)}}}"


async def node_slots(client: redis.Redis) -> list[int]:
    """The first slot of every primary (slot 0 for one node or Sentinel's master)."""
    if not redis_client.is_cluster(client):
        return [0]
    answer: Any = await client.execute_command("CLUSTER SLOTS")  # type: ignore[no-untyped-call]
    first: dict[Any, int] = {}
    for (start, _end), node in answer.items():
        primary = tuple(node["primary"])
        first[primary] = min(first.get(primary, start), start)
    return sorted(first.values())


async def _eval(client: redis.Redis, source: str, key: str, *args: Any) -> Any:
    return await client.eval(source, 1, key, *args)


async def states(client: redis.Redis, settings: Settings) -> dict[int, tuple[str, str]]:
    """slot -> (run_id, run_id recorded) of every primary."""
    found = {}
    for slot in await node_slots(client):
        run_id, recorded = await _eval(client, STATE, restored_key(settings, slot))
        found[slot] = (_text(run_id), _text(recorded))
    return found


async def run_ids(client: redis.Redis, settings: Settings) -> dict[int, str]:
    return {slot: run_id for slot, (run_id, _) in (await states(client, settings)).items()}


async def record(client: redis.Redis, settings: Settings, began: dict[int, str]) -> int:
    """Record the pass on every primary still running the run_id read before it; how many."""
    done = 0
    for slot, run_id in began.items():
        done += int(await _eval(client, _RECORD, restored_key(settings, slot), run_id))
    return done


async def unrestored(client: redis.Redis, settings: Settings) -> list[int]:
    """The first slots of the primaries whose marks are not restored for their run."""
    return [s for s, (run_id, got) in (await states(client, settings)).items() if run_id != got]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
