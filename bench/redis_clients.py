"""The gateway's guard on a Redis Cluster: our PipelinedCluster beside redis-py's RedisCluster.

    python -m bench.redis_clients [--url redis+cluster://h:p,...] [--calls N]

Without --url it starts a Cluster of its own (3 primaries + 3 replicas on free loopback ports,
services/dev/redis_cluster.py) and stops it at the end. Both clients run the same guard script
(services/gateway/ratelimit.py: the revocation mark and the client's rate bucket, one EVALSHA)
on keys spread over every primary, N calls at concurrency 1 and 32, under uvloop as the
gateway runs. Printed per client: calls/s, p50 and p99 of one call, and the CPU this process
spent per call (the client's own cost: on a shared machine it moves less than calls/s).

Before timing, each client's verdicts are checked: a revoked grant answers revoked, a bucket
of 3 grants 3 calls and refuses the 4th; a client that gets them wrong is reported, not timed.
Keys go under their own prefix and are deleted at the end. The machine is shared: quote the
figures with that said.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

from libs.common import keys, marks_fence, redis_client
from libs.common.config import load_settings
from services.gateway import ratelimit
from services.gateway.ratelimit import Guard, Pace
from services.gateway.redis_routing import pipelined

Check = Callable[[str, str, int, Pace], Awaitable[tuple[bool, bool]]]

SCHOOLS = 64
CONCURRENCY = (1, 32)


@dataclasses.dataclass
class Result:
    client: str
    concurrency: int
    calls: int
    seconds: float
    cpu: float
    latencies: list[float]

    def row(self) -> str:
        ordered = sorted(self.latencies)
        p50 = statistics.median(ordered) * 1000
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
        return (
            f"{self.client:<22} c={self.concurrency:<3} {self.calls / self.seconds:>9,.0f} calls/s"
            f"  p50 {p50:6.3f} ms  p99 {p99:6.3f} ms"
            f"  cpu {self.cpu * 1e6 / self.calls:6.1f} us/call"
        )


def _ours(url: str, settings: Any) -> tuple[Check, Callable[[], Awaitable[None]]]:
    conn = pipelined(url, timeout=2.0, fenced_by=settings)
    guard = Guard(conn)

    async def check(mark: str, bucket: str, want: int, pace: Pace) -> tuple[bool, bool]:
        verdict = await guard.check(mark, bucket, want=want, pace=pace)
        return verdict.revoked, verdict.allowed

    return check, conn.close


def _redis_py(url: str) -> tuple[Check, Callable[[], Awaitable[None]]]:
    client = redis_client.connect(url, socket_timeout=2.0, socket_connect_timeout=2.0)
    source = ratelimit._GUARD  # the very script the gateway runs
    sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
    from redis.exceptions import NoScriptError

    async def check(mark: str, bucket: str, want: int, pace: Pace) -> tuple[bool, bool]:
        args = (mark, bucket, want, pace.interval_us, pace.burst, 0, 0)
        try:
            answer = await client.evalsha(sha, 2, *args)
        except NoScriptError:
            answer = await client.eval(source, 2, *args)
        return answer[0] == 1, answer[1] >= 1

    return check, client.aclose


async def _correct(check: Check, settings: Any, label: str) -> str | None:
    """Why the client's verdicts are wrong, or None."""
    pace = Pace.of(per_minute=60, burst=3)
    for school in range(1, 4):
        tag = secrets.token_hex(3)
        mark = keys.revoked_mark(settings, school, f"g{tag}")
        bucket = keys.gateway_bucket(settings, school, f"c{tag}")
        got = [await check(mark, bucket, 1, pace) for _ in range(4)]
        if [allowed for _, allowed in got] != [True, True, True, False]:
            return f"{label}: a bucket of 3 answered {got}"
        writer = redis_client.connect(settings.redis_url)
        try:
            await writer.set(mark, "revoked", ex=60)
        finally:
            await writer.aclose()
        if not (await check(mark, bucket, 1, pace))[0]:
            return f"{label}: a revoked grant was not answered revoked"
    return None


async def _measure(label: str, check: Check, settings: Any, calls: int, concurrency: int) -> Result:
    pace = Pace.of(per_minute=10_000_000, burst=1_000_000)
    work = [
        (
            keys.revoked_mark(settings, n % SCHOOLS + 1, f"grant{n % 997}"),
            keys.gateway_bucket(settings, n % SCHOOLS + 1, f"client{n % 13}"),
        )
        for n in range(calls)
    ]
    latencies: list[float] = []
    position = iter(work)

    async def worker() -> None:
        for mark, bucket in position:
            began = time.perf_counter()
            await check(mark, bucket, 1, pace)
            latencies.append(time.perf_counter() - began)

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return Result(
        label, concurrency, calls, time.perf_counter() - t0, time.process_time() - cpu0, latencies
    )


async def run(url: str, calls: int) -> int:
    prefix = f"lcbench-rc:{secrets.token_hex(3)}:"
    settings = load_settings(
        {
            "CONNECT_ENV": "test",
            "REDIS_URL": url,
            "REDIS_KEY_PREFIX": prefix,
            "DATABASE_URL": "postgresql://unused@127.0.0.1:1/unused",
            "KEY_ENCRYPTION_KEY": "A" * 43 + "=",
            "SECRET_PEPPER": "B" * 43 + "=",
        }
    )
    admin = redis_client.connect(url)
    # The guard's connection is fenced as the gateway's is: identity's pass recorded.
    await marks_fence.record(admin, settings, await marks_fence.run_ids(admin, settings))
    clients: dict[str, Callable[[], tuple[Check, Callable[[], Awaitable[None]]]]] = {
        "PipelinedCluster": lambda: _ours(url, settings),
        "redis-py RedisCluster": lambda: _redis_py(url),
    }
    results: list[Result] = []
    wrong: list[str] = []
    try:
        for label, make in clients.items():
            check, close = make()
            try:
                problem = await _correct(check, settings, label)
                if problem:
                    wrong.append(problem)
                    continue
                await _measure(label, check, settings, min(calls, 2000), 32)  # warm-up
                for concurrency in CONCURRENCY:
                    results.append(await _measure(label, check, settings, calls, concurrency))
            finally:
                await close()
    finally:
        found = [k async for k in admin.scan_iter(match=f"{prefix}*", count=1000)]
        if found:
            await admin.delete(*found)
        await admin.aclose()
    print(f"guard calls on {url.split('@')[-1]} ({calls} per run, uvloop, shared machine)")
    for concurrency in CONCURRENCY:
        for result in results:
            if result.concurrency == concurrency:
                print("  " + result.row())
    for problem in wrong:
        print("  WRONG " + problem)
    return 1 if wrong else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a redis+cluster:// URL (default: a Cluster of its own)")
    parser.add_argument("--calls", type=int, default=20_000)
    args = parser.parse_args(argv)
    if args.url:
        return uvloop.run(run(args.url, args.calls))
    from services.dev.redis_cluster import start_redis_cluster
    from tests.support import free_port

    with tempfile.TemporaryDirectory(prefix="lc-bench-cluster-") as directory:
        ports = [free_port() for _ in range(6)]
        buses = [free_port() for _ in range(6)]
        cluster = start_redis_cluster(Path(directory), ports, bus_ports=buses)
        try:
            return uvloop.run(run(cluster.url, args.calls))
        finally:
            cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
