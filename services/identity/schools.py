"""Schools as tenants: each one its own authorization server, found from the request's Host."""

from __future__ import annotations

import time
from dataclasses import dataclass

import asyncpg

from libs.common.config import Settings
from services.identity import keys, store


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


class SchoolDirectory:
    """Host to issuer resolution, cached briefly: every request needs it, schools rarely change."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings, ttl: float = 10.0) -> None:
        self._pool = pool
        self._settings = settings
        self._ttl = ttl
        self._by_subdomain: dict[str, tuple[float, store.School | None]] = {}

    def forget(self) -> None:
        self._by_subdomain.clear()

    async def school(self, subdomain: str) -> store.School | None:
        now = time.monotonic()
        hit = self._by_subdomain.get(subdomain)
        if hit and hit[0] > now:
            return hit[1]
        school = await store.school_by_subdomain(self._pool, subdomain)
        self._by_subdomain[subdomain] = (now + self._ttl, school)
        return school

    async def resolve(self, host: str) -> Issuer:
        subdomain = self._settings.urls.subdomain_of(host)
        if subdomain is None:
            raise UnknownSchool(host)
        if subdomain == "":
            return Issuer(None, self._settings.urls.platform_url)
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
