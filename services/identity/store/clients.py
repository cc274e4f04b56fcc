"""OAuth clients: the row, its lookups and its changes (the short-lived cache is client_cache)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from libs.common.db import Executor


@dataclass(frozen=True, slots=True)
class Client:
    id: str
    school_id: int | None
    name: str
    token_endpoint_auth_method: str
    secret_hash: bytes | None
    redirect_uris: tuple[str, ...]
    allowed_origins: tuple[str, ...]
    scopes: tuple[str, ...]
    grant_types: tuple[str, ...]
    response_types: tuple[str, ...]
    first_party: bool
    created_via: str
    registration_token_hash: bytes | None
    metadata: dict[str, Any]
    rate_limit_per_minute: int | None
    disabled_at: datetime | None
    created_at: datetime

    @property
    def is_public(self) -> bool:
        return self.token_endpoint_auth_method == "none"

    @property
    def is_platform(self) -> bool:
        return self.school_id is None


def _client(r: asyncpg.Record) -> Client:
    return Client(
        id=r["id"],
        school_id=r["school_id"],
        name=r["name"],
        token_endpoint_auth_method=r["token_endpoint_auth_method"],
        secret_hash=r["secret_hash"],
        redirect_uris=tuple(r["redirect_uris"]),
        allowed_origins=tuple(r["allowed_origins"]),
        scopes=tuple(r["scopes"]),
        grant_types=tuple(r["grant_types"]),
        response_types=tuple(r["response_types"]),
        first_party=r["first_party"],
        created_via=r["created_via"],
        registration_token_hash=r["registration_token_hash"],
        metadata=r["metadata"] or {},
        rate_limit_per_minute=r["rate_limit_per_minute"],
        disabled_at=r["disabled_at"],
        created_at=r["created_at"],
    )


async def insert_client(
    db: Executor,
    *,
    client_id: str,
    school_id: int | None,
    name: str,
    token_endpoint_auth_method: str,
    secret_hash: bytes | None,
    redirect_uris: Sequence[str],
    allowed_origins: Sequence[str],
    scopes: Sequence[str],
    grant_types: Sequence[str],
    response_types: Sequence[str] = ("code",),
    first_party: bool = False,
    created_via: str = "admin",
    registration_token_hash: bytes | None = None,
    metadata: dict[str, Any] | None = None,
) -> Client:
    row = await db.fetchrow(
        "INSERT INTO clients (id, school_id, name, token_endpoint_auth_method, secret_hash,"
        " secret_rotated_at, redirect_uris, allowed_origins, scopes, grant_types,"
        " response_types, first_party, created_via, registration_token_hash, metadata)"
        " VALUES ($1, $2, $3, $4, $5, CASE WHEN $5::bytea IS NULL THEN NULL ELSE now() END,"
        " $6, $7, $8, $9, $10, $11, $12, $13, $14) RETURNING *",
        client_id,
        school_id,
        name,
        token_endpoint_auth_method,
        secret_hash,
        list(redirect_uris),
        list(allowed_origins),
        list(scopes),
        list(grant_types),
        list(response_types),
        first_party,
        created_via,
        registration_token_hash,
        metadata or {},
    )
    assert row is not None
    return _client(row)


def possible_client_id(value: str) -> bool:
    """RFC 6749 A.1: a client_id is VSCHAR (%x20-7E). Anything else names no client, and
    asking PostgreSQL for it could fail the request (text cannot hold NUL) instead."""
    return value.isascii() and value.isprintable()


async def client_by_id(db: Executor, client_id: str) -> Client | None:
    if not possible_client_id(client_id):
        return None
    row = await db.fetchrow("SELECT * FROM clients WHERE id = $1", client_id)
    return _client(row) if row else None


# Client authentication reads the client's row on every token, revocation and introspection
# request; a few seconds of reuse removes that query from the hot path. A change is announced
# on `connect:clients` once committed (clients.announce_change), and every identity process's
# follower drops the entry when it reads the announcement (clients.follow_changes). Rows are
# reused only while that follower is known to be reading (`_followed_until`), and a read that
# an announcement overtook is not kept (`_generation`): otherwise a row read just before a
# change committed could be cached just after its announcement was applied, and live on for
# the whole TTL.
CLIENT_CACHE_TTL = 5.0
_CLIENT_CACHE_MAX = 10_000
_client_cache: dict[str, tuple[float, Client]] = {}
_generation = 0
_followed_until = 0.0


async def cached_client_by_id(db: Executor, client_id: str) -> Client | None:
    """client_by_id, reused for CLIENT_CACHE_TTL seconds; unknown ids are never cached, so a
    client is usable the moment it is registered."""
    now = time.monotonic()
    if now >= _followed_until:
        return await client_by_id(db, client_id)
    hit = _client_cache.get(client_id)
    if hit is not None and hit[0] > now:
        return hit[1]
    generation = _generation
    client = await client_by_id(db, client_id)
    if client is None:
        _client_cache.pop(client_id, None)
        return None
    if generation != _generation or time.monotonic() >= _followed_until:
        return client
    if len(_client_cache) >= _CLIENT_CACHE_MAX:
        _client_cache.clear()
    _client_cache[client_id] = (now + CLIENT_CACHE_TTL, client)
    return client


def forget_client(client_id: str | None = None) -> None:
    """Drop one cached client (or all): its row is about to change or has changed. Reads in
    flight are not kept either: they may have read the row as it was."""
    global _generation
    _generation += 1
    if client_id is None:
        _client_cache.clear()
    else:
        _client_cache.pop(client_id, None)


def client_changes_followed(until: float) -> None:
    """The change follower has read every announcement made before now: cached rows may be
    used until `until` (time.monotonic), when it should have answered again."""
    global _followed_until
    _followed_until = max(_followed_until, until)


def client_changes_unfollowed() -> None:
    """The follower lost its place: nothing cached can be trusted, and nothing is cached until
    it follows again."""
    global _followed_until
    _followed_until = 0.0
    forget_client()


async def list_clients(db: Executor, school_id: int | None) -> list[Client]:
    rows = await db.fetch(
        "SELECT * FROM clients WHERE school_id IS NOT DISTINCT FROM $1 ORDER BY created_at",
        school_id,
    )
    return [_client(r) for r in rows]


async def update_client(db: Executor, client_id: str, **fields: Any) -> Client | None:
    """Update the named columns; names come from code, never from the request."""
    allowed = {
        "name",
        "redirect_uris",
        "allowed_origins",
        "scopes",
        "grant_types",
        "response_types",
        "token_endpoint_auth_method",
        "secret_hash",
        "metadata",
        "disabled_at",
        "registration_token_hash",
        "rate_limit_per_minute",
        "first_party",
    }
    if not fields or not set(fields) <= allowed:
        raise ValueError(f"cannot update {sorted(set(fields) - allowed)}")
    forget_client(client_id)
    names = list(fields)
    assignments = ", ".join(f"{n} = ${i + 2}" for i, n in enumerate(names))
    if "secret_hash" in fields:
        assignments += ", secret_rotated_at = now()"
    row = await db.fetchrow(
        f"UPDATE clients SET {assignments}, updated_at = now() WHERE id = $1 RETURNING *",  # noqa: S608
        client_id,
        *(list(v) if isinstance(v, tuple) else v for v in fields.values()),
    )
    # Again after the write: a request in between may have cached the row as it was.
    forget_client(client_id)
    return _client(row) if row else None


async def rehash_client_secret(
    db: Executor, client_id: str, column: str, *, old: bytes, new: bytes
) -> bool:
    """Store a client's secret (or registration access token) hashed under the new pepper, if
    its hash is still `old` (compare and set: a rotation of the secret in between wins). The
    secret itself is unchanged, so neither updated_at nor secret_rotated_at moves."""
    if column not in ("secret_hash", "registration_token_hash"):
        raise ValueError(f"cannot rehash {column}")
    status = await db.execute(
        f"UPDATE clients SET {column} = $3 WHERE id = $1 AND {column} = $2",  # noqa: S608
        client_id,
        old,
        new,
    )
    forget_client(client_id)
    return status == "UPDATE 1"


async def delete_client(db: Executor, client_id: str) -> bool:
    forget_client(client_id)
    result: str = await db.execute("DELETE FROM clients WHERE id = $1", client_id)
    forget_client(client_id)
    return result.endswith(" 1")
