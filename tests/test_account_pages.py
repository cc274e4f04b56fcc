"""The account pages on real sockets: Connected Apps (list, Revoke) and the access history.

Grants come from the real flow (consent page, code, token endpoint); revocation is checked
where it matters: introspection, the refresh token, the Redis mark gateways read, and, in
Chromium through a real gateway, an API call refused with 401.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode, urlsplit
from uuid import UUID, uuid4

import asyncpg
import pytest
import redis.asyncio as redis_asyncio

from libs.common import scopes as catalogue
from libs.common import streams
from libs.common.config import Settings
from services.gateway.audit import api_call
from services.identity import sessions, store, users
from services.identity.store import audit as audit_store
from tests.test_authorize import Browser, authorize_url, form, query_of
from tests.test_gateway_support import echo_upstream
from tests.test_gateway_support import make_world as gateway_world
from tests.test_pages_browser import chromium
from tests.token_helpers import (
    PASSWORD,
    REDIRECT_URI,
    World,
    basic,
    code_grant,
    insert_code,
    introspect,
    make_world,
    pkce_pair,
    post_form,
    redeem,
    refresh,
    revocation_marked,
)

__all__ = ["chromium", "echo_upstream"]

CSP_FRAME = "frame-ancestors 'none'"


@pytest.fixture(autouse=True)
async def _fresh_address_counter(redis: redis_asyncio.Redis, settings: Settings) -> Any:
    """Every test signs in from 127.0.0.1; one test's failures must not throttle the next."""
    key = sessions.address_throttle_key(settings, "127.0.0.1")
    await redis.delete(key)
    yield
    await redis.delete(key)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    b = Browser()
    yield b
    await b.close()


@pytest.fixture
async def world(
    identity_url: str, pool: asyncpg.Pool, settings: Settings, unique: str, identity_port: int
) -> World:
    return await make_world(pool, settings, unique, identity_port, label="acct")


# Steps shared with test_admin_pages.py -----------------------------------------------------


async def sign_in(
    browser: Browser,
    origin: str,
    email: str,
    password: str = PASSWORD,
    *,
    return_to: str = "/account/apps",
) -> tuple[int, Any, str]:
    status, _, body = await browser.get(
        f"{origin}/account/login?{urlencode({'return_to': return_to})}"
    )
    assert status == 200, body
    f = form(body, "/account/login")
    return await browser.post(
        origin + "/account/login", {**f.fields, "email": email, "password": password}
    )


async def signed_in(browser: Browser, origin: str, email: str, password: str = PASSWORD) -> None:
    status, headers, body = await sign_in(browser, origin, email, password)
    assert status == 303, body
    assert headers["Location"] == "/account/apps"


async def authorize_in_browser(
    browser: Browser, http: Any, world: World, scope: str = "openid courses:read"
) -> dict[str, Any]:
    """The signed-in browser authorizes the confidential client (consenting if asked); the
    client redeems the code. Returns the token response."""
    verifier, challenge = pkce_pair()
    url = authorize_url(
        world.origin,
        world.confidential.id,
        redirect_uri=REDIRECT_URI,
        challenge=challenge,
        scope=scope,
    )
    status, headers, body = await browser.get(url)
    if status == 200:
        f = form(body, "/v1/oauth/consent")
        status, headers, body = await browser.post(
            world.origin + f.action, {**f.fields, "decision": "allow"}
        )
    assert status in (302, 303), body
    code = query_of(headers["Location"])["code"]
    answer = await redeem(
        http,
        world.origin,
        code,
        verifier,
        client_id=world.confidential.id,
        secret=world.secret,
    )
    assert answer.status == 200, answer.body
    return answer.body


async def live_grants(pool: asyncpg.Pool, user_id: UUID, client_id: str) -> list[UUID]:
    rows = await pool.fetch(
        "SELECT id FROM grants WHERE user_id = $1 AND client_id = $2 AND revoked_at IS NULL",
        user_id,
        client_id,
    )
    return [r["id"] for r in rows]


async def consent_row(pool: asyncpg.Pool, user_id: UUID, client_id: str) -> list[str] | None:
    scopes: list[str] | None = await pool.fetchval(
        "SELECT scopes FROM consents WHERE user_id = $1 AND client_id = $2", user_id, client_id
    )
    return scopes


def revoke_form(html: str) -> dict[str, str]:
    return form(html, "/account/apps/revoke").fields


# Signing in --------------------------------------------------------------------------------


async def test_signed_out_visitor_signs_in_and_comes_back(world: World, browser: Browser) -> None:
    for path in ("/account/apps", "/account/activity?before=1.2"):
        status, headers, _ = await browser.get(world.origin + path)
        assert status == 303
        target = urlsplit(headers["Location"])
        assert target.path == "/account/login"
        assert query_of(headers["Location"])["return_to"] == path
    status, headers, body = await sign_in(
        browser, world.origin, world.user.email, return_to="/account/activity"
    )
    assert status == 303, body
    assert headers["Location"] == "/account/activity"
    status, headers, body = await browser.get(world.origin + "/account/activity")
    assert status == 200
    assert CSP_FRAME in headers["Content-Security-Policy"]
    assert "script-src" not in headers["Content-Security-Policy"]
    assert world.user.email in body


async def test_sign_in_never_returns_elsewhere(world: World, browser: Browser) -> None:
    evil = ("https://evil.example/", "//evil.example/account", "/v1/oauth/authorize", "/\\evil")
    for target in evil:
        fresh = Browser()
        try:
            status, headers, _ = await sign_in(
                fresh, world.origin, world.user.email, return_to=target
            )
        finally:
            await fresh.close()
        assert status == 303
        assert headers["Location"] == "/account/apps", target
    # Signed in already, the sign-in page only sends one on, to the same safe places.
    await signed_in(browser, world.origin, world.user.email)
    for target in evil:
        status, headers, _ = await browser.get(
            f"{world.origin}/account/login?{urlencode({'return_to': target})}"
        )
        assert status == 303
        assert headers["Location"] == "/account/apps", target


async def test_sign_in_without_csrf_token_is_refused(
    world: World, browser: Browser, pool: asyncpg.Pool
) -> None:
    await browser.get(world.origin + "/account/login")
    for data in ({}, {"csrf_token": "forged"}):
        status, headers, _ = await browser.post(
            world.origin + "/account/login",
            {**data, "email": world.user.email, "password": PASSWORD},
        )
        assert status == 403
        assert "Location" not in headers
    assert browser.cookie("lc_session") is None


async def test_a_non_ascii_csrf_token_is_refused_not_a_server_error(
    world: World, browser: Browser
) -> None:
    # Found by fuzzing: hmac.compare_digest raises TypeError on non-ASCII text, a 500.
    await browser.get(world.origin + "/account/login")
    status, _, _ = await browser.post(
        world.origin + "/account/login",
        {"csrf_token": "försök", "email": world.user.email, "password": PASSWORD},
    )
    assert status == 403
    assert browser.cookie("lc_session") is None
    await signed_in(browser, world.origin, world.user.email)
    status, _, _ = await browser.post(
        world.origin + "/account/apps/revoke",
        {"csrf_token": "ünïcode", "grant_id": str(uuid4()), "client_id": "x\x00y"},
    )
    assert status == 403


async def test_wrong_password_is_answered_on_the_page(world: World, browser: Browser) -> None:
    status, _, body = await sign_in(browser, world.origin, world.user.email, "not the password")
    assert status == 400
    assert "Incorrect email or password." in body
    assert browser.cookie("lc_session") is None


# Connected Apps ----------------------------------------------------------------------------


async def test_connected_apps_lists_each_app_with_its_scopes_in_words(
    world: World, browser: Browser, http: Any, pool: asyncpg.Pool, settings: Settings, unique: str
) -> None:
    await signed_in(browser, world.origin, world.user.email)
    status, _, body = await browser.get(world.origin + "/account/apps")
    assert status == 200
    assert "No apps are connected" in body

    await authorize_in_browser(browser, http, world, "openid courses:read")
    # A second authorization with more scopes: a second grant, still one app on the page.
    await authorize_in_browser(browser, http, world, "openid courses:read students:read")
    assert len(await live_grants(pool, world.user.id, world.confidential.id)) == 2

    # Someone else's grant of the same app at the same school is not this user's business.
    other, _ = await users.create_user(
        pool, school_id=world.school.id, email=f"other-{unique}@example.com", password=PASSWORD
    )
    _, challenge = pkce_pair()
    await insert_code(
        pool,
        settings,
        school_id=world.school.id,
        client_id=world.public.id,
        user_id=other.id,
        scopes=["orders:read"],
        challenge=challenge,
    )

    status, headers, body = await browser.get(world.origin + "/account/apps")
    assert status == 200
    assert CSP_FRAME in headers["Content-Security-Policy"]
    assert body.count('action="/account/apps/revoke"') == 1
    assert "Confidential App" in body
    assert "Public App" not in body
    for name in ("openid", "courses:read", "students:read"):
        assert catalogue.CATALOGUE[name].description.replace("'", "&#39;") in body
    assert catalogue.CATALOGUE["orders:read"].description not in body
    assert "Allowed since" in body and "Last used" in body
    fields = revoke_form(body)
    assert UUID(fields["grant_id"]) in await live_grants(pool, world.user.id, world.confidential.id)
    assert fields["csrf_token"]


async def test_a_revoke_during_a_silent_reauthorization_ends_the_grant_it_made(
    world: World, browser: Browser, http: Any, pool: asyncpg.Pool, monkeypatch: Any
) -> None:
    """An app keeps the browser coming back through authorize (the consent is remembered, so
    no page) while the user clicks Revoke: the grant being made at that moment must end with
    the others, not outlive the click. The code's insert is held open to make the race
    happen every time."""
    from services.identity.store import authorize as flow_store

    await signed_in(browser, world.origin, world.user.email)
    await authorize_in_browser(browser, http, world, "openid courses:read")
    _, _, apps_page = await browser.get(world.origin + "/account/apps")

    entered, release = asyncio.Event(), asyncio.Event()
    insert = flow_store.insert_authorization_code

    async def held_open(*args: Any, **kwargs: Any) -> None:
        entered.set()
        await release.wait()
        await insert(*args, **kwargs)

    monkeypatch.setattr(flow_store, "insert_authorization_code", held_open)
    _, challenge = pkce_pair()
    url = authorize_url(
        world.origin, world.confidential.id, redirect_uri=REDIRECT_URI, challenge=challenge
    )
    silent = asyncio.create_task(browser.get(url))
    revoking: asyncio.Task[Any] | None = None
    try:
        await asyncio.wait_for(entered.wait(), 10)
        revoking = asyncio.create_task(
            browser.post(world.origin + "/account/apps/revoke", revoke_form(apps_page))
        )
        await asyncio.sleep(0.3)  # the Revoke reaches the consent row the authorize holds
    finally:
        release.set()
    status, headers, _ = await silent
    assert status == 302 and "code" in query_of(headers["Location"])
    assert revoking is not None
    status, _, _ = await revoking
    assert status == 303
    assert await live_grants(pool, world.user.id, world.confidential.id) == []
    assert await consent_row(pool, world.user.id, world.confidential.id) is None


async def test_revoke_ends_every_grant_of_the_app_and_forgets_consent(
    world: World,
    browser: Browser,
    http: Any,
    pool: asyncpg.Pool,
    redis: redis_asyncio.Redis,
    settings: Settings,
) -> None:
    await signed_in(browser, world.origin, world.user.email)
    first = await authorize_in_browser(browser, http, world, "openid courses:read")
    second = await authorize_in_browser(browser, http, world, "openid courses:read")
    granted = await live_grants(pool, world.user.id, world.confidential.id)
    assert len(granted) == 2
    assert await consent_row(pool, world.user.id, world.confidential.id) is not None
    assert (await introspect(http, world, first["access_token"]))["active"] is True

    _, _, body = await browser.get(world.origin + "/account/apps")
    status, headers, _ = await browser.post(
        world.origin + "/account/apps/revoke", revoke_form(body)
    )
    assert status == 303
    assert headers["Location"] == "/account/apps?" + urlencode({"revoked": world.confidential.id})

    # Revoked everywhere before the page answered: PostgreSQL, the mark and the stream.
    assert await live_grants(pool, world.user.id, world.confidential.id) == []
    for grant_id in granted:
        assert await revocation_marked(redis, settings, grant_id) == (True, True)
    for answer in (first, second):
        assert (await introspect(http, world, answer["access_token"]))["active"] is False
        refreshed = await refresh(http, world, answer["refresh_token"])
        assert refreshed.status == 400
        assert refreshed.body["error"] == "invalid_grant"
    assert await consent_row(pool, world.user.id, world.confidential.id) is None

    status, _, body = await browser.get(world.origin + headers["Location"])
    assert "<strong>Confidential App</strong> no longer has access" in body
    assert 'action="/account/apps/revoke"' not in body

    # The next authorization asks again.
    _, challenge = pkce_pair()
    url = authorize_url(
        world.origin,
        world.confidential.id,
        redirect_uri=REDIRECT_URI,
        challenge=challenge,
        scope="openid courses:read",
    )
    status, _, body = await browser.get(url)
    assert status == 200
    assert 'action="/v1/oauth/consent"' in body


async def test_revoke_without_or_with_a_wrong_csrf_token_changes_nothing(
    world: World, browser: Browser, http: Any, pool: asyncpg.Pool
) -> None:
    await signed_in(browser, world.origin, world.user.email)
    answer = await authorize_in_browser(browser, http, world)
    _, _, body = await browser.get(world.origin + "/account/apps")
    fields = revoke_form(body)
    forged = fields["csrf_token"][:-4] + (
        "AAAA" if not fields["csrf_token"].endswith("AAAA") else "BBBB"
    )
    for data in (
        {"grant_id": fields["grant_id"]},
        {"grant_id": fields["grant_id"], "csrf_token": ""},
        {"grant_id": fields["grant_id"], "csrf_token": forged},
    ):
        status, headers, page = await browser.post(world.origin + "/account/apps/revoke", data)
        assert status == 403, page
        assert "Location" not in headers
        assert CSP_FRAME in headers["Content-Security-Policy"]
    # Signed out (no session at all): refused too.
    anonymous = Browser()
    try:
        status, _, _ = await anonymous.post(world.origin + "/account/apps/revoke", fields)
        assert status == 403
    finally:
        await anonymous.close()
    assert len(await live_grants(pool, world.user.id, world.confidential.id)) == 1
    assert (await introspect(http, world, answer["access_token"]))["active"] is True


async def test_another_users_grant_cannot_be_revoked_by_a_crafted_post(
    world: World, browser: Browser, http: Any, pool: asyncpg.Pool, unique: str
) -> None:
    victim = Browser()
    try:
        await signed_in(victim, world.origin, world.user.email)
        answer = await authorize_in_browser(victim, http, world)
    finally:
        await victim.close()
    victim_grants = await live_grants(pool, world.user.id, world.confidential.id)

    attacker, _ = await users.create_user(
        pool, school_id=world.school.id, email=f"mallory-{unique}@example.com", password=PASSWORD
    )
    await signed_in(browser, world.origin, attacker.email)
    # A grant of their own gives the attacker a page with a revoke form and its CSRF token.
    await authorize_in_browser(browser, http, world)
    _, _, body = await browser.get(world.origin + "/account/apps")
    csrf_token = revoke_form(body)["csrf_token"]
    attacker_grants = await live_grants(pool, attacker.id, world.confidential.id)

    for data in (
        {"grant_id": str(victim_grants[0])},
        {"grant_id": "not-a-uuid"},
        {"grant_id": str(UUID(int=0))},
    ):
        status, headers, _ = await browser.post(
            world.origin + "/account/apps/revoke", {**data, "csrf_token": csrf_token}
        )
        assert status == 404
        assert "Location" not in headers
    assert await live_grants(pool, world.user.id, world.confidential.id) == victim_grants
    assert await consent_row(pool, world.user.id, world.confidential.id) is not None
    assert (await introspect(http, world, answer["access_token"]))["active"] is True
    # Nor was anything of the attacker's own touched by the refused posts.
    assert await live_grants(pool, attacker.id, world.confidential.id) == attacker_grants


async def test_a_remembered_consent_without_live_access_can_be_forgotten(
    world: World, browser: Browser, http: Any, pool: asyncpg.Pool
) -> None:
    await signed_in(browser, world.origin, world.user.email)
    answer = await authorize_in_browser(browser, http, world)
    # The app revoked its own token (RFC 7009): the grant ends, the consent stays.
    revoked = await post_form(
        http,
        world.origin + "/v1/oauth/revoke",
        {"token": answer["refresh_token"]},
        authorization=basic(world.confidential.id, world.secret),
    )
    assert revoked.status == 200
    _, _, body = await browser.get(world.origin + "/account/apps")
    fields = revoke_form(body)
    assert fields.get("client_id") == world.confidential.id
    assert "grant_id" not in fields
    status, _, _ = await browser.post(world.origin + "/account/apps/revoke", fields)
    assert status == 303
    assert await consent_row(pool, world.user.id, world.confidential.id) is None
    # Nothing left to forget: a second post finds nothing.
    status, _, _ = await browser.post(world.origin + "/account/apps/revoke", fields)
    assert status == 404


async def test_the_platform_origin_has_no_account_pages(
    identity_url: str, browser: Browser, identity_port: int
) -> None:
    status, headers, _ = await browser.get(f"http://localhost:{identity_port}/account/apps")
    assert status == 404
    assert CSP_FRAME in headers["Content-Security-Policy"]


async def test_the_button_kit_is_a_plain_snippet(
    world: World, browser: Browser, identity_port: int
) -> None:
    for origin in (world.origin, f"http://localhost:{identity_port}"):
        status, headers, body = await browser.get(origin + "/account/button")
        assert status == 200
        assert CSP_FRAME in headers["Content-Security-Policy"]
        assert '<a class="lw-connect" href="#example">' in body
        # The snippet is shown as text, and its CSS is the stylesheet's own.
        assert "&lt;a class=&#34;lw-connect&#34;" in body or "&lt;a class=&quot;lw-connect" in body
        assert ".lw-connect {" in body and ".snippet" not in body.split("<h2>CSS</h2>")[1]


# Access history ----------------------------------------------------------------------------


def _row(
    i: int, label: str, school_id: int, subject: str, at: datetime, **extra: Any
) -> audit_store.AuditRow:
    values: dict[str, Any] = {
        "record_id": f"test-{label}-{i}",
        "occurred_at": at,
        "school_id": school_id,
        "client_id": None,
        "subject": subject,
        "grant_id": None,
        "action": "api.call",
        "method": "GET",
        "path": f"/api/v1/courses/{i}",
        "status": 200,
        "scope": "courses:read",
        "ip": None,
        "detail": {},
    }
    values.update(extra)
    return audit_store.AuditRow(**values)


async def test_access_history_is_the_users_own_newest_first_and_paginated(
    world: World, browser: Browser, pool: asyncpg.Pool, unique: str
) -> None:
    me = str(world.user.id)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    label = f"{unique}{secrets.token_hex(2)}"
    rows = [
        _row(
            i,
            label,
            world.school.id,
            me,
            start + timedelta(minutes=i),
            client_id=world.confidential.id,
        )
        for i in range(60)
    ]
    # Someone else's records, and mine at another school: never on my page.
    rows.append(
        _row(
            100,
            label,
            world.school.id,
            str(UUID(int=7)),
            start + timedelta(hours=5),
            path="/api/v1/someone-else",
        )
    )
    rows.append(
        _row(
            101,
            label,
            world.school.id + 1,
            me,
            start + timedelta(hours=5),
            path="/api/v1/elsewhere",
        )
    )
    # What the user sees is escaped.
    rows.append(
        _row(
            102,
            label,
            world.school.id,
            me,
            start - timedelta(days=1),
            path="/api/v1/<script>x</script>",
        )
    )
    await audit_store.insert_many(pool, rows)

    await signed_in(browser, world.origin, world.user.email)
    status, headers, first = await browser.get(world.origin + "/account/activity")
    assert status == 200
    assert CSP_FRAME in headers["Content-Security-Policy"]
    assert "someone-else" not in first and "elsewhere" not in first
    # The sign-in this test just made is the newest record once the consumer stores it; the
    # rows inserted above are newest-first below it.
    shown = [int(p) for p in re.findall(r"/api/v1/courses/(\d+)", first)]
    assert shown == sorted(shown, reverse=True)
    assert shown[0] == 59
    assert "Confidential App" in first
    older = re.search(r'<a href="([^"]+)" rel="next">Older</a>', first)
    assert older, first
    status, _, second = await browser.get(world.origin + older.group(1).replace("&amp;", "&"))
    assert status == 200
    more = [int(p) for p in re.findall(r"/api/v1/courses/(\d+)", second)]
    assert set(shown).isdisjoint(more)
    assert sorted(shown + more) == list(range(60))
    assert "&lt;script&gt;x&lt;/script&gt;" in second
    assert "<script>x</script>" not in second
    assert 'href="/account/activity">Newest</a>' in second


async def test_gateway_api_calls_and_token_events_reach_the_history(
    world: World,
    browser: Browser,
    http: Any,
    pool: asyncpg.Pool,
    redis: redis_asyncio.Redis,
    settings: Settings,
) -> None:
    await signed_in(browser, world.origin, world.user.email)
    await authorize_in_browser(browser, http, world)
    (grant_id,) = await live_grants(pool, world.user.id, world.confidential.id)
    # The record a gateway appends for a call made with this user's token.
    marker = f"/api/v1/courses/from-gateway-{secrets.token_hex(3)}"
    await streams.append(
        redis,
        settings.stream(streams.AUDIT),
        {
            "records": [
                api_call(
                    school_id=world.school.id,
                    client_id=world.confidential.id,
                    subject=str(world.user.id),
                    grant_id=str(grant_id),
                    method="GET",
                    path=marker,
                    status=200,
                    scope="courses:read",
                    ip="127.0.0.1",
                    request_id="req-1",
                )
            ]
        },
    )
    body = ""
    for _ in range(100):  # the audit consumer stores the stream in batches
        _, _, body = await browser.get(world.origin + "/account/activity")
        if marker in body and "Access token issued" in body:
            break
        await asyncio.sleep(0.1)
    assert marker in body
    assert "Access token issued" in body
    assert "Permission given" in body
    assert "Signed in" in body


# In a real browser, through the gateway ------------------------------------------------------


async def test_revoke_in_chromium_and_the_gateway_refuses_the_token(
    chromium: Any,
    gateway_url: str,
    echo_upstream: str,
    gateway_settings: Settings,
    gateway_port: int,
    pool: asyncpg.Pool,
    http: Any,
) -> None:
    w = await gateway_world(pool, gateway_settings, "acct", gateway_port)
    # courses:read is staff's to grant (seed 002: the curriculum and everyone's enrollments).
    await store.upsert_membership(pool, w.school.id, w.user.id, "lecturer")
    issued, grant_id = await code_grant(
        http,
        pool,
        gateway_settings,
        w.origin,
        school_id=w.school.id,
        client_id=w.client.id,
        secret=w.secret,
        user_id=w.user.id,
        scopes=["courses:read"],
        redirect_uri="https://partner.example/callback",
    )
    assert issued.status == 200, issued.body
    bearer = {"Authorization": f"Bearer {issued.body['access_token']}"}
    async with http.get(w.origin + "/api/v1/courses", headers=bearer) as resp:
        assert resp.status == 200

    context = await chromium.new_context(
        java_script_enabled=False, viewport={"width": 900, "height": 1000}
    )
    page = await context.new_page()
    try:
        response = await page.goto(w.origin + "/account/apps")
        assert response is not None and response.status == 200
        assert "/account/login" in page.url
        assert CSP_FRAME in (await response.all_headers())["content-security-policy"]
        await page.get_by_label("Email").fill(w.user.email)
        await page.get_by_label("Password").fill("correct horse battery")
        await page.get_by_role("button", name="Sign in").click()
        await page.wait_for_url("**/account/apps")
        assert await page.locator("h2.app-title").all_inner_texts() == ["Partner App"]
        listed = await page.locator("ul.scopes li .scope-text").all_inner_texts()
        assert listed == [catalogue.CATALOGUE["courses:read"].description]
        await page.screenshot(path="/tmp/account_apps.png", full_page=True)
        await page.get_by_role("button", name="Revoke Partner App").click()
        await page.wait_for_url("**/account/apps?revoked=**")
        assert "no longer has access" in await page.locator("[role=status]").inner_text()
        assert await page.locator("h2.app-title").count() == 0
    finally:
        await context.close()

    async with http.get(w.origin + "/api/v1/courses", headers=bearer) as resp:
        assert resp.status == 401
        assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    inspected = await post_form(
        http,
        w.origin + "/v1/oauth/introspect",
        {"token": issued.body["access_token"]},
        authorization=basic(w.client.id, w.secret),
    )
    assert inspected.status == 200
    assert inspected.body["active"] is False
    row = await pool.fetchrow(
        "SELECT revoked_at, revoked_reason FROM grants WHERE id = $1", grant_id
    )
    assert row["revoked_at"] is not None and row["revoked_reason"] == "user_revoked"
