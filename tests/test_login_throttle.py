"""Who the sign-in throttle counts: callers by IPv4 address or IPv6 /64, through the real
form."""

from __future__ import annotations

import dataclasses
import ipaddress
import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import pytest
import redis.asyncio as redis_asyncio

from libs.common.config import Settings
from services.identity import sessions, store
from tests.support import client_session, free_port, running
from tests.test_authorize import (
    PASSWORD,
    form,
    make_school,
    make_user,
)


@pytest.fixture(autouse=True)
async def _fresh_address_counter(redis: redis_asyncio.Redis, settings: Settings) -> Any:
    """Browser tests sign in from 127.0.0.1; one test's failures must not throttle the next."""
    key = settings.stream("connect:throttle:login:address:127.0.0.1")
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
