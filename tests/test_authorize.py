"""The authorization endpoint's validation: what is an error page, what is an error redirect.

Until the client and its redirect URI are trusted, every problem is a 400 page without a
Location header (no open redirect); after that, every problem is a redirect carrying `error`,
`state` and `iss`. The helpers here are shared with the flow and browser tests.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import asyncpg
import pytest

from libs.common.config import Settings
from services.identity import clients, schools, store, users
from tests.support import client_session

PASSWORD = "correct horse battery staple"
REDIRECT = "https://app.example/cb"


# Helpers shared with test_login_consent.py and test_pages_browser.py ---------------------


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass
class World:
    school: store.School
    base: str
    client: store.Client
    user: store.User
    email: str
    password: str
    redirect_uri: str


async def make_school(pool: asyncpg.Pool, settings: Settings, label: str) -> store.School:
    return await schools.create_school(pool, settings, label, f"School {label.title()}")


async def make_user(
    pool: asyncpg.Pool,
    school: store.School,
    unique: str,
    *,
    name: str = "Ada Lovelace",
    role: str = "admin",
) -> store.User:
    """A user of `school`; an admin unless told, since the user who connects an app to a
    school is typically its admin (seed 000), and a member could not grant data scopes."""
    user, _ = await users.create_user(
        pool,
        school_id=school.id,
        email=f"ada-{unique}-{secrets.token_hex(3)}@example.com",
        password=PASSWORD,
        name=name,
        role=role,
    )
    return user


async def make_client(
    pool: asyncpg.Pool,
    settings: Settings,
    school: store.School | None,
    *,
    redirect_uris: tuple[str, ...] = (REDIRECT,),
    scopes: tuple[str, ...] = ("courses:read", "students:read"),
    name: str = "Gradebook Sync",
    created_via: str = "admin",
) -> store.Client:
    made = await clients.create_client(
        pool,
        settings,
        school=school,
        name=name,
        redirect_uris=redirect_uris,
        public=True,
        scopes=scopes,
        created_via=created_via,
    )
    return made.client


async def make_world(
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
    port: int,
    *,
    redirect_uris: tuple[str, ...] = (REDIRECT,),
    scopes: tuple[str, ...] = ("courses:read", "students:read"),
) -> World:
    school = await make_school(pool, settings, f"az{unique}{secrets.token_hex(2)}")
    user = await make_user(pool, school, unique)
    client = await make_client(pool, settings, school, redirect_uris=redirect_uris, scopes=scopes)
    return World(
        school=school,
        base=f"http://{school.subdomain}.localhost:{port}",
        client=client,
        user=user,
        email=user.email,
        password=PASSWORD,
        redirect_uri=redirect_uris[0],
    )


def authorize_url(
    base: str,
    client_id: str,
    *,
    redirect_uri: str | None = REDIRECT,
    challenge: str | None = None,
    method: str | None = "S256",
    path: str = "/v1/oauth/authorize",
    **extra: str,
) -> str:
    params: dict[str, str] = {"response_type": "code", "client_id": client_id}
    if redirect_uri is not None:
        params["redirect_uri"] = redirect_uri
    params["state"] = extra.pop("state", "st-" + secrets.token_hex(4))
    params["code_challenge"] = challenge if challenge is not None else pkce()[1]
    if method is not None:
        params["code_challenge_method"] = method
    params.update(extra)
    return f"{base}{path}?{urlencode({k: v for k, v in params.items() if v != ''})}"


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


@dataclass
class Form:
    action: str
    fields: dict[str, str]
    buttons: dict[str, str]


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[Form] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append(Form(a.get("action", ""), {}, {}))
        elif tag == "input" and self.forms and a.get("name"):
            if a.get("type") == "radio" and "checked" not in a:
                return
            self.forms[-1].fields[a["name"]] = a.get("value", "")
        elif tag == "button" and self.forms and a.get("name"):
            self.forms[-1].buttons[a["value"]] = a["name"]


def form(html: str, action: str) -> Form:
    parser = _FormParser()
    parser.feed(html)
    for f in parser.forms:
        if f.action == action:
            return f
    raise AssertionError(f"no form posting to {action}")


class Browser:
    """A cookie-keeping client that never follows redirects, like a careful browser."""

    def __init__(self) -> None:
        self.session = client_session(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def close(self) -> None:
        await self.session.close()

    async def get(self, url: str) -> tuple[int, Any, str]:
        async with self.session.get(url, allow_redirects=False) as resp:
            return resp.status, resp.headers, await resp.text()

    async def post(self, url: str, data: dict[str, str]) -> tuple[int, Any, str]:
        async with self.session.post(url, data=data, allow_redirects=False) as resp:
            return resp.status, resp.headers, await resp.text()

    def cookie(self, name: str) -> str | None:
        for c in self.session.cookie_jar:
            if c.key == name:
                return c.value
        return None

    async def login(self, base: str, html: str, email: str, password: str) -> tuple[int, Any, str]:
        f = form(html, "/v1/oauth/login")
        return await self.post(base + f.action, {**f.fields, "email": email, "password": password})

    async def follow(self, base: str, status: int, headers: Any, body: str) -> tuple[int, Any, str]:
        """Follow redirects that stay on this origin; stop at the client's redirect URI."""
        while status in (302, 303) and headers["Location"].startswith("/"):
            status, headers, body = await self.get(base + headers["Location"])
        return status, headers, body

    async def sign_in_to_consent(self, world: World, url: str) -> tuple[int, Any, str]:
        """Open `url`, sign in, and return whatever comes after (consent page or redirect)."""
        status, headers, body = await self.get(url)
        assert status == 200, body
        status, headers, body = await self.login(world.base, body, world.email, world.password)
        assert status == 303, body
        return await self.follow(world.base, status, headers, body)

    async def decide(self, base: str, html: str, decision: str) -> tuple[int, Any, str]:
        f = form(html, "/v1/oauth/consent")
        return await self.post(base + f.action, {**f.fields, "decision": decision})


@pytest.fixture
async def browser() -> Any:
    b = Browser()
    yield b
    await b.close()


@pytest.fixture
async def world(
    identity_url: str, pool: asyncpg.Pool, settings: Settings, unique: str, identity_port: int
) -> World:
    return await make_world(pool, settings, unique, identity_port)


def assert_error_page(status: int, headers: Any, body: str) -> None:
    assert status == 400, body
    assert "Location" not in headers
    assert headers["Content-Type"].startswith("text/html")
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]


def assert_error_redirect(
    status: int, headers: Any, error: str, *, state: str, issuer: str, to: str = REDIRECT
) -> dict[str, str]:
    assert status == 302
    location = headers["Location"]
    assert location.startswith(to + "?")
    q = query_of(location)
    assert q["error"] == error, q
    assert q["state"] == state
    assert q["iss"] == issuer
    assert q.get("error_description")
    assert "code" not in q
    return q


# PKCE ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("challenge", "method"),
    [("", "S256"), (None, "plain"), (None, None), (None, "S512"), ("short", "S256")],
    ids=["no-challenge", "plain", "no-method", "unknown-method", "malformed-challenge"],
)
async def test_pkce_problems_redirect_invalid_request(
    world: World, http: Any, challenge: str | None, method: str | None
) -> None:
    url = authorize_url(
        world.base, world.client.id, challenge=challenge, method=method, state="pk-1"
    )
    async with http.get(url, allow_redirects=False) as resp:
        assert_error_redirect(
            resp.status, resp.headers, "invalid_request", state="pk-1", issuer=world.base
        )


# Untrusted client or redirect URI: an error page, never a redirect -------------------------


async def test_unknown_or_missing_client_is_an_error_page(world: World, http: Any) -> None:
    for url in (
        authorize_url(world.base, "no-such-client"),
        authorize_url(world.base, ""),
        f"{world.base}/v1/oauth/authorize?client_id=a&client_id=b&redirect_uri={REDIRECT}",
    ):
        async with http.get(url, allow_redirects=False) as resp:
            assert_error_page(resp.status, resp.headers, await resp.text())


async def test_a_client_id_no_client_can_have_is_an_error_page(world: World, http: Any) -> None:
    # Found by fuzzing: a NUL in client_id reached PostgreSQL, which refused it (a 500).
    for client_id in ("x\x00y", "\x00", "ünï", "tab\there"):
        for path in ("/v1/oauth/authorize", "/oauth/authorize"):
            async with http.get(
                authorize_url(world.base, client_id, path=path), allow_redirects=False
            ) as resp:
                assert_error_page(resp.status, resp.headers, await resp.text())


@pytest.mark.parametrize(
    "redirect_uri",
    [
        "https://app.example/other",
        "https://app.example/cb/extra",
        "https://app.example/cbx",
        "https://APP.example/cb",
        "https://app.example/CB",
        "https://app.example/cb?x=1",
        "https://app.example/cb#frag",
        "https://app.example:443/cb",
        "http://app.example/cb",
        "https://app.example.evil.test/cb",
        "https://evil.test/?https://app.example/cb",
        "https://app.example/cb/",
    ],
)
async def test_redirect_uri_mismatch_is_an_error_page_without_location(
    world: World, http: Any, redirect_uri: str
) -> None:
    url = authorize_url(world.base, world.client.id, redirect_uri=redirect_uri, method="plain")
    async with http.get(url, allow_redirects=False) as resp:
        body = await resp.text()
        assert_error_page(resp.status, resp.headers, body)
    assert "evil" not in body


async def test_duplicate_redirect_uri_is_an_error_page(world: World, http: Any) -> None:
    url = authorize_url(world.base, world.client.id) + "&redirect_uri=https%3A%2F%2Fevil.test%2Fcb"
    async with http.get(url, allow_redirects=False) as resp:
        assert_error_page(resp.status, resp.headers, await resp.text())


async def test_missing_redirect_uri_uses_the_only_one_and_refuses_to_guess(
    identity_url: str,
    http: Any,
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    world = await make_world(pool, settings, unique, identity_port)
    url = authorize_url(world.base, world.client.id, redirect_uri=None, scope="admin:read")
    async with http.get(url, allow_redirects=False) as resp:
        # The one registered URI is trusted, so the (deliberate) scope error goes there.
        assert resp.headers["Location"].startswith(REDIRECT + "?")
        assert query_of(resp.headers["Location"])["error"] == "invalid_scope"

    two = await make_client(
        pool, settings, world.school, redirect_uris=(REDIRECT, "https://app.example/cb2")
    )
    async with http.get(
        authorize_url(world.base, two.id, redirect_uri=None), allow_redirects=False
    ) as resp:
        assert_error_page(resp.status, resp.headers, await resp.text())


async def test_loopback_redirect_may_change_port_on_ip_literals_only(
    identity_url: str,
    http: Any,
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    world = await make_world(
        pool,
        settings,
        unique,
        identity_port,
        redirect_uris=(
            "http://127.0.0.1:8000/cb",
            "http://[::1]:8000/cb",
            "http://localhost:8000/cb",
        ),
    )
    allowed = ("http://127.0.0.1:51234/cb", "http://127.0.0.1/cb", "http://[::1]:6000/cb")
    for uri in allowed:
        url = authorize_url(world.base, world.client.id, redirect_uri=uri, scope="admin:read")
        async with http.get(url, allow_redirects=False) as resp:
            assert resp.status == 302, uri
            assert resp.headers["Location"].startswith(uri + "?")
    refused = (
        "http://localhost:51234/cb",  # a name, not an IP literal: no port exception
        "http://127.0.0.1:51234/other",
        "http://127.0.0.1:51234/cb?x=1",
        "http://127.0.0.2:8000/cb",
        "https://127.0.0.1:8000/cb",
        "http://127.0.0.1:99999/cb",
        "http://user@127.0.0.1:8000/cb",
        "http://[::1]:6000/cb/",
    )
    for uri in refused:
        url = authorize_url(world.base, world.client.id, redirect_uri=uri)
        async with http.get(url, allow_redirects=False) as resp:
            assert_error_page(resp.status, resp.headers, await resp.text())


async def test_client_of_another_school_or_of_the_platform_is_an_error_page(
    world: World,
    http: Any,
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    other = await make_school(pool, settings, f"azb{unique}")
    other_base = f"http://{other.subdomain}.localhost:{identity_port}"
    platform = f"http://localhost:{identity_port}"
    platform_client = await make_client(pool, settings, None)
    for base, client_id in (
        (other_base, world.client.id),  # school A's client at school B
        (platform, world.client.id),  # a school's client on the platform origin
        (world.base, platform_client.id),  # a platform client at a school origin
    ):
        async with http.get(authorize_url(base, client_id), allow_redirects=False) as resp:
            assert_error_page(resp.status, resp.headers, await resp.text())


async def test_disabled_client_is_an_error_page(
    world: World, http: Any, pool: asyncpg.Pool
) -> None:
    await pool.execute("UPDATE clients SET disabled_at = now() WHERE id = $1", world.client.id)
    async with http.get(authorize_url(world.base, world.client.id), allow_redirects=False) as resp:
        body = await resp.text()
        assert_error_page(resp.status, resp.headers, body)
        assert "disabled" in body


# After the redirect URI is trusted: error redirects ------------------------------------------


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        ({"scope": "admin:read"}, "invalid_scope"),
        ({"scope": "openid admin:write"}, "invalid_scope"),
        ({"scope": "orders:read"}, "invalid_scope"),  # not registered by the client
        ({"scope": "read"}, "invalid_scope"),  # an umbrella over scopes it lacks
        ({"scope": "courses:read nonsense:read"}, "invalid_scope"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"response_type": ""}, "invalid_request"),
        ({"request": "eyJhbGciOiJub25lIn0.e30."}, "request_not_supported"),
        ({"request_uri": "urn:ietf:params:oauth:request_uri:x"}, "request_uri_not_supported"),
        ({"resource": "https://evil.test/api"}, "invalid_target"),
        ({"resource": "not a uri"}, "invalid_target"),
        ({"prompt": "none login"}, "invalid_request"),
        ({"prompt": "select_account"}, "invalid_request"),
        ({"max_age": "-1"}, "invalid_request"),
        ({"response_mode": "fragment"}, "invalid_request"),
    ],
)
async def test_request_problems_redirect_with_state_and_iss(
    world: World, http: Any, extra: dict[str, str], error: str
) -> None:
    url = authorize_url(world.base, world.client.id, state="s-42", **extra)
    if extra.get("response_type") == "":
        url = url.replace("response_type=code&", "")
    async with http.get(url, allow_redirects=False) as resp:
        assert_error_redirect(resp.status, resp.headers, error, state="s-42", issuer=world.base)


async def test_repeated_parameter_is_invalid_request(world: World, http: Any) -> None:
    url = authorize_url(world.base, world.client.id, state="s-1") + "&scope=openid&scope=email"
    async with http.get(url, allow_redirects=False) as resp:
        assert_error_redirect(
            resp.status, resp.headers, "invalid_request", state="s-1", issuer=world.base
        )


async def test_school_allowed_scopes_are_enforced(
    world: World, http: Any, pool: asyncpg.Pool, settings: Settings, identity_port: int
) -> None:
    await pool.execute(
        "UPDATE schools SET allowed_scopes = '{courses:read}' WHERE id = $1", world.school.id
    )
    # No request has reached this school yet, so the issuer directory has not cached it.
    url = authorize_url(world.base, world.client.id, scope="students:read", state="s-7")
    async with http.get(url, allow_redirects=False) as resp:
        assert_error_redirect(
            resp.status, resp.headers, "invalid_scope", state="s-7", issuer=world.base
        )
    url = authorize_url(world.base, world.client.id, scope="openid courses:read")
    async with http.get(url, allow_redirects=False) as resp:
        assert resp.status == 200


async def test_state_is_omitted_when_absent_and_existing_query_is_kept(
    identity_url: str,
    http: Any,
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    world = await make_world(
        pool, settings, unique, identity_port, redirect_uris=("https://app.example/cb?tenant=7",)
    )
    url = authorize_url(
        world.base,
        world.client.id,
        redirect_uri="https://app.example/cb?tenant=7",
        scope="admin:read",
        state="",
    )
    async with http.get(url, allow_redirects=False) as resp:
        location = resp.headers["Location"]
    assert location.startswith("https://app.example/cb?tenant=7&")
    q = query_of(location)
    assert q["tenant"] == "7"
    assert "state" not in q
    assert q["iss"] == world.base


async def test_prompt_none_without_session_is_login_required(world: World, http: Any) -> None:
    url = authorize_url(world.base, world.client.id, prompt="none", state="quiet")
    async with http.get(url, allow_redirects=False) as resp:
        assert_error_redirect(
            resp.status, resp.headers, "login_required", state="quiet", issuer=world.base
        )


async def test_valid_request_shows_the_login_page_with_strict_headers(
    world: World, http: Any
) -> None:
    for path in ("/v1/oauth/authorize", "/oauth/authorize"):
        url = authorize_url(world.base, world.client.id, path=path, scope="openid courses:read")
        async with http.get(url, allow_redirects=False) as resp:
            body = await resp.text()
            assert resp.status == 200, body
            h = resp.headers
            csp = h["Content-Security-Policy"]
            for directive in (
                "default-src 'none'",
                "style-src 'self'",
                "img-src 'self' data:",
                "frame-ancestors 'none'",
                "base-uri 'none'",
            ):
                assert directive in csp
            # The form's redirect chain may end at the client, and nowhere else.
            assert "form-action 'self' https://app.example;" in csp
            assert h["X-Frame-Options"] == "DENY"
            assert h["Referrer-Policy"] == "no-referrer"
            assert h["Cache-Control"] == "no-store"
            if path == "/v1/oauth/authorize":  # later requests send the cookie back
                assert "lc_presession" in resp.cookies
        assert 'name="csrf_token"' in body
        assert "Gradebook Sync" in body
        assert world.school.name in body


async def test_resource_of_the_school_is_accepted_and_mcp_is_the_platforms_alone(
    world: World, http: Any, settings: Settings
) -> None:
    url = authorize_url(world.base, world.client.id, resource=world.base)
    async with http.get(url, allow_redirects=False) as resp:
        assert resp.status == 200, await resp.text()
    # The MCP resource names the platform as its one authorization server (RFC 9728).
    url = authorize_url(world.base, world.client.id, resource=f"{settings.urls.platform_url}/mcp")
    async with http.get(url, allow_redirects=False) as resp:
        assert resp.status in (302, 303), await resp.text()
        assert query_of(resp.headers["Location"])["error"] == "invalid_target"


async def test_head_is_not_an_authorization_request(world: World, http: Any) -> None:
    async with http.head(authorize_url(world.base, world.client.id)) as resp:
        assert resp.status == 405


async def test_static_stylesheet_is_served(world: World, http: Any) -> None:
    async with http.get(world.base + "/static/connect.css") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/css")
        assert ".card" in await resp.text()
