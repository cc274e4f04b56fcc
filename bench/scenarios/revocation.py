"""Revocation: once the revoke has answered, no call with the grant's token succeeds at any
gateway. Two gateway processes; many trials, each on a grant of its own:

1. a user token from the real code exchange; both gateways verify (and cache) it: 200;
2. calls hammer both gateways from several loops each while the token is revoked through the
   RFC 7009 endpoint (`POST /v1/oauth/revoke` on the public origin);
3. every call that STARTED after the revoke answered must be refused (401); the count of those
   that succeeded is the figure (goal: 0, always). Also the time from sending the revoke to
   each gateway's first 401.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass

import aiohttp
import redis.asyncio as redis_asyncio

from bench.measure import Context
from bench.report import Row
from bench.world import mint_codes, token_request
from libs.common import leases

LOOPS_PER_GATEWAY = 4
PATH = "/api/v1/courses"


@dataclass
class Call:
    gateway: int
    started: float
    ended: float
    status: int


async def _hammer(
    http: aiohttp.ClientSession,
    base: str,
    index: int,
    host: str,
    token: str,
    stop: asyncio.Event,
    calls: list[Call],
) -> None:
    headers = {"Host": host, "Authorization": f"Bearer {token}"}
    while not stop.is_set():
        started = time.monotonic()
        try:
            async with http.get(base + PATH, headers=headers) as resp:
                await resp.read()
                status = resp.status
        except aiohttp.ClientError:
            status = 0
        calls.append(Call(index, started, time.monotonic(), status))


async def _live_leases(redis_url: str, prefix: str) -> int:
    """Gateways holding a revocation lease now (libs/common/leases.py): the trials test the
    path where a gateway answers "not revoked" from memory only when this is 2."""
    client = redis_asyncio.Redis.from_url(redis_url)
    try:
        fields = await client.hgetall(prefix + leases.LEASES_KEY)
        now = await leases.redis_now_us(client)
    finally:
        await client.aclose()
    return sum(1 for k, v in fields.items() if k.startswith(b"e:") and int(v) > now)


async def run(ctx: Context) -> list[Row]:
    from libs.common import db

    s, w, plan = ctx.system, ctx.world, ctx.plan
    bases = [s.url(s.ports.gateway), s.url(s.ports.gateway2)]
    trials = plan.revocation_trials
    ctx.say(f"revocation: {trials} trials, 2 gateway processes, {LOOPS_PER_GATEWAY} loops each")
    leased_before = await _live_leases(s.redis_url, s.prefix)
    late_successes = 0
    calls_after = 0
    odd = 0
    to_first_401: list[float] = []
    answered_in: list[float] = []
    first_after_answer: list[float] = []
    pool = await db.create_pool(s.database_url, min_size=1, max_size=2)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        try:
            codes: list[str] = []
            for trial in range(trials):
                if not codes:
                    codes = await mint_codes(pool, s, w, min(20, trials - trial))
                issued = await token_request(http, bases[0], s.host, codes.pop())
                token = issued["access_token"]
                for base in bases:
                    async with http.get(
                        base + PATH, headers={"Host": s.host, "Authorization": f"Bearer {token}"}
                    ) as resp:
                        await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"a fresh token was refused: {resp.status}")
                stop = asyncio.Event()
                calls: list[Call] = []
                loops = [
                    asyncio.create_task(_hammer(http, base, i, s.host, token, stop, calls))
                    for i, base in enumerate(bases)
                    for _ in range(LOOPS_PER_GATEWAY)
                ]
                await asyncio.sleep(random.uniform(0.01, 0.04))
                sent = time.monotonic()
                async with http.post(
                    bases[0] + "/v1/oauth/revoke",
                    data={"token": token, "client_id": w.app_id},
                    headers={"Host": s.host},
                ) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"revoke answered {resp.status}")
                answered = time.monotonic()
                # Keep calling until both gateways have refused calls made after the answer.
                deadline = answered + 2.0
                while time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
                    refused = {c.gateway for c in calls if c.started > answered and c.status == 401}
                    if len(refused) == len(bases) and time.monotonic() > answered + 0.05:
                        break
                stop.set()
                await asyncio.gather(*loops)
                after = [c for c in calls if c.started > answered]
                calls_after += len(after)
                late_successes += sum(1 for c in after if 200 <= c.status < 300)
                odd += sum(1 for c in after if c.status not in (401,) and not 200 <= c.status < 300)
                answered_in.append((answered - sent) * 1000)
                for i in range(len(bases)):
                    firsts = [c.ended for c in calls if c.gateway == i and c.status == 401]
                    if firsts:
                        to_first_401.append((min(firsts) - sent) * 1000)
                        first_after_answer.append((min(firsts) - answered) * 1000)
        finally:
            await pool.close()

    leased_after = await _live_leases(s.redis_url, s.prefix)

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")

    ctx.details["revocation"] = {
        "trials": trials,
        "gateways": len(bases),
        "loops_per_gateway": LOOPS_PER_GATEWAY,
        "gateways_with_a_lease": {"before": leased_before, "after": leased_after},
        "calls_started_after_answer": calls_after,
        "successes_after_answer": late_successes,
        "other_statuses_after_answer": odd,
        "revoke_answered_ms": {
            "median": statistics.median(answered_in),
            "max": max(answered_in),
        },
        "first_401_from_revoke_sent_ms": {
            "median": statistics.median(to_first_401),
            "p95": pct(to_first_401, 0.95),
            "max": max(to_first_401),
        },
        "first_401_after_answer_ms": {
            "median": statistics.median(first_after_answer),
            "max": max(first_after_answer),
        },
    }
    ctx.say(
        f"  {late_successes} successes among {calls_after} calls started after the revoke "
        f"answered; first 401 {statistics.median(to_first_401):.1f} ms after sending it "
        f"(median; max {max(to_first_401):.1f}), revoke answered in "
        f"{statistics.median(answered_in):.1f} ms"
    )
    return [
        Row(
            "revocation",
            f"{late_successes} of {calls_after} calls after the answer succeeded "
            f"({trials} trials); first 401 {statistics.median(to_first_401):.1f} ms after the "
            f"revoke was sent (median, max {max(to_first_401):.1f}), revoke answers in "
            f"{statistics.median(answered_in):.1f} ms; gateways holding revocation leases "
            f"{leased_before} before, {leased_after} after",
            "—",
            "—",
            "0, always",
            "met" if late_successes == 0 and calls_after > 0 else "NOT MET",
            {"late_successes": late_successes, "calls_after": calls_after},
        )
    ]
