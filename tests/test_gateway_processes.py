"""Gateways as real processes (`loopwise-connect serve gateway`): revocation is immediate at
every one of them, and a stopping gateway finishes its in-flight calls and writes their audit
records."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp
import orjson
import pytest

from libs.common import streams
from libs.common.config import Settings
from services.identity import audit, grants, keys
from tests.support import free_port
from tests.test_gateway_support import (
    World,
    access_claims,
    echo_upstream,
    make_world,
    mint,
    real_token,
    user_grant,
)

__all__ = ["echo_upstream"]

pytestmark = pytest.mark.usefixtures("echo_upstream")

CLI = str(Path(sys.executable).with_name("loopwise-connect"))
TRIALS = 30


class GatewayProcess:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        self._out = log.open("wb")
        self.process = subprocess.Popen(
            [CLI, "serve", "gateway", "--port", str(self.port)],
            env={**os.environ, **env},
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    async def ready(self, http: Any, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"gateway exited: {self.log.read_text()[-3000:]}")
            try:
                async with http.get(self.url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"gateway not ready: {self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=30)
        finally:
            self._out.close()
        return code


@contextlib.contextmanager
def started_gateways(env: dict[str, str], logs: Path, count: int) -> Iterator[list[GatewayProcess]]:
    """`count` gateway processes, stopped at the end (resumed first if a test paused one)."""
    started = [GatewayProcess(env, logs / f"gateway-{n}.log") for n in range(count)]
    try:
        yield started
    finally:
        for process in started:
            if process.process.poll() is None:
                os.kill(process.process.pid, signal.SIGCONT)
            process.stop()


@pytest.fixture(scope="module")
def gateway_processes(
    gateway_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[GatewayProcess]]:
    env = {**gateway_env, "LOG_LEVEL": "warning"}
    with started_gateways(env, tmp_path_factory.mktemp("gateways"), 2) as started:
        yield started


@pytest.fixture(scope="module")
async def two_gateways(
    gateway_processes: list[GatewayProcess], gateway_identity_url: str
) -> list[str]:
    from tests.support import client_session

    async with client_session() as http:
        for process in gateway_processes:
            await process.ready(http)
    return [p.url for p in gateway_processes]


async def _status(
    http: Any,
    base: str,
    host: str,
    token: str,
    path: str = "/api/v1/courses",
    request_id: str | None = None,
) -> int:
    """The status of a protected call to the school `host` with `token`."""
    headers = {"Host": host, "Authorization": f"Bearer {token}"}
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    async with http.get(base + path, headers=headers) as resp:
        await resp.read()
        return int(resp.status)


async def _minted(
    keyring: keys.KeyRing, settings: Settings, world: World, grant_id: UUID, scope: str
) -> str:
    """An access token of `grant_id` for `scope`, signed as identity signs for the school."""
    return await mint(keyring, world.school.id, access_claims(settings, world, grant_id, scope))


class Race:
    """Calls racing a revoke: any call started after the revoke answered must be refused."""

    def __init__(
        self, http: Any, host: str, token: str, trial: int, late: list[tuple[int, str]]
    ) -> None:
        self.http, self.host, self.token, self.trial, self.late = http, host, token, trial, late
        self.answered = asyncio.Event()
        self.stop = asyncio.Event()
        self.after = 0  # calls started after the revoke answered

    async def hammer(self, base: str) -> None:
        while not self.stop.is_set():
            after_answer = self.answered.is_set()
            status = await _status(self.http, base, self.host, self.token)
            if after_answer:
                self.after += 1
                if status != 401:
                    self.late.append((self.trial, base))


async def test_revocation_is_immediate_at_every_gateway(
    two_gateways: list[str], http: Any, pool: Any, gateway_settings: Settings, gateway_port: int
) -> None:
    """Revoke through identity's RFC 7009 endpoint; the moment it has answered, no call with
    the grant's token succeeds at either gateway, over many trials, even with calls racing."""
    world = await make_world(pool, gateway_settings, "rev", gateway_port)
    await pool.execute(
        "UPDATE clients SET rate_limit_per_minute = 100000 WHERE id = $1", world.client.id
    )
    first, second = two_gateways
    late_successes: list[tuple[int, str]] = []
    raced = 0
    for trial in range(TRIALS):
        issued = await real_token(http, first, world, scope="courses:read")
        token = issued["access_token"]
        # Both gateways have verified (and cached) the token before the revoke.
        assert await _status(http, first, world.host, token) == 200
        assert await _status(http, second, world.host, token) == 200
        race = Race(http, world.host, token, trial, late_successes)
        hammers = [asyncio.create_task(race.hammer(b)) for b in (first, second) for _ in range(3)]
        await asyncio.sleep(0.005 * (trial % 4))
        async with http.post(
            first + "/v1/oauth/revoke",
            data={"token": token},
            headers={
                "Host": world.host,
                "Authorization": aiohttp.encode_basic_auth(world.client.id, world.secret),
            },
        ) as resp:
            assert resp.status == 200
        race.answered.set()
        assert await _status(http, first, world.host, token) == 401, trial
        assert await _status(http, second, world.host, token) == 401, trial
        await asyncio.sleep(0.01)
        race.stop.set()
        await asyncio.gather(*hammers)
        raced += race.after
    assert late_successes == []
    assert raced >= TRIALS * 2  # the race really ran past every revoke


async def test_a_revoked_user_grant_is_refused_at_both(
    two_gateways: list[str],
    http: Any,
    pool: Any,
    redis: Any,
    gateway_settings: Settings,
    gateway_port: int,
) -> None:
    """The same through identity's own revoke_grant (account and admin pages use it)."""
    world = await make_world(pool, gateway_settings, "revu", gateway_port)
    keyring = keys.KeyRing(pool, gateway_settings)
    for _ in range(10):
        grant_id = await user_grant(pool, world, ["read"])
        token = await _minted(keyring, gateway_settings, world, grant_id, "read")
        assert [await _status(http, b, world.host, token) for b in two_gateways] == [200, 200]
        await grants.revoke_grant(pool, redis, gateway_settings, grant_id, reason="user_revoked")
        assert [await _status(http, b, world.host, token) for b in two_gateways] == [401, 401]


async def test_a_stopping_gateway_finishes_in_flight_calls_and_flushes_the_audit(
    http: Any,
    pool: Any,
    redis: Any,
    gateway_env: dict[str, str],
    gateway_settings: Settings,
    gateway_identity_url: str,
    gateway_port: int,
    tmp_path: Path,
) -> None:
    world: World = await make_world(pool, gateway_settings, "stop", gateway_port)
    keyring = keys.KeyRing(pool, gateway_settings)
    grant_id = await user_grant(pool, world, ["read"])
    token = await _minted(keyring, gateway_settings, world, grant_id, "read")
    process = GatewayProcess({**gateway_env, "LOG_LEVEL": "warning"}, tmp_path / "gw.log")
    try:
        await process.ready(http)
        request_id = f"inflight-{os.getpid()}-{time.monotonic_ns()}"

        slow = "/api/v1/courses/slow?s=1"
        call = asyncio.create_task(_status(http, process.url, world.host, token, slow, request_id))
        await asyncio.sleep(0.4)
        process.process.send_signal(signal.SIGTERM)
        assert await call == 200
        assert await asyncio.to_thread(process.stop) == 0
    finally:
        process.stop()
    found = False
    for _, fields in await redis.xrevrange(gateway_settings.stream(streams.AUDIT), count=1000):
        for data in audit.records_of(orjson.loads(fields[b"data"])):
            if (data.get("detail") or {}).get("request_id") == request_id:
                found = data["status"] == 200
    assert found


async def test_a_gateway_killed_under_load_has_recorded_every_call_it_answered(
    http: Any,
    pool: Any,
    redis: Any,
    gateway_env: dict[str, str],
    gateway_settings: Settings,
    gateway_identity_url: str,
    gateway_port: int,
    tmp_path: Path,
) -> None:
    """Durable mode: calls served (200) and refused with a record (403) from
    sixteen concurrent callers, and the gateway SIGKILLed in the middle of them. Every answer
    a caller received has its record on connect:audit; a buffered gateway loses the records
    of the last few milliseconds' answers."""
    world: World = await make_world(pool, gateway_settings, "kill", gateway_port)
    await pool.execute(
        "UPDATE clients SET rate_limit_per_minute = 1000000 WHERE id = $1", world.client.id
    )
    keyring = keys.KeyRing(pool, gateway_settings)
    grant_id = await user_grant(pool, world, ["courses:read", "openid"])
    reader = await _minted(keyring, gateway_settings, world, grant_id, "courses:read")
    openid = await _minted(keyring, gateway_settings, world, grant_id, "openid")
    stream = gateway_settings.stream(streams.AUDIT)
    since = await streams.last_id(redis, stream)
    answered: dict[str, int] = {}
    prefix = f"kill-{os.getpid()}-{time.monotonic_ns()}"

    async def caller(url: str, label: str, token: str, steady: asyncio.Event, target: int) -> None:
        for i in range(100_000):
            rid = f"{label}-{i}"
            try:
                answered[rid] = await _status(http, url, world.host, token, request_id=rid)
            except (aiohttp.ClientError, OSError):
                return  # killed: this call had no answer
            if len(answered) >= target:
                steady.set()

    # Twice: one kill could land just after a buffered gateway's flush, and prove nothing.
    for round_ in range(2):
        process = GatewayProcess(
            {**gateway_env, "LOG_LEVEL": "warning", "GATEWAY_AUDIT_MODE": "durable"},
            tmp_path / f"gw-{round_}.log",
        )
        try:
            await process.ready(http)
            # Once the load is steady, so the kill lands among calls.
            steady = asyncio.Event()
            target = len(answered) + 300
            callers = [
                asyncio.create_task(
                    caller(
                        process.url,
                        f"{prefix}-{round_}-{n}",
                        openid if n % 4 == 0 else reader,
                        steady,
                        target,
                    )
                )
                for n in range(16)
            ]
            await steady.wait()
            os.kill(process.process.pid, signal.SIGKILL)
            await asyncio.gather(*callers)
        finally:
            process.stop()
    assert {200, 403} <= set(answered.values())
    recorded: dict[str, int] = {}
    for _, fields in await redis.xrange(stream, min=f"({since}"):
        for data in audit.records_of(orjson.loads(fields[b"data"])):
            rid = (data.get("detail") or {}).get("request_id")
            if isinstance(rid, str) and rid.startswith(prefix):
                recorded[rid] = data["status"]
    missing = sorted(set(answered) - set(recorded))
    assert not missing, f"{len(missing)} of {len(answered)} answered calls have no record"
    assert {rid: recorded[rid] for rid in answered} == answered
