"""No open redirector through self-registered clients (RFC 9700 4.11.2; contract section 13).

Anyone may register a client with `redirect_uris: ["https://evil.example/"]`. An error the
authorization endpoint finds before the user has acted must not send the browser there: for
such a client it is our own page (400, no Location) naming the error. A client a school
admin, the CLI or an operator made keeps its error redirects; after the user acted (Deny,
Cancel, signing in or picking a school in this flow) every client hears the outcome.
Everything runs against the real identity service on a real socket.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
import redis.asyncio as redis_asyncio

from libs.common.config import Settings
from services.identity import ratelimit, sessions, store
from tests.support import client_session
from tests.test_authorize import (
    PASSWORD,
    Browser,
    World,
    assert_error_page,
    authorize_url,
    form,
    make_client,
    make_school,
    make_user,
    pkce,
    query_of,
)

EVIL = "https://evil.example/"


@dataclass(frozen=True)
class Site:
    """An issuer with a client that registered itself there (through the real RFC 7591
    endpoint), and one that a school admin or the CLI made, both sending to EVIL."""

    base: str
    school: store.School
    registered: str
    reviewed: str


@dataclass(frozen=True)
class Sites:
    school: Site
    platform: Site


async def _register(http: aiohttp.ClientSession, base: str) -> str:
    doc = {
        "client_name": "Totally Legit Helper",
        "redirect_uris": [EVIL],
        "token_endpoint_auth_method": "none",
    }
    async with http.post(base + "/v1/oauth/register", json=doc) as resp:
        answer = await resp.json()
        assert resp.status == 201, answer
    return str(answer["client_id"])


@pytest.fixture(scope="module")
async def sites(
    identity_url: str,
    pool: asyncpg.Pool,
    settings: Settings,
    redis: redis_asyncio.Redis,
    identity_port: int,
) -> Sites:
    school = await make_school(pool, settings, f"ur{secrets.token_hex(4)}")
    school_base = f"http://{school.subdomain}.localhost:{identity_port}"
    platform_base = f"http://localhost:{identity_port}"
    # The platform's registration window is shared by every test registering there.
    bucket = ratelimit.key(settings, "register", "platform", "127.0.0.1")
    await redis.delete(bucket)
    async with client_session() as http:
        school_registered = await _register(http, school_base)
        platform_registered = await _register(http, platform_base)
    await redis.delete(bucket)
    admin_made = await make_client(pool, settings, school, redirect_uris=(EVIL,))
    cli_made = await make_client(
        pool, settings, None, redirect_uris=(EVIL,), scopes=("read",), created_via="cli"
    )
    return Sites(
        Site(school_base, school, school_registered, admin_made.id),
        Site(platform_base, school, platform_registered, cli_made.id),
    )


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    b = Browser()
    yield b
    await b.close()


@pytest.fixture(autouse=True)
async def _fresh_address_counter(redis: redis_asyncio.Redis, settings: Settings) -> Any:
    """Every test signs in from 127.0.0.1; a test's sign-ins must not throttle the next."""
    key = sessions.address_throttle_key(settings, "127.0.0.1")
    await redis.delete(key)
    yield
    await redis.delete(key)


async def ask(
    http: aiohttp.ClientSession, base: str, client_id: str, how: str, **extra: str
) -> tuple[int, Any, str]:
    """The authorization request by GET, by GET at the alias, or by POST (OIDC Core 3.1.2.1)."""
    url = authorize_url(base, client_id, redirect_uri=EVIL, **extra)
    if how == "post":
        path, query = url.split("?", 1)
        async with http.post(
            path,
            data=query,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            allow_redirects=False,
        ) as resp:
            return resp.status, resp.headers, await resp.text()
    if how == "alias":
        url = url.replace("/v1/oauth/authorize", "/oauth/authorize")
    async with http.get(url, allow_redirects=False) as resp:
        return resp.status, resp.headers, await resp.text()


def assert_page_names(status: int, headers: Any, body: str, error: str) -> None:
    assert_error_page(status, headers, body)
    assert f'<code class="error-code">{error}</code>' in body, body
    assert not any("evil.example" in v for v in headers.values())


def assert_redirects_to_evil(status: int, headers: Any, error: str, issuer: str) -> None:
    assert status in (302, 303), status
    location = headers["Location"]
    assert urlsplit(location).netloc == "evil.example"
    q = query_of(location)
    assert q["error"] == error and q["iss"] == issuer and "code" not in q


# Every error found before the user acts --------------------------------------------------------

PRE_INTERACTION = [
    ({"response_type": "token"}, "unsupported_response_type"),
    ({"response_type": "code token"}, "unsupported_response_type"),
    ({"response_type": "Code"}, "unsupported_response_type"),
    ({"response_type": ""}, "invalid_request"),  # missing
    ({"code_challenge": ""}, "invalid_request"),  # no PKCE
    ({"code_challenge_method": "plain"}, "invalid_request"),
    ({"code_challenge_method": ""}, "invalid_request"),  # would default to plain
    ({"code_challenge_method": "s256"}, "invalid_request"),
    ({"code_challenge": "short"}, "invalid_request"),
    ({"scope": "admin:read"}, "invalid_scope"),
    ({"scope": "openid nonsense"}, "invalid_scope"),
    ({"scope": "openid admin:write"}, "invalid_scope"),
    ({"resource": "https://evil.test/api"}, "invalid_target"),
    ({"resource": "not a uri"}, "invalid_target"),
    ({"resource": "https://evil.test/#x"}, "invalid_target"),
    ({"prompt": "select_account"}, "invalid_request"),
    ({"prompt": "none login"}, "invalid_request"),
    ({"max_age": "-1"}, "invalid_request"),
    ({"max_age": "soon"}, "invalid_request"),
    ({"response_mode": "fragment"}, "invalid_request"),
    ({"response_mode": "form_post"}, "invalid_request"),
    ({"request": "eyJhbGciOiJub25lIn0.e30."}, "request_not_supported"),
    ({"request_uri": "urn:ietf:params:oauth:request_uri:x"}, "request_uri_not_supported"),
    ({"state": "s" * 3000}, "invalid_request"),
    ({"nonce": "n" * 600}, "invalid_request"),
    ({"prompt": "none"}, "login_required"),  # nobody signed in, and the client said not to ask
]


@pytest.mark.parametrize(
    ("extra", "error"), PRE_INTERACTION, ids=[f"{e}:{next(iter(x))}" for x, e in PRE_INTERACTION]
)
async def test_an_unreviewed_clients_error_before_interaction_is_our_page(
    sites: Sites, http: Any, extra: dict[str, str], error: str
) -> None:
    for site in (sites.school, sites.platform):
        for how in ("get", "alias", "post"):
            status, headers, body = await ask(http, site.base, site.registered, how, **extra)
            assert_page_names(status, headers, body, error)


@pytest.mark.parametrize(
    ("extra", "error"), PRE_INTERACTION, ids=[f"{e}:{next(iter(x))}" for x, e in PRE_INTERACTION]
)
async def test_an_admin_or_cli_made_clients_error_still_redirects(
    sites: Sites, http: Any, extra: dict[str, str], error: str
) -> None:
    for site in (sites.school, sites.platform):
        for how in ("get", "post"):
            status, headers, _ = await ask(http, site.base, site.reviewed, how, **extra)
            assert_redirects_to_evil(status, headers, error, site.base)


async def test_a_repeated_parameter_of_an_unreviewed_client_is_our_page(
    sites: Sites, http: Any
) -> None:
    for site in (sites.school, sites.platform):
        for repeated in ("scope=openid&scope=email", "response_type=code", "state=a&state=b"):
            url = authorize_url(site.base, site.registered, redirect_uri=EVIL) + "&" + repeated
            async with http.get(url, allow_redirects=False) as resp:
                assert_page_names(resp.status, resp.headers, await resp.text(), "invalid_request")
        url = authorize_url(site.base, site.reviewed, redirect_uri=EVIL) + "&response_type=code"
        async with http.get(url, allow_redirects=False) as resp:
            assert_redirects_to_evil(resp.status, resp.headers, "invalid_request", site.base)


async def test_an_unreviewed_client_naming_the_school_api_on_the_platform_is_our_page(
    sites: Sites, http: Any, settings: Settings
) -> None:
    api = settings.urls.school_origin(sites.school.school.subdomain)
    status, headers, body = await ask(
        http, sites.platform.base, sites.platform.registered, "get", resource=api
    )
    assert_page_names(status, headers, body, "invalid_target")


async def test_a_schools_refused_scope_for_an_unreviewed_client_is_our_page(
    identity_url: str, http: Any, pool: asyncpg.Pool, settings: Settings, identity_port: int
) -> None:
    school = await make_school(pool, settings, f"ua{secrets.token_hex(4)}")
    await pool.execute(
        "UPDATE schools SET allowed_scopes = '{courses:read}' WHERE id = $1", school.id
    )
    base = f"http://{school.subdomain}.localhost:{identity_port}"
    registered = await make_client(
        pool, settings, school, redirect_uris=(EVIL,), created_via="registration"
    )
    admin_made = await make_client(pool, settings, school, redirect_uris=(EVIL,))
    status, headers, body = await ask(http, base, registered.id, "get", scope="students:read")
    assert_page_names(status, headers, body, "invalid_scope")
    status, headers, _ = await ask(http, base, admin_made.id, "get", scope="students:read")
    assert_redirects_to_evil(status, headers, "invalid_scope", base)


async def test_an_unreviewed_client_the_user_cannot_use_is_our_page(
    identity_url: str, http: Any, pool: asyncpg.Pool, settings: Settings, identity_port: int
) -> None:
    """`unauthorized_client`: a self-registered client altered to lose the code flow."""
    school = await make_school(pool, settings, f"uu{secrets.token_hex(4)}")
    base = f"http://{school.subdomain}.localhost:{identity_port}"
    registered = await make_client(
        pool, settings, school, redirect_uris=(EVIL,), created_via="registration"
    )
    await pool.execute("UPDATE clients SET response_types = '{}' WHERE id = $1", registered.id)
    status, headers, body = await ask(http, base, registered.id, "get")
    assert_page_names(status, headers, body, "unauthorized_client")


# A signed-in user who has not acted in this flow -------------------------------------------------


@dataclass
class Member:
    world: World
    registered: store.Client
    admin_made: store.Client


@pytest.fixture
async def member(
    identity_url: str, pool: asyncpg.Pool, settings: Settings, unique: str, identity_port: int
) -> Member:
    """A member of a school (who may grant none of `events:write`), and two clients."""
    school = await make_school(pool, settings, f"um{unique}")
    user = await make_user(pool, school, unique, role="member")
    registered = await make_client(
        pool,
        settings,
        school,
        redirect_uris=(EVIL,),
        scopes=("events:read", "events:write"),
        created_via="registration",
    )
    admin_made = await make_client(
        pool, settings, school, redirect_uris=(EVIL,), scopes=("events:read", "events:write")
    )
    base = f"http://{school.subdomain}.localhost:{identity_port}"
    world = World(school, base, registered, user, user.email, PASSWORD, EVIL)
    return Member(world, registered, admin_made)


async def sign_in(browser: Browser, world: World) -> None:
    """Sign in through a flow of the client, and leave it at its consent page."""
    url = authorize_url(world.base, world.client.id, redirect_uri=EVIL, scope="events:read")
    status, _, page = await browser.sign_in_to_consent(world, url)
    assert status == 200 and 'action="/v1/oauth/consent"' in page


async def test_a_signed_in_users_silent_errors_for_an_unreviewed_client_are_our_page(
    member: Member, browser: Browser
) -> None:
    world = member.world
    await sign_in(browser, world)  # no consent given: the page is left undecided
    for client, reviewed in ((member.registered, False), (member.admin_made, True)):
        for extra, error in (
            ({"scope": "events:write"}, "access_denied"),  # beyond the member's role
            ({"scope": "events:read", "prompt": "none"}, "consent_required"),
        ):
            status, headers, body = await browser.get(
                authorize_url(world.base, client.id, redirect_uri=EVIL, **extra)
            )
            if reviewed:
                assert_redirects_to_evil(status, headers, error, world.base)
            else:
                assert_page_names(status, headers, body, error)


async def test_a_platform_users_silent_school_choice_for_an_unreviewed_client_is_our_page(
    sites: Sites,
    browser: Browser,
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
) -> None:
    first = await make_school(pool, settings, f"uf{unique}")
    second = await make_school(pool, settings, f"ug{unique}")
    user = await make_user(pool, first, unique)
    await store.upsert_membership(pool, second.id, user.id, "admin")
    site = sites.platform
    actor = World(
        first, site.base, await client_of(pool, site.registered), user, user.email, PASSWORD, EVIL
    )
    url = authorize_url(site.base, site.registered, redirect_uri=EVIL, scope="events:read")
    status, _, page = await browser.sign_in_to_consent(actor, url)
    assert 'action="/v1/oauth/select-school"' in page
    status, headers, body = await browser.get(
        authorize_url(site.base, site.registered, redirect_uri=EVIL, prompt="none")
    )
    assert_page_names(status, headers, body, "interaction_required")
    status, headers, body = await browser.get(
        authorize_url(site.base, site.reviewed, redirect_uri=EVIL, prompt="none")
    )
    assert_redirects_to_evil(status, headers, "interaction_required", site.base)


async def client_of(pool: asyncpg.Pool, client_id: str) -> store.Client:
    client = await store.client_by_id(pool, client_id)
    assert client is not None
    return client


# After the user acted: the client hears the outcome --------------------------------------------


async def test_deny_redirects_access_denied_for_every_client(
    member: Member, browser: Browser, pool: asyncpg.Pool
) -> None:
    world = member.world
    await sign_in(browser, world)
    for client in (member.registered, member.admin_made):
        status, _, page = await browser.get(
            authorize_url(world.base, client.id, redirect_uri=EVIL, scope="events:read", state="d")
        )
        assert status == 200 and 'action="/v1/oauth/consent"' in page
        status, headers, _ = await browser.decide(world.base, page, "deny")
        assert status == 303
        assert_redirects_to_evil(status, headers, "access_denied", world.base)
        assert query_of(headers["Location"])["state"] == "d"


async def test_cancel_at_the_school_picker_redirects_for_an_unreviewed_client(
    sites: Sites, browser: Browser, pool: asyncpg.Pool, settings: Settings, unique: str
) -> None:
    first = await make_school(pool, settings, f"uc{unique}")
    second = await make_school(pool, settings, f"ud{unique}")
    user = await make_user(pool, first, unique)
    await store.upsert_membership(pool, second.id, user.id, "admin")
    site = sites.platform
    actor = World(
        first, site.base, await client_of(pool, site.registered), user, user.email, PASSWORD, EVIL
    )
    url = authorize_url(site.base, site.registered, redirect_uri=EVIL, state="c")
    _, _, page = await browser.sign_in_to_consent(actor, url)
    picker = form(page, "/v1/oauth/select-school")
    status, headers, _ = await browser.post(
        site.base + picker.action, {**picker.fields, "decision": "cancel"}
    )
    assert_redirects_to_evil(status, headers, "access_denied", site.base)
    assert query_of(headers["Location"])["state"] == "c"


async def test_an_error_after_signing_in_during_the_flow_redirects(
    member: Member, browser: Browser
) -> None:
    """Signing in on a page naming the app is acting: the app hears what came of it."""
    world = member.world
    url = authorize_url(
        world.base, member.registered.id, redirect_uri=EVIL, scope="events:write", state="w"
    )
    status, headers, _ = await browser.sign_in_to_consent(world, url)
    assert_redirects_to_evil(status, headers, "access_denied", world.base)
    assert query_of(headers["Location"])["state"] == "w"
    # The same request again, now with the session from before: nobody acted, our page.
    status, headers, body = await browser.get(url)
    assert_page_names(status, headers, body, "access_denied")


async def test_an_error_after_picking_a_school_redirects(
    sites: Sites, browser: Browser, pool: asyncpg.Pool, settings: Settings, unique: str
) -> None:
    """Picking a school on a page naming the app is acting too, even without a sign-in."""
    led = await make_school(pool, settings, f"ul{unique}")
    attended = await make_school(pool, settings, f"un{unique}")
    user = await make_user(pool, led, unique)
    await store.upsert_membership(pool, attended.id, user.id, "member")
    site = sites.platform
    client = await client_of(pool, site.registered)
    actor = World(led, site.base, client, user, user.email, PASSWORD, EVIL)
    first = authorize_url(site.base, site.registered, redirect_uri=EVIL, scope="events:read")
    _, _, page = await browser.sign_in_to_consent(actor, first)
    assert 'action="/v1/oauth/select-school"' in page
    # A new request in the signed-in browser: nobody signs in, the user picks a school
    # whose role allows none of what is asked.
    url = authorize_url(
        site.base, site.registered, redirect_uri=EVIL, scope="events:write", state="pick"
    )
    status, _, page = await browser.get(url)
    assert status == 200
    picker = form(page, "/v1/oauth/select-school")
    fields = {**picker.fields, "school_id": str(attended.id), "decision": "continue"}
    status, headers, body = await browser.post(site.base + picker.action, fields)
    status, headers, body = await browser.follow(site.base, status, headers, body)
    assert_redirects_to_evil(status, headers, "access_denied", site.base)
    assert query_of(headers["Location"])["state"] == "pick"


async def test_an_unreviewed_clients_flow_still_ends_with_a_code(
    sites: Sites, browser: Browser, pool: asyncpg.Pool, settings: Settings, unique: str
) -> None:
    for site in (sites.school, sites.platform):
        user = await make_user(pool, site.school, unique)
        actor = World(
            site.school,
            site.base,
            await client_of(pool, site.registered),
            user,
            user.email,
            PASSWORD,
            EVIL,
        )
        verifier, challenge = pkce()
        url = authorize_url(
            site.base,
            site.registered,
            redirect_uri=EVIL,
            challenge=challenge,
            scope="openid events:read",
            state="ok",
        )
        _, _, page = await browser.sign_in_to_consent(actor, url)
        assert "has not been reviewed" in page
        status, headers, _ = await browser.decide(site.base, page, "allow")
        assert status == 303 and headers["Location"].startswith(EVIL + "?")
        q = query_of(headers["Location"])
        assert q["code"] and q["state"] == "ok" and q["iss"] == site.base
        token = {
            "grant_type": "authorization_code",
            "code": q["code"],
            "redirect_uri": EVIL,
            "client_id": site.registered,
            "code_verifier": verifier,
        }
        status, _, body = await browser.post(site.base + "/v1/oauth/token", token)
        assert status == 200, body
        # The next app's user signs in afresh.
        browser.session.cookie_jar.clear()
