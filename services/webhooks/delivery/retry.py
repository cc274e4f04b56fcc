"""When a failed attempt is tried again: the retry policy.

An attempt that got a 2xx is delivered; a 410 Gone is final and disables the subscription; any
other failure is retried after the next wait of WEBHOOK_RETRY_SCHEDULE, stretched to the
receiver's Retry-After (RFC 9110 10.2.3, on 429 and 503) up to
WEBHOOK_RETRY_AFTER_MAX_SECONDS, and dead-lettered once the schedule is spent. A manual retry
gets one attempt.
"""

from __future__ import annotations

import email.utils
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.webhooks.delivery.attempt import AttemptResult


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP-date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def classify(
    result: AttemptResult,
    *,
    attempt_number: int,
    manual: bool,
    schedule: Sequence[float],
    retry_after_max: float,
) -> tuple[str, float | None]:
    """The outcome of an attempt and, for a retry, the wait before the next one."""
    if result.ok:
        return "delivered", None
    if result.status == 410:
        return "gone", None
    if manual or attempt_number > len(schedule):
        return "dead", None
    wait = schedule[attempt_number - 1]
    if result.retry_after is not None:
        # Never sooner than the receiver asked, never later than we are willing to wait.
        wait = max(wait, min(result.retry_after, retry_after_max))
    return "retry", wait
