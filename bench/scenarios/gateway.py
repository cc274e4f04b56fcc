"""Gateway: an authenticated `GET /api/v1/courses` through the gateway, against the same
request straight to the school API (identity headers and internal token sent by wrk) and
through a bare aiohttp pass-through proxy (bench/bare_proxy.py).

Runs alternate (gateway, bare proxy, direct, direct, bare proxy, gateway) so machine noise
falls on all of them, first at the throughput concurrency, then, for plan.latency_rounds
rounds, at a light one where queueing is small and the p99 difference is the latency the
gateway's checks add.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import aiohttp
import redis.asyncio as redis_asyncio

from bench.measure import Context, Measured
from bench.report import Row, ratio
from libs.common.config import load_settings

PATH = "/api/v1/courses"
# identity's consumer group on connect:audit (services/identity/audit_consumer.py GROUP).
AUDIT_GROUP = "identity-audit"


def _identity_headers(ctx: Context) -> str:
    """What the gateway sends upstream for this token (services/gateway/checks.py)."""
    c = ctx.claims
    host = ctx.system.host
    return "\n".join(
        [
            f"X-Connect-School-Id: {c['school_id']}",
            f"X-Connect-Subject: {c['sub']}",
            f"X-Connect-Client-Id: {c['client_id']}",
            f"X-Connect-Scopes: {c['scope']}",
            f"X-Connect-Grant-Id: {c['grant_id']}",
            f"X-Connect-Internal-Token: {ctx.system.env['INTERNAL_TOKEN']}",
            "X-Forwarded-For: 127.0.0.1",
            "X-Forwarded-Proto: http",
            f"X-Forwarded-Host: {host}",
        ]
    )


async def _same_answer(ctx: Context, targets: dict[str, tuple[str, dict[str, str]]]) -> None:
    """Each variant answers 200 with the same courses before anything is measured."""
    bodies = {}
    async with aiohttp.ClientSession() as http:
        for name, (url, headers) in targets.items():
            async with http.get(url + PATH, headers=headers) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{name} answered {resp.status}: {body[:200]!r}")
                bodies[name] = len(body)
    if len(set(bodies.values())) != 1:
        raise RuntimeError(f"the variants answer differently: {bodies}")


async def _audit_backlog(client: redis_asyncio.Redis, stream: str) -> tuple[int, float]:
    """The audit entries identity had not stored when a run ended, and how long it took to
    store them: a consumer falling behind would leave its work (and its CPU) outside the
    measured window and flatter the gateway's figures."""
    began = time.monotonic()
    behind = -1
    while time.monotonic() - began < 30:
        groups = await client.xinfo_groups(stream)
        group = next((g for g in groups if g["name"] == AUDIT_GROUP.encode()), None)
        if group is None:
            return 0, 0.0
        lag = int(group.get("lag") or 0) + int(group["pending"])
        if behind < 0:
            behind = lag
        if lag == 0:
            break
        await asyncio.sleep(0.005)
    return behind, time.monotonic() - began


async def run(ctx: Context) -> list[Row]:
    s = ctx.system
    plan = ctx.plan
    gw, sa, bare = s.pid("gateway"), s.pid("school-api"), s.pid("bare-proxy")
    ident = s.pid("identity")
    direct_headers = _identity_headers(ctx)
    variants = {
        "gateway": (
            s.url(s.ports.gateway),
            {"BENCH_HOST": s.host, "BENCH_HEADERS": f"Authorization: Bearer {ctx.bearer}"},
            # identity consumes the gateway's audit records (stream → PostgreSQL).
            {"front": [gw], "school_api": [sa], "identity": [ident]},
        ),
        "direct": (
            s.url(s.ports.school_api),
            {"BENCH_HOST": s.host, "BENCH_HEADERS": direct_headers},
            {"school_api": [sa]},
        ),
        "bare proxy": (
            s.url(s.ports.bare_proxy),
            {"BENCH_HOST": s.host, "BENCH_HEADERS": direct_headers},
            {"front": [bare], "school_api": [sa]},
        ),
    }

    def as_headers(env: dict[str, str]) -> dict[str, str]:
        out = {"Host": env["BENCH_HOST"]}
        for line in env["BENCH_HEADERS"].splitlines():
            name, _, value = line.partition(": ")
            out[name] = value
        return out

    await _same_answer(ctx, {k: (v[0], as_headers(v[1])) for k, v in variants.items()})

    for name, (url, env, groups) in variants.items() if plan.variant_warmup else ():
        await ctx.wrk(
            f"warm-up {name}",
            url,
            "static.lua",
            duration=plan.warmup_s,
            connections=plan.connections,
            groups=groups,
            env={**env, "BENCH_PATH": PATH},
        )
    runs: dict[str, dict[str, list[Measured]]] = {"load": {}, "light": {}}
    redis_client = redis_asyncio.Redis.from_url(s.redis_url)
    audit_stream = s.prefix + "connect:audit"
    backlog: list[tuple[int, float]] = []
    # ABBA: each variant twice, symmetric in time, so a burst of other load or a drift of the
    # machine's speed falls on all of them alike.
    order = ["gateway", "bare proxy", "direct", "direct", "bare proxy", "gateway"]
    try:
        for level, conns, seconds, rounds in (
            ("load", plan.connections, plan.gateway_s, 1),
            ("light", plan.latency_connections, plan.gateway_latency_s, plan.latency_rounds),
        ):
            ctx.say(
                f"gateway scenario, c={conns}: {', '.join(order)} ({seconds:g}s each)"
                + (f", {rounds} rounds" if rounds > 1 else "")
            )
            for name in order * rounds:
                url, env, groups = variants[name]
                m = await ctx.wrk(
                    f"{name} c={conns}",
                    url,
                    "static.lua",
                    duration=seconds,
                    connections=conns,
                    groups=groups,
                    env={**env, "BENCH_PATH": PATH},
                    quiet_wait=5 if plan.peer else 0,
                )
                ctx.say("  " + m.line(*(["front"] if "front" in groups else ["school_api"])))
                runs[level].setdefault(name, []).append(m)
                if name == "gateway":
                    backlog.append(await _audit_backlog(redis_client, audit_stream))
                    ctx.say(
                        f"  audit trail: {backlog[-1][0]} entries unstored when the run ended, "
                        f"stored {backlog[-1][1] * 1000:.0f} ms later"
                    )
    finally:
        await redis_client.aclose()

    def avg(level: str, name: str, attr: str) -> float:
        return statistics.fmean(getattr(m.result, attr) for m in runs[level][name])

    def median(level: str, name: str, attr: str) -> float:
        return statistics.median(getattr(m.result, attr) for m in runs[level][name])

    def cpu(level: str, name: str, *labels: str) -> float:
        return statistics.fmean(m.cpu_ms_per_req(*labels) for m in runs[level][name])

    every = ("front", "school_api", "identity", "postgres", "redis")
    g_rps, b_rps, d_rps = (avg("load", n, "rps") for n in ("gateway", "bare proxy", "direct"))
    g_p99_light = median("light", "gateway", "p99_ms")
    b_p99_light = median("light", "bare proxy", "p99_ms")
    d_p99_light = median("light", "direct", "p99_ms")
    added_vs_bare = g_p99_light - b_p99_light
    added_vs_direct = g_p99_light - d_p99_light
    errors = sum(m.result.errors for level in runs.values() for ms in level.values() for m in ms)
    share = g_rps / b_rps if b_rps else 0.0
    # On a machine where every process shares the same cores, req/s goes as 1 / (CPU per
    # request of everything the call touched): a steadier view of the same ratio.
    cpu_share = cpu("load", "bare proxy", *every) / cpu("load", "gateway", *every)
    # GATEWAY_AUDIT_MODE as the gateways run it (services/gateway/audit.py): durable answers a
    # call only once its record is on the stream, a Redis round trip more per call.
    audit_mode = load_settings(s.env).gateway.audit_mode
    ctx.details["gateway"] = {
        "path": PATH,
        "audit_mode": audit_mode,
        "runs": {
            level: {name: [m.as_dict() for m in ms] for name, ms in by_name.items()}
            for level, by_name in runs.items()
        },
        "gateway_rps": g_rps,
        "bare_proxy_rps": b_rps,
        "direct_rps": d_rps,
        "share_of_bare_proxy": share,
        "share_of_bare_proxy_by_cpu": cpu_share,
        "p99_added_vs_bare_ms": added_vs_bare,
        "p99_added_vs_direct_ms": added_vs_direct,
        "gateway_front_cpu_ms_per_req": cpu("load", "gateway", "front"),
        "bare_proxy_front_cpu_ms_per_req": cpu("load", "bare proxy", "front"),
        "school_api_cpu_ms_per_req": cpu("load", "direct", "school_api"),
        "errors": errors,
        "audit_backlog_entries_max": max((b[0] for b in backlog), default=0),
        "audit_drain_ms_max": max((b[1] for b in backlog), default=0.0) * 1000,
    }
    c = plan.connections
    lc = plan.latency_connections
    n_light = len(runs["light"]["gateway"])
    ours = (
        f"{g_rps:,.0f} req/s (c={c}) p50 {avg('load', 'gateway', 'p50_ms'):.1f} / "
        f"p99 {avg('load', 'gateway', 'p99_ms'):.1f} ms; cpu {cpu('load', 'gateway', 'front'):.2f}"
        f" ms/req gateway, {cpu('load', 'gateway', *every):.2f} all; audit {audit_mode}, trail"
        f" stored within {ctx.details['gateway']['audit_drain_ms_max']:.0f} ms of each run's end"
    )
    baseline = (
        f"bare proxy {b_rps:,.0f} req/s p99 {avg('load', 'bare proxy', 'p99_ms'):.1f} ms, cpu "
        f"{cpu('load', 'bare proxy', 'front'):.2f} ms/req proxy; direct {d_rps:,.0f} req/s "
        f"p99 {avg('load', 'direct', 'p99_ms'):.1f} ms, cpu {cpu('load', 'direct', *every):.2f}"
        " all"
    )
    rows = [
        Row(
            "gateway: throughput",
            ours,
            baseline,
            f"{ratio(g_rps, b_rps)} of bare proxy ({cpu_share:.2f}× by CPU per request), "
            f"{ratio(g_rps, d_rps)} of direct",
            "≥ 0.80× bare proxy",
            ("met" if share >= 0.8 else "NOT MET") + (f" ({errors} errors)" if errors else ""),
            {"gateway_rps": g_rps, "bare_proxy_rps": b_rps, "direct_rps": d_rps},
        ),
        Row(
            "gateway: p99 added",
            f"{added_vs_bare:+.2f} ms vs bare proxy, {added_vs_direct:+.2f} ms vs direct "
            f"(p99 {g_p99_light:.2f} ms at c={lc}, median of {n_light} runs; audit {audit_mode})",
            f"bare proxy p99 {b_p99_light:.2f} ms, direct p99 {d_p99_light:.2f} ms (c={lc})",
            "—",
            "≤ 1 ms added",
            "met" if added_vs_bare <= 1.0 else "NOT MET",
            {"added_vs_bare_ms": added_vs_bare, "added_vs_direct_ms": added_vs_direct},
        ),
    ]
    return rows
