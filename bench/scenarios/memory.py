"""Memory: the peak RSS (VmHWM) of every service process over the whole run, and RSS after a
soak against RSS after the soak's warm-up (VmRSS from /proc/<pid>/status).

The soak is a steady mix through the gateway (authenticated API reads alternating with
client_credentials grants, from wrk) while events are appended for the webhooks service to
deliver, so every service works through it.
"""

from __future__ import annotations

import asyncio
import os

import redis.asyncio as redis_asyncio

from bench.measure import Context
from bench.procs import memory
from bench.report import Row
from bench.scenarios.webhooks import paced_appends

SERVICES = ("identity", "gateway", "gateway-2", "school-api", "webhooks")
HELPERS = ("bare-proxy", "receiver")
LIMIT_MB = 150.0
# RSS may move a little with the allocator; more than this between the two snapshots is growth.
GROWTH_MB = 8.0
GROWTH_SHARE = 0.05
SOAK_CONNECTIONS = 16
SOAK_EVENTS_PER_S = 100


def snapshot(ctx: Context) -> dict[str, dict[str, float]]:
    out = {}
    for name in (*SERVICES, *HELPERS):
        mem = memory(ctx.system.pid(name))
        if mem is not None:
            out[name] = {"rss_mb": round(mem.rss_mb, 1), "hwm_mb": round(mem.hwm_mb, 1)}
    return out


async def _soak(ctx: Context, seconds: float, label: str) -> None:
    s, w = ctx.system, ctx.world
    env = {
        "BENCH_HOST": s.host,
        "BENCH_BEARER": ctx.bearer,
        "BENCH_API_PATH": "/api/v1/courses",
        "BENCH_BASIC": w.basic(),
        "BENCH_CC_BODY": "grant_type=client_credentials",
    }
    client = redis_asyncio.Redis.from_url(s.redis_url)
    try:
        load = asyncio.create_task(
            ctx.wrk(
                label,
                s.url(s.ports.gateway),
                "soak.lua",
                duration=seconds,
                connections=SOAK_CONNECTIONS,
                groups={
                    "gateway": [s.pid("gateway")],
                    "identity": [s.pid("identity")],
                    "school_api": [s.pid("school-api")],
                    "webhooks": [s.pid("webhooks")],
                    # Not the system under test, but on the machine: counted, not "other".
                    "receiver": [s.pid("receiver")],
                    "harness": [os.getpid()],
                },
                env=env,
            )
        )
        await paced_appends(
            ctx, client, "course.deleted", SOAK_EVENTS_PER_S, max(0.0, seconds - 0.5), label
        )
        measured = await load
        ctx.say("  " + measured.line("gateway", "identity", "school_api"))
        ctx.details.setdefault("memory", {})[label] = measured.as_dict()
    finally:
        await client.aclose()


async def run(ctx: Context, at_ready: dict[str, dict[str, float]]) -> list[Row]:
    plan = ctx.plan
    ctx.say(f"soak: warm-up {plan.soak_warmup_s:g}s, then {plan.soak_s:g}s (memory)")
    await _soak(ctx, plan.soak_warmup_s, "soak warm-up")
    await asyncio.sleep(0.5)
    warm = snapshot(ctx)
    await _soak(ctx, plan.soak_s, "soak")
    await asyncio.sleep(0.5)
    after = snapshot(ctx)
    rows = []
    worst_peak = ("", 0.0)
    growing = []
    for name in SERVICES:
        if name not in after or name not in warm:
            continue
        peak = after[name]["hwm_mb"]
        growth = after[name]["rss_mb"] - warm[name]["rss_mb"]
        allowed = max(GROWTH_MB, warm[name]["rss_mb"] * GROWTH_SHARE)
        if peak > worst_peak[1]:
            worst_peak = (name, peak)
        if growth > allowed:
            growing.append(name)
        ctx.say(
            f"  {name:<11} ready {at_ready.get(name, {}).get('rss_mb', 0):6.1f} MB  "
            f"after warm-up {warm[name]['rss_mb']:6.1f} MB  after soak "
            f"{after[name]['rss_mb']:6.1f} MB ({growth:+.1f})  peak {peak:6.1f} MB"
        )
    for name in HELPERS:
        if name in after:
            ctx.say(f"  {name:<11} (bench helper) peak {after[name]['hwm_mb']:.1f} MB")
    ctx.details.setdefault("memory", {}).update(
        {
            "at_ready": at_ready,
            "after_soak_warmup": warm,
            "after_soak": after,
            "soak_s": plan.soak_s,
            "limit_mb": LIMIT_MB,
            "growth_allowed_mb": f"max({GROWTH_MB}, {GROWTH_SHARE:.0%} of the warm-up RSS)",
        }
    )
    over = [n for n in SERVICES if n in after and after[n]["hwm_mb"] > LIMIT_MB]
    verdict = "met" if not over and not growing else "NOT MET"
    notes = []
    if over:
        notes.append("over 150 MB: " + ", ".join(over))
    if growing:
        notes.append("grew: " + ", ".join(growing))
    growths = {
        n: after[n]["rss_mb"] - warm[n]["rss_mb"] for n in SERVICES if n in after and n in warm
    }
    most = max(growths, key=lambda n: growths[n])
    rows.append(
        Row(
            "memory",
            f"peak {worst_peak[1]:.0f} MB ({worst_peak[0]}); others "
            + ", ".join(
                f"{n} {after[n]['hwm_mb']:.0f}"
                for n in SERVICES
                if n in after and n != worst_peak[0]
            )
            + f" MB; after {plan.soak_s:g}s soak vs its warm-up: largest change "
            f"{growths[most]:+.1f} MB ({most})",
            "—",
            "—",
            "≤ 150 MB each, no growth",
            verdict + (f" ({'; '.join(notes)})" if notes else ""),
            {"peak_mb": worst_peak[1], "worst": worst_peak[0], "growth_mb": growths},
        )
    )
    return rows
