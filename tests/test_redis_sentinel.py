"""Redis behind Sentinel, failing over for real: a master and its replica watched by three
sentinels (quorum 2), all real redis-server processes of the test's own on free ports.

The master is SIGKILLed; the sentinels agree it is down, elect a leader and promote the replica.
Both clients of REDIS_URL=redis+sentinel://... follow it: redis-py's (libs/common/redis_client:
Sentinel.master_for asks on each new connection) and the gateway's pipelined guard connection
(services/gateway/redis_routing: asks the sentinels on each reconnection). The guard does not
read "no mark" as "not revoked" on the promoted replica until identity's marks pass records its
run (libs/common/marks_fence.py), and then answers from it, marks replicated before the failover
included.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis.asyncio as redis_asyncio
from redis.exceptions import RedisError

from libs.common import keys, marks_fence, redis_client
from libs.common.config import Settings
from services.gateway.ratelimit import Guard, Pace
from services.gateway.redis_pipeline import MarksNotRestored
from services.gateway.redis_routing import pipelined
from tests.support import free_port, redis_server

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="no redis-server (apt-get install redis-server)"
)

MASTER = "lcmain"
SENTINELS = 3
# How long the sentinels wait before calling the master down, and the deadline for all of it.
DOWN_AFTER_MS = 1000
FAILOVER_DEADLINE = 30.0


@dataclasses.dataclass
class Watched:
    master: int
    replica: int
    sentinels: list[int]
    procs: dict[int, subprocess.Popen[bytes]]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER}/0"

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.kill()
        proc.wait(5)


def _sentinel(port: int, master: int, directory: Path) -> subprocess.Popen[bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "sentinel.conf"  # sentinels rewrite their file: one each
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
        f"sentinel monitor {MASTER} 127.0.0.1 {master} 2\n"
        f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
        f"sentinel failover-timeout {MASTER} 10000\n"
        f"sentinel parallel-syncs {MASTER} 1\n"
    )
    return subprocess.Popen(
        ["redis-server", str(conf), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _until(what: str, probe: Callable[[], bool], deadline: float = FAILOVER_DEADLINE) -> None:
    """Poll `probe()` (synchronous redis-py calls) until it is true."""
    import redis

    end = time.monotonic() + deadline
    last: object = None
    while time.monotonic() < end:
        try:
            if probe():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{what} not within {deadline:.0f}s ({last})")


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[Watched]:
    import redis

    master, replica = free_port(), free_port()
    sentinels = [free_port() for _ in range(SENTINELS)]
    procs: dict[int, subprocess.Popen[bytes]] = {}
    made = Watched(master, replica, sentinels, procs)
    try:
        procs[master] = redis_server(master, directory=tmp_path / "master")
        procs[replica] = redis_server(
            replica, "--replicaof", "127.0.0.1", str(master), directory=tmp_path / "replica"
        )

        def linked() -> bool:
            with redis.Redis(port=replica, socket_timeout=1) as r:
                return r.info("replication").get("master_link_status") == "up"

        _until("the replica's link", linked)
        for n, port in enumerate(sentinels):
            procs[port] = _sentinel(port, master, tmp_path / f"sentinel{n}")

        def known() -> bool:
            # Every sentinel knows the replica and the other sentinels (else no election).
            for port in sentinels:
                with redis.Redis(port=port, socket_timeout=1, decode_responses=True) as s:
                    state = s.sentinel_master(MASTER)
                    if (state["num-slaves"], state["num-other-sentinels"]) != (1, SENTINELS - 1):
                        return False
            return True

        _until("the sentinels' view", known)
        yield made
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(5)


async def test_a_killed_master_is_replaced_and_both_clients_follow(
    settings: Settings, watched: Watched
) -> None:
    own = dataclasses.replace(settings, redis_url=watched.url)
    client: redis_asyncio.Redis = redis_client.connect(own.redis_url, socket_timeout=1.0)
    guard_conn = pipelined(own.redis_url, timeout=1.0, fenced_by=own)
    guard = Guard(guard_conn)
    pace = Pace.of(per_minute=6000, burst=100)
    revoked = keys.revoked_mark(own, 7, "revoked-grant")
    live = keys.revoked_mark(own, 7, "live-grant")
    bucket = keys.gateway_bucket(own, 7, "app")
    try:
        # Identity's pass on the master, a revoked grant's mark on it and on its replica.
        await marks_fence.record(client, own, await marks_fence.run_ids(client, own))
        await client.set(revoked, "revoked", ex=300)
        assert await client.execute_command("WAIT", 1, 2000) == 1
        assert (await guard.check(revoked, bucket, want=1, pace=pace)).revoked
        assert (await guard.check(live, bucket, want=1, pace=pace)).allowed
        assert int((await client.info("server"))["tcp_port"]) == watched.master

        watched.kill(watched.master)

        # redis-py: refused while the sentinels still name the dead master, then the replica.
        end = time.monotonic() + FAILOVER_DEADLINE
        while True:
            try:
                await client.set(keys.gateway_bucket(own, 8, "probe"), "1", ex=60)
                break
            except (RedisError, OSError):
                assert time.monotonic() < end, "redis-py never reached the promoted replica"
                await asyncio.sleep(0.1)
        assert int((await client.info("server"))["tcp_port"]) == watched.replica
        assert (await client.info("replication"))["role"] == "master"
        assert await client.get(revoked) == b"revoked"

        # The guard: it reaches the promoted replica and refuses there (MarksNotRestored:
        # the record it holds names the dead master's run), never answering "not revoked".
        refused = False
        while not refused:
            try:
                verdict = await guard.check(live, bucket, want=1, pace=pace)
            except MarksNotRestored:
                refused = True
            except ConnectionError:
                assert time.monotonic() < end, "the guard never reached the promoted replica"
                await asyncio.sleep(0.1)
            else:
                pytest.fail(
                    f"the promoted replica answered before its marks were restored: {verdict}"
                )

        # Identity's pass records the new master's run; then the guard answers from it.
        await marks_fence.record(client, own, await marks_fence.run_ids(client, own))
        await asyncio.sleep(0.3)  # the guard asks a refusing node again every 0.2 s
        assert (await guard.check(revoked, bucket, want=1, pace=pace)).revoked
        assert (await guard.check(live, bucket, want=1, pace=pace)).allowed
    finally:
        await guard_conn.close()
        await client.aclose()
