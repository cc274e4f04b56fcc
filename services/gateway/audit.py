"""The gateway's side of the audit trail: every protected call becomes an `api.call` record on
`connect:audit`, without the response ever waiting for Redis.

Records go into a bounded in-memory buffer; a background task appends them every
FLUSH_INTERVAL seconds, or at once when a batch is full, each batch as ONE stream entry:
`data` = `{"records": [record, ...]}` (at most BATCH records, about BATCH_BYTES). One XADD, one
stream entry for identity's consumer to read and acknowledge, and one row key prefix, instead
of one of each per call: on a machine whose cores the gateway shares with Redis, identity and
PostgreSQL, the per-record cost of those processes was most of what the audit trail cost a
call. Identity still appends its own records one entry each; its consumer reads both shapes
(services/identity/audit.py, `records_of`). The XADDs are packed here and go over the lean
pipelined connection (redis_pipeline.py): the audit must not cost the API more than the call
does. The trail fails closed, as Vault's audit devices do: a protected call takes a place for its
record (`reserve`) before anything is done for it, and fills it with the outcome
(`Slot.fill`) once it has one. Places held by calls in progress count against the capacity
with the records waiting to be written, so a call that got a place always gets its record in,
and when the buffer is full (Redis away or slow for long) the call is refused (503) rather
than served unaudited; the refusal is counted and warned of at most once per WARN_INTERVAL. A
reservation is a counter, no Redis round trip: what the audit trail costs a call stays where
it was. `append` (a record no call waits on) drops and counts the record when the buffer is
full. Identity's audit consumer stores the stream in PostgreSQL.

Durable mode (GATEWAY_AUDIT_MODE=durable) closes the one window buffering leaves:
a gateway killed (SIGKILL, OOM, a lost host) loses the records it held, up to FLUSH_INTERVAL of
answered calls. There a call's answer waits until its record is on the stream
(`Slot.written`), in a group commit as databases do for their log: one write in flight at a
time, started by the call whose record finds none in flight, in that call's own turn of the
event loop (no timer, no task to wake); the records of the calls finishing meanwhile go
together in the next write, which the reply of the previous one starts, in the turn that parses
it, where the calls it wrote are released too (PipelinedRedis.send_now: no task between the
reply and the answer). So a call waits one Redis round trip, two under load, and under load one
XADD carries many records. The flush loop takes over only when that cannot be done at once (no
connection yet, a write failed, a Cluster redirection): it writes the backlog the awaitable way
and hands back. A call whose record cannot be written (Redis away) is answered 503, like one
refused a place; its record stays buffered and is written when Redis is back (the upstream was
called: the call happened).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from libs.common import streams, tasks
from libs.common.logging import get_logger
from services.gateway.audit_retention import AuditRetention
from services.gateway.redis_pipeline import PipelinedRedis, RedisReplyError, Replies, pack

log = get_logger(__name__)

# A trade between the two figures the bench holds the gateway to. Each flush has a fixed cost
# (an XADD here; a read, an insert, a commit and an acknowledgement in identity and PostgreSQL),
# so rare flushes serve more calls per second; but each becomes one insert, about 13 µs of
# PostgreSQL's CPU per record, and at light load the calls that meet that burst on a core
# make the p99. Quick bench on the 2-core machine, identity's consumer gathering as long, share
# of the bare proxy's throughput at c=32 / p99 added at c=2, runs of 2026-12-05:
#   0.01 s: 0.77-0.85× / +0.24 to +0.34 ms; 0.02 s: 0.85-0.87× / +0.37 to +0.53 ms;
#   0.05 s: 0.85-0.90× / +0.55 to +0.92 ms.
# A busy gateway fills a batch (BATCH) before the interval ends.
FLUSH_INTERVAL = 0.02
# Durable mode: after a failed write, the next attempt comes after at most this long (calls
# wait for it, answered 503 if it fails too).
DURABLE_RETRY_MAX = 0.5
# Bounds of one batch entry: the consumer holds a read of entries in memory at once, and a
# huge entry would hold up Redis (and every call's guard check on it) while it is copied.
BATCH = 200
BATCH_BYTES = 256 * 1024
# Batch entries sent in one pipelined write when a backlog (Redis was away) is written out.
PIPELINE = 16
WARN_INTERVAL = 10.0
# The flush loop's name under the gateway's Supervisor (/healthz, /readyz, logs).
FLUSH_TASK = "gateway-audit-flush"


def api_call(
    *,
    school_id: int,
    client_id: str,
    subject: str,
    grant_id: str,
    method: str,
    path: str,
    status: int,
    scope: str | None,
    ip: str | None,
    request_id: str,
) -> dict[str, Any]:
    """One record, in the shape identity's audit consumer stores (see identity's audit.py)."""
    return {
        "occurred_at": time.time(),
        "action": "api.call",
        "school_id": school_id,
        "client_id": client_id,
        "subject": subject,
        "grant_id": grant_id,
        "method": method,
        "path": path,
        "status": status,
        "scope": scope,
        "ip": ip,
        "detail": {"request_id": request_id},
    }


class Slot:
    """The place of one call's record in the buffer, held while the call is in progress."""

    __slots__ = ("_buffer",)

    def __init__(self, buffer: AuditBuffer) -> None:
        self._buffer: AuditBuffer | None = buffer

    @property
    def open(self) -> bool:
        """Neither filled nor given back yet."""
        return self._buffer is not None

    def fill(self, record: dict[str, Any]) -> int:
        """Queue the call's record in its place; a place is filled once. Returns the record's
        number, for AuditBuffer.written."""
        buffer = self._buffer
        if buffer is None:
            raise RuntimeError("this audit slot was already filled or released")
        self._buffer = None
        buffer._reserved -= 1
        return buffer._queue(record)

    async def written(self, record: dict[str, Any]) -> bool:
        """Fill the place, and in durable mode wait until the record is on the stream: True
        when the call may be answered, False when the record could not be written now (the
        call is answered 503; the record stays buffered and is written later)."""
        buffer = self._buffer
        number = self.fill(record)
        assert buffer is not None
        return await buffer.written(number)

    def release(self) -> None:
        """Give the place back unfilled (the call ended with no record to write); once filled
        or released, nothing more happens, so a `finally` may always call it."""
        buffer = self._buffer
        if buffer is not None:
            self._buffer = None
            buffer._reserved -= 1


class AuditBuffer:
    def __init__(
        self,
        connection: PipelinedRedis,
        stream: str,
        *,
        capacity: int,
        on_drop: Callable[[], None] | None = None,
        on_refuse: Callable[[], None] | None = None,
        durable: bool = False,
        retention: AuditRetention | None = None,
    ) -> None:
        self._redis = connection
        self.durable = durable
        # The entries written, kept until identity has stored them (audit_retention.py).
        self.retention = retention
        # Everything of the XADD but the value: `XADD <stream> MAXLEN ~ N * data <json>`.
        self._head = pack(
            b"XADD", stream, b"MAXLEN", b"~", streams.DEFAULT_MAXLEN, b"*", b"data", b""
        ).removesuffix(b"$0\r\n\r\n")
        self._capacity = capacity
        self._on_drop = on_drop
        self._on_refuse = on_refuse
        # Places held by calls in progress (Slot), counted with the records against capacity.
        self._reserved = 0
        # Each record as its JSON: serialized when appended, so a flush is a join and a write
        # rather than a burst of work delaying the calls in flight.
        self._records: deque[bytes] = deque()
        self._batch_ready = asyncio.Event()
        self._has_records = asyncio.Event()
        self._last_warning = float("-inf")
        self._task: asyncio.Task[None] | None = None
        self._own_supervisor: tasks.Supervisor | None = None
        self._stopping = False
        self._stopped = asyncio.Event()
        # Set when the flush loop has ended for the shutdown (everything written, or given up).
        self._finished = asyncio.Event()
        self.dropped = 0
        self.refused = 0
        self._id_prefix = secrets.token_hex(8) + "-"
        # Records queued and records written since start: a record's number is its place in
        # the order of both, as records are written in the order they were queued.
        self._queued = 0
        self._written = 0
        # Durable mode: calls waiting for their record, in order (its number, their future).
        self._waiters: deque[tuple[int, asyncio.Future[bool]]] = deque()
        # Durable mode: records in each entry of the write in flight (empty: none in flight),
        # and whether the flush loop has the writing (a write failed or could not start).
        self._in_flight: list[int] = []
        self._loop_writes = False
        # The loop's next write waits first (the last one failed: Redis away).
        self._backoff = False
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self._records)

    @property
    def reserved(self) -> int:
        """Places held by calls in progress."""
        return self._reserved

    def reserve(self) -> Slot | None:
        """A place for the record of a call about to be handled, or None when the buffer cannot
        promise one (the caller refuses the call: it must not be served unaudited)."""
        if len(self._records) + self._reserved >= self._capacity:
            self.refused += 1
            if self._on_refuse is not None:
                self._on_refuse()
            self._warn_full()
            return None
        self._reserved += 1
        return Slot(self)

    def append(self, record: dict[str, Any]) -> None:
        """Queue a record no call waits on; never blocks, never raises. When the buffer is full
        the record is dropped and counted (calls reserve their place instead)."""
        if len(self._records) + self._reserved >= self._capacity:
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop()
            self._warn_full()
            return
        self._queue(record)

    def _warn_full(self) -> None:
        now = time.monotonic()
        if now - self._last_warning >= WARN_INTERVAL:
            self._last_warning = now
            log.warning(
                "audit_buffer_full",
                refused=self.refused,
                dropped=self.dropped,
                capacity=self._capacity,
                reserved=self._reserved,
            )

    def _queue(self, record: dict[str, Any]) -> int:
        # Its own id, unique across processes: a flush whose replies were lost (the connection
        # dropped after Redis applied some of the XADDs) sends the records again in new
        # entries, and identity keys each row by this id, so a record is stored once.
        self._queued += 1
        record["rid"] = f"{self._id_prefix}{self._queued:x}"
        self._records.append(orjson.dumps(record))
        if self.durable:
            if not self._in_flight and not self._loop_writes:
                self._start_write()
        elif len(self._records) == 1:
            self._has_records.set()
        elif len(self._records) >= BATCH:
            self._batch_ready.set()
        return self._queued

    async def written(self, number: int) -> bool:
        """Durable mode: wait until record `number` is on the stream; False if a write failed
        first (Redis away: the record stays buffered). Buffered mode: True at once."""
        if not self.durable or self._written >= number:
            return True
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append((number, done))
        return await done

    def _settle(self, ok: bool) -> None:
        """Answer the waiters: those whose record is written (ok), or all (a write failed)."""
        waiters = self._waiters
        while waiters and (not ok or waiters[0][0] <= self._written):
            _, done = waiters.popleft()
            if not done.done():
                done.set_result(ok)

    def _entry(self, start: int) -> tuple[bytes, int]:
        """The XADD of one batch entry from the records at `start`: (command, records in it).
        A record alone over BATCH_BYTES still goes, alone: bounded entries, no lost record."""
        taken: list[bytes] = []
        size = 0
        for payload in itertools.islice(self._records, start, start + BATCH):
            if taken and size + len(payload) > BATCH_BYTES:
                break
            taken.append(payload)
            size += len(payload) + 1
        value = b'{"records":[%s]}' % b",".join(taken)
        return b"%s$%d\r\n%s\r\n" % (self._head, len(value), value), len(taken)

    def _entered(self, entry_id: Any, count: int) -> None:
        """The oldest `count` records went into the stream as entry `entry_id`: written, and
        kept until identity has stored them (audit_retention.py)."""
        if self.retention is None:
            for _ in range(count):
                self._records.popleft()
        else:
            taken = [self._records.popleft() for _ in range(count)]
            self.retention.kept(entry_id, b'{"records":[%s]}' % b",".join(taken), count)
        self._written += count

    def _commands(self) -> tuple[list[bytes], list[int]]:
        """The XADDs of what is buffered (at most PIPELINE entries), and the records in each."""
        commands: list[bytes] = []
        counts: list[int] = []
        start = 0
        while start < len(self._records) and len(commands) < PIPELINE:
            command, count = self._entry(start)
            commands.append(command)
            counts.append(count)
            start += count
        return commands, counts

    def _start_write(self) -> None:
        """Durable mode: send what is buffered now, or hand it to the flush loop when the
        connection cannot take it at once."""
        commands, counts = self._commands()
        if self._redis.send_now(b"".join(commands), len(counts), self._on_replies):
            self._in_flight = counts
        else:
            self._hand_to_loop()

    def _on_replies(self, replies: Replies) -> None:
        """The write in flight answered: release the calls it wrote, start the next write."""
        counts, self._in_flight = self._in_flight, []
        try:
            if isinstance(replies, ConnectionError):
                # Whether Redis applied the write is unknown; the records stay buffered, and a
                # record is stored once however often it is sent (its rid). The calls waiting
                # are answered 503 now, as the flush loop answers them when its write fails.
                self._settle(False)
                self._warn_failed()
                self._backoff = True
                self._hand_to_loop()
                return
            for answer, count in zip(replies, counts, strict=True):
                if isinstance(answer, RedisReplyError):
                    # A redirection (Cluster) or a refusal: the loop sends the rest again
                    # the awaitable way, which follows redirections, and answers the calls.
                    self._settle(True)
                    self._hand_to_loop()
                    return
                self._entered(answer, count)
            self._settle(True)
            if self._records and not self._loop_writes:
                self._start_write()
            elif self._stopping:
                self._wake.set()
        except Exception:
            # Called from the connection's reader: what nobody foresaw must not end it, nor
            # leave calls waiting. The loop takes over, as after a failed write.
            log.exception("audit_write_failed")
            self._settle(False)
            self._hand_to_loop()

    def _hand_to_loop(self) -> None:
        self._loop_writes = True
        self._wake.set()

    def _warn_failed(self) -> None:
        now = time.monotonic()
        if now - self._last_warning >= WARN_INTERVAL:
            self._last_warning = now
            log.warning("audit_flush_failed", buffered=len(self._records))

    async def flush(self) -> int:
        """Append everything buffered now; records stay buffered when Redis fails."""
        written = 0
        while self._records:
            commands, counts = self._commands()
            answers = await self._redis.execute_many(commands)
            # Redis answers in order: the entries before a refused one are in the stream, and
            # re-sending them would store their records twice (under new entry ids).
            for answer, count in zip(answers, counts, strict=True):
                if isinstance(answer, RedisReplyError):
                    raise answer
                self._entered(answer, count)
                written += count
            if self._waiters:
                self._settle(True)
        return written

    async def _run(self) -> None:
        delay = FLUSH_INTERVAL
        while True:
            if not self._records and not self._stopping:
                # Nothing to write: sleep until a record comes rather than waking every
                # interval (a hundred times a second) for nothing.
                self._has_records.clear()
                await self._has_records.wait()
            if not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._batch_ready.wait(), timeout=delay)
            self._batch_ready.clear()
            try:
                await self.flush()
                delay = FLUSH_INTERVAL
            except (OSError, RedisReplyError):
                if self._stopping:
                    log.warning("audit_records_lost_at_shutdown", records=len(self._records))
                    return
                now = time.monotonic()
                if now - self._last_warning >= WARN_INTERVAL:
                    self._last_warning = now
                    log.warning("audit_flush_failed", buffered=len(self._records))
                delay = min(max(delay * 2, 0.1), 2.0)
            if self._stopping:
                return

    async def _run_durable(self) -> None:
        """Durable mode: idle while calls write their records themselves (`_start_write`);
        when that cannot go on (no connection yet, a write failed or was redirected), write
        the backlog here the awaitable way, then hand the writing back."""
        delay = FLUSH_INTERVAL
        while True:
            if not self._loop_writes:
                if self._stopping and not self._in_flight:
                    if not self._records:
                        return
                    self._loop_writes = True
                    continue
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._backoff:
                if self._stopping:
                    log.warning("audit_records_lost_at_shutdown", records=len(self._records))
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopped.wait(), timeout=delay)
                delay = min(delay * 2, DURABLE_RETRY_MAX)
            try:
                await self.flush()
            except (OSError, RedisReplyError):
                # The calls waiting are answered 503 now rather than held; their records stay
                # buffered and are written once Redis answers again.
                self._settle(False)
                self._warn_failed()
                self._backoff = True
                continue
            delay = FLUSH_INTERVAL
            self._backoff = False
            self._loop_writes = False

    async def run(self) -> None:
        """The flush loop, until stop(). Run under a Supervisor (`start`): its own handling
        covers Redis failing (records kept, retried); anything else ending it (a bug, an
        exception nobody foresaw) must not end the audit trail for good, with records piling
        up until every call is refused and, in durable mode, calls waiting for ever."""
        try:
            if self.durable:
                await self._run_durable()
            else:
                await self._run()
        except BaseException:
            # The calls waiting now are answered 503 rather than held until the restart; their
            # records stay buffered for it.
            self._settle(False)
            raise
        finally:
            if self._stopping:
                self._finished.set()

    def start(self, supervisor: tasks.Supervisor | None = None) -> None:
        """Run the flush loop under `supervisor` (the gateway's, which restarts it with backoff
        whatever ends it and shows it in /healthz and /readyz), or under one of its own."""
        if supervisor is None:
            supervisor = self._own_supervisor = tasks.Supervisor(asyncio.Event())
        self._task = supervisor.start(FLUSH_TASK, self.run)

    async def stop(self, timeout: float = 5.0) -> None:
        """Write what is left and stop (graceful shutdown, after in-flight calls finished). The
        supervisor's stop is set first (the gateway's is, before this), so the loop, ending,
        is not restarted."""
        self._stopping = True
        self._stopped.set()
        self._wake.set()
        self._batch_ready.set()
        self._has_records.set()
        if self._task is None:
            return
        if self._own_supervisor is not None:
            self._own_supervisor.stop.set()
        finished = asyncio.ensure_future(self._finished.wait())
        await asyncio.wait({finished, self._task}, timeout=timeout)
        finished.cancel()
        if (
            not self._finished.is_set()
            and self._task.done()
            and self._records
            and not self._in_flight
        ):
            # The loop was between a failure and its restart: one last attempt here.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.flush(), timeout=timeout)
        if self._records:
            log.warning("audit_records_lost_at_shutdown", records=len(self._records))
        self._settle(False)
        if self._own_supervisor is not None:
            await self._own_supervisor.close(grace=0)
