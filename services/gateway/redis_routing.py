"""The lean pipelined connection (redis_pipeline.py) on a Redis Cluster or behind Sentinel.

:func:`pipelined` reads REDIS_URL as libs/common/redis_client.py does: a single node gets the
plain :class:`PipelinedRedis`, untouched (no per-command cost is added to `make dev` or the
bench); ``redis+sentinel://`` a PipelinedRedis that asks the sentinels for the master's address
on every (re)connection; ``redis+cluster://`` a :class:`PipelinedCluster`.

PipelinedCluster keeps a slot map (CLUSTER SLOTS) and one pipelined connection per primary, and
sends each command to the primary of its key's slot (the key is read from the packed command:
the first key of EVAL/EVALSHA, else the first argument). Redirections are followed as a
Cluster client must: MOVED reads the whole map again, from the node it names, before the
command goes again (a failover or a resharding moves many slots at once, and the marks fence
below needs the whole map); ASK sends ASKING then the command to the
importing node, once, without touching the map. TRYAGAIN, CLUSTERDOWN and a refused or lost
connection (a primary dying, its replica not yet promoted) are retried with a short backoff for
as long as the caller's timeout allows; then the error stands, and the gateway answers 503 as
with one node.

Fenced (the guard's connection), every node's revocation marks record is asked before the first
command on a connection, again after the map changes and after a MOVED to it
(libs/common/marks_fence.py); a node not restored refuses at once (MarksNotRestored, not
retried: it answers, and waiting would only hold the call until its timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from typing import Any

from redis.crc import key_slot

from libs.common import marks_fence, redis_client
from libs.common.config import Settings
from services.gateway.redis_pipeline import (
    MarksNotRestored,
    OnReplies,
    PipelinedRedis,
    RedisReplyError,
    pack,
)

_SLOTS = 16384
# Redirections followed for one command: a slot moves once per resharding step.
_MAX_REDIRECTS = 5
_BACKOFF_FIRST = 0.02
_BACKOFF_MAX = 0.25


def pipelined(
    url: str, *, timeout: float = 1.0, fenced_by: Settings | None = None
) -> PipelinedRedis:
    """The lean connection for REDIS_URL, whichever topology it names. `fenced_by`: check each
    node's revocation marks record (libs/common/marks_fence.py) under these settings' prefix,
    for the connection whose "no mark" means "not revoked"."""
    target = redis_client.parse(url)
    if target.kind == "cluster":
        return PipelinedCluster(target, timeout=timeout, fenced_by=fenced_by)
    fence = None
    if fenced_by is not None:
        key = marks_fence.restored_key(fenced_by, 0).encode()

        def fence() -> bytes | None:
            return key

    if target.kind == "sentinel":
        credentials = ""
        if target.password:
            credentials = f"{target.username or ''}:{target.password}@"
        # The address is the sentinels' answer; the URL gives credentials and database only.
        return PipelinedRedis(
            f"redis://{credentials}sentinel-master/{target.db}",
            timeout=timeout,
            locate=_sentinel_locator(target, timeout),
            fence=fence,
        )
    return PipelinedRedis(url, timeout=timeout, fence=fence)


def _sentinel_locator(target: redis_client.RedisTarget, timeout: float) -> Any:
    async def locate() -> tuple[str, int]:
        last: Exception | None = None
        for host, port in random.sample(target.nodes, len(target.nodes)):
            sentinel = PipelinedRedis(f"redis://{host}:{port}", timeout=timeout)
            try:
                answer = await sentinel.execute(
                    pack(b"SENTINEL", b"get-master-addr-by-name", target.master)
                )
            except (OSError, RedisReplyError) as exc:
                last = exc
                continue
            finally:
                await sentinel.close()
            if answer:
                return answer[0].decode(), int(answer[1])
        raise ConnectionError(f"no sentinel knows the master {target.master!r}: {last}")

    return locate


def key_of(command: bytes) -> bytes | None:
    """The key a packed command is routed by (RESP2 array of bulk strings); None for a command
    without one (PING), which any primary answers."""
    pos = command.index(b"\r\n") + 2
    parts: list[bytes] = []
    while len(parts) < 4 and pos < len(command):
        end = command.index(b"\r\n", pos)
        size = int(command[pos + 1 : end])
        start = end + 2
        parts.append(command[start : start + size])
        pos = start + size + 2
    name = parts[0].upper()
    if name in (b"EVALSHA", b"EVAL"):
        return parts[3] if len(parts) > 3 else None
    return parts[1] if len(parts) > 1 else None


class PipelinedCluster(PipelinedRedis):
    """Pipelined connections to every primary of a Redis Cluster, commands routed by slot."""

    def __init__(
        self,
        target: redis_client.RedisTarget,
        *,
        timeout: float = 1.0,
        fenced_by: Settings | None = None,
    ) -> None:
        self._target = target
        self._timeout = timeout
        self._fenced_by = fenced_by
        self._seeds = list(target.nodes)
        self._slots: list[tuple[str, int] | None] = [None] * _SLOTS
        self._nodes: dict[tuple[str, int], PipelinedRedis] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self._refresh_lock: asyncio.Lock | None = None
        self._generation = 0

    # --- the slot map ---------------------------------------------------------------------------

    def _node(self, address: tuple[str, int]) -> PipelinedRedis:
        node = self._nodes.get(address)
        if node is None:
            credentials = ""
            if self._target.password:
                credentials = f"{self._target.username or ''}:{self._target.password}@"
            node = self._nodes[address] = PipelinedRedis(
                f"redis://{credentials}{address[0]}:{address[1]}/0",
                timeout=self._timeout,
                fence=None if self._fenced_by is None else self._fence_of(address),
            )
        return node

    def _fence_of(self, address: tuple[str, int]) -> Callable[[], bytes | None]:
        """The marks record of the primary at `address`: the one in the first slot it serves
        (none known: nothing is routed to it, so nothing is asked of it)."""
        settings = self._fenced_by
        assert settings is not None

        def fence() -> bytes | None:
            try:
                slot = self._slots.index(address)
            except ValueError:
                return None
            return marks_fence.restored_key(settings, slot).encode()

        return fence

    async def refresh(
        self, *, unless_since: int | None = None, first: tuple[str, int] | None = None
    ) -> None:
        """Read CLUSTER SLOTS from a primary known, else from a seed. `unless_since`: a
        generation of the map (`_generation`); skipped when a refresh completed since it (the
        calls that found a slot unknown together read the map once). `first`: the node to ask
        first (the one a MOVED named: it knows it serves the slot, where another node's view
        may not have caught up yet).

        The map is only ever written whole, from one node's answer: the fence of a node
        (`_fence_of`) is the record in the first slot the map gives it, which a map patched
        slot by slot (after a MOVED) gets wrong, refusing a restored node until the next
        refresh."""
        if self._refresh_lock is None:
            self._refresh_lock = asyncio.Lock()
        async with self._refresh_lock:
            if unless_since is not None and self._generation != unless_since:
                return
            known = list(dict.fromkeys(a for a in self._slots if a is not None))
            candidates = ([first] if first is not None else []) + [
                a for a in known + self._seeds if a != first
            ]
            candidates = list(dict.fromkeys(candidates))
            last: Exception | None = None
            for address in candidates:
                try:
                    answer = await self._node(address).execute_unfenced(pack(b"CLUSTER", b"SLOTS"))
                except (OSError, RedisReplyError) as exc:
                    last = exc
                    continue
                slots: list[tuple[str, int] | None] = [None] * _SLOTS
                for start, end, primary, *_replicas in answer:
                    host = primary[0].decode() or address[0]
                    where = (host, int(primary[1]))
                    for slot in range(int(start), int(end) + 1):
                        slots[slot] = where
                if slots != self._slots:
                    # A replica promoted keeps its run_id and our connection to it, and may lack
                    # writes its primary took: every node's record is asked again.
                    for node in self._nodes.values():
                        node.recheck_fence()
                self._slots = slots
                self._generation += 1
                # Connections to nodes that no longer serve slots are let go.
                serving = set(slots)
                for gone in [a for a in self._nodes if a not in serving and a not in self._seeds]:
                    await self._nodes.pop(gone).close()
                return
            raise ConnectionError(f"no node of the Redis Cluster answers CLUSTER SLOTS: {last}")

    def _refresh_soon(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        # On failure the next command's failure refreshes again.
        with contextlib.suppress(ConnectionError):
            await self.refresh()

    async def _where(self, slot: int) -> tuple[str, int]:
        address = self._slots[slot]
        if address is None:
            # No map yet, or one where no primary serves the slot (a failover under way).
            await self.refresh(unless_since=self._generation)
            address = self._slots[slot]
            if address is None:
                raise ConnectionError(f"no primary serves slot {slot}")
        return address

    # --- commands -------------------------------------------------------------------------------

    async def execute(self, command: bytes) -> Any:
        answer = (await self._route([command], key_of(command)))[0]
        if isinstance(answer, RedisReplyError):
            raise answer
        return answer

    async def execute_many(self, commands: list[bytes]) -> list[Any]:
        """Commands on keys of one slot (the audit's XADDs to one stream), pipelined."""
        if not commands:
            return []
        return await self._route(commands, key_of(commands[0]))

    def send_now(self, commands: bytes, count: int, on_replies: OnReplies) -> bool:
        """To the primary the map names for the first command's key, if connected; a
        redirection comes back as an error reply, for the caller to send again the awaitable
        way (:meth:`execute_many` follows it)."""
        key = key_of(commands)
        address = self._slots[0 if key is None else key_slot(key)]
        node = None if address is None else self._nodes.get(address)
        return node is not None and node.send_now(commands, count, on_replies)

    async def _route(self, commands: list[bytes], key: bytes | None) -> list[Any]:
        slot = 0 if key is None else key_slot(key)
        deadline = time.monotonic() + self._timeout
        pause = _BACKOFF_FIRST
        asking: tuple[str, int] | None = None
        redirects = 0
        # The map to read again before the next attempt (the generation the failed attempt
        # was routed by, and the node a MOVED named), never patched here: see `refresh`.
        stale: int | None = None
        moved_to: tuple[str, int] | None = None
        generation = self._generation
        while True:
            try:
                if asking is not None:
                    replies = await self._node(asking).execute_many(
                        [b for c in commands for b in (pack(b"ASKING"), c)]
                    )
                    replies = replies[1::2]
                    asking = None
                else:
                    if stale is not None:
                        # Concurrent calls redirected by one move read the map once.
                        await self.refresh(unless_since=stale, first=moved_to)
                        stale = moved_to = None
                    generation = self._generation
                    replies = await self._node(await self._where(slot)).execute_many(commands)
            except MarksNotRestored as exc:
                # Fail closed at once (the node answers; identity's pass will restore it), not
                # after the caller's whole timeout.
                if "MOVED" in str(exc):
                    self._refresh_soon()
                raise
            except ConnectionError:
                # A primary gone: its replica takes over within the node timeout. The map is
                # read again (a refused seed is skipped) until the caller's time is up.
                stale = generation
                if time.monotonic() + pause > deadline:
                    raise
                await asyncio.sleep(pause)
                pause = min(pause * 2, _BACKOFF_MAX)
                continue
            first = replies[0]
            if not isinstance(first, RedisReplyError):
                return replies
            text = str(first)
            if text.startswith(("MOVED ", "ASK ")) and redirects < _MAX_REDIRECTS:
                redirects += 1
                kind, _, where = text.split(" ", 2)
                host, _, port = where.rpartition(":")
                address = (host, int(port))
                if kind == "MOVED":
                    # A failover or a resharding step: the whole map is read again, from the
                    # node named first, before the command is sent again. A replica promoted
                    # keeps its run_id and our connection: its record is asked again even if
                    # the map read looks the same.
                    self._node(address).recheck_fence()
                    stale, moved_to = generation, address
                else:
                    asking = address
                continue
            if text.startswith(("TRYAGAIN", "CLUSTERDOWN")) and time.monotonic() + pause < deadline:
                await asyncio.sleep(pause)
                pause = min(pause * 2, _BACKOFF_MAX)
                continue
            return replies

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        for node in list(self._nodes.values()):
            await node.close()
        self._nodes.clear()
