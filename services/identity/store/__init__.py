"""Every SQL statement identity runs, as plain async functions over asyncpg.

Handlers and domain modules never write SQL; they call these. Rows come back as dataclasses so
the rest of the service reads attributes, not string keys. This module holds the core model
(schools, users, clients, grants, keys); the flow's tables have a module each beside it
(`store.codes`, `store.refresh_tokens`, `store.grants` for the token endpoints' grants, ...).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from libs.common.db import Connection, Executor


@dataclass(frozen=True, slots=True)
class School:
    id: int
    subdomain: str
    name: str
    allowed_scopes: tuple[str, ...] | None
    open_registration: bool


@dataclass(frozen=True, slots=True)
class User:
    id: UUID
    email: str
    email_verified: bool
    name: str | None
    password_hash: str
    is_platform_admin: bool


@dataclass(frozen=True, slots=True)
class Membership:
    school_id: int
    subdomain: str
    school_name: str
    role: str


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


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    school_id: int | None
    alg: str
    state: str
    public_jwk: dict[str, Any]
    private_key_enc: bytes
    kek_id: str
    created_at: datetime
    activated_at: datetime | None
    retired_at: datetime | None
    expires_at: datetime | None


def _school(r: asyncpg.Record) -> School:
    scopes = r["allowed_scopes"]
    return School(
        r["id"],
        r["subdomain"],
        r["name"],
        tuple(scopes) if scopes is not None else None,
        r["open_registration"],
    )


def _user(r: asyncpg.Record) -> User:
    return User(
        r["id"],
        r["email"],
        r["email_verified"],
        r["name"],
        r["password_hash"],
        r["is_platform_admin"],
    )


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


def _key(r: asyncpg.Record) -> SigningKey:
    return SigningKey(
        r["kid"],
        r["school_id"],
        r["alg"],
        r["state"],
        r["public_jwk"],
        r["private_key_enc"],
        r["kek_id"],
        r["created_at"],
        r["activated_at"],
        r["retired_at"],
        r["expires_at"],
    )


# Schools ---------------------------------------------------------------------------------


async def insert_school(db: Executor, subdomain: str, name: str, school_id: int | None) -> School:
    if school_id is None:
        row = await db.fetchrow(
            "INSERT INTO schools (subdomain, name) VALUES ($1, $2) RETURNING *", subdomain, name
        )
    else:
        row = await db.fetchrow(
            "INSERT INTO schools (id, subdomain, name) VALUES ($1, $2, $3) RETURNING *",
            school_id,
            subdomain,
            name,
        )
        # Keep the identity sequence ahead of explicitly chosen ids, never pulling it back.
        await db.execute(
            "SELECT setval('schools_id_seq', (SELECT max(id) FROM schools))"
            " WHERE (SELECT max(id) FROM schools) >"
            " (SELECT last_value FROM schools_id_seq)"
        )
    assert row is not None
    return _school(row)


async def school_by_subdomain(db: Executor, subdomain: str) -> School | None:
    row = await db.fetchrow("SELECT * FROM schools WHERE subdomain = $1", subdomain)
    return _school(row) if row else None


async def school_by_id(db: Executor, school_id: int) -> School | None:
    row = await db.fetchrow("SELECT * FROM schools WHERE id = $1", school_id)
    return _school(row) if row else None


async def list_schools(db: Executor) -> list[School]:
    return [_school(r) for r in await db.fetch("SELECT * FROM schools ORDER BY id")]


async def set_open_registration(db: Executor, school_id: int, allowed: bool) -> None:
    await db.execute("UPDATE schools SET open_registration = $2 WHERE id = $1", school_id, allowed)


# Users -----------------------------------------------------------------------------------


async def insert_user(
    db: Executor, email: str, password_hash: str, name: str | None, *, platform_admin: bool = False
) -> User:
    row = await db.fetchrow(
        "INSERT INTO users (email, password_hash, name, is_platform_admin)"
        " VALUES ($1, $2, $3, $4) RETURNING *",
        email,
        password_hash,
        name,
        platform_admin,
    )
    assert row is not None
    return _user(row)


async def user_by_email(db: Executor, email: str) -> User | None:
    row = await db.fetchrow("SELECT * FROM users WHERE lower(email) = lower($1)", email)
    return _user(row) if row else None


async def user_by_id(db: Executor, user_id: UUID) -> User | None:
    row = await db.fetchrow("SELECT * FROM users WHERE id = $1", user_id)
    return _user(row) if row else None


async def update_password_hash(db: Executor, user_id: UUID, password_hash: str) -> None:
    await db.execute(
        "UPDATE users SET password_hash = $2, updated_at = now() WHERE id = $1",
        user_id,
        password_hash,
    )


async def upsert_membership(db: Executor, school_id: int, user_id: UUID, role: str) -> None:
    await db.execute(
        "INSERT INTO school_memberships (school_id, user_id, role) VALUES ($1, $2, $3)"
        " ON CONFLICT (school_id, user_id) DO UPDATE SET role = EXCLUDED.role",
        school_id,
        user_id,
        role,
    )


async def memberships_of(db: Executor, user_id: UUID) -> list[Membership]:
    rows = await db.fetch(
        "SELECT m.school_id, s.subdomain, s.name, m.role FROM school_memberships m"
        " JOIN schools s ON s.id = m.school_id WHERE m.user_id = $1 ORDER BY s.name",
        user_id,
    )
    return [Membership(r["school_id"], r["subdomain"], r["name"], r["role"]) for r in rows]


async def membership_role(db: Executor, school_id: int, user_id: UUID) -> str | None:
    role: str | None = await db.fetchval(
        "SELECT role FROM school_memberships WHERE school_id = $1 AND user_id = $2",
        school_id,
        user_id,
    )
    return role


async def list_users(db: Executor, school_id: int) -> list[tuple[User, str]]:
    rows = await db.fetch(
        "SELECT u.*, m.role FROM users u JOIN school_memberships m ON m.user_id = u.id"
        " WHERE m.school_id = $1 ORDER BY u.email",
        school_id,
    )
    return [(_user(r), r["role"]) for r in rows]


# Clients ---------------------------------------------------------------------------------


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


async def delete_client(db: Executor, client_id: str) -> bool:
    forget_client(client_id)
    result: str = await db.execute("DELETE FROM clients WHERE id = $1", client_id)
    forget_client(client_id)
    return result.endswith(" 1")


# Signing keys ----------------------------------------------------------------------------


async def keys_of_issuer(db: Executor, school_id: int | None) -> list[SigningKey]:
    rows = await db.fetch(
        "SELECT * FROM signing_keys WHERE school_id IS NOT DISTINCT FROM $1"
        " AND (state <> 'retired' OR expires_at > now())"
        " ORDER BY alg, CASE state WHEN 'current' THEN 0 WHEN 'next' THEN 1 ELSE 2 END,"
        " created_at DESC",
        school_id,
    )
    return [_key(r) for r in rows]


async def key_by_kid(db: Executor, kid: str) -> SigningKey | None:
    row = await db.fetchrow("SELECT * FROM signing_keys WHERE kid = $1", kid)
    return _key(row) if row else None


async def insert_key(
    db: Executor,
    *,
    kid: str,
    school_id: int | None,
    alg: str,
    state: str,
    public_jwk: dict[str, Any],
    private_key_enc: bytes,
    kek_id: str,
) -> SigningKey:
    row = await db.fetchrow(
        "INSERT INTO signing_keys (kid, school_id, alg, state, public_jwk, private_key_enc,"
        " kek_id, activated_at) VALUES ($1, $2, $3, $4, $5, $6, $7,"
        " CASE WHEN $4 = 'current' THEN now() END) RETURNING *",
        kid,
        school_id,
        alg,
        state,
        public_jwk,
        private_key_enc,
        kek_id,
    )
    assert row is not None
    return _key(row)


async def retire_key(db: Executor, kid: str, keep_seconds: int) -> None:
    await db.execute(
        "UPDATE signing_keys SET state = 'retired', retired_at = now(),"
        " expires_at = now() + make_interval(secs => $2) WHERE kid = $1",
        kid,
        keep_seconds,
    )


async def promote_key(db: Executor, kid: str) -> None:
    await db.execute(
        "UPDATE signing_keys SET state = 'current', activated_at = now() WHERE kid = $1", kid
    )


async def lock_issuer_keys(db: Connection, school_id: int | None) -> None:
    """Serialise key changes of one issuer across processes for the current transaction."""
    await db.execute("SELECT pg_advisory_xact_lock(hashtext('signing_keys'), $1)", school_id or 0)


async def issuers_due_for_rotation(db: Executor, older_than_seconds: int) -> list[int | None]:
    rows = await db.fetch(
        "SELECT DISTINCT school_id FROM signing_keys WHERE state = 'current'"
        " AND activated_at < now() - make_interval(secs => $1)",
        older_than_seconds,
    )
    return [r["school_id"] for r in rows]


# Grants ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grant:
    id: UUID
    school_id: int
    client_id: str
    user_id: UUID | None
    scopes: tuple[str, ...]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def _grant(r: asyncpg.Record) -> Grant:
    return Grant(
        r["id"],
        r["school_id"],
        r["client_id"],
        r["user_id"],
        tuple(r["scopes"]),
        r["created_at"],
        r["last_used_at"],
        r["revoked_at"],
    )


async def insert_grant(
    db: Executor, *, school_id: int, client_id: str, user_id: UUID | None, scopes: Sequence[str]
) -> Grant:
    row = await db.fetchrow(
        "INSERT INTO grants (school_id, client_id, user_id, scopes, last_used_at)"
        " VALUES ($1, $2, $3, $4, now()) RETURNING *",
        school_id,
        client_id,
        user_id,
        list(scopes),
    )
    assert row is not None
    return _grant(row)


async def grant_by_id(db: Executor, grant_id: UUID) -> Grant | None:
    row = await db.fetchrow("SELECT * FROM grants WHERE id = $1", grant_id)
    return _grant(row) if row else None


async def mark_grants_revoked(db: Executor, grant_ids: Sequence[UUID], reason: str) -> list[Grant]:
    """Revoke each once; the grants revoked now (not those already revoked or never there)."""
    rows = await db.fetch(
        "UPDATE grants SET revoked_at = now(), revoked_reason = $2"
        " WHERE id = ANY($1::uuid[]) AND revoked_at IS NULL RETURNING *",
        list(grant_ids),
        reason,
    )
    return [_grant(r) for r in rows]


async def active_grants_of(
    db: Executor, *, user_id: UUID, client_id: str | None = None, school_id: int | None = None
) -> list[Grant]:
    rows = await db.fetch(
        "SELECT * FROM grants WHERE user_id = $1 AND revoked_at IS NULL"
        " AND ($2::text IS NULL OR client_id = $2) AND ($3::bigint IS NULL OR school_id = $3)"
        " ORDER BY created_at",
        user_id,
        client_id,
        school_id,
    )
    return [_grant(r) for r in rows]


async def live_self_registered_grants(db: Executor, school_id: int) -> list[UUID]:
    """The unrevoked grants at the school of clients that registered themselves (RFC 7591):
    the school's own and platform clients alike."""
    rows = await db.fetch(
        "SELECT g.id FROM grants g JOIN clients c ON c.id = g.client_id"
        " WHERE g.school_id = $1 AND g.revoked_at IS NULL AND c.created_via = 'registration'"
        " ORDER BY g.created_at",
        school_id,
    )
    return [r["id"] for r in rows]


async def forget_self_registered_consents(db: Executor, school_id: int) -> int:
    """Forget what users at the school consented to for clients that registered themselves;
    how many consents were forgotten."""
    result: str = await db.execute(
        "DELETE FROM consents co USING clients c"
        " WHERE co.client_id = c.id AND co.school_id = $1 AND c.created_via = 'registration'",
        school_id,
    )
    return int(result.rsplit(" ", 1)[1])


async def touch_grant(db: Executor, grant_id: UUID) -> None:
    await db.execute("UPDATE grants SET last_used_at = now() WHERE id = $1", grant_id)
