"""The school API as MCP tools reach it: over the gateway's pooled `school_api` session, with
the identity headers a protected call carries, each call audited like one made directly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from yarl import URL

from libs.common.logging import get_logger
from services.gateway.mcp.auth import Caller

log = get_logger(__name__)

UPSTREAM = "school_api"
# A tool's answer when its call cannot be recorded: like a protected call's 503, not served.
UNRECORDABLE = (
    "temporarily_unavailable: the gateway cannot record this call in the audit trail right "
    "now; retry shortly."
)


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: Any  # the decoded JSON, None when there was none


class Unreachable(Exception):
    """The school API did not answer (connect failure, timeout, unreadable answer)."""


async def call(
    caller: Caller,
    method: str,
    path: str,
    *,
    query: Mapping[str, str] | None = None,
    body: Mapping[str, Any] | None = None,
    scope: str | None = None,
) -> Answer:
    """One school API call on the caller's behalf; `scope` is the granted scope that allowed it,
    for the audit record."""
    ctx = caller.ctx
    headers = caller.upstream_headers.copy()
    data = None
    if body is not None:
        data = orjson.dumps(body)
        headers["Content-Type"] = "application/json"
    url = URL(ctx.upstreams.urls[UPSTREAM] + path).with_query(query or {})
    # Its record's place first: a call that cannot be recorded is not made.
    slot = caller.reserve()
    if slot is None:
        raise Unreachable(UNRECORDABLE)
    # Recorded however it ends: 500 (what aiohttp answers) if it raised, 499 if cancelled.
    status = 500
    started = time.perf_counter()
    try:
        async with ctx.upstreams.session(UPSTREAM).request(
            method, url, headers=headers, data=data, allow_redirects=False
        ) as resp:
            ctx.metrics.upstream_latency.labels(UPSTREAM).observe(time.perf_counter() - started)
            raw = await resp.read()
            status = resp.status
    except TimeoutError:
        status = 504
        ctx.metrics.upstream_errors.labels(UPSTREAM, "timeout").inc()
        log.warning("upstream_timeout", upstream=UPSTREAM)
        raise Unreachable("The school API took too long to answer.") from None
    except aiohttp.ClientError as exc:
        status = 502
        ctx.metrics.upstream_errors.labels(UPSTREAM, "connect").inc()
        log.warning("upstream_failed", upstream=UPSTREAM, error=type(exc).__name__)
        raise Unreachable("The school API did not answer.") from None
    except asyncio.CancelledError:
        status = 499
        raise
    finally:
        number = slot.fill(caller.record(method, path, status, scope))
    # Durable mode: the tool's answer carries what the call returned, so it waits for the
    # call's record like any answer the gateway gives.
    if not await ctx.audit.written(number):
        raise Unreachable(UNRECORDABLE)
    try:
        decoded = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        ctx.metrics.upstream_errors.labels(UPSTREAM, "protocol").inc()
        raise Unreachable("The school API answered something other than JSON.") from None
    return Answer(status, decoded)
