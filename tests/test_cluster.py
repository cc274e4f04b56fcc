"""The production topology (services/dev/topology.py), started for real on free ports: nginx in
front of two processes of each service, PostgreSQL behind PgBouncer, Redis.

A partner's OAuth client (Authlib) runs the authorization code flow through nginx against the
seeded demo school and calls the API; a gateway is killed and calls keep succeeding while the
supervisor brings it back; `.data/cluster.env` names the stores the services use. Skipped only
when nginx or PgBouncer cannot be installed.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx2 as httpx
import pytest
from authlib.integrations.httpx_client import AsyncOAuth2Client

from libs.common import db
from services.dev import topology
from tests.test_authorize import Browser
from tests.test_oauth_client_e2e import LocalhostTransport

CLI = str(Path(sys.executable).with_name("loopwise-connect"))


@pytest.fixture(scope="session")
async def cluster(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[topology.Topology]:
    try:
        await asyncio.to_thread(topology.ensure_packages)
    except RuntimeError as exc:
        pytest.skip(f"the topology's packages cannot be installed: {exc}")
    root = tmp_path_factory.mktemp("topology")
    root.chmod(0o755)
    topo = topology.Topology(root / "cluster", ports=topology.TopologyPorts.free())
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


async def _access_token(topo: topology.Topology, browser: Browser) -> str:
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
    return str(token["access_token"])


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
    access_token = await _access_token(cluster, browser)
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
    text, mode = await asyncio.to_thread(_read, cluster.data_dir.parent / "cluster.env")
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
