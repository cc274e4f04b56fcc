"""Who the sign-in throttle counts: callers by IPv4 address or IPv6 /64, accounts, and the
browsers that have signed in to an account before (device cookies), through the real forms."""

from __future__ import annotations

import dataclasses
import ipaddress
import secrets
import time
from collections.abc import AsyncIterator
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
import redis.asyncio as redis_asyncio
from yarl import URL

from libs.common.config import Settings
from services.identity import sessions, store
from tests.support import client_session, free_port, running
from tests.test_account_pages import sign_in as account_sign_in
from tests.test_authorize import (
    PASSWORD,
    Browser,
    authorize_url,
    form,
    make_client,
    make_school,
    make_user,
)


@pytest.fixture(autouse=True)
async def _fresh_address_counter(redis: redis_asyncio.Redis, settings: Settings) -> Any:
    """Browser tests sign in from 127.0.0.1; one test's failures must not throttle the next."""
    key = sessions.address_throttle_key(settings, "127.0.0.1")
    await redis.delete(key)
    yield
    await redis.delete(key)


@dataclasses.dataclass
class Place:
    school: store.School
    origin: str
    user: store.User


@pytest.fixture
async def place(
    identity_url: str, pool: asyncpg.Pool, settings: Settings, unique: str, identity_port: int
) -> Place:
    school = await make_school(pool, settings, f"thr{unique}{secrets.token_hex(2)}")
    user = await make_user(pool, school, unique)
    return Place(school, f"http://{school.subdomain}.localhost:{identity_port}", user)


# Callers: IPv4 addresses and IPv6 /64s ------------------------------------------------------


@pytest.fixture(scope="module")
async def edge_identity(settings: Settings, migrated: None) -> AsyncIterator[str]:
    """Identity as it runs behind the gateway: it takes the caller's address (and the Host)
    from X-Forwarded-*, so a test can sign in from any address it names."""
    from services.identity.app import create_app

    trusting = dataclasses.replace(settings, trust_forwarded_host=True)
    async with running(create_app(trusting), free_port()) as url:
        yield url


class EdgeCaller:
    """Sign-in attempts at the account login form, each from the address it is given."""

    def __init__(self, base: str, origin: str) -> None:
        self.base = base
        self.host = urlsplit(origin).netloc
        self.http = client_session(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.fields: dict[str, str] = {}

    async def close(self) -> None:
        await self.http.close()

    def _headers(self, address: str) -> dict[str, str]:
        return {"X-Forwarded-Host": self.host, "X-Forwarded-For": address}

    async def login(self, address: str, email: str, password: str) -> int:
        if not self.fields:
            async with self.http.get(
                self.base + "/account/login", headers=self._headers(address)
            ) as resp:
                assert resp.status == 200, await resp.text()
                self.fields = form(await resp.text(), "/account/login").fields
        async with self.http.post(
            self.base + "/account/login",
            data={**self.fields, "email": email, "password": password},
            headers=self._headers(address),
            allow_redirects=False,
        ) as resp:
            await resp.read()
            return resp.status


@pytest.fixture
async def caller(edge_identity: str, place: Place) -> AsyncIterator[EdgeCaller]:
    c = EdgeCaller(edge_identity, place.origin)
    yield c
    await c.close()


def _random_64() -> list[int]:
    """The four leading groups of a /64 under 2001:db8::/32 no other test uses."""
    return [0x2001, 0xDB8, secrets.randbelow(0x10000), secrets.randbelow(0x10000)]


def _spellings(net: list[int], i: int) -> str:
    """Addresses of one /64, each written another way: compressed, full with leading zeros,
    upper case, with a zone."""
    host = [0, 0, secrets.randbelow(0x10000), i + 1]
    groups = net + host
    full = ":".join(f"{g:04x}" for g in groups)
    compressed = str(ipaddress.IPv6Address(full))
    return [compressed, full, full.upper(), compressed + "%eth0"][i % 4]


async def test_sign_in_failures_from_one_ipv6_64_share_one_budget(
    caller: EdgeCaller, place: Place, unique: str
) -> None:
    net = _random_64()
    for i in range(sessions.ADDRESS_FAILURE_LIMIT):
        email = f"guess{i}-{unique}@example.com"
        assert await caller.login(_spellings(net, i), email, "wrong password") == 400
    # Another address of the same /64, an account it never tried, the right password: refused.
    same_64 = ":".join(f"{g:x}" for g in net) + "::beef:1"
    assert await caller.login(same_64, place.user.email, PASSWORD) == 429
    # The next /64 over is another subscriber.
    other = [*net[:3], (net[3] + 1) % 0x10000]
    other_64 = ":".join(f"{g:x}" for g in other) + "::1"
    assert await caller.login(other_64, place.user.email, PASSWORD) == 303


async def test_ipv4_mapped_ipv6_counts_as_its_ipv4_and_ipv4_stays_per_address(
    caller: EdgeCaller, place: Place, unique: str
) -> None:
    last = secrets.randbelow(254) + 1
    v4 = f"203.0.113.{last}"
    mapped = [v4, f"::ffff:{v4}", f"::ffff:cb00:71{last:02x}", f"0:0:0:0:0:FFFF:{v4}"]
    for i in range(sessions.ADDRESS_FAILURE_LIMIT):
        email = f"v4guess{i}-{unique}@example.com"
        assert await caller.login(mapped[i % len(mapped)], email, "wrong password") == 400
    for spelling in mapped:
        assert await caller.login(spelling, place.user.email, PASSWORD) == 429, spelling
    # Its IPv4 neighbour is someone else.
    neighbour = f"203.0.113.{last % 254 + 1}"
    assert await caller.login(neighbour, place.user.email, PASSWORD) == 303


# Device cookies --------------------------------------------------------------------------------


@pytest.fixture
async def browsers() -> AsyncIterator[Any]:
    opened: list[Browser] = []

    def new() -> Browser:
        opened.append(Browser())
        return opened[-1]

    yield new
    for b in opened:
        await b.close()


async def lock_out(origin: str, email: str) -> None:
    """A stranger's browser spends the account's allowance on wrong passwords; then even the
    right password is refused to it."""
    stranger = Browser()
    try:
        for _ in range(sessions.ACCOUNT_FAILURE_LIMIT):
            status, _, _ = await sign_in(stranger, origin, email, "not the password")
            assert status == 400
        status, _, _ = await sign_in(stranger, origin, email, PASSWORD)
        assert status == 429
    finally:
        await stranger.close()


async def sign_in(
    browser: Browser, origin: str, email: str, password: str = PASSWORD
) -> tuple[int, Any, str]:
    """The account sign-in form, as after signing out: the session goes, the device cookie
    stays."""
    browser.session.cookie_jar.clear(lambda c: c.key == sessions.SESSION_COOKIE)
    return await account_sign_in(browser, origin, email, password)


def set_device(browser: Browser, origin: str, value: str) -> None:
    browser.session.cookie_jar.update_cookies({sessions.DEVICE_COOKIE: value}, URL(origin))


async def test_a_successful_sign_in_sets_a_long_lived_httponly_lax_device_cookie(
    place: Place, settings: Settings
) -> None:
    b = Browser()
    try:
        status, _, body = await b.get(f"{place.origin}/account/login")
        assert status == 200
        f = form(body, "/account/login")
        data = {**f.fields, "email": place.user.email, "password": "not the password"}
        async with b.session.post(place.origin + f.action, data=data) as resp:
            assert resp.status == 400
            assert sessions.DEVICE_COOKIE not in resp.cookies
        data["password"] = PASSWORD
        async with b.session.post(place.origin + f.action, data=data, allow_redirects=False) as r:
            assert r.status == 303
            raw = [v for v in r.headers.getall("Set-Cookie") if v.startswith("lc_device=")]
        assert len(raw) == 1
        morsel = SimpleCookie(raw[0])[sessions.DEVICE_COOKIE]
        assert morsel["httponly"] and morsel["samesite"] == "Lax" and morsel["path"] == "/"
        assert bool(morsel["secure"]) == (not settings.is_development)
        assert int(morsel["max-age"]) == sessions.DEVICE_LIFETIME >= 90 * 24 * 3600
        # Naming the account without saying whose it is.
        assert place.user.email not in morsel.value and str(place.user.id) not in morsel.value
        [device] = sessions.devices(settings, morsel.value)
        assert device.tag == sessions.device_tag(settings, place.user.id)
    finally:
        await b.close()


async def test_the_owners_browser_signs_in_while_strangers_have_locked_the_account(
    place: Place, pool: asyncpg.Pool, settings: Settings, browsers: Any
) -> None:
    owner = browsers()
    status, _, _ = await sign_in(owner, place.origin, place.user.email)
    assert status == 303
    assert owner.cookie(sessions.DEVICE_COOKIE)

    await lock_out(place.origin, place.user.email)
    # The owner's browser, through the authorization flow's sign-in form this time.
    client = await make_client(pool, settings, place.school)
    status, _, page = await owner.get(authorize_url(place.origin, client.id, prompt="login"))
    assert status == 200, page
    status, _, body = await owner.login(place.origin, page, place.user.email, PASSWORD)
    assert status == 303, body
    # And through the account form, again.
    status, _, _ = await sign_in(owner, place.origin, place.user.email)
    assert status == 303
    # The owner signing in gives strangers no fresh allowance.
    stranger = browsers()
    status, _, _ = await sign_in(stranger, place.origin, place.user.email, PASSWORD)
    assert status == 429


async def test_wrong_passwords_with_a_device_cookie_are_throttled_per_cookie(
    place: Place, browsers: Any
) -> None:
    owner, laptop = browsers(), browsers()
    for b in (owner, laptop):
        status, _, _ = await sign_in(b, place.origin, place.user.email)
        assert status == 303
    await lock_out(place.origin, place.user.email)
    stolen = owner.cookie(sessions.DEVICE_COOKIE)
    assert stolen

    # Someone holding the owner's cookie guesses: the cookie's own allowance, then nothing.
    thief = browsers()
    set_device(thief, place.origin, stolen)
    for _ in range(sessions.DEVICE_FAILURE_LIMIT):
        status, _, _ = await sign_in(thief, place.origin, place.user.email, "a guess")
        assert status == 400
    status, _, _ = await sign_in(thief, place.origin, place.user.email, PASSWORD)
    assert status == 429
    # The browser the cookie came from shares its counter; another of the owner's does not.
    status, _, _ = await sign_in(owner, place.origin, place.user.email, PASSWORD)
    assert status == 429
    status, _, _ = await sign_in(laptop, place.origin, place.user.email, PASSWORD)
    assert status == 303


async def test_forged_expired_or_foreign_device_cookies_do_not_help(
    place: Place, pool: asyncpg.Pool, settings: Settings, unique: str, browsers: Any
) -> None:
    other_user = await make_user(pool, place.school, unique + "b")
    owner = browsers()
    status, _, _ = await sign_in(owner, place.origin, place.user.email)
    assert status == 303
    genuine = owner.cookie(sessions.DEVICE_COOKIE)
    assert genuine
    tag, nonce, issued, mac = genuine.split(".")
    own_tag = sessions.device_tag(settings, place.user.id)
    assert tag == own_tag

    def flip(text: str) -> str:
        return text[:-1] + ("A" if text[-1] != "A" else "B")

    old = int(time.time()) - sessions.DEVICE_LIFETIME - 60
    other_pepper = dataclasses.replace(settings, given_secret_pepper=secrets.token_bytes(32))
    forged = {
        "mac changed": f"{tag}.{nonce}.{issued}.{flip(mac)}",
        "issued moved": f"{tag}.{nonce}.{int(issued) + 1}.{mac}",
        "nonce changed": f"{tag}.{flip(nonce)}.{issued}.{mac}",
        "expired": sessions.encode_devices(settings, [sessions.Device(own_tag, nonce, old)]),
        "another server's": sessions.encode_devices(
            other_pepper, [sessions.Device(own_tag, nonce, int(issued))]
        ),
        "no mac": f"{tag}.{nonce}.{issued}",
        "garbage": "~".join(["x.y.z.w"] * 50),
    }
    await lock_out(place.origin, place.user.email)
    for label, value in forged.items():
        b = browsers()
        set_device(b, place.origin, value)
        status, _, _ = await sign_in(b, place.origin, place.user.email, PASSWORD)
        assert status == 429, label

    # A cookie of one account is no help to another: the owner's browser, at the other account.
    await lock_out(place.origin, other_user.email)
    status, _, _ = await sign_in(owner, place.origin, other_user.email, PASSWORD)
    assert status == 429
    # Its own account still opens.
    status, _, _ = await sign_in(owner, place.origin, place.user.email, PASSWORD)
    assert status == 303


async def test_one_browser_is_remembered_for_each_account_it_signed_in_to(
    place: Place, pool: asyncpg.Pool, settings: Settings, unique: str, browsers: Any
) -> None:
    second = await make_user(pool, place.school, unique + "s")
    shared = browsers()
    for user in (place.user, second):
        status, _, _ = await sign_in(shared, place.origin, user.email)
        assert status == 303
    value = shared.cookie(sessions.DEVICE_COOKIE)
    assert [d.tag for d in sessions.devices(settings, value)] == [
        sessions.device_tag(settings, second.id),
        sessions.device_tag(settings, place.user.id),
    ]
    for user in (place.user, second):
        await lock_out(place.origin, user.email)
    for user in (place.user, second):
        status, _, _ = await sign_in(shared, place.origin, user.email)
        assert status == 303, user.email


def test_a_device_cookie_keeps_the_latest_accounts_only(settings: Settings) -> None:
    import uuid

    ids = [uuid.uuid4() for _ in range(sessions.DEVICE_ACCOUNTS + 3)]
    value = ""
    for user_id in ids:
        value = sessions.remember_device(settings, user_id, sessions.devices(settings, value))
    assert len(value) <= 1024
    kept = [d.tag for d in sessions.devices(settings, value)]
    latest = list(reversed(ids))[: sessions.DEVICE_ACCOUNTS]
    assert kept == [sessions.device_tag(settings, u) for u in latest]
