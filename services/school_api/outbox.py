"""The outbox relay: moves committed events from PostgreSQL to the `connect:events` stream,
and keeps each until the dispatcher has it.

Each batch is one transaction: lock the oldest unpublished rows (`FOR UPDATE SKIP LOCKED`, so
any number of relays in any number of processes share the work and never publish a row
twice), append them to the stream in id order in one round trip, mark them published, commit.
If Redis fails the transaction rolls back and the rows wait for the next try, with backoff.
If the commit fails after the append, the rows are published again later.

What is guaranteed: every committed event reaches the webhooks dispatcher at least once, even
through a Redis that restarts empty or a failover that loses the last writes. An event on the
stream is not yet safe, so a published row is kept, with the entry id and the `run_id` of the
Redis that took it, until the dispatcher's consumer group (`streams.EVENTS_GROUP`) has
acknowledged that entry, which it does only once the event's deliveries are recorded in
PostgreSQL; the row is then *settled*. Each round the relay asks Redis, in one script, for its
`run_id` and the group's progress: rows below the group's acknowledged floor on that run are
settled; published rows of any other run that never settled are published again (in id
order, before anything newer of the same resource). Appends carry the `run_id` the relay
expects and are refused by a Redis of another run, so nothing is appended to a new Redis
before what it lost has been put back. A republished event keeps its id (the webhook-id), and
the dispatcher records one delivery per subscription and event id: no second delivery comes of
it. What remains: settled rows and their deliveries live in PostgreSQL; a row published in a
run that ended more than `retention` seconds ago unsettled (no dispatcher running) is purged
with the rest and not published again.

Order per resource: events of one resource (`ordering_key`, e.g. `course:12` within a school)
reach the stream in commit order. Outbox ids of one resource follow commit order (store.enqueue
runs after the change's row write, under its row lock), and a relay holds back an event while
an older one of its resource is unpublished and not in its own batch (another relay is
publishing it, or it waits to be published again). Each entry carries `ordering_key` and
`sequence` (the outbox id) so that the webhooks service keeps the order per subscription.
Events of different resources are not ordered with respect to each other.

The relay wakes on the outbox trigger's NOTIFY (sent when a change commits) and polls every
`poll_interval` seconds as well, for notifications lost while its listening connection was
down. Published rows are deleted after `retention` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import redis.asyncio as redis
from prometheus_client import CollectorRegistry, Counter, Gauge

from libs.common import streams
from libs.common.logging import get_logger
from services.school_api import store

log = get_logger(__name__)


def iso_utc(moment: datetime) -> str:
    """ISO 8601 in UTC with a `Z`, as the API spells every timestamp."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def message(event: store.OutboxEvent) -> dict[str, Any]:
    """The stream entry: the webhook body it becomes (contract section 8), and for ordering
    (not part of the body) the event's resource and its place in the resource's history."""
    entry = {
        "id": str(event.event_id),
        "type": event.type,
        "school_id": event.school_id,
        "occurred_at": iso_utc(event.occurred_at),
        "data": event.data,
    }
    if event.ordering_key is not None:
        entry["ordering_key"] = event.ordering_key
        entry["sequence"] = event.id
    return entry


# Appends a batch to the stream unless the Redis answering is not the run the relay expects
# (ARGV[1]; empty: any). Returns the run_id, then the entries' ids (none when refused).
_APPEND = """
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
if ARGV[1] ~= '' and ARGV[1] ~= run_id then return {run_id} end
local answer = {run_id}
for i = 3, #ARGV do
  answer[#answer + 1] = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'data', ARGV[i])
end
return answer
"""


# The outbox gauges are counted at most this often (a round can be much shorter).
GAUGE_INTERVAL = 1.0
# How soon a relay looks again at events it held back for another relay's batch to commit.
HELD_BACK_RETRY = 0.02


class RunChanged(Exception):
    """The Redis answering is another run than the relay expected: it may have lost events."""


class RelayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.published = Counter(
            "school_api_events_published_total",
            "Events moved from the outbox to the event stream",
            registry=registry,
        )
        self.failures = Counter(
            "school_api_relay_failures_total",
            "Relay batches that failed and will be retried",
            registry=registry,
        )
        self.backlog = Gauge(
            "school_api_outbox_backlog",
            "Events committed but not yet on the event stream",
            registry=registry,
        )
        self.unsettled = Gauge(
            "school_api_outbox_unsettled",
            "Events on the stream the dispatcher has not acknowledged yet",
            registry=registry,
        )
        self.republished = Counter(
            "school_api_events_republished_total",
            "Events published again because the Redis that took them restarted or failed over",
            registry=registry,
        )


class OutboxRelay:
    def __init__(
        self,
        pool: asyncpg.Pool,
        redis_client: redis.Redis,
        stream: str,
        *,
        dsn: str | None = None,
        batch_size: int = 100,
        poll_interval: float = 1.0,
        retention: float = 24 * 3600,
        purge_interval: float = 60.0,
        max_backoff: float = 30.0,
        batch_timeout: float = 15.0,
        metrics: RelayMetrics | None = None,
        on_progress: Callable[[], None] | None = None,
        group: str = streams.EVENTS_GROUP,
    ) -> None:
        self._pool = pool
        self._redis = redis_client
        self._stream = stream
        # The consumer group whose acknowledgement settles an event.
        self._group = group
        self._append = redis_client.register_script(_APPEND)
        # The run of the Redis the relay last reconciled with; appends expect it.
        self._run_id: str | None = None
        # Without a DSN the relay only polls (tests that drive it batch by batch).
        self._dsn = dsn
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._retention = retention
        self._purge_interval = purge_interval
        self._max_backoff = max_backoff
        # A Redis or PostgreSQL that hangs instead of failing must not hold the batch's row
        # locks forever: past this, the batch is abandoned (rolled back) and retried.
        self._batch_timeout = batch_timeout
        self._metrics = metrics
        # Told after each round that went through (the supervisor's `ran_cleanly`).
        self._on_progress = on_progress
        self._wake = asyncio.Event()
        self._stopped = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        self._next_purge = 0.0
        self._next_gauges = 0.0
        self.failures = 0  # consecutive failed batches; 0 when the last one went through
        # Events of the last batch left for later: an older one of their resource was in
        # another relay's hands. That relay is about to commit, so look again soon.
        self.held_back = 0

    # -- one batch ------------------------------------------------------------------------

    async def publish_batch(self) -> int:
        """Publish the oldest unclaimed events, at most one batch; how many went out. Raises
        RunChanged (publishing nothing) when Redis is not the run last reconciled with."""
        async with store.transaction(self._pool) as conn:
            events, self.held_back = await store.claim_outbox(conn, self._batch_size)
            if not events:
                return 0
            answer = await self._append(
                keys=[self._stream],
                args=[
                    self._run_id or "",
                    streams.DEFAULT_MAXLEN,
                    # The `data` member, as libs.common.streams writes every entry.
                    *(orjson.dumps(message(e)) for e in events),
                ],
            )
            run_id, entry_ids = streams.text(answer[0]), [streams.text(a) for a in answer[1:]]
            if len(entry_ids) != len(events):
                raise RunChanged(run_id)
            await store.mark_published(conn, [e.id for e in events], entry_ids, run_id)
        if self._metrics is not None:
            self._metrics.published.inc(len(events))
        return len(events)

    async def reconcile(self) -> None:
        """Settle what the dispatcher's group has acknowledged on the Redis answering now, and
        unpublish what a Redis of another run took and never had acknowledged."""
        progress = await streams.group_progress(self._redis, self._stream, self._group)
        run_id = progress.run_id
        if progress.below is not None:
            await store.settle(self._pool, run_id, progress.below)
        rewound = await store.rewind(self._pool, run_id)
        if self._run_id is not None and run_id != self._run_id:
            log.warning("redis_run_changed", stream=self._stream)
        if rewound:
            # The Redis that took them restarted or failed over before the dispatcher had them.
            log.warning("outbox_republishing", events=rewound)
            if self._metrics is not None:
                self._metrics.republished.inc(rewound)
        self._run_id = run_id

    async def drain(self) -> int:
        """Reconcile, then publish batches until the backlog is empty (or the relay is
        stopping)."""
        await asyncio.wait_for(self.reconcile(), self._batch_timeout)
        total = 0
        reconciled_again = False
        while True:
            try:
                count = await asyncio.wait_for(self.publish_batch(), self._batch_timeout)
            except RunChanged:
                if reconciled_again:
                    raise  # Redis keeps changing under us: the loop's backoff, not a spin
                reconciled_again = True
                # Put back what the new Redis lacks before appending anything to it.
                await asyncio.wait_for(self.reconcile(), self._batch_timeout)
                continue
            reconciled_again = False
            total += count
            if count + self.held_back < self._batch_size or self._stopped.is_set():
                return total

    # -- the loop -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to end once its current batch is done."""
        self._stopped.set()
        self._wake.set()

    async def run(self) -> None:
        log.info("outbox_relay_started", stream=self._stream)
        held_wait = 0.0
        try:
            while not self._stopped.is_set():
                await self._ensure_listener()
                # Cleared before draining: a NOTIFY that lands mid-batch wakes the next round.
                self._wake.clear()
                try:
                    await self.drain()
                    self.failures = 0
                    if self._on_progress is not None:
                        self._on_progress()
                except Exception:
                    self.failures += 1
                    if self._metrics is not None:
                        self._metrics.failures.inc()
                    delay = min(self._max_backoff, 0.25 * 2 ** min(self.failures, 10))
                    log.warning(
                        "outbox_relay_failed", failures=self.failures, retry_in=delay, exc_info=True
                    )
                    # The gauges say what is owed most of all while Redis is away.
                    await self._refresh_gauges()
                    await self._sleep(delay, wake_on_notify=False)
                    continue
                await self._housekeeping()
                await self._refresh_gauges()
                if self.held_back:
                    # Soon, but less often the longer the other relay's batch takes (a Redis
                    # that hangs holds it up to batch_timeout).
                    held_wait = (
                        min(held_wait * 2, self._poll_interval) if held_wait else HELD_BACK_RETRY
                    )
                else:
                    held_wait = 0.0
                await self._sleep(held_wait or self._poll_interval, wake_on_notify=True)
        finally:
            await self._close_listener()
            log.info("outbox_relay_stopped")

    async def _sleep(self, seconds: float, *, wake_on_notify: bool) -> None:
        waiter = self._wake if wake_on_notify else self._stopped
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter.wait(), timeout=seconds)

    async def _housekeeping(self) -> None:
        try:
            now = time.monotonic()
            if now >= self._next_purge:
                self._next_purge = now + self._purge_interval
                purged = await store.purge_published(self._pool, self._retention)
                if purged:
                    log.info("outbox_purged", events=purged)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            log.warning("outbox_housekeeping_failed", exc_info=True)

    async def _refresh_gauges(self) -> None:
        """The unpublished and unsettled counts, at most once per GAUGE_INTERVAL."""
        now = time.monotonic()
        if self._metrics is None or now < self._next_gauges:
            return
        self._next_gauges = now + GAUGE_INTERVAL
        try:
            self._metrics.backlog.set(await store.outbox_backlog(self._pool))
            self._metrics.unsettled.set(await store.outbox_unsettled(self._pool))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            log.warning("outbox_gauges_failed", exc_info=True)

    # -- LISTEN ---------------------------------------------------------------------------

    def _notified(self, *_args: Any) -> None:
        self._wake.set()

    def _listener_lost(self, *_args: Any) -> None:
        self._listener = None

    async def _ensure_listener(self) -> None:
        if self._dsn is None or (self._listener is not None and not self._listener.is_closed()):
            return
        try:
            # A connection of its own: LISTEN holds it for the life of the relay, and a pool
            # connection would carry the subscription to whoever borrowed it next.
            conn = await asyncpg.connect(
                self._dsn, server_settings={"application_name": "loopwise-connect-relay"}
            )
            await conn.add_listener(store.NOTIFY_CHANNEL, self._notified)
            conn.add_termination_listener(self._listener_lost)
            self._listener = conn
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            # Polling still runs; the next round tries to listen again.
            log.warning("outbox_listen_failed", exc_info=True)

    async def _close_listener(self) -> None:
        conn, self._listener = self._listener, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await conn.close(timeout=2)
