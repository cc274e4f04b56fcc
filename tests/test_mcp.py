"""The MCP server (contract 9) on real sockets, met by the real MCP SDK client.

Identity behind a gateway (issuers on the gateway's public port), the real school API (with its
outbox relay) as the gateway's `school_api` upstream. The session's `gateway_url` fronts an echo
server, so this module runs a gateway of its own (`extra_gateway`) and sends every request to it
with the public origin's Host, as DNS and a port forward would. Tokens come from identity's
token endpoint, for an MCP client registered on the platform, the school picked at consent and
the MCP endpoint named as RFC 8707 `resource`.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any
from uuid import UUID, uuid4

import aiohttp
import asyncpg
import httpx2
import orjson
import pytest
import redis.asyncio as redis_asyncio
from mcp import types
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from pytest_aiohttp import AiohttpServer

from libs.common import streams
from libs.common.config import Settings
from services.identity import audit, clients, keys, schools, store, users
from services.school_api import seed
from tests.test_gateway_refusals import buffer_empty, gateway_metric, recording_upstream
from tests.test_gateway_support import extra_gateway, mint
from tests.test_school_api_events import events_of, until
from tests.token_helpers import insert_code, pkce_pair

pytestmark = pytest.mark.timeout(60)

LOOPBACK_REDIRECT = "http://127.0.0.1:33418/callback"
SCOPES = ("openid", "courses:read", "courses:write")


@dataclass(frozen=True)
class System:
    gateway: str  # where this module's gateway listens (http://127.0.0.1:port)
    public_port: int  # the port of every public origin

    @property
    def platform_host(self) -> str:
        return f"localhost:{self.public_port}"

    @property
    def platform(self) -> str:
        return f"http://{self.platform_host}"

    @property
    def mcp_resource(self) -> str:
        return f"{self.platform}/mcp"

    def school_host(self, subdomain: str) -> str:
        return f"{subdomain}.localhost:{self.public_port}"


@pytest.fixture(scope="module")
async def system(
    gateway_env: dict[str, str], gateway_port: int, gateway_identity_url: str, school_api_url: str
) -> AsyncIterator[System]:
    async with extra_gateway(gateway_env, SCHOOL_API_URL=school_api_url) as base:
        yield System(base, gateway_port)


@dataclass(frozen=True)
class Tenant:
    school: store.School
    user: store.User


async def new_tenant(pool: asyncpg.Pool, settings: Settings, label: str) -> Tenant:
    """A school with the sample data `make dev` gives `demo`, and a user of it."""
    school = await schools.create_school(
        pool,
        settings,
        f"mcp{label}{secrets.token_hex(3)}",
        f"MCP {label}",
        # Above make_world's ids (1_000_000 + up to 1e9), within int4.
        1_100_000_000 + secrets.randbelow(900_000_000),
    )
    assert await seed.seed_school(pool, school.id, school.name)
    user, _ = await users.create_user(
        pool,
        school_id=school.id,
        email=f"mcp-{label}-{secrets.token_hex(4)}@example.com",
        password="correct horse battery",
        name="Ada Lovelace",
        # Only an admin may grant every tool's scope (roles.py).
        role="admin",
    )
    return Tenant(school, user)


@pytest.fixture(scope="module")
async def tenant(pool: asyncpg.Pool, gateway_settings: Settings) -> Tenant:
    return await new_tenant(pool, gateway_settings, "a")


@pytest.fixture(scope="module")
async def other_tenant(pool: asyncpg.Pool, gateway_settings: Settings) -> Tenant:
    return await new_tenant(pool, gateway_settings, "b")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _token_request(
    http: aiohttp.ClientSession, system: System, host: str, form: dict[str, str]
) -> dict[str, Any]:
    async with http.post(
        system.gateway + "/v1/oauth/token", data=form, headers={"Host": host}
    ) as resp:
        body: dict[str, Any] = await resp.json()
        assert resp.status == 200, body
        return body


@dataclass(frozen=True)
class Consented:
    """A public loopback client's code as the authorize flow stores it after consent, and the
    form that redeems it (no `resource` in it: the code's own is what counts unless named)."""

    form: dict[str, str]
    client_id: str
    grant_id: UUID


async def consented_code(
    pool: asyncpg.Pool,
    settings: Settings,
    tenant: Tenant,
    *,
    school: store.School | None,
    name: str,
    scopes: Sequence[str],
    resource: str | None,
    created_via: str = "admin",
) -> Consented:
    """A new public client of `school` (None: the platform's) with a code for `tenant`'s user."""
    made = await clients.create_client(
        pool,
        settings,
        school=school,
        name=name,
        redirect_uris=[LOOPBACK_REDIRECT],
        public=True,
        scopes=scopes,
        created_via=created_via,
    )
    verifier, challenge = pkce_pair()
    code, grant_id = await insert_code(
        pool,
        settings,
        school_id=tenant.school.id,
        client_id=made.client.id,
        user_id=tenant.user.id,
        scopes=scopes,
        challenge=challenge,
        redirect_uri=LOOPBACK_REDIRECT,
        resource=resource,
    )
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": LOOPBACK_REDIRECT,
        "code_verifier": verifier,
        "client_id": made.client.id,
    }
    return Consented(form, made.client.id, grant_id)


@dataclass(frozen=True)
class Issued:
    access_token: str
    client_id: str
    grant_id: UUID


async def mcp_token(
    http: aiohttp.ClientSession,
    pool: asyncpg.Pool,
    settings: Settings,
    system: System,
    tenant: Tenant,
    *,
    scopes: Sequence[str] = SCOPES,
    resource: str | None = "mcp",
    created_via: str = "registration",
) -> Issued:
    """An MCP client registered on the platform, authorized for `tenant`'s school (the code as
    the authorize flow stores it after consent), its code exchanged at the platform's token
    endpoint through the gateway."""
    named = system.mcp_resource if resource == "mcp" else resource
    code = await consented_code(
        pool,
        settings,
        tenant,
        school=None,
        name="Claude Code",
        scopes=scopes,
        resource=named,
        created_via=created_via,
    )
    form = {**code.form, "resource": named} if named else code.form
    body = await _token_request(http, system, system.platform_host, form)
    assert body["school_id"] == tenant.school.id
    return Issued(body["access_token"], code.client_id, code.grant_id)


TenantToken = Callable[..., Awaitable[Issued]]


@pytest.fixture
def tenant_token(
    http: aiohttp.ClientSession,
    pool: asyncpg.Pool,
    gateway_settings: Settings,
    system: System,
    tenant: Tenant,
) -> TenantToken:
    """`mcp_token` for the module's tenant, so a test names only the options it varies."""
    return partial(mcp_token, http, pool, gateway_settings, system, tenant)


@asynccontextmanager
async def mcp_session(
    system: System, access_token: str, *, era: str = "handshake"
) -> AsyncIterator[ClientSession]:
    """The SDK's client over streamable HTTP, Host the platform's, connected the way of `era`:
    the `initialize` handshake (protocol 2025-11-25 and before) or `discover` (2026-07-28,
    every request self-contained)."""
    headers = {"Host": system.platform_host, "Authorization": f"Bearer {access_token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30) as client,
        streamable_http_client(system.gateway + "/mcp", http_client=client) as (read, write),
        ClientSession(read, write) as session,
    ):
        if era == "handshake":
            await session.initialize()
        else:
            discovered = await session.discover()
            assert "2026-07-28" in discovered.supported_versions
        yield session


def _text(result: types.CallToolResult) -> str:
    return "".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def _post_mcp(
    http: aiohttp.ClientSession, system: System, token: str | None, host: str | None = None
) -> tuple[int, dict[str, Any] | None, Any]:
    """A bare JSON-RPC ping POST, to see the HTTP answer itself."""
    headers = {
        "Host": host or system.platform_host,
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
    }
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    payload = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    async with http.post(system.gateway + "/mcp", data=orjson.dumps(payload), headers=headers) as r:
        raw = await r.read()
        body = orjson.loads(raw) if raw and r.content_type == "application/json" else None
        return r.status, body, r.headers


async def _refused_as_invalid_token(
    http: aiohttp.ClientSession, system: System, token: str
) -> dict[str, Any] | None:
    """A ping with `token`: a 401 whose challenge says invalid_token and still points at the
    resource metadata, so a client knows where to get a better one; the body, for a look."""
    status, body, headers = await _post_mcp(http, system, token)
    assert status == 401
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert "resource_metadata=" in headers["WWW-Authenticate"]
    return body


# Metadata ------------------------------------------------------------------------------------


async def test_protected_resource_metadata_names_the_platform_issuer(
    system: System, http: aiohttp.ClientSession, tenant: Tenant
) -> None:
    async with http.get(
        system.gateway + "/.well-known/openid-configuration",
        headers={"Host": system.platform_host},
    ) as resp:
        issuer = (await resp.json())["issuer"]
    for path in (
        "/.well-known/oauth-protected-resource/mcp",
        "/.well-known/oauth-protected-resource",
    ):
        async with http.get(system.gateway + path, headers={"Host": system.platform_host}) as resp:
            assert resp.status == 200, path
            document = await resp.json()
        assert document["resource"] == system.mcp_resource
        assert document["authorization_servers"] == [issuer]
        assert document["bearer_methods_supported"] == ["header"]
        assert "courses:read" in document["scopes_supported"]
        assert "students:read" in document["scopes_supported"]
        assert not [s for s in document["scopes_supported"] if s.startswith("admin:")]
        # A school origin has no MCP endpoint, so no metadata for one.
        async with http.get(
            system.gateway + path, headers={"Host": system.school_host(tenant.school.subdomain)}
        ) as resp:
            assert resp.status == 404
    async with http.get(system.gateway + "/openapi.json") as resp:
        paths = (await resp.json())["paths"]
    assert "post" in paths["/mcp"]
    assert "/.well-known/oauth-protected-resource/mcp" in paths


# Who may call ----------------------------------------------------------------------------------


async def test_no_token_is_401_pointing_at_the_resource_metadata(
    system: System, http: aiohttp.ClientSession
) -> None:
    status, _, headers = await _post_mcp(http, system, None)
    assert status == 401
    challenge = headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert (
        f'resource_metadata="{system.platform}/.well-known/oauth-protected-resource/mcp"'
        in challenge
    )
    assert "error=" not in challenge
    await _refused_as_invalid_token(http, system, "not-a-jwt")


async def test_token_of_another_audience_is_401(
    system: System, http: aiohttp.ClientSession, tenant_token: TenantToken
) -> None:
    # No `resource` named by an operator-made platform app: the token is for the school's
    # API origin, not for /mcp.
    issued = await tenant_token(resource=None, created_via="cli")
    body = await _refused_as_invalid_token(http, system, issued.access_token)
    assert body is not None and body["error"] == "invalid_token"


async def test_a_self_registered_client_naming_no_resource_gets_an_mcp_token(
    system: System, http: aiohttp.ClientSession, tenant_token: TenantToken
) -> None:
    # An MCP client that omits RFC 8707 `resource`: a self-registered platform client may
    # only mint for the MCP server, so that is its audience, and the MCP server takes it.
    issued = await tenant_token(resource=None)
    status, body, _ = await _post_mcp(http, system, issued.access_token)
    assert status == 200, body


async def test_token_of_a_school_issuer_is_401_even_for_this_resource(
    system: System,
    http: aiohttp.ClientSession,
    pool: asyncpg.Pool,
    gateway_settings: Settings,
    tenant: Tenant,
) -> None:
    """The metadata names the platform as the resource's one authorization server: a
    school's issuer refuses to mint for it, and the gateway refuses such a token anyway."""
    code = await consented_code(
        pool,
        gateway_settings,
        tenant,
        school=tenant.school,
        name="School App",
        scopes=SCOPES,
        resource=system.mcp_resource,
    )
    school_host = system.school_host(tenant.school.subdomain)
    async with http.post(
        system.gateway + "/v1/oauth/token", data=code.form, headers={"Host": school_host}
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_target"

    # As if a school's key had signed one all the same.
    now = int(time.time())
    forged = await mint(
        keys.KeyRing(pool, gateway_settings),
        tenant.school.id,
        {
            "iss": gateway_settings.urls.school_origin(tenant.school.subdomain),
            "sub": str(tenant.user.id),
            "aud": system.mcp_resource,
            "client_id": code.client_id,
            "scope": " ".join(SCOPES),
            "school_id": tenant.school.id,
            "school_subdomain": tenant.school.subdomain,
            "jti": secrets.token_urlsafe(16),
            "iat": now,
            "exp": now + 600,
            "grant_id": str(uuid4()),
        },
    )
    status, answer, _ = await _post_mcp(http, system, forged)
    assert status == 401
    assert answer is not None and answer["error"] == "invalid_token"


async def test_mcp_answers_on_the_platform_origin_only(
    system: System,
    http: aiohttp.ClientSession,
    tenant: Tenant,
    tenant_token: TenantToken,
) -> None:
    issued = await tenant_token()
    status, _, _ = await _post_mcp(
        http, system, issued.access_token, host=system.school_host(tenant.school.subdomain)
    )
    assert status == 404
    status, body, _ = await _post_mcp(http, system, issued.access_token)
    assert status == 200, body
    assert body is not None and body["result"] == {}
    # Stateless: no server-initiated stream to open, no session to end.
    bearer = {"Host": system.platform_host, "Authorization": f"Bearer {issued.access_token}"}
    for method in ("GET", "DELETE"):
        async with http.request(method, system.gateway + "/mcp", headers=bearer) as resp:
            assert resp.status == 405
            assert resp.headers["Allow"] == "POST"


async def test_revoked_grant_is_401(
    system: System, http: aiohttp.ClientSession, tenant_token: TenantToken
) -> None:
    issued = await tenant_token()
    async with mcp_session(system, issued.access_token) as session:
        assert (await session.call_tool("list_courses", {"limit": 1})).is_error is False
    async with http.post(
        system.gateway + "/v1/oauth/revoke",
        data={"token": issued.access_token, "client_id": issued.client_id},
        headers={"Host": system.platform_host},
    ) as resp:
        assert resp.status == 200
    await _refused_as_invalid_token(http, system, issued.access_token)


# Tools ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("era", ["handshake", "modern"])
async def test_tools_act_on_the_tokens_school_through_the_school_api(
    era: str,
    system: System,
    http: aiohttp.ClientSession,
    pool: asyncpg.Pool,
    redis: redis_asyncio.Redis,
    gateway_settings: Settings,
    tenant: Tenant,
    other_tenant: Tenant,
    school_api_url: str,
    tenant_token: TenantToken,
) -> None:
    issued = await tenant_token()
    ours = {
        r["id"]
        for r in await pool.fetch(
            "SELECT id FROM school_api.courses WHERE school_id = $1", tenant.school.id
        )
    }
    theirs = {
        r["id"]
        for r in await pool.fetch(
            "SELECT id FROM school_api.courses WHERE school_id = $1", other_tenant.school.id
        )
    }
    assert ours and theirs

    async with mcp_session(system, issued.access_token, era=era) as session:
        # tools/list offers every tool, each naming the scope it needs.
        listed = {t.name: t for t in (await session.list_tools()).tools}
        assert {"list_courses", "update_course", "list_members", "update_settings"} <= set(listed)
        assert "students:read" in (listed["list_members"].description or "")
        assert listed["update_course"].input_schema["required"] == ["id"]
        assert listed["list_courses"].annotations is not None
        assert listed["list_courses"].annotations.read_only_hint is True

        result = await session.call_tool("list_courses", {"limit": 100})
        assert result.is_error is False, _text(result)
        assert result.structured_content is not None
        rows = result.structured_content["data"]
        seen = {row["id"] for row in rows}
        assert seen == ours
        assert {row["school_id"] for row in rows} == {tenant.school.id}
        assert orjson.loads(_text(result))["data"] == rows

        # Another school's course does not exist from here.
        missing = await session.call_tool("get_course", {"id": min(theirs)})
        assert missing.is_error is True
        assert "not_found" in _text(missing)

        course_id = min(ours)
        title = f"Renamed over MCP {secrets.token_hex(3)}"
        updated = await session.call_tool("update_course", {"id": course_id, "title": title})
        assert updated.is_error is False, _text(updated)
        assert updated.structured_content is not None
        assert updated.structured_content["title"] == title

        # Arguments the school API would refuse are refused with its reasons.
        invalid = await session.call_tool("update_course", {"id": course_id, "status": "gone"})
        assert invalid.is_error is True
        assert "status" in _text(invalid)

    # The change, read straight from the school API with a gateway-vouched identity.
    headers = {
        "X-Connect-Internal-Token": gateway_settings.internal_token,
        "X-Connect-School-Id": str(tenant.school.id),
        "X-Connect-Subject": str(tenant.user.id),
        "X-Connect-Client-Id": issued.client_id,
        "X-Connect-Scopes": "courses:read",
    }
    async with http.get(f"{school_api_url}/api/v1/courses/{course_id}", headers=headers) as resp:
        assert resp.status == 200
        assert (await resp.json())["title"] == title

    # And the event every change publishes. The school's stream may hold the other era's
    # change already (the tenant is the module's): wait for this one, not for any.
    async def changed() -> list[dict[str, Any]]:
        events = await events_of(
            redis, gateway_settings.stream(streams.EVENTS), tenant.school.id, 0, timeout=0
        )
        return [
            e
            for e in events
            if e["type"] == "course.updated"
            and e["data"]["id"] == course_id
            and e["data"]["title"] == title
        ]

    async def published() -> bool:
        return bool(await changed())

    assert await until(published)
    assert len(await changed()) == 1

    # Each school API call a tool made is in the audit trail, under the grant (the gateway
    # appends its records in batches, so they are waited for).
    expected = {
        ("GET", "/api/v1/courses", 200),
        ("PATCH", f"/api/v1/courses/{course_id}", 200),
        # The MCP POSTs themselves (initialize and tools/list among them) are recorded too.
        ("POST", "/mcp", 200),
    }

    async def audited() -> bool:
        entries = await redis.xrevrange(gateway_settings.stream(streams.AUDIT), count=5000)
        records = [
            r for _, fields in entries for r in audit.records_of(orjson.loads(fields[b"data"]))
        ]
        calls = {
            (r.get("method"), r.get("path"), r.get("status"))
            for r in records
            if r.get("grant_id") == str(issued.grant_id) and r.get("action") == "api.call"
        }
        return expected <= calls

    assert await until(audited)


async def _call_raw(
    http: aiohttp.ClientSession, system: System, token: str, name: str, arguments: dict[str, Any]
) -> tuple[int, dict[str, Any], Any]:
    """A bare tools/call POST, to see the HTTP answer itself."""
    payload = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
    }
    headers = {
        "Host": system.platform_host,
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "Authorization": f"Bearer {token}",
    }
    async with http.post(system.gateway + "/mcp", data=orjson.dumps(payload), headers=headers) as r:
        return r.status, orjson.loads(await r.read()), r.headers


async def test_a_tool_without_its_scope_is_a_403_naming_the_scope(
    system: System, http: aiohttp.ClientSession, tenant_token: TenantToken
) -> None:
    """The MCP authorization spec's scope challenge: HTTP 403 insufficient_scope with the
    scope to ask for, so the client steps up instead of the model meeting a dead end."""
    issued = await tenant_token(scopes=("openid", "courses:read"))
    where = f"{system.platform}/.well-known/oauth-protected-resource/mcp"
    for name, arguments, scope in (
        ("update_course", {"id": 1, "title": "x"}, "courses:write"),
        ("list_members", {}, "students:read"),
        # Any-of: the first scope the table names is the one asked for.
        ("get_settings", {}, "school:read"),
    ):
        status, body, headers = await _call_raw(http, system, issued.access_token, name, arguments)
        assert status == 403, body
        assert body["error"] == "insufficient_scope" and body["scope"] == scope
        challenge = headers["WWW-Authenticate"]
        assert 'error="insufficient_scope"' in challenge
        assert f'scope="{scope}"' in challenge
        assert f'resource_metadata="{where}"' in challenge

    # What the grant holds still works; an unknown tool is a tool error, not a 403.
    async with mcp_session(system, issued.access_token) as session:
        unknown = await session.call_tool("drop_database", {})
        assert unknown.is_error is True
        allowed = await session.call_tool("list_courses", {})
        assert allowed.is_error is False


async def test_the_first_401_asks_for_reading_only(
    system: System, http: aiohttp.ClientSession
) -> None:
    status, _, headers = await _post_mcp(http, system, None)
    assert status == 401
    challenge = headers["WWW-Authenticate"]
    scope = challenge.split('scope="', 1)[1].split('"', 1)[0].split()
    assert "courses:read" in scope and "students:read" in scope
    assert all(s.endswith(":read") for s in scope), scope


async def test_any_of_scopes_and_argument_checks(
    system: System, tenant: Tenant, tenant_token: TenantToken
) -> None:
    issued = await tenant_token(scopes=("openid", "appearance:read", "posts:read", "posts:write"))
    async with mcp_session(system, issued.access_token) as session:
        found = await session.call_tool("get_settings", {})
        assert found.is_error is False, _text(found)
        assert found.structured_content is not None
        assert found.structured_content["school_id"] == tenant.school.id

        created = await session.call_tool("create_post", {"title": "Hello from MCP"})
        assert created.is_error is False, _text(created)
        assert created.structured_content is not None
        post_id = created.structured_content["id"]
        assert created.structured_content["school_id"] == tenant.school.id
        deleted = await session.call_tool("delete_post", {"id": post_id})
        assert deleted.is_error is False, _text(deleted)
        gone = await session.call_tool("get_post", {"id": post_id})
        assert gone.is_error is True

        # Nothing a caller sends can reach another path than the tool's.
        for bad in ({"id": "1/../../members"}, {"id": True}, {"id": 0}, {"id": 1, "x": 1}):
            refused = await session.call_tool("get_post", bad)
            assert refused.is_error is True
            assert "invalid arguments" in _text(refused)


# The audit trail fails closed ----------------------------------------------------------------


async def test_an_mcp_call_that_cannot_be_recorded_is_refused(
    http: aiohttp.ClientSession,
    pool: asyncpg.Pool,
    gateway_settings: Settings,
    gateway_env: dict[str, str],
    gateway_port: int,
    gateway_identity_url: str,
    tenant: Tenant,
    redis: redis_asyncio.Redis,
    aiohttp_server: AiohttpServer,
) -> None:
    """GATEWAY_AUDIT_BUFFER=2: a tool's school API call takes a place of its own beside the
    /mcp call's. While one tool call is held at the school API, both places are taken: a ping
    is 503 and a tool call is refused before reaching the school API, each counted. With one
    place free, a tool call is served but its school API call is not made (a tool error). Every
    school API call made has its record."""

    async def records(grant_id: UUID) -> list[tuple[str, int]]:
        return [
            (r["path"], r["status"])
            for _, fields in await redis.xrange(gateway_settings.stream(streams.AUDIT))
            for r in audit.records_of(orjson.loads(fields[b"data"]))
            if r.get("grant_id") == str(grant_id) and r.get("action") == "api.call"
        ]

    async def written(grant_id: UUID, expected: list[tuple[str, int]]) -> None:
        """Until the buffer has written these records out and is empty again."""
        assert await until(lambda: _equal(records(grant_id), expected)), await records(grant_id)
        await buffer_empty(http, base)

    async with (
        recording_upstream(aiohttp_server) as (upstream, upstream_url),
        extra_gateway(gateway_env, SCHOOL_API_URL=upstream_url, GATEWAY_AUDIT_BUFFER="2") as base,
    ):
        system = System(base, gateway_port)
        issued = await mcp_token(http, pool, gateway_settings, system, tenant)
        token, grant = issued.access_token, issued.grant_id
        status, body, _ = await _call_raw(http, system, token, "list_courses", {})
        assert status == 200 and body["result"]["isError"] is False, body
        expected = [("/api/v1/courses", 200), ("/mcp", 200)]
        await written(grant, expected)

        upstream.hold_all = True
        held = asyncio.ensure_future(_call_raw(http, system, token, "list_courses", {}))
        try:
            assert await until(lambda: asyncio.sleep(0, upstream.holding == 1))
            before = await gateway_metric(http, base, "gateway_audit_refused_total")
            status, body, headers = await _post_mcp(http, system, token)
            assert status == 503 and body is not None, body
            assert body["error"] == "temporarily_unavailable"
            assert headers["Retry-After"] == "1"
            status, _, _ = await _call_raw(http, system, token, "list_courses", {})
            assert status == 503
            assert await gateway_metric(http, base, "gateway_audit_refused_total") == before + 2
            assert len(upstream.received) == 2  # the first and the held one
        finally:
            upstream.hold_all = False
            upstream.release.set()
            status, body, _ = await held
        assert status == 200 and body["result"]["isError"] is False, body
        expected += [("/api/v1/courses", 200), ("/mcp", 200)]
        await written(grant, expected)

        # One place taken by a school API call (a school token's, straight through the gateway)
        # held at the upstream: the tool call itself is served, but its school API call cannot
        # be recorded and is not made.
        school_host = system.school_host(tenant.school.subdomain)
        code = await consented_code(
            pool,
            gateway_settings,
            tenant,
            school=tenant.school,
            name="Gradebook",
            scopes=("courses:read",),
            resource=None,
        )
        school_token = (await _token_request(http, system, school_host, code.form))["access_token"]
        upstream.release.clear()
        stuck = asyncio.ensure_future(
            http.get(
                base + "/api/v1/courses/hold",
                headers={"Host": school_host, "Authorization": f"Bearer {school_token}"},
            )
        )
        try:
            assert await until(lambda: asyncio.sleep(0, upstream.holding == 1))
            before = await gateway_metric(http, base, "gateway_audit_refused_total")
            status, body, _ = await _call_raw(http, system, token, "list_courses", {})
        finally:
            upstream.release.set()
            resp = await stuck
            resp.close()
        assert resp.status == 200
        assert status == 200
        assert body["result"]["isError"] is True
        assert "temporarily_unavailable" in body["result"]["content"][0]["text"]
        assert await gateway_metric(http, base, "gateway_audit_refused_total") == before + 1
        assert len(upstream.received) == 3  # the school token's call, not the refused one
        await written(grant, [*expected, ("/mcp", 200)])


async def _equal(got: Awaitable[Any], expected: Any) -> bool:
    return bool(await got == expected)


async def test_in_durable_mode_an_mcp_answer_comes_after_its_own_record(
    http: aiohttp.ClientSession,
    system: System,
    tenant_token: TenantToken,
    gateway_env: dict[str, str],
    gateway_settings: Settings,
    school_api_url: str,
    redis: redis_asyncio.Redis,
) -> None:
    """GATEWAY_AUDIT_MODE=durable: the /mcp call's record is on connect:audit before the
    answer's status goes out, streamed or not (the SDK's answers are streamed: they were sent
    before the record was even queued)."""
    issued = await tenant_token()
    async with extra_gateway(
        gateway_env, SCHOOL_API_URL=school_api_url, GATEWAY_AUDIT_MODE="durable"
    ) as base:
        for n in range(3):
            request_id = f"durable-mcp-{secrets.token_hex(4)}-{n}"
            headers = {
                "Host": system.platform_host,
                "Accept": "application/json, text/event-stream",
                "Content-Type": "application/json",
                "Authorization": f"Bearer {issued.access_token}",
                "X-Request-Id": request_id,
            }
            ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
            async with http.post(base + "/mcp", data=orjson.dumps(ping), headers=headers) as r:
                assert r.status == 200
                # The status is here: the record must be on the stream already.
                recorded = [
                    rec
                    for _, fields in await redis.xrange(gateway_settings.stream(streams.AUDIT))
                    for rec in audit.records_of(orjson.loads(fields[b"data"]))
                    if (rec.get("detail") or {}).get("request_id") == request_id
                ]
                await r.read()
            assert [(rec["path"], rec["status"]) for rec in recorded] == [("/mcp", 200)]
