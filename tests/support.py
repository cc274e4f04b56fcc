"""Test helpers: free ports, real servers on real sockets, and resolvers for test names.

Python does not resolve `demo.localhost` the way curl and browsers do, so clients built here use
`LocalhostResolver`, which maps every `*.localhost` name to 127.0.0.1 and leaves the URL (and
so the Host header) exactly as a user's browser would send it. `ExampleResolver` gives the
documentation names tests subscribe webhooks to (`hooks.example.com`, the API document's
`hooks.partner.example`) a public address, as a partner's real host would have; the webhooks
service refuses names that do not resolve.

Test functions and function-scoped fixtures serve in-process apps with pytest-aiohttp's
`aiohttp_server` (and `aiohttp_client` when only a client to the app is needed); fixtures
wider than a function serve theirs with `running`, on the same aiohttp TestServer.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import socket
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from aiohttp.test_utils import BaseTestServer, TestServer

from libs.common import db
from libs.common.config import Settings, load_settings


def statement_cache() -> int:
    """asyncpg's statement cache for a connection of the tests' own to the run's server: 0
    through a transaction pooler (`make test-cluster`: TEST_DATABASE_STATEMENT_CACHE), where a
    named statement prepared on one server session may be bound on another."""
    return int(os.environ.get("TEST_DATABASE_STATEMENT_CACHE") or 100)


async def connect(database_url: str) -> asyncpg.Connection:
    """One plain connection (no JSON codec) to a database of the run's server."""
    return await asyncpg.connect(database_url, statement_cache_size=statement_cache())


def direct_url(database_url: str) -> str:
    """The same database on the server itself: through a transaction pooler
    (TEST_DATABASE_SESSION_URL), a look at it that leaves no server session idle in the
    pooler's pool, where it would count as a process using the database."""
    session = os.environ.get("TEST_DATABASE_SESSION_URL")
    if not session:
        return database_url
    path = urlsplit(database_url).path
    return urlunsplit(urlsplit(session)._replace(path=path))


def database_env(base_env: dict[str, str], database_url: str) -> dict[str, str]:
    """The DATABASE_* variables of `base_env` for another database on the run's server:
    through a transaction pooler, its session DSN and statement cache too."""
    env = {"DATABASE_URL": database_url}
    session = base_env.get("DATABASE_SESSION_URL")
    if session:
        path = urlsplit(database_url).path
        env["DATABASE_SESSION_URL"] = urlunsplit(urlsplit(session)._replace(path=path))
    if "DATABASE_STATEMENT_CACHE" in base_env:
        env["DATABASE_STATEMENT_CACHE"] = base_env["DATABASE_STATEMENT_CACHE"]
    return env


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2]
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


# Below the kernel's ephemeral range, where free ports are drawn from.
_FIRST_PORT = 10000


def free_port() -> int:
    """A port nothing is bound to now, outside the kernel's ephemeral range when it can be.

    A port is often chosen long before it is bound (a session fixture's, a service's settings),
    and meanwhile the kernel may give it to an outgoing connection as its local port, or to
    another program binding port 0; it draws both from the ephemeral range. A run on the
    topology's stores opens many connections (PgBouncer's server sessions, six Cluster nodes
    per client) beside other runs on the machine: the session's gateway upstream port was
    taken once, and the 74 tests using it failed to start (EADDRINUSE)."""
    low, _high = _ephemeral_ports()
    if low - _FIRST_PORT >= 1000:
        for _ in range(50):
            port = random.randrange(_FIRST_PORT, low)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalhostResolver(AbstractResolver):
    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        local = host == "localhost" or host.endswith(".localhost")
        address = "127.0.0.1" if local else host
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


class ExampleResolver(AbstractResolver):
    """The names RFC 2606 reserves for documentation (`example`, `example.com`, `.net`,
    `.org` and their subdomains) resolve to example.com's published IPv6 address (a public
    one: the SSRF checks let it pass); any other name asks the system. IPv6 only, so a sender
    bound to an IPv4 egress address finds nothing to connect to and sends nothing off this
    machine."""

    ADDRESS = "2606:2800:21f:cb07:6820:80da:af6b:8b2c"
    DOMAINS = ("example", "example.com", "example.net", "example.org")

    def __init__(self) -> None:
        self._system: ThreadedResolver | None = None

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        name = host.rstrip(".").lower()
        if not any(name == d or name.endswith("." + d) for d in self.DOMAINS):
            self._system = self._system or ThreadedResolver()
            return await self._system.resolve(host, port, family)
        if family not in (socket.AF_UNSPEC, socket.AF_INET6):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            {
                "hostname": host,
                "host": self.ADDRESS,
                "port": port,
                "family": socket.AF_INET6,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


def client_session(**kwargs: Any) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(resolver=LocalhostResolver(), force_close=False)
    return aiohttp.ClientSession(connector=connector, **kwargs)


Served = TypeVar("Served", bound=BaseTestServer)


def base_url(server: BaseTestServer) -> str:
    """The started server's root without a trailing slash, as tests join paths to it."""
    return str(server.make_url("/")).removesuffix("/")


def without_handler_cancellation(server: Served) -> Served:
    """`server` (started), set to let a handler run to its end when its client goes away, as
    every server here did before pytest-aiohttp and as the services' own runner
    (libs.common.web.serve) and a partner's server do. The TestServer `aiohttp_server` makes
    cancels it and takes no setting for it; a test may depend on it (a receiver still holding
    the request of a sender that was killed)."""
    server.handler.handler_cancellation = False
    return server


@asynccontextmanager
async def running(app: web.Application, port: int) -> AsyncIterator[str]:
    """Serve `app` on 127.0.0.1:port for the block; yields the base URL.

    For session- and module-scoped fixtures (and the helpers they share), which cannot use
    pytest-aiohttp's function-scoped `aiohttp_server`; test functions and function-scoped
    fixtures use that fixture. Built on the same `aiohttp.test_utils.TestServer` it uses: a real
    socket (SO_REUSEADDR), no access log, handlers not cancelled, and at the block's end two
    seconds for requests in flight before the app's cleanup."""
    server = TestServer(app, host="127.0.0.1", port=port)
    await server.start_server(access_log=None, shutdown_timeout=2)
    without_handler_cancellation(server)
    try:
        yield base_url(server)
    finally:
        await server.close()


async def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
            return
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


def redis_dump(port: int, directory: str | Path | None = None) -> Path:
    """Where a redis-server of `redis_server_argv` writes its data file (a replica writes
    the copy it syncs even without persistence): named by port, in `directory` or the
    system's temporary folder, never the checkout."""
    return Path(directory or tempfile.gettempdir(), f"lc-test-{port}.rdb")


def redis_server_argv(port: int, *extra: str, directory: str | Path | None = None) -> list[str]:
    """The command line of a redis-server of a test's own on 127.0.0.1:`port`, without
    persistence (no snapshots, no append-only file: a restart starts it empty). `extra`: more
    of its options (`--replicaof HOST PORT`, say)."""
    dump = redis_dump(port, directory)
    return [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(dump.parent),
        "--dbfilename",
        dump.name,
        *extra,
    ]


def redis_server(
    port: int, *extra: str, directory: str | Path | None = None
) -> subprocess.Popen[bytes]:
    """`redis_server_argv` started (not waited for), for synchronous fixtures and tests that
    manage the process themselves; `directory` is made if missing."""
    if directory is not None:
        Path(directory).mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        redis_server_argv(port, *extra, directory=directory),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def start_redis(
    port: int, *extra: str, directory: str | Path | None = None
) -> asyncio.subprocess.Process:
    """`redis_server_argv` started, returned once it accepts connections."""
    proc = await asyncio.create_subprocess_exec(
        *redis_server_argv(port, *extra, directory=directory),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_for_port(port, timeout=10)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc


async def shutdown_redis(port: int, proc: asyncio.subprocess.Process) -> None:
    """A clean SHUTDOWN NOSAVE (as an operator stops it), then the process's end."""
    cli = await asyncio.create_subprocess_exec(
        "redis-cli",
        "-p",
        str(port),
        "shutdown",
        "nosave",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await asyncio.wait_for(cli.wait(), 10)
    await asyncio.wait_for(proc.wait(), 10)


async def kill_process(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL `proc` unless it has ended already, and reap it."""
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


@asynccontextmanager
async def migrated_database(base_env: dict[str, str], suffix: str) -> AsyncIterator[str]:
    """A database of a module's own (the session's name + `suffix`), migrated, dropped at the
    block's end: services started on it never share work with the session's workers."""
    url = base_env["DATABASE_URL"] + suffix
    await db.migrate(url)
    try:
        yield url
    finally:
        await db.drop_database(url)


def settings_on_own_redis(
    env: dict[str, str], database_url: str, redis_port: int, label: str
) -> Settings:
    """`env`'s settings on `database_url` and a redis-server of the test's own on
    `redis_port`, under a key prefix of its own (`label` + random)."""
    return load_settings(
        {
            **env,
            **database_env(env, database_url),
            "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "REDIS_KEY_PREFIX": f"{label}{secrets.token_hex(3)}:",
        }
    )


async def identity_records(
    database_url: str, *, client_id: str | None = None, grant_id: Any = None
) -> list[dict[str, Any]]:
    """Identity's own audit records (audit_log rows it wrote in the transactions of what they
    record), oldest first, as records: grant and address as text, `detail` as it was given."""
    conn = await connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT * FROM audit_log WHERE record_id LIKE 'i:%'"
            " AND ($1::text IS NULL OR client_id = $1)"
            " AND ($2::uuid IS NULL OR grant_id = $2::uuid) ORDER BY id",
            client_id,
            str(grant_id) if grant_id is not None else None,
        )
    finally:
        await conn.close()
    records = []
    for r in rows:
        record = dict(r)
        record["grant_id"] = str(r["grant_id"]) if r["grant_id"] else None
        record["ip"] = str(r["ip"].ip if hasattr(r["ip"], "ip") else r["ip"]) if r["ip"] else None
        detail = r["detail"]
        if isinstance(detail, str):  # a plain connection has no JSON codec
            detail = json.loads(detail)
        record["detail"] = detail if isinstance(detail, dict) else {}
        record.update({k: v for k, v in record["detail"].items() if k not in record})
        records.append(record)
    return records
