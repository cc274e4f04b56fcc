"""Schools as tenants: each one its own authorization server, found from the request's Host."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import asyncpg
import redis.asyncio as redis

from libs.common.config import Settings
from services.identity import grants, keys, store


@dataclass(frozen=True, slots=True)
class Issuer:
    """The authorization server a request is addressed to: a school, or the platform."""

    school: store.School | None
    issuer: str

    @property
    def school_id(self) -> int | None:
        return self.school.id if self.school else None

    @property
    def is_platform(self) -> bool:
        return self.school is None


class UnknownSchool(LookupError):
    pass


# Subdomains remembered per process: far more than any deployment's schools, so the schools in
# use stay cached, while a flood of made-up Host labels only churns the least recently used.
MAX_CACHED_SUBDOMAINS = 10_000
# An unknown subdomain is remembered only briefly: a school created a moment ago must answer
# soon, and a flood of made-up labels should not keep what it cost around.
NEGATIVE_TTL = 2.0
# RFC 1035 2.3.4: a DNS label is at most 63 octets.
MAX_LABEL_LENGTH = 63


class SchoolDirectory:
    """Host to issuer resolution, cached briefly: every request needs it, schools rarely change.

    The cache is bounded (least recently used goes first): Host is the caller's to choose, so
    every distinct label would otherwise cost a permanent entry.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        ttl: float = 10.0,
        *,
        negative_ttl: float = NEGATIVE_TTL,
        max_entries: int = MAX_CACHED_SUBDOMAINS,
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._ttl = ttl
        self._negative_ttl = min(negative_ttl, ttl)
        self._max_entries = max_entries
        self._by_subdomain: OrderedDict[str, tuple[float, store.School | None]] = OrderedDict()

    def forget(self) -> None:
        self._by_subdomain.clear()

    def __len__(self) -> int:
        return len(self._by_subdomain)

    async def school(self, subdomain: str) -> store.School | None:
        now = time.monotonic()
        hit = self._by_subdomain.get(subdomain)
        if hit is not None:
            if hit[0] > now:
                self._by_subdomain.move_to_end(subdomain)
                return hit[1]
            del self._by_subdomain[subdomain]
        school = await store.school_by_subdomain(self._pool, subdomain)
        ttl = self._ttl if school is not None else self._negative_ttl
        self._by_subdomain[subdomain] = (time.monotonic() + ttl, school)
        self._by_subdomain.move_to_end(subdomain)
        while len(self._by_subdomain) > self._max_entries:
            self._by_subdomain.popitem(last=False)
        return school

    async def resolve(self, host: str) -> Issuer:
        subdomain = self._settings.urls.subdomain_of(host)
        if subdomain is None:
            raise UnknownSchool(host)
        if subdomain == "":
            return Issuer(None, self._settings.urls.platform_url)
        if len(subdomain) > MAX_LABEL_LENGTH:
            # No DNS name reaches such a school, and it would cost a query and a large entry.
            raise UnknownSchool(host)
        school = await self.school(subdomain)
        if school is None:
            raise UnknownSchool(host)
        return Issuer(school, self._settings.urls.school_origin(school.subdomain))


async def create_school(
    pool: asyncpg.Pool, settings: Settings, subdomain: str, name: str, school_id: int | None = None
) -> store.School:
    """A new school with its own signing keys, ready to issue tokens."""
    subdomain = subdomain.strip().lower()
    school = await store.insert_school(pool, subdomain, name.strip(), school_id)
    await keys.ensure_issuer_keys(pool, settings, school.id)
    return school


# Grants ended per round of a school's closing: one statement, a round trip of marks and one of
# announcements, and one wait for the gateways each.
CLOSING_PAGE = 500


async def set_open_registration(
    pool: asyncpg.Pool,
    redis_client: redis.Redis,
    settings: Settings,
    school_id: int,
    open_registration: bool,
) -> int:
    """Open or close the school to apps that register themselves (RFC 7591); how many grants
    closing ended.

    Closing ends, at once and at every gateway, every grant such apps hold at the school (its
    own apps and platform apps alike), and forgets the consents users gave them there, so
    opening again brings nothing back without the user. Their registrations stay: closed, they
    cannot authorize at the school (authorize.school_choice.closed_to), and no code of theirs
    is redeemed there (store.codes), so a grant made after the list below was read yields no
    token.
    Closing a closed school again ends whatever an interrupted run left.
    """
    # Committed before anything is listed: the token endpoint sees the school closed from
    # here on.
    await store.set_open_registration(pool, school_id, open_registration)
    if open_registration:
        return 0
    ended = 0
    async with pool.acquire() as conn, conn.transaction():
        # Before the grants are listed: a flow making a grant on the strength of a remembered
        # consent holds it (authorize.issue.issue_code), so it finishes first and its grant is
        # listed.
        await store.forget_self_registered_consents(conn, school_id)
        live = await store.live_self_registered_grants(conn, school_id)
        for start in range(0, len(live), CLOSING_PAGE):
            revoked = await grants.record_revocations(
                conn, live[start : start + CLOSING_PAGE], reason="registration_closed"
            )
            ended += len(revoked)
    # Announced once committed (grants.py), a page at a time.
    for start in range(0, len(live), CLOSING_PAGE):
        await grants.announce_revocations(
            redis_client,
            settings,
            dict.fromkeys(live[start : start + CLOSING_PAGE], school_id),
            reason="registration_closed",
        )
    return ended
