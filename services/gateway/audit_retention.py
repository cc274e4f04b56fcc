"""Records on `connect:audit` kept by the gateway until identity has stored them.

An entry on the stream is not yet safe: a Redis that restarts empty, or fails over before its
replica has the entry, loses it, and with it the records of calls the gateway has already
answered (the fault suite lost 4 to 37 per restart of the Cluster before this). So the gateway
keeps each batch entry it wrote until identity's audit consumer group (`streams.AUDIT_GROUP`)
has acknowledged it, which the consumer does only once the records are in PostgreSQL, on the
same run of Redis. As the school API's outbox does for events, every CHECK_INTERVAL one script
asks the stream's node for its `run_id` and the group's acknowledged floor:

- same run: every kept entry below the floor is dropped (it is stored);
- another run (restarted, failed over, or the first answer since this gateway started, when
  the run that took the entries is unknown): every kept entry is appended again. A record is
  stored once however often it is appended (identity keys audit rows by the record's own id,
  `rid`), so appending again what was in fact stored costs a duplicate entry, never a
  duplicate record.

What remains: a gateway and the Redis node holding `connect:audit` lost together (the kept
copies are in the gateway's memory), and records beyond MAX_KEPT_RECORDS while identity's
consumer is away for long (dropped oldest first, counted, warned of).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

import redis.asyncio as redis
from redis.exceptions import RedisError

from libs.common import streams
from libs.common.logging import get_logger

log = get_logger(__name__)

CHECK_INTERVAL = 0.25
# About a minute of a busy gateway's records: past it, identity's consumer has been away long
# enough that an operator is looking (the stream's lag metric), and memory stays bounded.
MAX_KEPT_RECORDS = 200_000
WARN_INTERVAL = 10.0


class AuditRetention:
    """The batch entries this gateway appended that identity has not acknowledged yet."""

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        *,
        on_dropped: Callable[[int], None] | None = None,
    ) -> None:
        self._client = client
        self._stream = stream
        # (entry key, the entry's `data` member, how many records it holds), oldest first.
        self._kept: deque[tuple[streams.EntryKey, bytes, int]] = deque()
        self._records = 0
        self._run_id: str | None = None
        self._on_dropped = on_dropped
        self._last_warning = 0.0

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def records(self) -> int:
        return self._records

    def kept(self, entry_id: str | bytes, data: bytes, records: int) -> None:
        """An entry Redis just took (its id as Redis answered it, and its `data` member)."""
        self._kept.append((streams.entry_key(entry_id), data, records))
        self._records += records
        dropped = 0
        while self._records > MAX_KEPT_RECORDS and len(self._kept) > 1:
            _, _, count = self._kept.popleft()
            self._records -= count
            dropped += count
        if dropped:
            if self._on_dropped is not None:
                self._on_dropped(dropped)
            now = time.monotonic()
            if now - self._last_warning >= WARN_INTERVAL:
                self._last_warning = now
                log.warning("audit_retention_full", dropped=dropped, kept=self._records)

    async def check(self) -> int:
        """Drop what identity stored; append again what a Redis of another run lost. Returns
        how many entries were appended again."""
        progress = await streams.group_progress(self._client, self._stream, streams.AUDIT_GROUP)
        if progress.run_id != self._run_id:
            again = await self._append_again()
            # Only once every kept entry is on this run: a failed append leaves the run
            # unrecorded, and the next check appends again.
            self._run_id = progress.run_id
            if again:
                log.warning("audit_records_appended_again", entries=again)
            return again
        if progress.below is not None:
            while self._kept and self._kept[0][0] < progress.below:
                _, _, count = self._kept.popleft()
                self._records -= count
        return 0

    async def _append_again(self) -> int:
        entries, self._kept, self._records = self._kept, deque(), 0
        if not entries:
            return 0
        try:
            pipe = self._client.pipeline(transaction=False)
            for _, data, _ in entries:
                pipe.xadd(
                    self._stream,
                    {b"data": data},
                    maxlen=streams.DEFAULT_MAXLEN,
                    approximate=True,
                )
            ids = await pipe.execute()
        except (RedisError, OSError):
            # Kept as they were, for the next check.
            self._kept = entries + self._kept
            self._records = sum(count for _, _, count in self._kept)
            raise
        again: deque[tuple[streams.EntryKey, bytes, int]] = deque(
            (streams.entry_key(entry_id), data, count)
            for entry_id, (_, data, count) in zip(ids, entries, strict=True)
        )
        self._kept = again + self._kept
        self._records = sum(count for _, _, count in self._kept)
        return len(again)

    async def run(self) -> None:
        """The check every CHECK_INTERVAL, for ever (under the gateway's Supervisor)."""
        while True:
            await self.check()
            await asyncio.sleep(CHECK_INTERVAL)
