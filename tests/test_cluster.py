"""The production topology (services/dev/topology.py), started for real on free ports: nginx in
front of two processes of each service, PostgreSQL behind PgBouncer, Redis.

A partner's OAuth client (Authlib) runs the authorization code flow through nginx against the
seeded demo school and calls the API; a gateway is killed and calls keep succeeding while the
supervisor brings it back; `.data/cluster.env` names the stores the services use. Skipped only
when nginx or PgBouncer cannot be installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import httpx2 as httpx
import pytest
from authlib.integrations.httpx_client import AsyncOAuth2Client

from libs.common import db, redis_client
from services.dev import topology
from tests.support import client_session
from tests.test_authorize import Browser
from tests.test_oauth_client_e2e import LocalhostTransport

CLI = str(Path(sys.executable).with_name("loopwise-connect"))
GATEWAY_UPSTREAM_TIMEOUT = 8.0


@pytest.fixture(scope="session")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[topology.Topology]:
    try:
        await asyncio.to_thread(topology.ensure_packages)
    except RuntimeError as exc:
        pytest.skip(f"the topology's packages cannot be installed: {exc}")
    root = tmp_path_factory.mktemp("topology")
    root.chmod(0o755)
    # nginx waits for a gateway its upstream timeout and a little more (topology.READ_MARGIN):
    # shorter than make cluster's 30 s, so a stopped gateway is passed over within the test.
    topo = topology.Topology(
        root / "cluster",
        ports=topology.TopologyPorts.free(),
        extra_env={
            "GATEWAY_UPSTREAM_TIMEOUT": str(GATEWAY_UPSTREAM_TIMEOUT),
            # The load tests below call as fast as the machine lets them; they are about nginx.
            "RATE_LIMIT_PER_MINUTE": "1000000",
            "RATE_LIMIT_BURST": "100000",
        },
    )
    await topo.start()
    try:
        yield topo
    finally:
        await topo.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    b = Browser()
    yield b
    await b.close()


async def _access_token(topo: topology.Topology, browser: Browser) -> tuple[str, str]:
    """An access token for the demo school, and its client's id."""
    """The authorization code flow with PKCE, every request through nginx's public port."""
    issuer = f"http://demo.localhost:{topo.ports.public}"
    login = next(x for x in topo.logins if x.school == "demo")
    redirect_uri = "http://127.0.0.1:9/callback"  # never contacted: the browser stops there
    scope = "openid courses:read"
    async with httpx.AsyncClient(transport=LocalhostTransport()) as plain:
        meta = (await plain.get(f"{issuer}/.well-known/openid-configuration")).json()
        assert meta["issuer"] == issuer
        registered = await plain.post(
            meta["registration_endpoint"],
            json={
                "client_name": "Cluster Partner",
                "redirect_uris": [redirect_uri],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "token_endpoint_auth_method": "none",
                "scope": scope,
            },
        )
        assert registered.status_code == 201, registered.text
    oauth = AsyncOAuth2Client(
        client_id=registered.json()["client_id"],
        redirect_uri=redirect_uri,
        scope=scope,
        code_challenge_method="S256",
        token_endpoint_auth_method="none",
        transport=LocalhostTransport(),
    )
    verifier = secrets.token_urlsafe(48)
    url, _state = oauth.create_authorization_url(
        meta["authorization_endpoint"], code_verifier=verifier, nonce=secrets.token_urlsafe(8)
    )
    status, headers, page = await browser.get(url)
    assert status == 200, page
    status, headers, page = await browser.login(issuer, page, login.email, login.password)
    status, headers, page = await browser.follow(issuer, status, headers, page)
    if status == 200:  # the consent page
        status, headers, _ = await browser.decide(issuer, page, "allow")
    assert status in (302, 303), page
    token = await oauth.fetch_token(
        meta["token_endpoint"], authorization_response=headers["Location"], code_verifier=verifier
    )
    await oauth.aclose()
    return str(token["access_token"]), str(registered.json()["client_id"])


async def _courses(topo: topology.Topology, access_token: str) -> int:
    async with httpx.AsyncClient(transport=LocalhostTransport(), timeout=10) as http:
        answer = await http.get(
            f"http://demo.localhost:{topo.ports.public}/api/v1/courses",
            headers={"Authorization": f"Bearer {access_token}"},
        )
    return answer.status_code


async def test_an_oauth_client_through_nginx_survives_a_killed_gateway(
    cluster: topology.Topology, browser: Browser
) -> None:
    access_token, _ = await _access_token(cluster, browser)
    assert await _courses(cluster, access_token) == 200

    gateway = cluster.services["gateway-1"]
    before, restarts = gateway.pid, gateway.restarts
    assert before is not None
    gateway.kill(signal.SIGKILL)
    # nginx retries a refused connection on the other gateway: no call fails meanwhile.
    statuses = [await _courses(cluster, access_token) for _ in range(40)]
    assert statuses == [200] * 40
    await gateway.wait_ready(timeout=30)
    assert gateway.restarts == restarts + 1
    assert gateway.pid not in (None, before)
    assert await _courses(cluster, access_token) == 200


async def test_every_kind_runs_twice_behind_nginx(cluster: topology.Topology) -> None:
    kinds = sorted(p.kind for p in cluster.services.values())
    assert kinds == sorted(["gateway", "identity", "school_api", "webhooks"] * 2)
    assert {p.name for p in cluster.services.values()} >= {"gateway-1", "gateway-2"}
    for proc in (*cluster.services.values(), cluster.nginx, cluster.pgbouncer):
        assert proc is not None and proc.pid is not None


def _read(path: Path) -> tuple[str, int]:
    return path.read_bytes().decode(errors="replace"), path.stat().st_mode & 0o777


async def test_cluster_env_names_the_stores_the_services_use(cluster: topology.Topology) -> None:
    text, mode = await asyncio.to_thread(_read, cluster.env_file)
    written = dict(line.split("=", 1) for line in text.splitlines() if line)
    assert written == cluster.env
    assert mode == 0o600
    pooled, session = urlsplit(written["DATABASE_URL"]), urlsplit(written["DATABASE_SESSION_URL"])
    assert pooled.port == cluster.ports.pgbouncer
    assert session.port == cluster.ports.postgres
    assert written["DATABASE_STATEMENT_CACHE"] == "0"
    assert cluster.redis is not None and written["REDIS_URL"] == cluster.redis.url
    assert (await asyncio.to_thread(_read, Path(written["CONNECT_DEV_SECRETS"])))[0]
    assert urlsplit(written["TEST_DATABASE_URL"]).port == cluster.ports.pgbouncer
    # What the services wrote is there, through PgBouncer.
    conn = await db.connect(written["DATABASE_URL"], statement_cache=0)
    try:
        names = {r["subdomain"] for r in await conn.fetch("SELECT subdomain FROM schools")}
    finally:
        await conn.close()
    assert {"demo", "northside"} <= names
    # And the CLI, given nothing but that file, reaches them.
    env = {**os.environ, **written}
    proc = await asyncio.create_subprocess_exec(
        CLI,
        "schools",
        "list",
        "--json",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert b'"demo"' in out


# -- stores only (make test-cluster) ----------------------------------------------------------


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


async def test_stores_only_runs_the_stores_and_nothing_else(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """`Topology(stores_only=True)` (what `make test-cluster` runs the suite on): PostgreSQL,
    PgBouncer in transaction pooling and Redis Cluster, their URLs in its env file for the
    tests; no service process, no nginx, no database prepared; all gone once stopped."""
    try:
        await asyncio.to_thread(topology.ensure_packages, topology.STORE_PROGRAMS)
    except RuntimeError as exc:
        pytest.skip(f"the topology's packages cannot be installed: {exc}")
    root = tmp_path_factory.mktemp("stores")
    root.chmod(0o755)
    ports = topology.TopologyPorts.free()
    topo = topology.Topology(
        root / "cluster", ports=ports, env_file=root / "cluster.env", stores_only=True
    )
    await topo.start()
    try:
        assert topo.services == {} and topo.nginx is None and topo.logins == []
        fronts = (ports.public, ports.identity, ports.school_api, ports.webhooks)
        processes = [port for kind in ports.processes.values() for port in kind]
        assert not any(_listening(port) for port in (*fronts, *processes))
        text, _ = await asyncio.to_thread(_read, topo.env_file)
        written = dict(line.split("=", 1) for line in text.splitlines() if line)
        assert urlsplit(written["TEST_DATABASE_URL"]).port == ports.pgbouncer
        assert urlsplit(written["TEST_DATABASE_SESSION_URL"]).port == ports.postgres
        assert written["TEST_DATABASE_STATEMENT_CACHE"] == "0"
        # Through PgBouncer each transaction may take another server session; the session DSN
        # is the server itself. No database of the product's was made.
        pooled = await db.connect(written["TEST_DATABASE_URL"], statement_cache=0)
        session = await db.connect(written["TEST_DATABASE_SESSION_URL"], statement_cache=0)
        try:
            names = {r["datname"] for r in await pooled.fetch("SELECT datname FROM pg_database")}
            assert topology.DATABASE_NAME not in names
            assert int(await session.fetchval("SHOW port")) == ports.postgres
        finally:
            await pooled.close()
            await session.close()
        client = redis_client.connect(written["TEST_REDIS_URL"])
        try:
            # Keys in every slot range answer: three primaries serve the whole key space.
            nodes = await client.cluster_nodes()  # type: ignore[attr-defined]
            primaries = [n for n in nodes.values() if "master" in n["flags"]]
            assert len(primaries) == 3 and len(nodes) == 6
            keys = [f"stores-only:{secrets.token_hex(4)}" for _ in range(16)]
            for key in keys:
                await client.set(key, key, ex=60)
            assert [await client.get(key) for key in keys] == [k.encode() for k in keys]
            await client.delete(*keys)
        finally:
            await client.aclose()
    finally:
        await topo.stop()
    assert not any(_listening(port) for port in (ports.pgbouncer, ports.postgres, *ports.redis))


# -- nginx: reloads and a stuck gateway -------------------------------------------------------


def _children(pid: int) -> set[int]:
    """The processes `pid` forked (nginx's workers), from /proc."""
    found: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name may hold spaces: the parent comes after its closing ")".
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(stat.parent.name))
    return found


async def _call_loop(
    topo: topology.Topology, access_token: str, stop: asyncio.Event, *, rounds: int | None = None
) -> list[int | str]:
    """GET the courses through nginx on one keep-alive connection, as a partner's client does,
    until `stop` is set (or `rounds` calls); each call's status or the error it ended in."""
    url = f"http://demo.localhost:{topo.ports.public}/api/v1/courses"
    headers = {"Authorization": f"Bearer {access_token}"}
    outcomes: list[int | str] = []
    timeout = aiohttp.ClientTimeout(total=60)
    async with client_session(timeout=timeout) as http:
        while not stop.is_set() and (rounds is None or len(outcomes) < rounds):
            try:
                async with http.get(url, headers=headers) as resp:
                    await resp.read()
                    outcomes.append(resp.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcomes.append(repr(exc))
    return outcomes


async def test_nginx_reloads_under_load_and_no_call_fails(
    cluster: topology.Topology, browser: Browser
) -> None:
    access_token, _ = await _access_token(cluster, browser)
    nginx = cluster.nginx
    assert nginx is not None and nginx.pid is not None
    stop = asyncio.Event()
    callers = [asyncio.create_task(_call_loop(cluster, access_token, stop)) for _ in range(4)]
    try:
        for _ in range(4):
            workers = _children(nginx.pid)
            await nginx.reload()
            # A reload starts new workers and lets the old ones finish their calls.
            async with asyncio.timeout(30):
                while True:
                    if not _children(nginx.pid) & workers:
                        break
                    await asyncio.sleep(0.1)
            await asyncio.sleep(0.3)
    finally:
        stop.set()
        outcomes = [o for found in await asyncio.gather(*callers) for o in found]
    assert [o for o in outcomes if o != 200] == []
    assert len(outcomes) >= 40  # calls were flowing through every reload


async def test_a_stopped_gateway_is_passed_over_and_then_honours_a_revocation(
    cluster: topology.Topology, browser: Browser
) -> None:
    """gateway-1 SIGSTOPped for longer than nginx's read timeout and the revocation lease:
    the calls it held are answered by gateway-2 while it is still stopped, new calls go there;
    a grant revoked meanwhile is refused by gateway-1 once it runs again (its lease lapsed,
    so it asks Redis rather than its own set)."""
    access_token, client_id = await _access_token(cluster, browser)
    stuck = cluster.services["gateway-1"]
    error_log = cluster.data_dir / "nginx" / "error.log"
    logged = error_log.stat().st_size if error_log.exists() else 0
    stuck.kill(signal.SIGSTOP)
    try:
        never = asyncio.Event()
        # Every call answered while gateway-1 is still stopped: nginx gave up on the calls it
        # had sent there (read timeout) and sent them, all GETs, to gateway-2.
        async with asyncio.timeout(6 * GATEWAY_UPSTREAM_TIMEOUT):
            done = await asyncio.gather(
                *(_call_loop(cluster, access_token, never, rounds=15) for _ in range(4))
            )
        outcomes = [o for found in done for o in found]
        assert outcomes == [200] * 60
        log_text = await asyncio.to_thread(_read_from, error_log, logged)
        assert "upstream timed out" in log_text and f":{stuck.port}/" in log_text
        # Revoked at identity while gateway-1 cannot confirm it: identity waits out its lease.
        async with (
            client_session() as http,
            http.post(
                f"http://{topology.HOST}:{cluster.ports.identity}/v1/oauth/revoke",
                data={"token": access_token, "client_id": client_id},
                headers={"Host": f"demo.localhost:{cluster.ports.public}"},
            ) as resp,
        ):
            assert resp.status == 200, await resp.text()
    finally:
        stuck.kill(signal.SIGCONT)
    # gateway-1 itself, first thing after it runs again, and through nginx.
    async with (
        client_session() as http,
        http.get(
            f"http://{topology.HOST}:{stuck.port}/api/v1/courses",
            headers={
                "Authorization": f"Bearer {access_token}",
                "Host": f"demo.localhost:{cluster.ports.public}",
            },
        ) as resp,
    ):
        assert resp.status == 401, await resp.text()
    assert set(await _call_loop(cluster, access_token, asyncio.Event(), rounds=6)) == {401}


def _read_from(path: Path, offset: int) -> str:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")
