"""What a remembered consent covers, the same on every path, and a flow that always ends.

A consent to an umbrella scope (`read`, `write`) covers the data scopes it stands for. The
flow that decides to skip the consent screen and the transaction that issues the code must
agree on that: when they did not, a silent re-authorization went round `advance` until
RecursionError, a 500 on every later visit. Every test drives the real identity service over
a real socket with a cookie-keeping client.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as redis_asyncio

from libs.common import scopes as catalogue
from libs.common.config import Settings
from services.identity import consent, credentials, sessions
from tests.test_authorize import (
    PASSWORD,
    REDIRECT,
    Browser,
    World,
    authorize_url,
    make_client,
    make_school,
    make_user,
    make_world,
    query_of,
)

UMBRELLA_CLIENT = ("read", "write")


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


@pytest.fixture
async def world(
    identity_url: str, pool: asyncpg.Pool, settings: Settings, unique: str, identity_port: int
) -> World:
    """A school client registered for the umbrella scopes, and an admin (who may grant all)."""
    return await make_world(pool, settings, unique, identity_port, scopes=UMBRELLA_CLIENT)


async def consent_to(browser: Browser, world: World, scope: str) -> None:
    """Sign in (if need be) and Allow `scope`: the consent row the later request meets."""
    url = authorize_url(world.base, world.client.id, scope=scope)
    if browser.cookie("lc_session"):
        status, _, page = await browser.get(url)
    else:
        status, _, page = await browser.sign_in_to_consent(world, url)
    assert status == 200, page
    status, headers, _ = await browser.decide(world.base, page, "allow")
    assert status == 303 and "code" in query_of(headers["Location"])


async def code_scopes(pool: asyncpg.Pool, code: str) -> list[str]:
    scopes = await pool.fetchval(
        "SELECT scopes FROM authorization_codes WHERE code_hash = $1",
        credentials.token_hash(code),
    )
    return list(scopes)


# Covered: the code comes at once, without the screen ------------------------------------------


@pytest.mark.parametrize(
    ("remembered", "requested", "granted"),
    [
        ("openid read", "openid courses:read", ["openid", "courses:read"]),
        ("write", "courses:write", ["courses:write"]),
        ("read write", "courses:read students:write", ["courses:read", "students:write"]),
        ("openid read write", "openid analytics:read coupons:write", None),
        ("read", "read courses:read", ["read", "courses:read"]),
        ("openid read", "", ["openid"]),  # no scope means openid, and it was allowed
        ("openid courses:read", "courses:read openid", ["courses:read", "openid"]),
    ],
    ids=[
        "read>courses",
        "write>courses",
        "both>mixed",
        "both>two",
        "read>itself",
        "openid",
        "order",
    ],
)
async def test_a_remembered_umbrella_consent_issues_the_code_at_once(
    world: World,
    browser: Browser,
    pool: asyncpg.Pool,
    remembered: str,
    requested: str,
    granted: list[str] | None,
) -> None:
    await consent_to(browser, world, remembered)
    for prompt in ("", "none"):
        status, headers, body = await browser.get(
            authorize_url(
                world.base, world.client.id, scope=requested, state="silent", prompt=prompt
            )
        )
        assert status == 302, body
        q = query_of(headers["Location"])
        assert headers["Location"].startswith(REDIRECT + "?")
        assert q["state"] == "silent" and q["iss"] == world.base
        assert await code_scopes(pool, q["code"]) == (granted or catalogue.parse(requested))


async def test_a_remembered_umbrella_consent_after_signing_in_again(
    world: World, browser: Browser, pool: asyncpg.Pool
) -> None:
    """The stored request's path (sign-in, then resume) meets the same rule."""
    await consent_to(browser, world, "openid read")
    fresh = Browser()
    try:
        status, headers, body = await fresh.sign_in_to_consent(
            world, authorize_url(world.base, world.client.id, scope="openid courses:read")
        )
        assert status == 302, body
        code = query_of(headers["Location"])["code"]
        assert await code_scopes(pool, code) == ["openid", "courses:read"]
    finally:
        await fresh.close()


async def test_a_platform_clients_remembered_umbrella_consent(
    identity_url: str,
    browser: Browser,
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    """On the platform the school is picked (here: the user's only one) before consent."""
    school = await make_school(pool, settings, f"rc{unique}")
    user = await make_user(pool, school, unique)
    client = await make_client(pool, settings, None, scopes=UMBRELLA_CLIENT, created_via="cli")
    platform = f"http://localhost:{identity_port}"
    actor = World(school, platform, client, user, user.email, PASSWORD, REDIRECT)
    await consent_to(browser, actor, "openid write")
    status, headers, body = await browser.get(
        authorize_url(platform, client.id, scope="openid courses:write", state="p")
    )
    assert status == 302, body
    q = query_of(headers["Location"])
    assert q["state"] == "p" and q["iss"] == platform
    assert await code_scopes(pool, q["code"]) == ["openid", "courses:write"]


# Not covered: the screen asks for the difference only ------------------------------------------


@pytest.mark.parametrize(
    ("remembered", "requested", "new"),
    [
        ("courses:read", "read", ["read"]),  # a data scope says nothing about the umbrella
        ("courses:read students:read", "read", ["read"]),
        ("write", "courses:read", ["courses:read"]),  # the other kind
        ("read", "openid courses:read", ["openid"]),
        ("read write", "openid", ["openid"]),
    ],
    ids=["data<read", "two-data<read", "write!>read", "read!>openid", "umbrellas!>openid"],
)
async def test_a_narrower_consent_asks_again_for_what_it_lacks(
    world: World,
    browser: Browser,
    pool: asyncpg.Pool,
    remembered: str,
    requested: str,
    new: list[str],
) -> None:
    await consent_to(browser, world, remembered)
    status, _, page = await browser.get(authorize_url(world.base, world.client.id, scope=requested))
    assert status == 200, page
    asked, _, already = page.partition("You already allowed it to:")
    for scope in catalogue.parse(requested):
        line = f'<code class="scope-name">{scope}</code>'
        assert (line in asked) == (scope in new), scope
        assert (line in already) == (scope not in new), scope
    status, headers, _ = await browser.decide(world.base, page, "allow")
    assert status == 303
    code = query_of(headers["Location"])["code"]
    assert await code_scopes(pool, code) == catalogue.parse(requested)


def test_one_rule_decides_what_a_consent_covers() -> None:
    """assess and covers are the same rule, in both directions, for every pair tried."""
    every = list(catalogue.PUBLIC_SCOPES)
    rng = secrets.SystemRandom()
    for _ in range(500):
        remembered = rng.sample(every, rng.randint(0, 4))
        requested = rng.sample(every, rng.randint(1, 4))
        need = consent.assess(requested, remembered)
        assert consent.covers(remembered, requested) == need.remembered
        assert set(need.new) | set(need.previously) == set(requested)
        for scope in requested:
            assert consent.covers(remembered, [scope]) == (scope in need.previously)
    assert consent.covers(["read"], ["courses:read", "read"])
    assert not consent.covers(["courses:read"], ["read"])
    assert not consent.covers(None, ["openid"])


# A flow that cannot make progress ends, with a clear error ---------------------------------------


async def test_a_flow_that_cannot_progress_ends_in_server_error(
    identity_url: str,
    browser: Browser,
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
    identity_port: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Were the code's transaction ever to refuse a consent the flow found sufficient again,
    the flow must answer server_error, not go round until RecursionError."""
    admin_made = await make_world(pool, settings, unique, identity_port, scopes=UMBRELLA_CLIENT)
    await consent_to(browser, admin_made, "openid courses:read")
    monkeypatch.setattr(consent, "covers", lambda remembered, requested: False)

    url = authorize_url(admin_made.base, admin_made.client.id, scope="courses:read", state="x")
    status, headers, body = await browser.get(url)
    assert status == 302, body
    q = query_of(headers["Location"])
    assert q["error"] == "server_error" and q["state"] == "x" and "code" not in q

    # A self-registered client's browser is not sent anywhere: the page says what happened.
    school = admin_made.school
    unreviewed = await make_client(
        pool, settings, school, scopes=UMBRELLA_CLIENT, created_via="registration"
    )
    actor = World(**{**admin_made.__dict__, "client": unreviewed})
    monkeypatch.undo()
    await consent_to(browser, actor, "openid courses:read")
    monkeypatch.setattr(consent, "covers", lambda remembered, requested: False)
    status, headers, body = await browser.get(
        authorize_url(actor.base, unreviewed.id, scope="courses:read")
    )
    assert status == 500 and "Location" not in headers
    assert "server_error" in body
    codes = await pool.fetchval(
        "SELECT count(*) FROM authorization_codes WHERE client_id = ANY($1)",
        [admin_made.client.id, unreviewed.id],
    )
    assert codes == 2  # the two consents' codes, none since
