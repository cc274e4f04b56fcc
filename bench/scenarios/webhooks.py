"""Webhooks: deliveries per second from an append to `connect:events` to a local receiver
(bench/receiver.py, a process of its own), and end-to-end latency at a fixed offered rate.

Subscriptions are made the way a partner makes them: `POST /api/v1/webhooks` through the
gateway with a user's access token. The burst appends a backlog of `course.updated` events
(each fanned out to every burst subscription) and times until the receiver has them all; the
paced run appends `course.published` events (one subscription) at the offered rate and the
receiver measures each one's latency from the `sent_at` written into the event. The baseline
is the receiver's own capacity under direct POSTs from wrk.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import redis.asyncio as redis_asyncio

from bench.measure import NOISY_SHARE, Context
from bench.procs import CpuMeter
from bench.report import Row, ratio
from bench.world import pg_backend_pids


def course_event(ctx: Context, kind: str, n: int, run: str) -> dict[str, Any]:
    """A school API event as the outbox relay appends it: the row as the API shows it."""
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return {
        "id": f"evt_bench_{run}_{n}",
        "type": kind,
        "school_id": ctx.world.school_id,
        "occurred_at": now,
        "data": {
            "id": n,
            "school_id": ctx.world.school_id,
            "title": f"Watercolour Foundations {n}",
            "description": "Materials, washes, wet-in-wet and glazing, step by step.",
            "status": "published",
            "price_cents": 4900,
            "lecturer_id": 1,
            "created_at": now,
            "updated_at": now,
            "run": run,
            "sent_at": time.time(),
        },
    }


async def _subscribe(
    ctx: Context, http: aiohttp.ClientSession, channel: str, event_types: list[str]
) -> str:
    s = ctx.system
    async with http.post(
        s.url(s.ports.gateway) + "/api/v1/webhooks",
        json={"url": f"{s.url(s.ports.receiver)}/hook/{channel}", "event_types": event_types},
        headers={"Host": s.host, "Authorization": f"Bearer {ctx.bearer}"},
    ) as resp:
        body = await resp.json()
        if resp.status != 201:
            raise RuntimeError(f"subscribing answered {resp.status}: {body}")
        return str(body["id"])


async def _stats(http: aiohttp.ClientSession, ctx: Context, channel: str) -> dict[str, Any]:
    s = ctx.system
    async with http.get(f"{s.url(s.ports.receiver)}/stats/{channel}") as resp:
        stats: dict[str, Any] = orjson.loads(await resp.read())
        return stats


async def _wait_for(
    http: aiohttp.ClientSession, ctx: Context, channels: list[str], total: int, timeout: float
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        stats = [await _stats(http, ctx, c) for c in channels]
        if sum(st["unique"] for st in stats) >= total or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.05)


async def subscriptions(ctx: Context) -> None:
    async with aiohttp.ClientSession() as http:
        for i in range(ctx.plan.webhook_subscriptions):
            await _subscribe(ctx, http, f"burst{i}", ["course.updated"])
        await _subscribe(ctx, http, "paced", ["course.published"])
        await _subscribe(ctx, http, "soak", ["course.deleted"])


async def paced_appends(
    ctx: Context, client: redis_asyncio.Redis, kind: str, rate: int, seconds: float, run: str
) -> int:
    """Append `rate` events a second for `seconds`, in ticks of 2 ms; returns how many."""
    stream = ctx.system.prefix + "connect:events"
    run = re.sub(r"[^A-Za-z0-9_-]+", "-", run)  # it becomes part of the event id
    started = time.monotonic()
    sent = 0
    total = int(rate * seconds)
    while sent < total:
        due = min(total, int((time.monotonic() - started) * rate) + 1)
        if due > sent:
            pipe = client.pipeline(transaction=False)
            for n in range(sent, due):
                event = course_event(ctx, kind, n, run)
                pipe.xadd(stream, {b"data": orjson.dumps(event)}, maxlen=100_000, approximate=True)
            await pipe.execute()
            sent = due
        await asyncio.sleep(0.002)
    return sent


async def run(ctx: Context) -> list[Row]:
    s, plan = ctx.system, ctx.plan
    receiver, webhooks = s.pid("receiver"), s.pid("webhooks")
    channels = [f"burst{i}" for i in range(plan.webhook_subscriptions)]

    # Baseline: the receiver under direct POSTs (a delivery's body and headers).
    body = orjson.dumps(course_event(ctx, "course.updated", 0, "direct")).decode()
    direct = await ctx.wrk(
        "receiver, direct POSTs",
        s.url(s.ports.receiver),
        "static.lua",
        duration=plan.receiver_s,
        connections=plan.connections,
        groups={"receiver": [receiver]},
        env={
            "BENCH_METHOD": "POST",
            "BENCH_PATH": "/hook/direct",
            "BENCH_BODY": body,
            "BENCH_HEADERS": "Content-Type: application/json\nwebhook-id: evt_bench_direct\n"
            "webhook-timestamp: 1700000000\nwebhook-signature: v1,"
            "K5oZfzN95Z9UVu1EsfQmfVNQhnkZ2pj9o9NDN/H/pI4=",
        },
    )
    ctx.say("  " + direct.line("receiver"))

    client = redis_asyncio.Redis.from_url(s.redis_url)
    http = aiohttp.ClientSession()
    try:
        # Burst: a backlog, drained as fast as the service goes.
        n = plan.webhook_burst_events
        total = n * len(channels)
        ctx.say(f"webhooks burst: {n} events × {len(channels)} subscriptions = {total} deliveries")
        stream = s.prefix + "connect:events"
        meter = CpuMeter()
        groups = {
            "webhooks": [webhooks],
            "receiver": [receiver],
            "harness": [os.getpid()],
            "redis": s.redis_pids(),
        }
        meter.begin({**groups, "postgres": await pg_backend_pids(s.database_url)})
        t0 = time.time()
        for start in range(0, n, 500):
            pipe = client.pipeline(transaction=False)
            for i in range(start, min(n, start + 500)):
                event = course_event(ctx, "course.updated", i, "burst")
                pipe.xadd(stream, {b"data": orjson.dumps(event)}, maxlen=100_000, approximate=True)
            await pipe.execute()
        appended = time.time() - t0
        stats = await _wait_for(http, ctx, channels, total, timeout=max(30.0, total / 200))
        cpu = meter.end({"postgres": await pg_backend_pids(s.database_url)})
        delivered = sum(st["unique"] for st in stats)
        received = sum(st["count"] for st in stats)
        last = max(st["last_at"] for st in stats)
        window = max(1e-6, last - t0)
        burst_rate = delivered / window
        cpu_ms = cpu.total("webhooks") * 1000 / max(1, delivered)
        cpu_all = cpu.total("webhooks", "postgres", "redis") * 1000 / max(1, delivered)
        burst_other = cpu.other_share()
        ctx.say(
            f"  {delivered}/{total} delivered in {window:.2f}s = {burst_rate:,.0f}/s "
            f"(appends took {appended:.2f}s), duplicates {received - delivered}, "
            f"cpu {cpu_ms:.2f} ms/delivery webhooks, {cpu_all:.2f} with stores, "
            f"other {burst_other:.0%}" + (" NOISY" if burst_other > NOISY_SHARE else "")
        )

        # Paced: end-to-end latency at the offered rate.
        rate, seconds = plan.webhook_rate, plan.webhook_latency_s
        ctx.say(f"webhooks paced: {rate}/s for {seconds:g}s, latency append → receiver")
        meter = CpuMeter()
        meter.begin({**groups, "postgres": await pg_backend_pids(s.database_url)})
        sent = await paced_appends(ctx, client, "course.published", rate, seconds, "paced")
        (paced,) = await _wait_for(http, ctx, ["paced"], sent, timeout=30)
        paced_cpu = meter.end({"postgres": await pg_backend_pids(s.database_url)})
        paced_other = paced_cpu.other_share()
        ctx.say(
            f"  {paced['unique']}/{sent} delivered, p50 {paced['p50_ms']:.1f} ms, "
            f"p99 {paced['p99_ms']:.1f} ms, max {paced['max_ms']:.1f} ms, "
            f"other {paced_other:.0%}" + (" NOISY" if paced_other > NOISY_SHARE else "")
        )
    finally:
        await http.close()
        await client.aclose()

    base = direct.result.rps
    ctx.details["webhooks"] = {
        "receiver_direct": direct.as_dict(),
        "burst": {
            "events": n,
            "subscriptions": len(channels),
            "deliveries_expected": total,
            "delivered": delivered,
            "duplicates": received - delivered,
            "window_s": window,
            "appends_s": appended,
            "rate": burst_rate,
            "cpu_seconds": cpu.seconds,
            "other_cpu_share": burst_other,
            "webhooks_cpu_ms_per_delivery": cpu_ms,
            "all_cpu_ms_per_delivery": cpu_all,
            "per_channel": stats,
        },
        "paced": {
            "offered_rate": rate,
            "seconds": seconds,
            "sent": sent,
            **paced,
            "cpu_seconds": paced_cpu.seconds,
            "other_cpu_share": paced_other,
        },
    }
    complete = delivered >= total
    p99 = paced["p99_ms"] if paced["p99_ms"] is not None else float("inf")
    p50 = paced["p50_ms"] if paced["p50_ms"] is not None else float("inf")
    return [
        Row(
            "webhooks: deliveries/s",
            f"{burst_rate:,.0f}/s ({delivered}/{total} in {window:.1f}s), cpu {cpu_ms:.2f} "
            f"ms/delivery ({cpu_all:.2f} with stores)"
            + (" (noisy)" if burst_other > NOISY_SHARE else ""),
            f"receiver under direct POSTs {base:,.0f}/s",
            ratio(burst_rate, base),
            "≥ 2,000/s",
            ("met" if burst_rate >= 2000 and complete else "NOT MET")
            + ("" if complete else " (incomplete)"),
            {"rate": burst_rate, "receiver_rps": base},
        ),
        Row(
            f"webhooks: latency at {rate}/s",
            f"p50 {p50:.1f} / p99 {p99:.1f} ms, {paced['unique']}/{sent} delivered"
            + (" (noisy)" if paced_other > NOISY_SHARE else ""),
            "—",
            "—",
            "p99 ≤ 100 ms",
            "met" if p99 <= 100 and paced["unique"] >= sent else "NOT MET",
            {"p50_ms": p50, "p99_ms": p99, "sent": sent, "delivered": paced["unique"]},
        ),
    ]
