"""Sign-in, the school picker and consent, end to end over real sockets with a cookie jar."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as redis_asyncio

from libs.common import scopes as catalogue
from libs.common.config import Settings
from services.identity import credentials, sessions
from services.identity.store import authorize as flow_store
from tests.support import identity_records
from tests.test_authorize import (
    PASSWORD,
    REDIRECT,
    Browser,
    World,
    authorize_url,
    form,
    make_client,
    make_school,
    make_user,
    make_world,
    pkce,
    query_of,
)

GENERIC = "Incorrect email or password."


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    b = Browser()
    yield b
    await b.close()


@pytest.fixture
async def world(
    identity_url: str, pool: asyncpg.Pool, settings: Settings, unique: str, identity_port: int
) -> World:
    return await make_world(pool, settings, unique, identity_port)


@pytest.fixture(autouse=True)
async def _fresh_address_counter(redis: redis_asyncio.Redis, settings: Settings) -> Any:
    """Every test signs in from 127.0.0.1; a test's failures must not throttle the next."""
    key = sessions.address_throttle_key(settings, "127.0.0.1")
    await redis.delete(key)
    yield
    await redis.delete(key)


def alert(html: str) -> str:
    match = re.search(r'<div class="alert alert-error" role="alert"[^>]*>(.*?)</div>', html, re.S)
    assert match, html
    return match.group(1).strip()


async def session_count(pool: asyncpg.Pool, world: World) -> int:
    return int(
        await pool.fetchval("SELECT count(*) FROM sessions WHERE user_id = $1", world.user.id)
    )


async def code_count(pool: asyncpg.Pool, world: World) -> int:
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM authorization_codes WHERE client_id = $1", world.client.id
        )
    )


# Sign-in ---------------------------------------------------------------------------------


async def test_wrong_password_and_unknown_email_read_the_same(
    world: World, browser: Browser, pool: asyncpg.Pool
) -> None:
    status, _, page = await browser.get(authorize_url(world.base, world.client.id))
    assert status == 200
    answers = []
    for email, password in ((world.email, "wrong password!"), ("nobody@example.com", PASSWORD)):
        status, headers, body = await browser.login(world.base, page, email, password)
        answers.append((status, alert(body)))
        assert "lc_session" not in {c.key for c in browser.session.cookie_jar}
        assert "Location" not in headers
    assert answers[0] == answers[1] == (400, GENERIC)
    assert await session_count(pool, world) == 0


async def test_account_throttle_refuses_even_the_right_password(
    world: World, browser: Browser, pool: asyncpg.Pool
) -> None:
    _, _, page = await browser.get(authorize_url(world.base, world.client.id))
    for _ in range(sessions.ACCOUNT_FAILURE_LIMIT):
        status, _, _ = await browser.login(world.base, page, world.email, "not the password")
        assert status == 400
    status, headers, body = await browser.login(world.base, page, world.email, PASSWORD)
    assert status == 429
    assert int(headers["Retry-After"]) > 0
    assert "try again later" in alert(body)
    assert await session_count(pool, world) == 0
    # Case and spaces do not make a new account for the counter.
    status, _, _ = await browser.login(world.base, page, f"  {world.email.upper()} ", PASSWORD)
    assert status == 429


async def test_address_throttle_covers_every_account(
    world: World,
    browser: Browser,
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
) -> None:
    _, _, page = await browser.get(authorize_url(world.base, world.client.id))
    for i in range(sessions.ADDRESS_FAILURE_LIMIT):
        status, _, _ = await browser.login(world.base, page, f"guess{i}-{unique}@example.com", "x")
        assert status == 400
    # A different, untouched account with the right password: refused all the same.
    status, _, body = await browser.login(world.base, page, world.email, PASSWORD)
    assert status == 429
    assert "try again later" in alert(body)
    assert await session_count(pool, world) == 0


async def test_concurrent_wrong_passwords_reach_the_check_no_more_than_the_limit(
    world: World, browser: Browser, pool: asyncpg.Pool
) -> None:
    """The throttle reserves an attempt before argon2 runs: a burst of guesses sent together
    cannot all pass a check made before any of them was counted."""
    _, _, page = await browser.get(authorize_url(world.base, world.client.id))
    burst = sessions.ACCOUNT_FAILURE_LIMIT * 4
    answers = await asyncio.gather(
        *(browser.login(world.base, page, world.email, f"guess {i}") for i in range(burst))
    )
    statuses = sorted(status for status, _, _ in answers)
    # 400: the password was checked and was wrong; 429: refused before any check.
    assert statuses.count(400) == sessions.ACCOUNT_FAILURE_LIMIT, statuses
    assert statuses.count(429) == burst - sessions.ACCOUNT_FAILURE_LIMIT, statuses
    # The account stays closed, to the right password too.
    status, _, _ = await browser.login(world.base, page, world.email, PASSWORD)
    assert status == 429
    assert await session_count(pool, world) == 0


async def test_concurrent_guesses_across_accounts_stop_at_the_address_limit(
    world: World, browser: Browser, pool: asyncpg.Pool, unique: str
) -> None:
    _, _, page = await browser.get(authorize_url(world.base, world.client.id))
    burst = sessions.ADDRESS_FAILURE_LIMIT * 2
    answers = await asyncio.gather(
        *(
            browser.login(world.base, page, f"burst{i}-{unique}@example.com", "x")
            for i in range(burst)
        )
    )
    statuses = [status for status, _, _ in answers]
    assert statuses.count(400) == sessions.ADDRESS_FAILURE_LIMIT, sorted(statuses)
    assert statuses.count(429) == burst - sessions.ADDRESS_FAILURE_LIMIT, sorted(statuses)
    status, _, _ = await browser.login(world.base, page, world.email, PASSWORD)
    assert status == 429
    assert await session_count(pool, world) == 0


async def test_a_successful_sign_in_gives_the_address_its_attempt_back(
    world: World, browser: Browser, redis: redis_asyncio.Redis, settings: Settings
) -> None:
    _, _, page = await browser.get(authorize_url(world.base, world.client.id))
    key = sessions.address_throttle_key(settings, "127.0.0.1")
    status, _, _ = await browser.login(world.base, page, world.email, "not the password")
    assert status == 400
    assert int(await redis.get(key) or 0) == 1
    status, _, _ = await browser.login(world.base, page, world.email, PASSWORD)
    assert status == 303
    # Only failures count: a school behind one address signing in does not use it up.
    assert int(await redis.get(key) or 0) == 1
    assert 0 < await redis.ttl(key) <= sessions.THROTTLE_WINDOW


async def test_login_without_or_with_a_wrong_csrf_token_changes_nothing(
    world: World, browser: Browser, pool: asyncpg.Pool
) -> None:
    _, _, page = await browser.get(authorize_url(world.base, world.client.id))
    f = form(page, "/v1/oauth/login")
    creds = {"email": world.email, "password": PASSWORD, "request_id": f.fields["request_id"]}
    for token in (None, "", "forged" + f.fields["csrf_token"][6:]):
        data = dict(creds) if token is None else {**creds, "csrf_token": token}
        status, headers, body = await browser.post(world.base + "/v1/oauth/login", data)
        assert status == 403, body
        assert "Location" not in headers
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert browser.cookie("lc_session") is None
    assert await session_count(pool, world) == 0

    # A token minted for another browser's pre-session cookie does not pass either.
    other = Browser()
    try:
        _, _, other_page = await other.get(authorize_url(world.base, world.client.id))
        stolen = form(other_page, "/v1/oauth/login").fields
        status, _, _ = await browser.post(
            world.base + "/v1/oauth/login",
            {**stolen, "email": world.email, "password": PASSWORD},
        )
        assert status == 403
    finally:
        await other.close()
    assert await session_count(pool, world) == 0


async def test_session_cookie_is_httponly_lax_random_and_stored_hashed(
    world: World, browser: Browser, pool: asyncpg.Pool
) -> None:
    _, _, page = await browser.get(authorize_url(world.base, world.client.id))
    f = form(page, "/v1/oauth/login")
    async with browser.session.post(
        world.base + "/v1/oauth/login",
        data={**f.fields, "email": world.email, "password": PASSWORD},
        allow_redirects=False,
    ) as resp:
        assert resp.status == 303
        raw = [v for v in resp.headers.getall("Set-Cookie") if v.startswith("lc_session=")]
    assert len(raw) == 1
    attributes = raw[0].lower()
    assert "httponly" in attributes
    assert "samesite=lax" in attributes
    assert "path=/" in attributes
    # The test environment is http on localhost; production (or https) adds Secure.
    assert "secure" not in attributes.replace("samesite", "")
    value = browser.cookie("lc_session")
    assert value and value.startswith(credentials.SESSION_PREFIX) and len(value) > 40
    rows = await pool.fetch("SELECT * FROM sessions WHERE user_id = $1", world.user.id)
    assert len(rows) == 1
    assert rows[0]["id_hash"] == credentials.token_hash(value)
    assert value.encode() not in bytes(rows[0]["id_hash"])
    lifetime = rows[0]["expires_at"] - rows[0]["authenticated_at"]
    assert 11 * 3600 < lifetime.total_seconds() <= 12 * 3600 + 5


async def test_signing_in_again_replaces_the_session_id(
    world: World, browser: Browser, pool: asyncpg.Pool
) -> None:
    await browser.sign_in_to_consent(world, authorize_url(world.base, world.client.id))
    first = browser.cookie("lc_session")
    status, _, page = await browser.get(authorize_url(world.base, world.client.id, prompt="login"))
    assert status == 200 and 'action="/v1/oauth/login"' in page
    status, _, _ = await browser.login(world.base, page, world.email, PASSWORD)
    assert status == 303
    second = browser.cookie("lc_session")
    assert first and second and first != second
    hashes = await pool.fetch("SELECT id_hash FROM sessions WHERE user_id = $1", world.user.id)
    assert [bytes(r["id_hash"]) for r in hashes] == [credentials.token_hash(second)]


async def test_a_non_member_cannot_sign_in_at_the_school(
    world: World,
    browser: Browser,
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
) -> None:
    elsewhere = await make_school(pool, settings, f"nm{unique}")
    stranger = await make_user(pool, elsewhere, unique)
    _, _, page = await browser.get(authorize_url(world.base, world.client.id))
    status, _, body = await browser.login(world.base, page, stranger.email, PASSWORD)
    assert status == 403
    assert "not a member" in alert(body)
    assert browser.cookie("lc_session") is None


# Consent ---------------------------------------------------------------------------------


async def test_consent_lists_seed_descriptions_and_allow_returns_a_code(
    world: World,
    browser: Browser,
    pool: asyncpg.Pool,
    redis: redis_asyncio.Redis,
    settings: Settings,
) -> None:
    _, challenge = pkce()
    nonce = "n-" + secrets.token_hex(6)
    url = authorize_url(
        world.base,
        world.client.id,
        challenge=challenge,
        scope="openid email courses:read students:read",
        state="xyz 1/2",
        nonce=nonce,
        resource=world.base,
    )
    status, headers, page = await browser.sign_in_to_consent(world, url)
    assert status == 200, page
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert "form-action 'self' https://app.example;" in headers["Content-Security-Policy"]
    for name in ("openid", "email", "courses:read", "students:read"):
        description = catalogue.CATALOGUE[name].description
        assert description.replace("'", "&#39;") in page, name
    assert "Gradebook Sync" in page
    assert world.school.name in page
    assert "app.example" in page
    assert world.email in page

    status, headers, _ = await browser.decide(world.base, page, "allow")
    assert status == 303
    location = headers["Location"]
    assert location.startswith(REDIRECT + "?")
    q = query_of(location)
    assert q["state"] == "xyz 1/2"
    assert q["iss"] == world.base
    code = q["code"]
    assert code.startswith(credentials.AUTHORIZATION_CODE_PREFIX)

    row = await pool.fetchrow(
        "SELECT * FROM authorization_codes WHERE code_hash = $1", credentials.token_hash(code)
    )
    assert row is not None
    assert row["school_id"] == world.school.id
    assert row["client_id"] == world.client.id
    assert row["user_id"] == world.user.id
    assert row["code_challenge"] == challenge
    assert row["nonce"] == nonce
    assert row["resource"] == world.base
    assert row["redirect_uri"] == REDIRECT
    assert list(row["scopes"]) == ["openid", "email", "courses:read", "students:read"]
    assert row["redeemed_at"] is None
    ttl = (row["expires_at"] - row["created_at"]).total_seconds()
    assert abs(ttl - settings.tokens.authorization_code_ttl) < 2
    session_row = await pool.fetchrow(
        "SELECT authenticated_at FROM sessions WHERE user_id = $1", world.user.id
    )
    assert row["auth_time"] == session_row["authenticated_at"]
    # Stored hashed: the raw code appears nowhere in the table.
    dump = await pool.fetchval(
        "SELECT string_agg(t::text, '|') FROM authorization_codes t WHERE client_id = $1",
        world.client.id,
    )
    assert code not in dump
    assert code.split("_", 1)[1] not in dump

    grant = await pool.fetchrow("SELECT * FROM grants WHERE id = $1", row["grant_id"])
    assert grant["user_id"] == world.user.id and grant["school_id"] == world.school.id
    assert list(grant["scopes"]) == list(row["scopes"])
    consented = await pool.fetchval(
        "SELECT scopes FROM consents WHERE user_id = $1 AND client_id = $2",
        world.user.id,
        world.client.id,
    )
    assert set(consented) == {"openid", "email", "courses:read", "students:read"}

    actions = [
        orjson.dumps(r, default=str).decode()
        for r in await identity_records(settings.database_url)
        if r["client_id"] == world.client.id or r["subject"] == str(world.user.id)
    ]
    assert any('"consent.granted"' in a and world.client.id in a for a in actions)
    assert any('"grant.created"' in a and str(row["grant_id"]) in a for a in actions)
    assert any('"login.succeeded"' in a and str(world.user.id) in a for a in actions)
    assert not any(code in a for a in actions)
    assert not any(PASSWORD in a for a in actions)


async def test_no_scope_means_openid(world: World, browser: Browser) -> None:
    status, _, page = await browser.sign_in_to_consent(
        world, authorize_url(world.base, world.client.id)
    )
    assert status == 200
    assert '<code class="scope-name">openid</code>' in page
    assert page.count('class="scope"') == 1


async def test_deny_redirects_access_denied(
    world: World, browser: Browser, pool: asyncpg.Pool
) -> None:
    url = authorize_url(world.base, world.client.id, scope="courses:read", state="no-thanks")
    _, _, page = await browser.sign_in_to_consent(world, url)
    status, headers, _ = await browser.decide(world.base, page, "deny")
    assert status == 303
    q = query_of(headers["Location"])
    assert q["error"] == "access_denied"
    assert q["state"] == "no-thanks"
    assert q["iss"] == world.base
    assert "code" not in q
    assert await code_count(pool, world) == 0
    assert (
        await pool.fetchval("SELECT count(*) FROM consents WHERE client_id = $1", world.client.id)
        == 0
    )


async def test_consent_without_or_with_a_wrong_csrf_token_changes_nothing(
    world: World, browser: Browser, pool: asyncpg.Pool
) -> None:
    _, _, page = await browser.sign_in_to_consent(
        world, authorize_url(world.base, world.client.id, scope="courses:read")
    )
    f = form(page, "/v1/oauth/consent")
    for fields in (
        {"request_id": f.fields["request_id"], "decision": "allow"},
        {**f.fields, "csrf_token": "A" * 43, "decision": "allow"},
        # The sign-out form's token is for another purpose.
        {
            **f.fields,
            "csrf_token": form(page, "/v1/oauth/logout").fields["csrf_token"],
            "decision": "allow",
        },
    ):
        status, headers, _ = await browser.post(world.base + "/v1/oauth/consent", fields)
        assert status == 403
        assert "Location" not in headers
    assert await code_count(pool, world) == 0
    # Another user's session does not make the token valid either.
    other = Browser()
    try:
        other_user = await make_user(pool, world.school, "o" + secrets.token_hex(3))
        other_world = World(**{**world.__dict__, "user": other_user, "email": other_user.email})
        await other.sign_in_to_consent(other_world, authorize_url(world.base, world.client.id))
        status, _, _ = await other.post(
            world.base + "/v1/oauth/consent", {**f.fields, "decision": "allow"}
        )
        assert status == 403
    finally:
        await other.close()
    assert await code_count(pool, world) == 0
    # The untouched request still completes with the real token.
    status, headers, _ = await browser.decide(world.base, page, "allow")
    assert status == 303 and "code" in query_of(headers["Location"])


async def test_a_consent_form_is_good_for_one_decision(
    world: World, browser: Browser, pool: asyncpg.Pool
) -> None:
    _, _, page = await browser.sign_in_to_consent(
        world, authorize_url(world.base, world.client.id, scope="courses:read")
    )
    status, _, _ = await browser.decide(world.base, page, "allow")
    assert status == 303
    status, headers, _ = await browser.decide(world.base, page, "allow")
    assert status == 400
    assert "Location" not in headers
    assert await code_count(pool, world) == 1


async def test_remembered_consent_skips_the_screen_and_new_scopes_ask_for_the_difference(
    world: World, browser: Browser, pool: asyncpg.Pool
) -> None:
    _, _, page = await browser.sign_in_to_consent(
        world, authorize_url(world.base, world.client.id, scope="openid courses:read")
    )
    await browser.decide(world.base, page, "allow")

    status, headers, _ = await browser.get(
        authorize_url(world.base, world.client.id, scope="courses:read", state="again")
    )
    assert status == 302
    q = query_of(headers["Location"])
    assert q["code"] and q["state"] == "again" and q["iss"] == world.base

    status, _, page = await browser.get(
        authorize_url(world.base, world.client.id, scope="openid courses:read students:read")
    )
    assert status == 200
    new, _, previous = page.partition("You already allowed it to:")
    assert catalogue.CATALOGUE["students:read"].description in new
    assert catalogue.CATALOGUE["courses:read"].description not in new
    assert catalogue.CATALOGUE["courses:read"].description in previous
    assert catalogue.CATALOGUE["students:read"].description not in previous
    status, headers, _ = await browser.decide(world.base, page, "allow")
    assert status == 303
    code = query_of(headers["Location"])["code"]
    scopes = await pool.fetchval(
        "SELECT scopes FROM authorization_codes WHERE code_hash = $1",
        credentials.token_hash(code),
    )
    assert list(scopes) == ["openid", "courses:read", "students:read"]
    consented = await pool.fetchval(
        "SELECT scopes FROM consents WHERE user_id = $1 AND client_id = $2",
        world.user.id,
        world.client.id,
    )
    assert list(consented) == ["openid", "courses:read", "students:read"]


async def test_prompt_consent_shows_the_screen_again(world: World, browser: Browser) -> None:
    url = authorize_url(world.base, world.client.id, scope="courses:read")
    _, _, page = await browser.sign_in_to_consent(world, url)
    await browser.decide(world.base, page, "allow")
    status, _, page = await browser.get(
        authorize_url(world.base, world.client.id, scope="courses:read", prompt="consent")
    )
    assert status == 200
    assert 'action="/v1/oauth/consent"' in page
    assert catalogue.CATALOGUE["courses:read"].description in page


async def test_prompt_none_with_a_session(world: World, browser: Browser) -> None:
    url = authorize_url(world.base, world.client.id, scope="courses:read")
    _, _, page = await browser.sign_in_to_consent(world, url)
    status, headers, _ = await browser.get(
        authorize_url(world.base, world.client.id, scope="students:read", prompt="none", state="q")
    )
    assert status == 302
    q = query_of(headers["Location"])
    assert q["error"] == "consent_required" and q["state"] == "q" and q["iss"] == world.base
    await browser.decide(world.base, page, "allow")
    status, headers, _ = await browser.get(
        authorize_url(world.base, world.client.id, scope="courses:read", prompt="none")
    )
    assert status == 302 and "code" in query_of(headers["Location"])


async def test_prompt_login_and_max_age_reauthenticate_once(world: World, browser: Browser) -> None:
    url = authorize_url(world.base, world.client.id, scope="courses:read")
    _, _, page = await browser.sign_in_to_consent(world, url)
    await browser.decide(world.base, page, "allow")
    for extra in ({"prompt": "login"}, {"max_age": "0"}):
        status, _, page = await browser.get(
            authorize_url(world.base, world.client.id, scope="courses:read", **extra)
        )
        assert status == 200 and 'action="/v1/oauth/login"' in page, extra
        status, headers, _ = await browser.login(world.base, page, world.email, PASSWORD)
        assert status == 303
        # After signing in within this flow it goes on: no second login page.
        status, headers, _ = await browser.follow(world.base, status, headers, "")
        assert status == 302, extra
        assert "code" in query_of(headers["Location"])
    # A generous max_age is satisfied by the existing session.
    status, headers, _ = await browser.get(
        authorize_url(world.base, world.client.id, scope="courses:read", max_age="3600")
    )
    assert status == 302 and "code" in query_of(headers["Location"])


async def test_expired_or_forged_request_id_is_an_error_page(
    world: World, browser: Browser
) -> None:
    for request_id in ("", "x" * 43, "../../etc"):
        status, headers, _ = await browser.get(
            f"{world.base}/v1/oauth/authorize/resume?request_id={request_id}"
        )
        assert status == 400
        assert "Location" not in headers


async def test_pending_request_is_bound_to_its_origin(
    world: World,
    browser: Browser,
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    _, _, page = await browser.get(authorize_url(world.base, world.client.id))
    request_id = form(page, "/v1/oauth/login").fields["request_id"]
    other = await make_school(pool, settings, f"or{unique}")
    status, _, _ = await browser.get(
        f"http://{other.subdomain}.localhost:{identity_port}/v1/oauth/authorize/resume"
        f"?request_id={request_id}"
    )
    assert status == 400


async def test_pending_request_is_bound_to_the_browser_that_started_it(
    world: World, browser: Browser, pool: asyncpg.Pool, unique: str
) -> None:
    """The request id travels in URLs (the resume link): a stranger who learned it must not go
    on with the request as themselves. A code for the stranger's account, issued to the
    victim's state, nonce and PKCE challenge, would sign the victim in to the app as the
    stranger once the stranger slips it to the victim's callback (code injection)."""
    url = authorize_url(world.base, world.client.id, scope="openid courses:read")
    _, _, login_page = await browser.get(url)
    request_id = form(login_page, "/v1/oauth/login").fields["request_id"]
    resume = f"{world.base}/v1/oauth/authorize/resume?request_id={request_id}"
    codes_before = await code_count(pool, world)

    stranger = Browser()
    try:
        # Signed out: no sign-in page for the victim's request.
        status, headers, body = await stranger.get(resume)
        assert status == 400
        assert "Location" not in headers
        assert "/v1/oauth/login" not in body
        # Signed in as another member of the school, through a request of its own: no consent
        # page for the victim's request either, and no code.
        other = await make_user(pool, world.school, f"s{unique}")
        _, _, own = await stranger.get(url)
        status, headers, body = await stranger.login(world.base, own, other.email, PASSWORD)
        status, _, consent_page = await stranger.follow(world.base, status, headers, body)
        assert status == 200
        assert form(consent_page, "/v1/oauth/consent").fields["request_id"] != request_id
        status, headers, body = await stranger.get(resume)
        assert status == 400
        assert "Location" not in headers
        assert "/v1/oauth/consent" not in body
    finally:
        await stranger.close()
    assert await code_count(pool, world) == codes_before

    # The browser that started it goes on as before.
    status, headers, body = await browser.login(world.base, login_page, world.email, PASSWORD)
    status, _, consent_page = await browser.follow(world.base, status, headers, body)
    assert form(consent_page, "/v1/oauth/consent").fields["request_id"] == request_id
    status, headers, _ = await browser.decide(world.base, consent_page, "allow")
    assert status == 303
    assert "code" in query_of(headers["Location"])


# Platform clients: the school picker ----------------------------------------------------------


async def test_platform_client_picks_a_school_and_the_code_is_bound_to_it(
    identity_url: str,
    browser: Browser,
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    first = await make_school(pool, settings, f"pa{unique}")
    second = await make_school(pool, settings, f"pb{unique}")
    outsider = await make_school(pool, settings, f"pc{unique}")
    user = await make_user(pool, first, unique)
    await pool.execute(
        "INSERT INTO school_memberships (school_id, user_id, role) VALUES ($1, $2, 'admin')",
        second.id,
        user.id,
    )
    client = await make_client(
        pool,
        settings,
        None,
        name="Claude Code",
        scopes=("courses:read",),
        created_via="registration",
    )
    platform = f"http://localhost:{identity_port}"
    actor = World(first, platform, client, user, user.email, PASSWORD, REDIRECT)
    _, challenge = pkce()
    url = authorize_url(
        platform,
        client.id,
        challenge=challenge,
        scope="courses:read",
        state="mcp",
        resource=f"{settings.urls.platform_url}/mcp",
    )
    status, _, page = await browser.sign_in_to_consent(actor, url)
    assert status == 200
    assert 'action="/v1/oauth/select-school"' in page
    assert first.name in page and second.name in page
    assert outsider.name not in page

    picker = form(page, "/v1/oauth/select-school")
    fields = {**picker.fields, "school_id": str(second.id), "decision": "continue"}
    status, headers, body = await browser.post(platform + picker.action, fields)
    assert status == 303, body
    status, _, page = await browser.follow(platform, status, headers, body)
    assert status == 200
    assert 'action="/v1/oauth/consent"' in page
    assert second.name in page
    assert "has not been reviewed" in page  # a self-registered app

    status, headers, _ = await browser.decide(platform, page, "allow")
    assert status == 303
    q = query_of(headers["Location"])
    assert q["iss"] == platform and q["state"] == "mcp"
    row = await pool.fetchrow(
        "SELECT * FROM authorization_codes WHERE code_hash = $1",
        credentials.token_hash(q["code"]),
    )
    assert row["school_id"] == second.id
    assert row["code_challenge"] == challenge
    assert row["resource"] == f"{settings.urls.platform_url}/mcp"

    # Picking a school the user does not belong to is refused.
    status, _, page = await browser.get(authorize_url(platform, client.id, scope="courses:read"))
    picker = form(page, "/v1/oauth/select-school")
    status, _, _ = await browser.post(
        platform + picker.action,
        {**picker.fields, "school_id": str(outsider.id), "decision": "continue"},
    )
    assert status == 400


async def test_platform_user_without_a_school_is_denied(
    identity_url: str,
    browser: Browser,
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    school = await make_school(pool, settings, f"ns{unique}")
    user = await make_user(pool, school, unique)
    await pool.execute("DELETE FROM school_memberships WHERE user_id = $1", user.id)
    client = await make_client(pool, settings, None, scopes=("courses:read",))
    platform = f"http://localhost:{identity_port}"
    actor = World(school, platform, client, user, user.email, PASSWORD, REDIRECT)
    status, headers, _ = await browser.sign_in_to_consent(
        actor, authorize_url(platform, client.id, scope="courses:read", state="lonely")
    )
    assert status == 302
    q = query_of(headers["Location"])
    assert q["error"] == "access_denied" and q["state"] == "lonely" and q["iss"] == platform
    assert "school" in q["error_description"]


async def test_sign_out_ends_the_session(
    world: World, browser: Browser, pool: asyncpg.Pool
) -> None:
    _, _, page = await browser.sign_in_to_consent(world, authorize_url(world.base, world.client.id))
    logout = form(page, "/v1/oauth/logout")
    status, headers, _ = await browser.post(world.base + logout.action, logout.fields)
    assert status == 303
    assert headers["Location"].startswith("/v1/oauth/authorize/resume?")
    assert await session_count(pool, world) == 0
    status, _, page = await browser.get(world.base + headers["Location"])
    assert status == 200 and 'action="/v1/oauth/login"' in page
    # An absolute return_to is no way out.
    assert sessions.safe_return_path("https://evil.test/") == "/v1/oauth/signed-out"
    assert sessions.safe_return_path("//evil.test/") == "/v1/oauth/signed-out"


async def test_a_school_pick_does_not_survive_signing_in_as_someone_else(
    identity_url: str,
    browser: Browser,
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    mine = await make_school(pool, settings, f"sa{unique}")
    theirs = await make_school(pool, settings, f"sb{unique}")
    first = await make_user(pool, mine, unique)
    await pool.execute(
        "INSERT INTO school_memberships (school_id, user_id, role) VALUES ($1, $2, 'lecturer')",
        theirs.id,
        first.id,
    )
    second = await make_user(pool, mine, unique)
    await pool.execute(
        "INSERT INTO school_memberships (school_id, user_id, role) VALUES ($1, $2, 'lecturer')",
        theirs.id,
        second.id,
    )
    client = await make_client(pool, settings, None, scopes=("courses:read",))
    platform = f"http://localhost:{identity_port}"
    actor = World(mine, platform, client, first, first.email, PASSWORD, REDIRECT)
    _, _, page = await browser.sign_in_to_consent(
        actor, authorize_url(platform, client.id, scope="courses:read")
    )
    picker = form(page, "/v1/oauth/select-school")
    status, headers, body = await browser.post(
        platform + picker.action, {**picker.fields, "school_id": str(theirs.id)}
    )
    _, _, page = await browser.follow(platform, status, headers, body)
    assert 'action="/v1/oauth/consent"' in page and theirs.name in page
    # "Not you?": the second user signs in to the same pending request...
    logout = form(page, "/v1/oauth/logout")
    status, headers, body = await browser.post(platform + logout.action, logout.fields)
    _, _, page = await browser.follow(platform, status, headers, body)
    status, headers, body = await browser.login(platform, page, second.email, PASSWORD)
    _, _, page = await browser.follow(platform, status, headers, body)
    # ...and chooses for themselves instead of inheriting the first user's choice.
    assert 'action="/v1/oauth/select-school"' in page


async def test_the_returning_user_costs_one_read_query(
    world: World, browser: Browser, pool: asyncpg.Pool
) -> None:
    _, _, page = await browser.sign_in_to_consent(
        world, authorize_url(world.base, world.client.id, scope="courses:read")
    )
    await browser.decide(world.base, page, "allow")
    cookie = browser.cookie("lc_session")
    assert cookie
    seen: list[str] = []

    def log(record: Any) -> None:
        seen.append(record.query)

    async with pool.acquire() as conn:
        conn.add_query_logger(log)
        state = await flow_store.authorize_state(
            conn,
            client_id=world.client.id,
            session_hash=credentials.token_hash(cookie),
            school_id=world.school.id,
        )
        conn.remove_query_logger(log)
    assert len(seen) == 1
    assert state.client is not None and state.client.id == world.client.id
    assert state.session is not None and state.session.user_id == world.user.id
    assert state.session_may_use_school
    assert state.consented == ("courses:read",)


async def test_the_code_redeems_once_at_the_token_endpoint(world: World, browser: Browser) -> None:
    verifier, challenge = pkce()
    _, _, page = await browser.sign_in_to_consent(
        world,
        authorize_url(
            world.base, world.client.id, challenge=challenge, scope="openid courses:read"
        ),
    )
    _, headers, _ = await browser.decide(world.base, page, "allow")
    code = query_of(headers["Location"])["code"]
    exchange = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "client_id": world.client.id,
        "code_verifier": verifier,
    }
    status, _, body = await browser.post(world.base + "/v1/oauth/token", exchange)
    assert status == 200, body
    assert '"access_token"' in body and '"id_token"' in body
    status, _, body = await browser.post(world.base + "/v1/oauth/token", exchange)
    assert status == 400 and "invalid_grant" in body
