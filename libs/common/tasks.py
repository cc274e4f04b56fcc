"""Stopping a service's background loops within a bound.

A cancel can be lost inside redis-py's blocking reads (XREAD/XREADGROUP with BLOCK): the
library catches the CancelledError while tearing the connection down and the loop carries on.
A shutdown that simply awaited such a task would hang forever, so stopping here asks first
(the loops' stop event), then cancels repeatedly until each task has ended or the bound is up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
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
