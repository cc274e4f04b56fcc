"""The system under test: its stores, its environment, its processes and its data.

The bench gets its own database (`loopwise_bench`, dropped and made afresh each run) on the
PostgreSQL `make dev` would use (services.dev.localstores.find_or_start), its own Redis key
prefix, its own ports (BENCH_PORT_BASE, default 18180, far from make dev's 8080-8083) and
secrets generated for the run. Services are started exactly as `make dev` starts them:
`python -m services.cli serve <part> --port N`.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit
from uuid import UUID

import aiohttp
import asyncpg
import orjson

from bench.procs import BenchError, Proc, Procs, pids_named, port_free

ROOT = Path(__file__).resolve().parents[1]
# BENCH_DATABASE: another name, for a bench beside another clone's on the same PostgreSQL.
DATABASE_NAME = os.environ.get("BENCH_DATABASE", "loopwise_bench")
SUBDOMAIN = "bench"
REDIRECT_URI = "https://app.example.com/callback"
# What the public app's users consent to: an OIDC sign-in plus the API scopes the scenarios use
# (a code exchange therefore also signs an RS256 ID token, as for any OIDC client).
APP_SCOPES = ("openid", "profile", "courses:read", "students:read")
CODE_SCOPES = ("openid", "courses:read", "students:read")
M2M_SCOPES = ("courses:read", "students:read")
# High enough that the gateway's limiter (still consulted on every call) never refuses.
RATE_LIMIT_PER_MINUTE = 100_000_000


@dataclass(frozen=True, slots=True)
class Ports:
    gateway: int
    identity: int
    school_api: int
    webhooks: int
    gateway2: int
    bare_proxy: int
    receiver: int
    peer: int

    @classmethod
    def from_base(cls, base: int) -> Ports:
        return cls(
            gateway=base,
            identity=base + 1,
            school_api=base + 2,
            webhooks=base + 3,
            gateway2=base + 4,
            bare_proxy=base + 5,
            receiver=base + 6,
            peer=base + 10,
        )


def vars_of(ports: Ports) -> list[int]:
    return [getattr(ports, name) for name in ports.__dataclass_fields__]


def _key() -> str:
    return base64.b64encode(secrets.token_bytes(32)).decode()


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@dataclass
class System:
    """The bench's stores, environment and processes."""

    run_id: str
    ports: Ports
    database_url: str
    redis_url: str
    env: dict[str, str]
    logs: Path
    stop_stores: Callable[[], None]
    procs: Procs = field(default_factory=Procs)

    @property
    def host(self) -> str:
        """The bench school's Host on the public origin (the gateway)."""
        return f"{SUBDOMAIN}.localhost:{self.ports.gateway}"

    @property
    def prefix(self) -> str:
        return self.env["REDIS_KEY_PREFIX"]

    def url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}"

    def service(self, part: str, port: int, name: str | None = None) -> Proc:
        return self.procs.start(
            Proc(
                name=name or part,
                argv=[sys.executable, "-m", "services.cli", "serve", part, "--port", str(port)],
                env=self.env,
                log=self.logs / f"{name or part}.log",
                port=port,
                cwd=ROOT,
            )
        )

    def helper(self, module: str, name: str, port: int, *args: str) -> Proc:
        return self.procs.start(
            Proc(
                name=name,
                argv=[sys.executable, "-m", module, "--port", str(port), *args],
                env=self.env,
                log=self.logs / f"{name}.log",
                port=port,
                cwd=ROOT,
            )
        )

    def pid(self, name: str) -> int:
        return self.procs.by_name(name).pid

    def redis_pids(self) -> list[int]:
        port = urlsplit(self.redis_url).port or 6379
        pids = pids_named(("redis-server", "valkey-server"))
        # Several servers: keep the one whose command line names our port, if one does.
        if len(pids) > 1:
            mine = [p for p in pids if f":{port}" in _cmdline(p)]
            return mine or pids[:1]
        return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def make_system(run_id: str, logs: Path) -> System:
    from services.dev import localstores

    base = int(os.environ.get("BENCH_PORT_BASE", "18180"))
    ports = Ports.from_base(base)
    taken = [port for port in vars_of(ports) if not port_free(port)]
    if taken:
        raise BenchError(
            f"ports {', '.join(map(str, taken))} are taken; stop what holds them or set "
            "BENCH_PORT_BASE to another range"
        )
    try:
        stores, stop_stores = localstores.find_or_start(
            ROOT / ".data", database_name=DATABASE_NAME, env=os.environ
        )
    except RuntimeError as exc:
        raise BenchError(f"no PostgreSQL/Redis for the bench: {exc}") from None
    database_url = with_database(stores.database_url, DATABASE_NAME)
    env = {
        **os.environ,
        "CONNECT_ENV": "development",
        "DATABASE_URL": database_url,
        "REDIS_URL": stores.redis_url,
        "REDIS_KEY_PREFIX": f"lcbench:{run_id}:",
        "KEY_ENCRYPTION_KEY": _key(),
        "SECRET_PEPPER": _key(),
        "INTERNAL_TOKEN": secrets.token_urlsafe(32),
        "PUBLIC_URL_TEMPLATE": f"http://{{school}}.localhost:{ports.gateway}",
        "PLATFORM_URL": f"http://localhost:{ports.gateway}",
        "GATEWAY_PORT": str(ports.gateway),
        "IDENTITY_PORT": str(ports.identity),
        "SCHOOL_API_PORT": str(ports.school_api),
        "WEBHOOKS_PORT": str(ports.webhooks),
        # As make dev: identity sits behind the gateway, nothing stands in front of it.
        "TRUST_FORWARDED_HOST": "true",
        "GATEWAY_TRUST_FORWARDED": "false",
        "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "info"),
        "PYTHONUNBUFFERED": "1",
    }
    return System(run_id, ports, database_url, stores.redis_url, env, logs, stop_stores)


# -- data ----------------------------------------------------------------------------------------


@dataclass
class World:
    """What the seeding made: the school, users, the two clients."""

    school_id: int
    subdomain: str
    user_ids: list[UUID]
    m2m_id: str
    m2m_secret: str
    app_id: str

    def basic(self) -> str:
        raw = f"{quote(self.m2m_id, safe='')}:{quote(self.m2m_secret, safe='')}".encode()
        return "Basic " + base64.b64encode(raw).decode()


async def prepare_database(system: System) -> None:
    """A fresh bench database; keys an earlier run left in Redis (it was killed) go too."""
    from libs.common import db

    await _unlink(system.redis_url, "lcbench:*")
    await db.drop_database(system.database_url)
    await db.ensure_database(system.database_url)
    await db.migrate(system.database_url)


async def seed(system: System, users: int) -> World:
    """The bench school with the school API's sample data, users, and two clients."""
    from libs.common import db
    from libs.common.config import load_settings
    from services.identity import clients, keys, schools
    from services.identity import users as identity_users
    from services.school_api.seed import seed_school

    settings = load_settings(system.env)
    pool = await db.create_pool(system.database_url, min_size=1, max_size=4)
    try:
        school = await schools.create_school(pool, settings, SUBDOMAIN, "Bench School")
        await keys.ensure_issuer_keys(pool, settings, None)
        await seed_school(pool, school.id, "Bench School")
        password = secrets.token_urlsafe(16)
        made = await asyncio.gather(
            *(
                identity_users.create_user(
                    pool,
                    school_id=school.id,
                    email=f"bench-user-{i}@example.com",
                    password=password,
                    name=f"Bench User {i}",
                    # Staff who connect apps (seed 000): a member's role could not grant
                    # students:read, and a refresh of such a grant revokes it.
                    role="admin",
                )
                for i in range(users)
            )
        )
        m2m = await clients.create_client(
            pool,
            settings,
            school=school,
            name="Bench M2M",
            redirect_uris=[],
            scopes=M2M_SCOPES,
            grant_types=["client_credentials"],
        )
        app = await clients.create_client(
            pool,
            settings,
            school=school,
            name="Bench App",
            redirect_uris=[REDIRECT_URI],
            public=True,
            scopes=APP_SCOPES,
        )
        assert m2m.client_secret is not None
        await pool.execute(
            "UPDATE clients SET rate_limit_per_minute = $2 WHERE id = ANY($1::text[])",
            [m2m.client.id, app.client.id],
            RATE_LIMIT_PER_MINUTE,
        )
        return World(
            school_id=school.id,
            subdomain=school.subdomain,
            user_ids=[u.id for u, _ in made],
            m2m_id=m2m.client.id,
            m2m_secret=m2m.client_secret,
            app_id=app.client.id,
        )
    finally:
        await pool.close()


async def mint_codes(
    pool: asyncpg.Pool,
    system: System,
    world: World,
    n: int,
    scopes: Sequence[str] = CODE_SCOPES,
) -> list[str]:
    """`n` authorization codes of the public app, each on a grant of its own, stored exactly as
    the authorize flow stores them (as tests/token_helpers.py's insert_code does: a consent
    grant, then the hashed code bound to client, redirect URI, PKCE challenge, school and user),
    in bulk. Returns the token-request bodies that redeem them (PKCE verifier included).

    Codes live 60 s (AUTHORIZATION_CODE_TTL), so mint right before they are exchanged."""
    from services.identity import credentials, pkce

    ttl = 60
    bodies: list[str] = []
    redirect = quote(REDIRECT_URI, safe="")
    batch = 5000
    for start in range(0, n, batch):
        size = min(batch, n - start)
        users = [world.user_ids[(start + i) % len(world.user_ids)] for i in range(size)]
        async with pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                "INSERT INTO grants (school_id, client_id, user_id, scopes, last_used_at)"
                " SELECT $1, $2, u, $4, now() FROM unnest($3::uuid[]) AS t(u)"
                " RETURNING id, user_id",
                world.school_id,
                world.app_id,
                users,
                list(scopes),
            )
            codes = [credentials.new_secret(credentials.AUTHORIZATION_CODE_PREFIX) for _ in rows]
            verifiers = [secrets.token_urlsafe(48) for _ in rows]
            await conn.execute(
                "INSERT INTO authorization_codes (code_hash, grant_id, client_id, school_id,"
                " user_id, redirect_uri, scopes, code_challenge, nonce, resource, auth_time,"
                " expires_at)"
                " SELECT h, g, $5, $6, u, $7, $8, c, NULL, NULL, now() - interval '5 seconds',"
                " now() + make_interval(secs => $9)"
                " FROM unnest($1::bytea[], $2::uuid[], $3::uuid[], $4::text[]) AS t(h, g, u, c)",
                [credentials.token_hash(c) for c in codes],
                [r["id"] for r in rows],
                [r["user_id"] for r in rows],
                [pkce.s256_challenge(v) for v in verifiers],
                world.app_id,
                world.school_id,
                REDIRECT_URI,
                list(scopes),
                ttl,
            )
        bodies += [
            f"grant_type=authorization_code&code={c}&redirect_uri={redirect}"
            f"&code_verifier={v}&client_id={world.app_id}"
            for c, v in zip(codes, verifiers, strict=True)
        ]
    if n >= 1000 and os.environ.get("BENCH_ANALYZE", "1") == "1":
        # Rows arriving one sign-in at a time are analyzed by autovacuum as they accumulate;
        # tens of thousands inserted at once are not yet, and without fresh statistics an
        # exchange cost PostgreSQL about 3× the CPU here (BENCH_ANALYZE=0 shows it).
        await pool.execute("ANALYZE grants, authorization_codes")
    return bodies


def refresh_prefix(world: World) -> str:
    return f"grant_type=refresh_token&client_id={world.app_id}&refresh_token="


async def token_request(
    http: aiohttp.ClientSession, base: str, host: str, body: str, authorization: str | None = None
) -> dict[str, Any]:
    """POST a form body to /v1/oauth/token; the JSON answer, or BenchError."""
    headers = {"Host": host, "Content-Type": "application/x-www-form-urlencoded"}
    if authorization:
        headers["Authorization"] = authorization
    async with http.post(f"{base}/v1/oauth/token", data=body, headers=headers) as resp:
        raw = await resp.read()
        if resp.status != 200:
            raise BenchError(f"token endpoint answered {resp.status}: {raw[:300]!r}")
        answer: dict[str, Any] = orjson.loads(raw)
        return answer


async def user_tokens(
    system: System, world: World, http: aiohttp.ClientSession, n: int = 1
) -> list[dict[str, Any]]:
    """`n` token answers of the public app for users, through the real code exchange at the
    gateway's public origin."""
    from libs.common import db

    pool = await db.create_pool(system.database_url, min_size=1, max_size=2)
    try:
        bodies = await mint_codes(pool, system, world, n)
    finally:
        await pool.close()
    base = system.url(system.ports.gateway)
    return [await token_request(http, base, system.host, b) for b in bodies]


async def pg_backend_pids(database_url: str) -> list[int]:
    """The PostgreSQL backends serving the bench database (their CPU is the stores' share)."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    return [int(r["pid"]) for r in rows]


async def cleanup(system: System) -> None:
    """Drop the bench database and delete the run's Redis keys."""
    from libs.common import db

    try:
        await db.drop_database(system.database_url)
    except (OSError, asyncpg.PostgresError) as exc:
        sys.stderr.write(f"[bench] could not drop {DATABASE_NAME}: {exc}\n")
    await _unlink(system.redis_url, f"{system.prefix}*")


async def _unlink(redis_url: str, pattern: str) -> None:
    import redis.asyncio as redis_asyncio

    client = redis_asyncio.Redis.from_url(redis_url)
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await client.unlink(*batch)
                batch = []
        if batch:
            await client.unlink(*batch)
    finally:
        await client.aclose()
