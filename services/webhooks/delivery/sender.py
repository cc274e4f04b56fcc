"""Sends due deliveries: signed, from the egress address, bounded, and every attempt recorded.

A sender claims due deliveries from PostgreSQL (FOR UPDATE SKIP LOCKED plus a lease, so any
number of processes share the work; the sender renews its short lease while it holds the
delivery, so one whose sender died is claimed again within seconds), checks the grant's
revocation mark right before sending, POSTs the stored body with Standard Webhooks headers,
and hands the outcome to a recorder that writes outcomes in batches. Retries are rows with a
later `next_attempt_at`, so a restart loses none.

Bounds, so one slow receiver cannot starve the others: at most WEBHOOK_ENDPOINT_CONCURRENCY
requests to one subscription in flight per process and WEBHOOK_MAX_IN_FLIGHT in all; of one
subscription's deliveries at most LEASE_DEPTH times its concurrency leased at once over all
processes (read-ahead that keeps a fast endpoint busy), and no more than its concurrency
while it is slow (read-ahead would only wait). Receivers' connections are pooled
(keep-alive) in one session per process (`egress`); one request is `attempt.post`, and what
follows it `retry.classify`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import UTC, datetime
from uuid import UUID

import aiohttp
import asyncpg
from cryptography.exceptions import InvalidTag
from redis.exceptions import RedisError

from libs.common import keys, tasks
from libs.common.logging import get_logger
from services.webhooks import dispatcher, signing, ssrf, store
from services.webhooks.context import WebhooksContext
from services.webhooks.delivery import egress
from services.webhooks.delivery.attempt import AttemptResult, post, signed_headers
from services.webhooks.delivery.retry import classify
from services.webhooks.store import outcomes as outcome_store
from services.webhooks.store import queue as queue_store
from services.webhooks.store import revocations as revocation_store
from services.webhooks.store.queue import Claimed

log = get_logger(__name__)

CLAIM_BATCH = 256
# A sender leases up to this many times WEBHOOK_ENDPOINT_CONCURRENCY of one subscription's
# deliveries, so the next ones are at hand when a request finishes (the claim and the record
# of outcomes stay off the path between two requests to one endpoint).
LEASE_DEPTH = 8
# Outcomes are written together: up to this many, or after this long, whichever comes first
# (each write is a round trip and a commit; the wait costs a few ms of lease, no latency).
RECORD_BATCH = 100
RECORD_WAIT = 0.005
# An endpoint answering this slowly (or timing out) gets no read-ahead for a while.
SLOW_SECONDS = 1.0
SLOW_FOR = 60.0
# A delivery that waited longer than this for its endpoint's turn has its grant's revocation
# mark checked again right before it is sent.
RECHECK_AFTER = 0.2
# With nothing due, look again this often: retries scheduled by other processes, and NOTIFY
# lost with a dropped listener connection.
POLL_INTERVAL = 1.0

# Bounds of a sender's lease on a delivery, in seconds (renewed every third of it).
LEASE_MIN = 5.0
LEASE_MAX = 30.0
# Retries due within this are woken for by a timer rather than the poll.
_TIMER_HORIZON = 60.0


def _set_event(event: asyncio.Event, *_: object) -> None:
    event.set()


class Sender:
    """Claims and sends due deliveries until stopped; one per process."""

    def __init__(self, ctx: WebhooksContext, worker: str) -> None:
        self._ctx = ctx
        self._worker = worker
        policy = ctx.settings.webhooks
        self._policy = policy
        # Short, and renewed while held: a sender that dies (SIGKILL, lost host) gives its
        # deliveries back within one lease, while a live one keeps them however long they
        # wait for their endpoint's turn. Twice the request timeout, so a renewal that comes
        # late by a whole request still finds its lease.
        self._lease = min(max(policy.timeout * 2, LEASE_MIN), LEASE_MAX)
        # Every delivery this sender holds a lease on, waiting or sending.
        self._holding: dict[asyncio.Task[None], UUID] = {}
        self._gates: dict[UUID, tuple[asyncio.Semaphore, int]] = {}
        self._sending = asyncio.Semaphore(policy.max_in_flight)
        # Leased here and held in memory: sending or waiting for the endpoint's turn.
        self._max_leased = policy.max_in_flight * LEASE_DEPTH
        # Tasks still waiting for their endpoint's turn, with their delivery: given back on
        # stop rather than left to a lease that runs for minutes.
        self._waiting: dict[asyncio.Task[None], UUID] = {}
        self._slow: dict[UUID, float] = {}
        self._revoked_here: set[UUID] = set()
        # Single flight: one revocation check per grant answers every delivery waiting on
        # it, and a "not revoked" answer stands for RECHECK_AFTER.
        self._grant_checks: dict[UUID, asyncio.Future[bool]] = {}
        self._grant_clear_at: dict[UUID, float] = {}
        self._keys = signing.KeyCache(ctx.settings.key_encryption_keys)
        self._tasks: set[asyncio.Task[None]] = set()
        self._outcomes: list[outcome_store.Outcome] = []
        self._flush_wanted = asyncio.Event()
        # One writer at a time: the final flush at shutdown may meet the loop's.
        self._flush_lock = asyncio.Lock()
        self._slot_freed = asyncio.Event()
        self._stopping = False
        self._background: list[asyncio.Task[None]] = []
        self._supervisor: tasks.Supervisor | None = None
        self._session: aiohttp.ClientSession | None = None
        self._resolver: ssrf.GuardedResolver | None = None
        self._family = egress.egress_family(ctx.settings)

    async def start(self, supervisor: tasks.Supervisor | None = None) -> None:
        """Start the sender's loops under `supervisor` (the service's, so its health reflects
        them; one of the sender's own without)."""
        self._resolver = egress.make_resolver(
            self._ctx.settings, self._ctx.policy, self._ctx.resolver
        )
        self._session = egress.make_session(self._ctx.settings, self._resolver)
        self._supervisor = supervisor or tasks.Supervisor(asyncio.Event())
        self._background = [
            self._supervisor.start("webhooks-claim", self._claim_loop),
            self._supervisor.start("webhooks-record", self._flush_loop),
            self._supervisor.start("webhooks-listen", self._listen),
            self._supervisor.start("webhooks-renew", self._renew_loop),
        ]

    async def stop(self) -> None:
        """Stop claiming, let in-flight deliveries finish (the timeout bounds them), record
        their outcomes. Anything cut short keeps its lease and is sent again later."""
        self._stopping = True
        if self._supervisor is not None:
            # Loops that end now end for good (the claim loop returns once stopping).
            self._supervisor.stop.set()
        self._ctx.due.set()
        self._slot_freed.set()
        claim_loop = self._background[0]
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(claim_loop, timeout=5)
        waiting = dict(self._waiting)
        for task in waiting:
            task.cancel()
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            await queue_store.release_leases(self._ctx.pool, list(waiting.values()), self._worker)
        if self._tasks:
            _, unfinished = await asyncio.wait(self._tasks, timeout=self._policy.timeout + 2)
            for task in unfinished:
                task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._flush(final=True), timeout=10)
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._session is not None:
            await self._session.close()
        if self._resolver is not None:
            await self._resolver.close()

    # -- claiming --------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        ctx = self._ctx
        delay = 0.2
        while not self._stopping:
            free = self._max_leased - len(self._tasks)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            # Cleared before the claim: a wake-up arriving during it is not lost.
            ctx.due.clear()
            try:
                claimed = await queue_store.claim_due(
                    ctx.pool,
                    per_endpoint=self._policy.endpoint_concurrency * LEASE_DEPTH,
                    per_slow_endpoint=self._policy.endpoint_concurrency,
                    slow=self._slow_endpoints(),
                    limit=min(free, CLAIM_BATCH),
                    lease_seconds=self._lease,
                    worker=self._worker,
                )
                if claimed:
                    await self._start_sends(claimed)
                    delay = 0.2
                    continue
            except (OSError, asyncpg.PostgresError, RedisError):
                log.warning("claim_failed", exc_info=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.due.wait(), POLL_INTERVAL)

    async def _revoked(self, grants: Iterable[tuple[int, UUID]]) -> set[UUID]:
        """Grants (school, grant id) whose revocation mark identity has set: checked right
        before sending."""
        ids = list(set(grants))
        pipe = self._ctx.redis.pipeline(transaction=False)
        for school_id, gid in ids:
            pipe.exists(keys.revoked_mark(self._ctx.settings, school_id, gid))
        answers = await pipe.execute()
        return {gid for (_, gid), found in zip(ids, answers, strict=True) if found}

    async def _skip_revoked(self, grants: set[UUID], ids: Sequence[UUID]) -> None:
        await queue_store.cancel_deliveries(self._ctx.pool, ids)
        self._ctx.metrics.attempts.labels("cancelled").inc(len(ids))
        new = grants - self._revoked_here
        if new:
            self._revoked_here |= new
            # The stream announcement may lag the mark (or be gone): apply it now.
            await revocation_store.revoke_grants(self._ctx.pool, [(g, "revoked") for g in new])

    async def _start_sends(self, claimed: Sequence[Claimed]) -> None:
        revoked = await self._revoked((c.school_id, c.grant_id) for c in claimed)
        inactive = [c.id for c in claimed if not c.active and c.grant_id not in revoked]
        if inactive:
            await queue_store.cancel_deliveries(self._ctx.pool, inactive)
            self._ctx.metrics.attempts.labels("cancelled").inc(len(inactive))
        if revoked:
            await self._skip_revoked(revoked, [c.id for c in claimed if c.grant_id in revoked])
        checked_at = time.monotonic()
        for c in claimed:
            if c.active and c.grant_id not in revoked:
                task = asyncio.create_task(self._send(c, checked_at))
                self._tasks.add(task)
                self._waiting[task] = c.id
                self._holding[task] = c.id
                self._ctx.metrics.in_flight.inc()
                task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._waiting.pop(task, None)
        self._holding.pop(task, None)
        self._ctx.metrics.in_flight.dec()
        self._slot_freed.set()

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._lease / 3)
            # Outcomes not yet written still hold their delivery: a lease lost before the
            # write would let another sender send it again.
            held = set(self._holding.values()) | {o.delivery_id for o in self._outcomes}
            if not held:
                continue
            try:
                await queue_store.renew_leases(
                    self._ctx.pool, list(held), self._worker, self._lease
                )
            except (OSError, asyncpg.PostgresError):
                # The next renewal may still come in time; if not, others send them again.
                log.warning("lease_renewal_failed", count=len(held), exc_info=True)

    def _slow_endpoints(self) -> list[UUID]:
        now = time.monotonic()
        if len(self._grant_clear_at) > 10_000:
            self._grant_clear_at = {
                g: t for g, t in self._grant_clear_at.items() if now - t <= RECHECK_AFTER
            }
        for sub in [s for s, until in self._slow.items() if until < now]:
            del self._slow[sub]
        return list(self._slow)

    def _note_speed(self, subscription_id: UUID, result: AttemptResult) -> None:
        if result.latency_ms >= SLOW_SECONDS * 1000:
            self._slow[subscription_id] = time.monotonic() + SLOW_FOR
        elif result.ok:
            self._slow.pop(subscription_id, None)

    # -- sending ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _turn(self, subscription_id: UUID) -> AsyncIterator[None]:
        """Wait for one of the endpoint's WEBHOOK_ENDPOINT_CONCURRENCY request slots."""
        gate, users = self._gates.get(subscription_id, (None, 0))
        if gate is None:
            gate = asyncio.Semaphore(self._policy.endpoint_concurrency)
        self._gates[subscription_id] = (gate, users + 1)
        try:
            async with gate:
                yield
        finally:
            gate, users = self._gates[subscription_id]
            if users == 1:
                del self._gates[subscription_id]
            else:
                self._gates[subscription_id] = (gate, users - 1)

    async def _grant_revoked(self, school_id: int, grant_id: UUID, checked_at: float) -> bool:
        """Whether the grant is revoked, asked again unless it was cleared just now."""
        if grant_id in self._revoked_here:
            return True
        now = time.monotonic()
        if now - max(checked_at, self._grant_clear_at.get(grant_id, 0.0)) <= RECHECK_AFTER:
            return False
        pending = self._grant_checks.get(grant_id)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._grant_checks[grant_id] = pending
            try:
                revoked = bool(await self._revoked([(school_id, grant_id)]))
            except BaseException as exc:
                pending.set_exception(exc)
                pending.exception()  # retrieved here: the waiters may be none
                raise
            finally:
                del self._grant_checks[grant_id]
            if not revoked:
                self._grant_clear_at[grant_id] = time.monotonic()
            pending.set_result(revoked)
            return revoked
        return await asyncio.shield(pending)

    async def _send(self, c: Claimed, checked_at: float) -> None:
        async with self._turn(c.subscription_id), self._sending:
            task = asyncio.current_task()
            if task is not None:
                self._waiting.pop(task, None)
            try:
                if await self._grant_revoked(c.school_id, c.grant_id, checked_at):
                    await self._skip_revoked({c.grant_id}, [c.id])
                    return
            except (OSError, asyncpg.PostgresError, RedisError):
                # Unsure whether it may go: hand it back to be claimed (and checked) again.
                log.warning("revocation_check_failed", delivery_id=str(c.id), exc_info=True)
                with contextlib.suppress(OSError, asyncpg.PostgresError):
                    await queue_store.release_leases(self._ctx.pool, [c.id], self._worker)
                return
            await self._attempt(c)

    async def _attempt(self, c: Claimed) -> None:
        attempted_at = datetime.now(UTC)
        try:
            headers = signed_headers(self._keys, c)
        except InvalidTag:
            result = AttemptResult(None, 0, None, "signing secret cannot be unsealed")
            log.error("secret_unseal_failed", subscription_id=str(c.subscription_id))
        else:
            assert self._session is not None
            assert self._resolver is not None
            try:
                result = await post(
                    self._session,
                    c.url,
                    c.body,
                    headers,
                    timeout=self._policy.timeout,
                    policy=self._ctx.policy,
                    resolver=self._resolver,
                    proxy=self._policy.egress_proxy,
                    family=self._family,
                )
            except Exception as exc:  # any surprise is a failed attempt, not a stuck lease
                log.exception("delivery_crashed", delivery_id=str(c.id))
                result = AttemptResult(None, 0, None, f"internal error: {type(exc).__name__}")
        outcome, retry_in = classify(
            result,
            attempt_number=c.attempt_count + 1,
            manual=c.manual,
            schedule=self._policy.retry_schedule,
            retry_after_max=self._policy.retry_after_max,
        )
        self._note_speed(c.subscription_id, result)
        metrics = self._ctx.metrics
        metrics.attempts.labels(outcome).inc()
        metrics.latency.observe(result.latency_ms / 1000)
        if outcome != "delivered":
            log.info(
                "delivery_failed",
                delivery_id=str(c.id),
                subscription_id=str(c.subscription_id),
                school=c.school_id,
                client_id=c.client_id,
                status=result.status,
                error=result.error,
                outcome=outcome,
                retry_in=retry_in,
            )
        self._outcomes.append(
            outcome_store.Outcome(
                delivery_id=c.id,
                subscription_id=c.subscription_id,
                attempted_at=attempted_at,
                response_status=result.status,
                latency_ms=result.latency_ms,
                excerpt=result.excerpt,
                error=result.error,
                outcome=outcome,
                retry_in=retry_in,
            )
        )
        self._flush_wanted.set()

    # -- recording -------------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await self._flush_wanted.wait()
            if len(self._outcomes) < RECORD_BATCH and not self._stopping:
                await asyncio.sleep(RECORD_WAIT)
            self._flush_wanted.clear()
            await self._flush()

    async def _flush(self, *, final: bool = False) -> None:
        """Write the outcomes gathered so far; the batch grows while the previous one writes."""
        async with self._flush_lock:
            await self._flush_locked(final=final)

    async def _flush_locked(self, *, final: bool) -> None:
        failures = 0
        while self._outcomes:
            batch = self._outcomes[:1000]
            try:
                disabled = await outcome_store.record_outcomes(
                    self._ctx.pool,
                    batch,
                    worker=self._worker,
                    disable_after=self._policy.disable_after,
                )
            except (OSError, asyncpg.PostgresError) as exc:
                failures += 1
                log.warning("record_failed", count=len(batch), exc_info=True)
                # A refusal that repeats (it is not the connection) would block every later
                # outcome: give up on the batch. Its leases run out and its deliveries are
                # sent again (at least once). At shutdown, give up sooner.
                if (failures >= 3 and isinstance(exc, store.PERMANENT_ERRORS)) or (
                    final and failures >= 3
                ):
                    log.error("outcomes_dropped", count=len(batch))
                    del self._outcomes[: len(batch)]
                    if final:
                        return
                    failures = 0
                    continue
                await asyncio.sleep(min(0.2 * 2**failures, 5))
                continue
            del self._outcomes[: len(batch)]
            failures = 0
            # The endpoints' slots are free again, and short retries want a timer.
            self._ctx.due.set()
            loop = asyncio.get_running_loop()
            for wait in {round(o.retry_in, 2) for o in batch if o.retry_in is not None}:
                if wait <= _TIMER_HORIZON:
                    loop.call_later(wait, self._ctx.due.set)
            if disabled:
                for d in disabled:
                    self._ctx.metrics.disabled.labels(d.reason).inc()
                try:
                    await dispatcher.announce(self._ctx, disabled)
                except (OSError, asyncpg.PostgresError, RedisError):
                    # Left unannounced in PostgreSQL; the housekeeping sweep retries.
                    log.warning("announce_failed", exc_info=True)

    # -- cross-process wake-ups ------------------------------------------------------------

    async def _listen(self) -> None:
        """LISTEN for the dispatchers of other processes; polling covers any gap."""
        ctx = self._ctx

        def wake(*_: object) -> None:
            ctx.due.set()

        while True:
            conn: asyncpg.Connection | None = None
            try:
                # LISTEN needs a session: the session DSN, not a transaction pooler's.
                conn = await asyncpg.connect(ctx.settings.session_database_url)
                lost = asyncio.Event()
                conn.add_termination_listener(functools.partial(_set_event, lost))
                await conn.add_listener(queue_store.NOTIFY_CHANNEL, wake)
                await lost.wait()
            except (OSError, asyncpg.PostgresError):
                log.warning("listen_failed", exc_info=True)
            finally:
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close(timeout=2))
            await asyncio.sleep(2)
