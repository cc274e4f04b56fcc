"""Role scope ceilings and closed schools: what a user may hand an app is bounded by their role.

Security review findings: (1) a member (a student) could consent to `students:read orders:read`
and hand an app every member's personal data; (2) a client that registered itself on the
always-open platform origin reached schools that closed registration through the school picker.
Every test goes through the real authorize, sign-in, picker and consent pages.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

import asyncpg
import orjson
import pytest
import redis.asyncio as redis_asyncio

from libs.common import scopes as catalogue
from libs.common.config import Settings
from services.identity import credentials, resources, roles, store
from tests.support import client_session
from tests.test_authorize import (
    PASSWORD,
    REDIRECT,
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
from tests.token_helpers import (
    REDIRECT_URI,
    basic,
    code_flow,
    insert_code,
    introspect,
    pkce_pair,
    post_form,
    refresh,
    revocation_marked,
    token,
)
from tests.token_helpers import make_world as token_world

DATA_ASKED = ("openid", "students:read", "orders:read", "events:read")
WIDE = ("openid", "profile", "read", "write", *catalogue.DATA_SCOPES)


@pytest.fixture
async def browser() -> Any:
    b = Browser()
    yield b
    await b.close()


async def school_world(
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
    port: int,
    role: str,
    scopes: tuple[str, ...] = WIDE,
) -> World:
    school = await make_school(pool, settings, f"rc{unique}{secrets.token_hex(2)}")
    user = await make_user(pool, school, unique, role=role)
    client = await make_client(pool, settings, school, scopes=scopes)
    base = f"http://{school.subdomain}.localhost:{port}"
    return World(school, base, client, user, user.email, PASSWORD, REDIRECT)


WorldOf = Callable[[str], Awaitable[World]]


@pytest.fixture
def world_of(
    identity_url: str, pool: asyncpg.Pool, settings: Settings, unique: str, identity_port: int
) -> WorldOf:
    """A school of this run's identity whose user holds the given role, with an app asking wide."""

    async def make(role: str) -> World:
        return await school_world(pool, settings, unique, identity_port, role)

    return make


def claims_of(access_token: str) -> dict[str, Any]:
    payload = access_token.split(".")[1]
    decoded: dict[str, Any] = orjson.loads(base64.urlsafe_b64decode(payload + "=="))
    return decoded


async def redeem(base: str, client_id: str, code: str, verifier: str, **extra: str) -> Any:
    async with client_session() as http:
        return await post_form(
            http,
            base + "/v1/oauth/token",
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT,
                "client_id": client_id,
                "code_verifier": verifier,
                **extra,
            },
        )


async def consent_page(browser: Browser, world: World, scope: str, **extra: str) -> tuple[str, str]:
    """Sign in and reach the consent page; (its HTML, the PKCE verifier)."""
    verifier, challenge = pkce()
    url = authorize_url(world.base, world.client.id, challenge=challenge, scope=scope, **extra)
    status, _, page = await browser.sign_in_to_consent(world, url)
    assert status == 200, page
    form(page, "/v1/oauth/consent")
    return page, verifier


async def allow(browser: Browser, world: World, page: str, verifier: str) -> dict[str, Any]:
    status, headers, _ = await browser.decide(world.base, page, "allow")
    assert status == 303
    q = query_of(headers["Location"])
    assert "code" in q, q
    answer = await redeem(world.base, world.client.id, q["code"], verifier)
    assert answer.status == 200, answer.body
    body: dict[str, Any] = answer.body
    return body


async def reauthorize(browser: Browser, world: World, scope: str) -> Any:
    """Ask again under a remembered consent: no page, straight to a code, which is redeemed."""
    verifier, challenge = pkce()
    status, headers, _ = await browser.get(
        authorize_url(world.base, world.client.id, challenge=challenge, scope=scope)
    )
    assert status == 302
    return await redeem(
        world.base, world.client.id, query_of(headers["Location"])["code"], verifier
    )


def platform_actor(
    school: store.School, client: store.Client, user: store.User, port: int
) -> World:
    """`user` of `school` authorizing `client` at the platform origin, where the picker is."""
    platform = f"http://localhost:{port}"
    return World(school, platform, client, user, user.email, PASSWORD, REDIRECT)


# The ceilings themselves ------------------------------------------------------------------


def test_ceilings_are_nested_and_never_hold_admin_scopes() -> None:
    member, lecturer, admin = (roles.ceiling(r) for r in ("member", "lecturer", "admin"))
    assert catalogue.IDENTITY_SCOPES <= member < lecturer < admin
    assert admin == frozenset(catalogue.PUBLIC_SCOPES)
    assert not admin & catalogue.ADMIN_SCOPES
    for personal in ("students:read", "orders:read", "analytics:read", "subscriptions:read"):
        assert personal not in lecturer
    # Seed 002's courses:read holds the whole curriculum and everyone's enrollments: staff's.
    assert "courses:read" in lecturer and "courses:read" not in member
    assert roles.ceiling(None) == frozenset()
    assert roles.ceiling(None, platform_admin=True) == admin
    # An umbrella fits only where everything it stands for does.
    assert roles.narrow(["read", "write", "events:read"], lecturer).granted == ("events:read",)
    assert roles.narrow(["read", "write"], admin).granted == ("read", "write")


# Finding 1: a member cannot hand out the school's data --------------------------------------


async def test_a_member_gets_only_what_a_member_may_grant(
    browser: Browser, pool: asyncpg.Pool, world_of: WorldOf
) -> None:
    world = await world_of("member")
    page, verifier = await consent_page(browser, world, " ".join(DATA_ASKED))
    # The page lists what will be granted, and says in words what needs a school admin.
    granted_part, _, withheld_part = page.partition("only a school admin can give")
    assert withheld_part, page
    assert "events:read" in granted_part and "students:read" not in granted_part
    assert "students:read" in withheld_part and "orders:read" in withheld_part
    assert "Read student profiles and progress data" in withheld_part

    tokens = await allow(browser, world, page, verifier)
    assert tokens["scope"] == "openid events:read"
    assert claims_of(tokens["access_token"])["scope"] == "openid events:read"
    consented = await pool.fetchval(
        "SELECT scopes FROM consents WHERE user_id = $1 AND client_id = $2",
        world.user.id,
        world.client.id,
    )
    assert consented == ["openid", "events:read"]

    # Asking again: the remembered consent covers what a member may grant; still no more.
    answer = await reauthorize(browser, world, " ".join(DATA_ASKED))
    assert answer.body["scope"] == "openid events:read"


async def test_an_admin_gets_everything_asked(browser: Browser, world_of: WorldOf) -> None:
    world = await world_of("admin")
    asked = "openid read students:read orders:read school:write"
    page, verifier = await consent_page(browser, world, asked)
    assert "only a school admin can give" not in page
    tokens = await allow(browser, world, page, verifier)
    assert tokens["scope"] == asked


async def test_the_read_umbrella_is_dropped_for_a_member_and_a_lecturer(
    world_of: WorldOf,
) -> None:
    expected = {
        "member": "openid events:read",
        "lecturer": "openid events:read curriculum:write",
    }
    for role, scope in expected.items():
        world = await world_of(role)
        b = Browser()
        try:
            page, verifier = await consent_page(
                b, world, "openid read events:read curriculum:write"
            )
            assert (
                '<code class="scope-name">read</code>'
                in page.partition("only a school admin can give")[2]
            )
            tokens = await allow(b, world, page, verifier)
        finally:
            await b.close()
        assert tokens["scope"] == scope, role


async def test_nothing_within_the_role_is_access_denied(
    browser: Browser, world_of: WorldOf
) -> None:
    world = await world_of("member")
    url = authorize_url(world.base, world.client.id, scope="students:read orders:read", state="s1")
    status, headers, _ = await browser.sign_in_to_consent(world, url)
    assert status == 302
    q = query_of(headers["Location"])
    assert q["error"] == "access_denied" and q["state"] == "s1" and q["iss"] == world.base
    assert "school admin" in q["error_description"]
    assert "code" not in q


async def test_remembered_consent_does_not_outlive_a_lowered_role(
    browser: Browser, pool: asyncpg.Pool, world_of: WorldOf
) -> None:
    world = await world_of("admin")
    page, verifier = await consent_page(browser, world, " ".join(DATA_ASKED))
    assert (await allow(browser, world, page, verifier))["scope"] == " ".join(DATA_ASKED)

    await store.upsert_membership(pool, world.school.id, world.user.id, "member")
    # Consent is still remembered (no page), but it grants only what a member may.
    answer = await reauthorize(browser, world, " ".join(DATA_ASKED))
    assert answer.body["scope"] == "openid events:read"


async def test_a_role_raised_after_the_consent_page_grants_no_more_than_it_showed(
    browser: Browser, pool: asyncpg.Pool, world_of: WorldOf
) -> None:
    world = await world_of("member")
    page, verifier = await consent_page(browser, world, " ".join(DATA_ASKED))
    await store.upsert_membership(pool, world.school.id, world.user.id, "admin")
    assert (await allow(browser, world, page, verifier))["scope"] == "openid events:read"


async def assert_ended_for_the_role(
    pool: asyncpg.Pool, redis: redis_asyncio.Redis, settings: Settings, grant_id: UUID
) -> None:
    """The grant ended everywhere gateways look (Redis mark, revocations stream), and for the
    role, not for some other reason."""
    assert await revocation_marked(redis, settings, grant_id) == (True, True)
    reason = await pool.fetchval("SELECT revoked_reason FROM grants WHERE id = $1", grant_id)
    assert reason == "role_lowered"


# Refresh: the ceiling is checked against the role now -----------------------------------------


async def test_a_lowered_role_ends_the_grant_at_its_next_refresh(
    identity_url: str,
    http: Any,
    pool: asyncpg.Pool,
    redis: redis_asyncio.Redis,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    world = await token_world(pool, settings, unique, identity_port, label="rl")
    answer, grant_id = await code_flow(
        http, pool, settings, world, scopes=("openid", "events:read", "students:read")
    )
    assert answer.status == 200, answer.body
    first = answer.body
    refreshed = await refresh(http, world, first["refresh_token"])
    assert refreshed.status == 200, refreshed.body

    await store.upsert_membership(pool, world.school.id, world.user.id, "member")
    # Even asking for only what a member may hold: the grant itself is beyond the role.
    refused = await refresh(http, world, refreshed.body["refresh_token"], scope="events:read")
    assert refused.status == 400
    assert refused.body["error"] == "invalid_grant"
    assert "role" in refused.body["error_description"]
    await assert_ended_for_the_role(pool, redis, settings, grant_id)
    assert (await introspect(http, world, refreshed.body["access_token"]))["active"] is False
    assert (await introspect(http, world, refreshed.body["refresh_token"]))["active"] is False


async def test_a_role_lowered_between_consent_and_redemption_ends_the_grant(
    identity_url: str,
    http: Any,
    pool: asyncpg.Pool,
    redis: redis_asyncio.Redis,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    """The code was issued while the user was an admin; their role is lowered before the app
    redeems it: no token, and the grant ends everywhere."""
    world = await token_world(pool, settings, unique, identity_port, label="rc")
    client = world.confidential
    verifier, challenge = pkce_pair()
    code, grant_id = await insert_code(
        pool,
        settings,
        school_id=world.school.id,
        client_id=client.id,
        user_id=world.user.id,
        scopes=("openid", "students:read"),
        challenge=challenge,
    )
    await store.upsert_membership(pool, world.school.id, world.user.id, "member")
    answer = await token(
        http,
        world.origin,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
        },
        authorization=basic(client.id, world.secret),
    )
    assert answer.status == 400 and answer.body["error"] == "invalid_grant", answer.body
    assert "role" in answer.body["error_description"]
    await assert_ended_for_the_role(pool, redis, settings, grant_id)


async def test_a_grant_within_the_role_refreshes_and_a_removed_membership_ends_it(
    identity_url: str,
    http: Any,
    pool: asyncpg.Pool,
    redis: redis_asyncio.Redis,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    world = await token_world(pool, settings, unique, identity_port, label="rm", role="member")
    answer, grant_id = await code_flow(
        http, pool, settings, world, scopes=("openid", "events:read")
    )
    assert answer.status == 200, answer.body
    refreshed = await refresh(http, world, answer.body["refresh_token"])
    assert refreshed.status == 200, refreshed.body
    assert refreshed.body["scope"] == "openid events:read"

    await pool.execute(
        "DELETE FROM school_memberships WHERE school_id = $1 AND user_id = $2",
        world.school.id,
        world.user.id,
    )
    refused = await refresh(http, world, refreshed.body["refresh_token"])
    assert refused.status == 400 and refused.body["error"] == "invalid_grant"
    assert await revocation_marked(redis, settings, grant_id) == (True, True)


# Platform clients: the picked school's role, and closed schools --------------------------------


async def test_a_platform_clients_user_gets_the_ceiling_of_the_school_picked(
    identity_url: str,
    browser: Browser,
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    led = await make_school(pool, settings, f"pl{unique}")
    attended = await make_school(pool, settings, f"pm{unique}")
    user = await make_user(pool, led, unique)
    await store.upsert_membership(pool, attended.id, user.id, "member")
    # Operator-made (a system-default app): neither closed-school nor MCP-only rules apply.
    client = await make_client(
        pool, settings, None, name="Loopwise Desktop", scopes=WIDE, created_via="cli"
    )
    actor = platform_actor(led, client, user, identity_port)
    platform = actor.base
    verifier, challenge = pkce()
    url = authorize_url(
        platform, client.id, challenge=challenge, scope=" ".join(DATA_ASKED), state="pk"
    )
    status, _, page = await browser.sign_in_to_consent(actor, url)
    picker = form(page, "/v1/oauth/select-school")
    fields = {**picker.fields, "school_id": str(attended.id), "decision": "continue"}
    status, headers, body = await browser.post(platform + picker.action, fields)
    status, _, page = await browser.follow(platform, status, headers, body)
    assert status == 200 and attended.name in page
    assert "only a school admin can give" in page
    tokens = await allow(browser, actor, page, verifier)
    assert tokens["scope"] == "openid events:read"
    assert tokens["school_id"] == attended.id


async def test_a_self_registered_platform_client_cannot_reach_a_closed_school(
    identity_url: str,
    browser: Browser,
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    open_school = await make_school(pool, settings, f"po{unique}")
    closed = await make_school(pool, settings, f"pq{unique}")
    await store.set_open_registration(pool, closed.id, False)
    user = await make_user(pool, open_school, unique)
    await store.upsert_membership(pool, closed.id, user.id, "admin")
    third = await make_school(pool, settings, f"pr{unique}")
    await store.upsert_membership(pool, third.id, user.id, "admin")
    client = await make_client(
        pool, settings, None, name="Claude Code", scopes=WIDE, created_via="registration"
    )
    actor = platform_actor(open_school, client, user, identity_port)
    platform = actor.base
    url = authorize_url(platform, client.id, scope="openid events:read", state="cl")
    status, _, page = await browser.sign_in_to_consent(actor, url)
    assert status == 200
    picker = form(page, "/v1/oauth/select-school")
    assert open_school.name in page and third.name in page
    assert closed.name not in page and f'value="{closed.id}"' not in page

    # Posted anyway: the request is refused.
    fields = {**picker.fields, "school_id": str(closed.id), "decision": "continue"}
    status, headers, _ = await browser.post(platform + picker.action, fields)
    assert status == 303
    q = query_of(headers["Location"])
    assert headers["Location"].startswith(REDIRECT + "?")
    assert q["error"] == "access_denied" and q["state"] == "cl" and q["iss"] == platform
    assert "registered themselves" in q["error_description"]

    # A user whose only school is closed has nothing to pick.
    lonely = await make_user(pool, closed, unique + "l")
    other = Browser()
    try:
        alone = platform_actor(closed, client, lonely, identity_port)
        status, headers, _ = await other.sign_in_to_consent(
            alone, authorize_url(platform, client.id, scope="openid", state="al")
        )
        assert status == 302
        q = query_of(headers["Location"])
        assert q["error"] == "access_denied" and q["state"] == "al"
    finally:
        await other.close()


async def test_a_self_registered_platform_client_mints_for_the_mcp_resource_only(
    identity_url: str,
    browser: Browser,
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    school = await make_school(pool, settings, f"pn{unique}")
    user = await make_user(pool, school, unique)
    client = await make_client(
        pool, settings, None, name="Cursor", scopes=WIDE, created_via="registration"
    )
    actor = platform_actor(school, client, user, identity_port)
    platform = actor.base
    mcp = resources.mcp_resource(settings)
    api = settings.urls.school_origin(school.subdomain)

    # Naming the school's API is refused before anyone signs in: on our own page, since the
    # client registered itself and nobody has acted yet (RFC 9700 4.11.2).
    status, headers, body = await browser.get(
        authorize_url(platform, client.id, scope="events:read", state="api", resource=api)
    )
    assert_error_page(status, headers, body)
    assert "invalid_target" in body

    # Naming none: the code, and so the token, is for the MCP server.
    verifier, challenge = pkce()
    url = authorize_url(platform, client.id, challenge=challenge, scope="openid events:read")
    status, _, page = await browser.sign_in_to_consent(actor, url)
    assert status == 200
    status, headers, _ = await browser.decide(platform, page, "allow")
    code = query_of(headers["Location"])["code"]
    bound = await pool.fetchval(
        "SELECT resource FROM authorization_codes WHERE code_hash = $1",
        credentials.token_hash(code),
    )
    assert bound == mcp
    # Asking the token endpoint for the school's API instead is refused, and the code kept.
    wrong = await redeem(platform, client.id, code, verifier, resource=api)
    assert wrong.status == 400 and wrong.body["error"] == "invalid_target"
    answer = await redeem(platform, client.id, code, verifier)
    assert answer.status == 200, answer.body
    assert claims_of(answer.body["access_token"])["aud"] == mcp
