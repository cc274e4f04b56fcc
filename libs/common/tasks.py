"""Stopping a service's background loops within a bound.

A cancel can be lost inside redis-py's blocking reads (XREAD/XREADGROUP with BLOCK): the
library catches the CancelledError while tearing the connection down and the loop carries on.
A shutdown that simply awaited such a task would hang forever, so stopping here asks first
(the loops' stop event), then cancels repeatedly until each task has ended or the bound is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from libs.common.logging import get_logger

log = get_logger(__name__)


async def stop_all(
    tasks: Sequence[asyncio.Task[Any]],
    *,
    stop: asyncio.Event | None = None,
    grace: float = 5.0,
    cancel_for: float = 3.0,
) -> None:
    """End `tasks`: set `stop`, allow `grace` seconds, then cancel until `cancel_for` is up."""
    pending = {t for t in tasks if not t.done()}
    if stop is not None:
        stop.set()
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace)
            pending = set(still)
    deadline = asyncio.get_running_loop().time() + cancel_for
    while pending and asyncio.get_running_loop().time() < deadline:
        for task in pending:
            task.cancel()
        _, still = await asyncio.wait(pending, timeout=0.05)
        pending = set(still)
    for task in pending:
        log.warning("background_task_did_not_stop", task=task.get_name())
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("background_task_failed", task=task.get_name(), exc_info=task.exception())


# -- Supervision ------------------------------------------------------------------------------
# A background loop that ends (an exception, or a return while the service still runs) used to
# end for good while the process stayed "healthy". Every long-running loop of a service runs
# under a Supervisor instead: it is restarted with backoff, its restarts are counted, and the
# service's liveness and readiness say when one is dead or failing (web.py's /healthz, /readyz).

BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
# A loop that ran this long before failing starts its backoff afresh: it had recovered.
BACKOFF_RESET_AFTER = 30.0
# Readiness fails while a loop has been failing (without one clean run of BACKOFF_RESET_AFTER)
# for this long: long enough to ride out a Redis failover, short enough for a balancer to notice.
NOT_READY_AFTER = 10.0
STEADY_AFTER = 2.0


@dataclass
class LoopState:
    name: str
    restarts: int = 0
    last_error: str | None = None
    # Since when the loop has been failing without a clean stretch; None while it runs well.
    failing_since: float | None = None
    # When the current run began; None between runs (during a backoff).
    running_since: float | None = None


class Supervisor:
    """Runs a service's background loops, restarting any that ends while `stop` is unset."""

    def __init__(
        self,
        stop: asyncio.Event,
        *,
        on_restart: Callable[[str], None] | None = None,
        not_ready_after: float = NOT_READY_AFTER,
        steady_after: float = STEADY_AFTER,
    ):
        self.stop = stop
        # The readiness thresholds (NOT_READY_AFTER, STEADY_AFTER); shorter in tests.
        self.not_ready_after = not_ready_after
        self.steady_after = steady_after
        self.loops: dict[str, LoopState] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._on_restart = on_restart

    def start(self, name: str, run: Callable[[], Awaitable[Any]]) -> asyncio.Task[None]:
        """Supervise `run()`: call it again, after a backoff, each time it raises or returns."""
        state = self.loops[name] = LoopState(name)
        task = asyncio.create_task(self._keep(state, run), name=name)
        self._tasks.append(task)
        return task

    @property
    def tasks(self) -> list[asyncio.Task[None]]:
        return list(self._tasks)

    async def _keep(self, state: LoopState, run: Callable[[], Awaitable[Any]]) -> None:
        loop = asyncio.get_running_loop()
        delay = BACKOFF_FIRST
        while not self.stop.is_set():
            began = state.running_since = loop.time()
            try:
                await run()
                if self.stop.is_set():
                    return
                state.last_error = "returned"
                log.error("background_loop_returned", task=state.name)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # whatever ended it, the loop must go on
                if self.stop.is_set():
                    return
                state.last_error = type(exc).__name__
                log.error("background_loop_failed", task=state.name, exc_info=exc)
            state.running_since = None
            now = loop.time()
            if now - began >= BACKOFF_RESET_AFTER:
                delay = BACKOFF_FIRST
                state.failing_since = now
            elif state.failing_since is None:
                state.failing_since = began
            state.restarts += 1
            if self._on_restart is not None:
                self._on_restart(state.name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), timeout=delay * random.uniform(0.8, 1.2))  # noqa: S311 (jitter)
            delay = min(delay * 2, BACKOFF_MAX)

    def alive(self) -> bool:
        """Liveness: every supervising task still runs (none was cancelled from outside)."""
        return all(not task.done() for task in self._tasks) or self.stop.is_set()

    def ready(self) -> bool:
        """Readiness: no loop has been failing for longer than `not_ready_after` (a loop running
        again for `steady_after` seconds since its last restart counts as recovered)."""
        now = asyncio.get_running_loop().time()
        return all(
            state.failing_since is None
            or now - state.failing_since < self.not_ready_after
            or (state.running_since is not None and now - state.running_since >= self.steady_after)
            for state in self.loops.values()
        )

    def ran_cleanly(self, name: str) -> None:
        """A loop reports a clean unit of work (a read, a batch), ending its failing stretch."""
        state = self.loops.get(name)
        if state is not None:
            state.failing_since = None

    async def close(self, *, grace: float = 5.0) -> None:
        await stop_all(self._tasks, stop=self.stop, grace=grace)
