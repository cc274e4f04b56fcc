"""What the gateway reads from identity's tables: schools by subdomain, and clients' CORS
origins and rate limits. Read-only, cached briefly, every statement in this one module.

The gateway reads PostgreSQL directly rather than asking identity over HTTP: the school of a
Host is needed on every protected call, and a cached indexed read needs no extra hop or
internal endpoint. Identity stays the only writer.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from libs.common.origins import normalise
from services.gateway.cache import TtlCache


@dataclass(frozen=True, slots=True)
class ClientPolicy:
    """The parts of a client row the gateway enforces."""

    client_id: str
    school_id: int | None  # None: a platform-level client
    allowed_origins: frozenset[str]
    rate_limit_per_minute: int | None
    disabled: bool


class Directory:
    # Short: a new school or a changed client is seen within seconds; a school that does not
    # exist is remembered for less, so creating it takes effect soon.
    TTL = 10.0
    NEGATIVE_TTL = 3.0

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.schools: TtlCache[str, int | None] = TtlCache(self.TTL, negative_ttl=self.NEGATIVE_TTL)
        self.clients: TtlCache[str, ClientPolicy | None] = TtlCache(
            self.TTL, negative_ttl=self.NEGATIVE_TTL
        )
        self.origins: TtlCache[int, frozenset[str]] = TtlCache(self.TTL)

    def forget(self) -> None:
        self.schools.forget()
        self.clients.forget()
        self.origins.forget()

    async def school_id(self, subdomain: str) -> int | None:
        found, value = self.schools.peek(subdomain)
        if found:
            return value

        async def load() -> int | None:
            school_id = await self._pool.fetchval(
                "SELECT id FROM schools WHERE subdomain = $1", subdomain
            )
            return int(school_id) if school_id is not None else None

        return await self.schools.get(subdomain, load)

    async def client(self, client_id: str) -> ClientPolicy | None:
        found, value = self.clients.peek(client_id)
        if found:
            return value

        async def load() -> ClientPolicy | None:
            row = await self._pool.fetchrow(
                "SELECT id, school_id, allowed_origins, rate_limit_per_minute,"
                " disabled_at IS NOT NULL AS disabled FROM clients WHERE id = $1",
                client_id,
            )
            if row is None:
                return None
            return ClientPolicy(
                client_id=row["id"],
                school_id=row["school_id"],
                allowed_origins=frozenset(normalise(o) for o in row["allowed_origins"]),
                rate_limit_per_minute=row["rate_limit_per_minute"],
                disabled=row["disabled"],
            )

        return await self.clients.get(client_id, load)

    async def school_origins(self, school_id: int) -> frozenset[str]:
        """Every origin registered on a live client usable at the school: its own clients and
        the platform's (whose tokens a user may have granted for this school)."""
        found, value = self.origins.peek(school_id)
        if found and value is not None:
            return value

        async def load() -> frozenset[str]:
            rows = await self._pool.fetch(
                "SELECT DISTINCT o AS origin FROM clients, unnest(allowed_origins) AS o"
                " WHERE (school_id = $1 OR school_id IS NULL) AND disabled_at IS NULL",
                school_id,
            )
            return frozenset(normalise(r["origin"]) for r in rows)

        return await self.origins.get(school_id, load)
