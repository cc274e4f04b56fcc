"""A `make dev`-like stack with the control surface of the production topology
(services/dev/topology.py's `Topology`): one process of each service, restarted by a
supervisor within a fraction of a second when it dies, on free ports, with a database and a
Redis key prefix of its own (dropped and deleted at the end) on the local stores `make dev`
uses. No load balancer, pooler or cluster: the faults that need one are skipped on it.

It is what `python -m faults --stack dev` and the suite's test run against: the workload and
the ledger do not depend on the topology being there.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from libs.common.logging import get_logger

log = get_logger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DATABASE_PREFIX = "loopwise_faults_"
PARTS = (("identity", "identity"), ("school_api", "school-api"), ("webhooks", "webhooks"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


class DevProc:
    """One service process: `kill` signals it; its stack's supervisor starts it again when it
    dies; `restart` stops and starts it at once."""

    def __init__(
        self, name: str, kind: str, part: str, port: int, env: dict[str, str], log_dir: Path
    ):
        self.name = name
        self.kind = kind
        self.port = port
        self._part = part
        self._env = env
        self._log = log_dir / f"{name}.log"
        self._popen: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def pid(self) -> int:
        assert self._popen is not None, f"{self.name} was not started"
        return self._popen.pid

    def spawn(self) -> None:
        with self._log.open("ab") as out:
            self._popen = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "services.cli",
                    "serve",
                    self._part,
                    "--port",
                    str(self.port),
                ],
                env=self._env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def dead(self) -> bool:
        return self._popen is None or self._popen.poll() is not None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if not self.dead():
            assert self._popen is not None
            self._popen.send_signal(sig)

    async def restart(self) -> None:
        await asyncio.to_thread(self.terminate)
        self.spawn()
        await self.wait_ready()

    def terminate(self, timeout: float = 20.0) -> None:
        if self._popen is None or self._popen.poll() is not None:
            return
        self._popen.send_signal(signal.SIGCONT)  # a stopped process cannot handle SIGTERM
        self._popen.terminate()
        try:
            self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            self._popen.wait(timeout=5)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/readyz"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
            while time.monotonic() < deadline:
                if not self.dead():
                    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                        async with http.get(url) as resp:
                            if resp.status == 200:
                                return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s (log {self._log})")


class DevStack:
    """`Topology`'s control API on one process of each service (see the module doc)."""

    def __init__(self, data_dir: Path, env: Mapping[str, str] | None = None) -> None:
        """`env`: where DATABASE_URL / REDIS_URL name the servers to use (the stack makes a
        database of its own on that PostgreSQL); os.environ by default, then the local
        stores `make dev` finds or starts."""
        self.data_dir = data_dir
        self._base_env = dict(os.environ if env is None else env)
        self.env: dict[str, str] = {}
        self.services: dict[str, DevProc] = {}
        self.public_port = 0
        self.direct_database_url = ""
        # What the production topology has and this stack does not.
        self.nginx = None
        self.pgbouncer = None
        self.postgres = None
        self.redis = None
        self.database_name = f"{DATABASE_PREFIX}{secrets.token_hex(4)}"
        self._stop_stores: object = None
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.public_port}"

    async def start(self) -> None:
        from libs.common import db
        from services.dev import localstores

        stores, stop = await asyncio.to_thread(
            localstores.find_or_start,
            self.data_dir,
            database_name=self.database_name,
            env=self._base_env,
        )
        self._stop_stores = stop
        parts = urlsplit(stores.database_url)
        database_url = urlunsplit(parts._replace(path=f"/{self.database_name}"))
        await db.ensure_database(database_url)
        await db.migrate(database_url)
        self.direct_database_url = database_url
        ports = {"gateway": free_port(), **{kind: free_port() for kind, _ in PARTS}}
        self.public_port = ports["gateway"]
        self.env = {
            **self._base_env,
            "CONNECT_ENV": "development",
            "DATABASE_URL": database_url,
            "REDIS_URL": stores.redis_url,
            "REDIS_KEY_PREFIX": f"lcfaults:{secrets.token_hex(4)}:",
            "KEY_ENCRYPTION_KEY": _key(),
            "SECRET_PEPPER": _key(),
            "INTERNAL_TOKEN": secrets.token_urlsafe(32),
            "PUBLIC_URL_TEMPLATE": f"http://{{school}}.localhost:{self.public_port}",
            "PLATFORM_URL": f"http://localhost:{self.public_port}",
            "GATEWAY_PORT": str(ports["gateway"]),
            "IDENTITY_PORT": str(ports["identity"]),
            "SCHOOL_API_PORT": str(ports["school_api"]),
            "WEBHOOKS_PORT": str(ports["webhooks"]),
            "TRUST_FORWARDED_HOST": "true",
            "GATEWAY_TRUST_FORWARDED": "false",
            "LOG_LEVEL": os.environ.get("FAULTS_LOG_LEVEL", "warning"),
            "PYTHONUNBUFFERED": "1",
        }
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for kind, part in (*PARTS, ("gateway", "gateway")):
            name = f"{kind}-1"
            self.services[name] = DevProc(name, kind, part, ports[kind], self.env, logs)
        for proc in self.services.values():
            proc.spawn()
        await asyncio.gather(*(p.wait_ready() for p in self.services.values()))
        self._supervisor = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        """Start a dead service again, as the topology's supervisor does."""
        while True:
            await asyncio.sleep(0.2)
            for proc in self.services.values():
                if proc.dead():
                    log.info("faults_devstack_restart", service=proc.name)
                    proc.restarts += 1
                    proc.spawn()

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await asyncio.gather(*(asyncio.to_thread(p.terminate) for p in self.services.values()))
        from libs.common import db

        if self.direct_database_url:
            with contextlib.suppress(OSError, Exception):
                await db.drop_database(self.direct_database_url)
        await _unlink(self.env.get("REDIS_URL", ""), self.env.get("REDIS_KEY_PREFIX", ""))
        if callable(self._stop_stores):
            self._stop_stores()


async def _unlink(redis_url: str, prefix: str) -> None:
    if not redis_url or not prefix:
        return
    import redis.asyncio as redis_asyncio

    client = redis_asyncio.Redis.from_url(redis_url)
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            batch.append(key)
        for i in range(0, len(batch), 1000):
            await client.unlink(*batch[i : i + 1000])
    finally:
        await client.aclose()
