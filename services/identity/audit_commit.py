"""Group commit of identity's records that have no transaction of their own to join.

A client_credentials token, a failed sign-in, a denied consent store nothing but their record,
and the request is answered only once that record has committed (a token is never answered
without its record). Each used to be its own INSERT and its own commit: under load, one
round trip, one transaction and one WAL flush per token, which cost the token endpoint 15% of
its client_credentials rate in `make bench-quick` (README, "Performance").

Here the records of concurrent requests share one multi-row INSERT, one commit, as databases
do for their log and as the gateway's durable audit does for its XADDs
(services/gateway/audit.py): a record that finds a write free starts one at once (no timer,
so a lone request waits one round trip, not an interval); while MAX_IN_FLIGHT writes are in
flight, the records arriving go together in the next. Each request awaits the
commit of its own batch. A batch that fails fails its requests (the token endpoint answers
500 `server_error`), never a token without its record; a row PostgreSQL refuses (a
constraint, a trigger) is retried alone with each of its batch's rows, so it fails its own
request only.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from libs.common.logging import get_logger
from services.identity import audit
from services.identity.store import audit as audit_store

log = get_logger(__name__)

# Rows of one INSERT: the bound keeps one statement's parameters and its time in PostgreSQL
# small; a backlog larger than this goes in several statements.
MAX_BATCH = 256
# Statements in flight at once. One alone makes the records arriving during a commit wait for
# it to end before theirs can start: about one and a half WAL flushes per request, and the
# flush is what grows when the disk is busy. With two, a batch starts while the other one's
# flush is under way (PostgreSQL flushes concurrent commits together), for at most twice the
# statements.
MAX_IN_FLIGHT = 2

_Waiter = tuple[audit_store.AuditRow, "asyncio.Future[None]"]


class AuditCommitter:
    """Stores identity's records outside any transaction, concurrent ones in one statement."""

    def __init__(
        self, pool: asyncpg.Pool, *, max_batch: int = MAX_BATCH, in_flight: int = MAX_IN_FLIGHT
    ) -> None:
        self._pool = pool
        self._max_batch = max_batch
        self._in_flight = in_flight
        self._pending: list[_Waiter] = []
        self._writers: set[asyncio.Task[None]] = set()

    async def write(self, entry: dict[str, Any]) -> None:
        """Store one record (`audit.record(...)`); returns once it has committed, raises what
        stopped it from committing."""
        await self.write_row(audit.row(audit.new_id(), entry))

    async def write_row(self, row: audit_store.AuditRow) -> None:
        """write() for a record already made into its row (`audit.row`)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((row, done))
        if len(self._writers) < self._in_flight:
            # A task, not this request's own coroutine: a request cancelled (its client
            # gone) must not cancel the write others in its batch wait for.
            writer = asyncio.create_task(self._write_pending())
            self._writers.add(writer)
            writer.add_done_callback(self._writers.discard)
        await done

    async def _write_pending(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: len(batch)]
                await self._store(batch)
        except BaseException:
            # Cancelled (the process stopping): nothing waiting is left waiting for ever.
            for _, done in self._pending:
                _settle(done, RuntimeError("the audit writer stopped"))
            self._pending.clear()
            raise

    async def _store(self, batch: list[_Waiter]) -> None:
        try:
            await audit_store.insert_new(self._pool, [row for row, _ in batch])
        except asyncpg.PostgresError as exc:
            if len(batch) == 1 or not _refused_row(exc):
                for _, done in batch:
                    _settle(done, exc)
                return
            # One row PostgreSQL will not take fails the statement, and so every request of
            # the batch: each row alone, so only the refused ones fail.
            log.warning("audit_batch_refused", rows=len(batch), error=type(exc).__name__)
            for row, done in batch:
                try:
                    await audit_store.insert_new(self._pool, [row])
                except Exception as alone:
                    _settle(done, alone)
                else:
                    _settle(done, None)
            return
        except Exception as exc:
            # The connection lost, PostgreSQL away: nothing of the batch is known to have
            # committed. The next batch tries again.
            for _, done in batch:
                _settle(done, exc)
            return
        except BaseException:
            # The writer cancelled (the process stopping).
            for _, done in batch:
                _settle(done, RuntimeError("the audit writer stopped"))
            raise
        for _, done in batch:
            _settle(done, None)

    async def close(self) -> None:
        """Let the writes in flight, and the backlog, finish (the process is stopping)."""
        if self._writers:
            await asyncio.gather(*self._writers, return_exceptions=True)


def _refused_row(exc: asyncpg.PostgresError) -> bool:
    """An error a row's own values or a rule on the table cause, not the database's state:
    retried row by row it fails that row only. Connection-level errors (class 08), shutdown
    (57) and resources (53) would fail each row the same way, so they fail the batch."""
    state = getattr(exc, "sqlstate", "") or ""
    return not state.startswith(("08", "53", "57", "58"))


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    """Answer a waiting request, unless it is gone (cancelled: its client hung up)."""
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)
