"""The whole system on real sockets, the way a partner meets it after `make dev`.

One system for the module: identity behind a gateway, the real school API (with its outbox
relay) as the gateway's `school_api` upstream and the real webhooks service (delivering from
127.0.0.2, fast retries) as its `webhooks` upstream, all on the run's database, Redis prefix
and keys. The public origins are the gateway's: `http://{school}.localhost:{gateway_port}`.
The session's own `gateway_url` fronts an echo server in the gateway tests, so this module
serves a gateway of its own (`extra_gateway`) and a resolver that sends the public origin's
port there, the way DNS and a port forward would: every URL below is the one a partner types.

Tokens come the quickstart's way (seed 001): dynamic registration, authorize with PKCE,
sign-in and consent in a browser, code exchange at `/api/oauth/token`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpServer
from standardwebhooks import Webhook

from libs.common.config import Settings
from services.identity import schools, store, users
from services.school_api import seed
from tests.support import without_handler_cancellation
from tests.test_authorize import PASSWORD, Browser, form, pkce, query_of
from tests.test_gateway_support import extra_gateway

pytestmark = pytest.mark.timeout(60)

REDIRECT_URI = "https://myapp.com/callback"
EGRESS_IP = "127.0.0.2"


# The system -------------------------------------------------------------------------------------


class PublicResolver(AbstractResolver):
    """`*.localhost` is 127.0.0.1 (as curl and browsers have it), and the public port is
    where this module's gateway listens. URLs and Host headers stay exactly as typed."""

    def __init__(self, public_port: int, gateway_port: int) -> None:
        self.public_port = public_port
        self.gateway_port = gateway_port

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        local = host == "localhost" or host.endswith(".localhost")
        return [
            {
                "hostname": host,
                "host": "127.0.0.1" if local else host,
                "port": self.gateway_port if local and port == self.public_port else port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


@dataclass(frozen=True)
class System:
    public_port: int  # the port of every public origin (the gateway's)
    gateway: str  # where this module's gateway listens
    school_api: str
    webhooks: str

    def origin(self, subdomain: str) -> str:
        return f"http://{subdomain}.localhost:{self.public_port}"

    @property
    def platform(self) -> str:
        return f"http://localhost:{self.public_port}"

    def session(self, **kwargs: Any) -> aiohttp.ClientSession:
        resolver = PublicResolver(self.public_port, int(urlsplit(self.gateway).port or 0))
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=resolver), **kwargs)


@pytest.fixture(scope="module")
async def system(
    gateway_env: dict[str, str],
    gateway_port: int,
    gateway_identity_url: str,
    school_api_url: str,
    webhooks_url: str,
    webhooks_settings: Settings,
) -> AsyncIterator[System]:
    """Identity behind the gateway (issuers on the gateway's port), the school API and the
    webhooks service, fronted by one gateway."""
    assert webhooks_settings.webhooks.egress_ip == EGRESS_IP
    assert max(webhooks_settings.webhooks.retry_schedule) < 5
    async with extra_gateway(
        gateway_env, SCHOOL_API_URL=school_api_url, WEBHOOKS_URL=webhooks_url
    ) as base:
        yield System(gateway_port, base, school_api_url, webhooks_url)


@pytest.fixture
async def http(system: System) -> AsyncIterator[aiohttp.ClientSession]:
    """The partner's server-side HTTP client (overrides conftest's `http` here)."""
    async with system.session() as session:
        yield session


class PartnerBrowser(Browser):
    """The user's browser, reaching the public origins through this module's gateway."""

    def __init__(self, system: System) -> None:
        # Not Browser.__init__: its session would resolve the public port to nothing.
        self.session = system.session(cookie_jar=aiohttp.CookieJar(unsafe=True))


@pytest.fixture
async def browser(system: System) -> AsyncIterator[PartnerBrowser]:
    b = PartnerBrowser(system)
    yield b
    await b.close()


# Schools, users, connected apps -------------------------------------------------------------------


@dataclass(frozen=True)
class Tenant:
    school: store.School
    origin: str
    email: str

    @property
    def name(self) -> str:
        return self.school.name


async def new_tenant(pool: asyncpg.Pool, settings: Settings, system: System, name: str) -> Tenant:
    """A `demo`-like school with its sample data and a user who can sign in."""
    school_id = 700_000 + secrets.randbelow(300_000)  # below make_world's 1_000_000+ ids
    label = secrets.token_hex(3)
    school = await schools.create_school(
        pool, settings, f"sys{label}", f"{name} {label}", school_id
    )
    assert await seed.seed_school(pool, school.id, school.name)
    user, _ = await users.create_user(
        pool,
        school_id=school.id,
        email=f"owner-{label}@example.com",
        password=PASSWORD,
        name="Ada Lovelace",
        # The school's owner: only an admin may grant the write scopes the issues use.
        role="admin",
    )
    return Tenant(school, system.origin(school.subdomain), user.email)


@dataclass(frozen=True)
class App:
    """A partner application connected to a school: its client and the user's tokens."""

    client_id: str
    tokens: dict[str, Any]

    @property
    def access_token(self) -> str:
        return str(self.tokens["access_token"])

    @property
    def claims(self) -> dict[str, Any]:
        payload = self.access_token.split(".")[1]
        decoded: dict[str, Any] = orjson.loads(base64.urlsafe_b64decode(payload + "=="))
        return decoded

    def bearer(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}", **extra}


async def connect_app(
    http: aiohttp.ClientSession,
    browser: Browser,
    tenant: Tenant,
    scope: str,
    name: str = "My Integration",
    client_id: str | None = None,
) -> App:
    """Seed 001's quickstart through the gateway: register (unless `client_id` names a client
    already made), authorize with PKCE, sign in (once per browser), consent, exchange the
    code."""
    if client_id is None:
        client_id = await register(http, tenant, name)
    return await authorize(http, browser, tenant, scope, client_id)


async def register(http: aiohttp.ClientSession, tenant: Tenant, name: str) -> str:
    """Dynamic registration of a public client (seed 001, option B)."""
    async with http.post(
        f"{tenant.origin}/api/oauth/register",
        json={
            "client_name": name,
            "redirect_uris": [REDIRECT_URI],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
        },
    ) as resp:
        registered = await resp.json()
        assert resp.status == 201, registered
    return str(registered["client_id"])


async def authorize(
    http: aiohttp.ClientSession, browser: Browser, tenant: Tenant, scope: str, client_id: str
) -> App:
    """Authorize with PKCE, sign in (once per browser), consent, exchange the code."""
    verifier, challenge = pkce()
    state = secrets.token_urlsafe(12)
    query = urlencode(
        {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": REDIRECT_URI,
            "scope": scope,
            "state": state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
    )
    status, headers, page = await browser.get(f"{tenant.origin}/oauth/authorize?{query}")
    assert status == 200, page
    if 'action="/v1/oauth/login"' in page:
        status, headers, page = await browser.login(tenant.origin, page, tenant.email, PASSWORD)
        assert status == 303, page
        status, headers, page = await browser.follow(tenant.origin, status, headers, page)
    assert status == 200, page
    form(page, "/v1/oauth/consent")  # the consent screen, not an error page
    status, headers, page = await browser.decide(tenant.origin, page, "allow")
    assert status in (302, 303), page
    assert headers["Location"].startswith(REDIRECT_URI + "?")
    params = query_of(headers["Location"])
    assert params["state"] == state
    assert params["iss"] == tenant.origin

    async with http.post(
        f"{tenant.origin}/api/oauth/token",
        data={
            "grant_type": "authorization_code",
            "code": params["code"],
            "redirect_uri": REDIRECT_URI,
            "client_id": client_id,
            "code_verifier": verifier,
        },
    ) as resp:
        tokens = await resp.json()
        assert resp.status == 200, tokens
    assert tokens["token_type"] == "Bearer"
    assert tokens["scope"] == scope
    assert tokens["school_id"] == tenant.school.id
    assert tokens["school_subdomain"] == tenant.school.subdomain
    return App(client_id, tokens)


async def revoke(http: aiohttp.ClientSession, tenant: Tenant, app: App) -> None:
    async with http.post(
        f"{tenant.origin}/v1/oauth/revoke",
        data={"token": app.access_token, "client_id": app.client_id},
    ) as resp:
        assert resp.status == 200, await resp.text()


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: dict[str, str],
    body: Any = None,
) -> tuple[int, CIMultiDict[str], Any]:
    async with http.request(method, url, headers=headers, json=body) as resp:
        raw = await resp.read()
        payload = orjson.loads(raw) if raw and resp.content_type == "application/json" else None
        return resp.status, CIMultiDict(resp.headers), payload


# Webhook receivers --------------------------------------------------------------------------------


@dataclass
class Received:
    body: bytes
    headers: dict[str, str]
    remote: str | None
    at: float

    @property
    def event(self) -> dict[str, Any]:
        decoded: dict[str, Any] = orjson.loads(self.body)
        return decoded


@dataclass
class Receiver:
    """A partner's webhook endpoint: a real aiohttp server on 127.0.0.1 that records all."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.received.append(Received(body, headers, request.remote, time.monotonic()))
        self._arrived.set()
        return web.Response(text="thanks")

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"expected {count} deliveries within {timeout}s, got {len(self.received)}"
                )
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        return self.received


@pytest.fixture
def receivers(aiohttp_server: AiohttpServer) -> Callable[[], Awaitable[Receiver]]:
    async def start() -> Receiver:
        receiver = Receiver()
        app = web.Application()
        app.router.add_post("/hooks", receiver.handle)
        server = await aiohttp_server(app, access_log=None, shutdown_timeout=0.5)
        receiver.url = str(without_handler_cancellation(server).make_url("/hooks"))
        return receiver

    return start


async def audit_record(pool: asyncpg.Pool, request_id: str, timeout: float = 5.0) -> asyncpg.Record:
    """The `api.call` record identity's consumer stored for the call with this request id."""
    deadline = time.monotonic() + timeout
    while True:
        row = await pool.fetchrow(
            "SELECT * FROM audit_log WHERE action = 'api.call' AND detail->>'request_id' = $1",
            request_id,
        )
        if row is not None:
            return row
        assert time.monotonic() < deadline, f"no audit record for {request_id} in {timeout}s"
        await asyncio.sleep(0.05)


# Issue 4: a quickstart token reads its school's data, and only with its scopes -----------------


async def test_issue4_quickstart_token_reads_only_its_school_through_the_gateway(
    system: System,
    http: aiohttp.ClientSession,
    browser: PartnerBrowser,
    pool: asyncpg.Pool,
    gateway_settings: Settings,
) -> None:
    a = await new_tenant(pool, gateway_settings, system, "Ridgeway Art School")
    b = await new_tenant(pool, gateway_settings, system, "Harbour Music School")
    app = await connect_app(http, browser, a, "read courses:read students:read")
    claims = app.claims
    assert claims["iss"] == a.origin
    assert claims["school_id"] == a.school.id

    # A's courses, and nothing of B's, even when the caller forges the gateway's headers.
    forged = {
        "X-Connect-School-Id": str(b.school.id),
        "X-Connect-Subject": "someone-else",
        "X-Connect-Client-Id": "forged-client",
        "X-Connect-Scopes": "courses:read courses:write admin:write",
        "X-Connect-Internal-Token": "guess",
    }
    for extra in ({}, forged):
        request_id = "sys-" + secrets.token_hex(8)
        status, headers, page = await call(
            http,
            "GET",
            f"{a.origin}/api/v1/courses?limit=100",
            app.bearer(**{"X-Request-Id": request_id}, **extra),
        )
        assert status == 200, page
        assert headers["X-Request-Id"] == request_id
        courses = page["data"]
        assert len(courses) == 4  # the seeded four
        assert {c["school_id"] for c in courses} == {a.school.id}
        assert all(c["title"].startswith(f"{a.name}: ") for c in courses)
        assert not any(b.name in c["title"] for c in courses)
        assert page["next_cursor"] is None

        # The gateway's record of this very call, stored by identity's audit consumer, names
        # the verified school, client, subject and grant, never the forged ones.
        record = await audit_record(pool, request_id)
        assert record["school_id"] == a.school.id
        assert record["client_id"] == app.client_id
        assert record["subject"] == claims["sub"]
        assert str(record["grant_id"]) == claims["grant_id"]
        assert (record["method"], record["path"], record["status"]) == (
            "GET",
            "/api/v1/courses",
            200,
        )

    # Members with students:read.
    status, _, page = await call(http, "GET", f"{a.origin}/api/v1/members", app.bearer())
    assert status == 200, page
    assert page["data"]
    assert {m["school_id"] for m in page["data"]} == {a.school.id}

    # The same token on school B's origin: not B's token.
    status, headers, page = await call(http, "GET", f"{b.origin}/api/v1/courses", app.bearer())
    assert status == 401, page
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]

    # A token of another app that holds students:read only: members yes, courses no.
    roster = await connect_app(http, browser, a, "students:read", name="Roster Sync")
    status, headers, page = await call(http, "GET", f"{a.origin}/api/v1/courses", roster.bearer())
    assert status == 403, page
    challenge = headers["WWW-Authenticate"]
    assert 'error="insufficient_scope"' in challenge
    assert 'scope="courses:read"' in challenge
    status, _, page = await call(http, "GET", f"{a.origin}/api/v1/members", roster.bearer())
    assert status == 200, page
    assert {m["school_id"] for m in page["data"]} == {a.school.id}

    # Revoked through the gateway: the very next call is refused; the other app carries on.
    await revoke(http, a, app)
    status, headers, page = await call(http, "GET", f"{a.origin}/api/v1/courses", app.bearer())
    assert status == 401, page
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    status, _, _ = await call(http, "GET", f"{a.origin}/api/v1/members", roster.bearer())
    assert status == 200


# Issue 5: webhooks, signed, from the egress IP, within a second, and only while granted ----------


async def test_issue5_course_update_reaches_the_partner_signed_within_a_second(
    system: System,
    http: aiohttp.ClientSession,
    browser: PartnerBrowser,
    pool: asyncpg.Pool,
    gateway_settings: Settings,
    receivers: Callable[[], Awaitable[Receiver]],
) -> None:
    school = await new_tenant(pool, gateway_settings, system, "Lakeside Pottery School")
    hooks = await connect_app(http, browser, school, "courses:read courses:write", "Course Sync")
    # Another app of the same school, subscribed too: it shows events still flow after the
    # first app's grant is revoked, so "nothing arrived" is not "nothing was sent yet".
    editor = await connect_app(http, browser, school, "courses:read courses:write", "Editor")
    partner, control = await receivers(), await receivers()

    status, _, made = await call(
        http,
        "POST",
        f"{school.origin}/api/v1/webhooks",
        hooks.bearer(),
        {"url": partner.url, "event_types": ["course.updated"]},
    )
    assert status == 201, made
    secret = str(made["secret"])
    assert secret.startswith("whsec_")

    # member.* needs students:read, which this grant does not hold.
    status, headers, body = await call(
        http,
        "POST",
        f"{school.origin}/api/v1/webhooks",
        hooks.bearer(),
        {"url": partner.url, "event_types": ["member.enrolled"]},
    )
    assert status == 403, body
    assert body["error"] == "insufficient_scope"
    assert 'scope="students:read"' in headers["WWW-Authenticate"]

    status, _, other = await call(
        http,
        "POST",
        f"{school.origin}/api/v1/webhooks",
        editor.bearer(),
        {"url": control.url, "event_types": ["course.updated"]},
    )
    assert status == 201, other

    status, _, page = await call(
        http, "GET", f"{school.origin}/api/v1/courses?limit=1", hooks.bearer()
    )
    assert status == 200, page
    course_url = f"{school.origin}/api/v1/courses/{page['data'][0]['id']}"

    sent = time.monotonic()
    status, _, shown = await call(
        http, "PATCH", course_url, hooks.bearer(), {"title": "Wheel Throwing, revised"}
    )
    assert status == 200, shown
    assert shown["title"] == "Wheel Throwing, revised"
    (got,) = await partner.wait_for(1, timeout=3.0)
    latency = got.at - sent
    print(f"\ncourse.updated reached the partner {latency * 1000:.0f} ms after the PATCH")
    assert latency < 1.0, f"delivered after {latency:.3f}s"

    event = Webhook(secret).verify(got.body, got.headers)
    assert event == got.event
    assert event["type"] == "course.updated"
    assert event["school_id"] == school.school.id
    assert event["data"] == shown
    assert got.headers["webhook-id"] == event["id"]
    assert got.headers["webhook-signature"].startswith("v1,")
    assert got.remote == EGRESS_IP
    (seen,) = await control.wait_for(1)
    assert seen.event["id"] == event["id"]

    # The user revokes the app: the gateway refuses its token, its subscription goes quiet.
    await revoke(http, school, hooks)
    status, _, _ = await call(http, "GET", course_url, hooks.bearer())
    assert status == 401
    sent = time.monotonic()
    status, _, shown = await call(
        http, "PATCH", course_url, editor.bearer(), {"title": "Wheel Throwing, final"}
    )
    assert status == 200, shown
    _, after = await control.wait_for(2, timeout=3.0)
    assert after.event["data"] == shown
    await asyncio.sleep(max(0.0, sent + 1.5 - time.monotonic()))
    assert len(partner.received) == 1, [r.event for r in partner.received[1:]]


# Public routes through the gateway ----------------------------------------------------------------


async def test_public_documents_name_the_public_origin(
    system: System,
    http: aiohttp.ClientSession,
    pool: asyncpg.Pool,
    gateway_settings: Settings,
) -> None:
    tenant = await new_tenant(pool, gateway_settings, system, "Northgate Language School")
    for path in ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"):
        status, _, meta = await call(http, "GET", tenant.origin + path, {})
        assert status == 200, meta
        assert meta["issuer"] == tenant.origin
        assert meta["issuer"].endswith(f".localhost:{system.public_port}")
        assert meta["token_endpoint"].startswith(tenant.origin + "/")
        assert meta["authorization_endpoint"].startswith(tenant.origin + "/")
        assert meta["code_challenge_methods_supported"] == ["S256"]
    status, _, jwks = await call(http, "GET", meta["jwks_uri"], {})
    assert status == 200, jwks
    assert jwks["keys"] and all(k.get("kid") for k in jwks["keys"])

    for origin in (tenant.origin, system.platform):
        status, _, egress = await call(http, "GET", f"{origin}/v1/webhooks/egress-ips", {})
        assert status == 200, egress
        assert EGRESS_IP in egress["egress_ips"]
