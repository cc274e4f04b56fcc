"""Identity's administration commands: `loopwise-connect schools|users|clients|keys ...`.

One async function per subcommand, named after it, taking the pool, the settings and the
subcommand's options as keywords, and returning the answer the CLI prints. `COMMANDS` maps
(command, action) to it; `run` runs one against the migrated database, refusing (as identity
does at start) secrets that are not the database's. `CommandError` is a refusal the CLI prints
without a traceback. The argument parser itself is the CLI's (`services/cli.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import asyncpg
import redis.asyncio as redis

from libs.common import db, streams
from libs.common import scopes as catalogue
from libs.common.config import Settings
from services.identity import clients, keys, schools, secret_checks, store, users

Command = Callable[..., Awaitable[dict[str, Any]]]


class CommandError(Exception):
    """A command that cannot do what was asked; printed without a traceback."""


async def run(
    command: str, action: str, options: Mapping[str, Any], settings: Settings
) -> dict[str, Any]:
    """Run `command action` with `options` (the parser's, by name) and return its answer."""
    chosen = COMMANDS.get((command, action))
    await db.migrate(settings.database_url)
    pool = await db.create_pool(settings=settings, min_size=1, max_size=2)
    try:
        # As identity at start: with secrets other than the database's, a command would seal
        # new signing keys or hash client secrets that nothing could open or match afterwards.
        await secret_checks.verify(pool, settings)
        if chosen is None:
            raise CommandError(f"unknown command {command}")
        return await chosen(pool, settings, **options)
    finally:
        await pool.close()


async def _school(pool: asyncpg.Pool, ref: str) -> store.School:
    """A school by its id (digits) or its subdomain."""
    school = (
        await store.school_by_id(pool, int(ref))
        if ref.isdigit()
        else await store.school_by_subdomain(pool, ref.lower())
    )
    if school is None:
        raise CommandError(f"no school {ref!r}")
    return school


@contextlib.asynccontextmanager
async def _redis(settings: Settings) -> AsyncIterator[redis.Redis]:
    client = streams.connect(settings.redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def schools_create(
    pool: asyncpg.Pool, settings: Settings, *, subdomain: str, name: str, school_id: int | None
) -> dict[str, Any]:
    try:
        school = await schools.create_school(pool, settings, subdomain, name, school_id)
    except asyncpg.UniqueViolationError:
        raise CommandError("a school with that subdomain or id exists") from None
    except asyncpg.CheckViolationError:
        raise CommandError("the subdomain must be a DNS label (a-z, 0-9, -)") from None
    return {
        "school_id": school.id,
        "subdomain": school.subdomain,
        "name": school.name,
        "issuer": settings.urls.school_origin(school.subdomain),
    }


async def schools_list(pool: asyncpg.Pool, settings: Settings) -> dict[str, Any]:
    found = await store.list_schools(pool)
    return {
        "schools": [{"school_id": s.id, "subdomain": s.subdomain, "name": s.name} for s in found]
    }


async def schools_update(
    pool: asyncpg.Pool, settings: Settings, *, school: str, open_registration: bool | None
) -> dict[str, Any]:
    found = await _school(pool, school)
    if open_registration is None:
        raise CommandError("nothing to update: give --open-registration true|false")
    async with _redis(settings) as redis_client:
        # Closing ends the grants of apps that registered themselves, at every gateway,
        # before this returns.
        ended = await schools.set_open_registration(
            pool, redis_client, settings, found.id, open_registration
        )
    updated: dict[str, Any] = {
        "school_id": found.id,
        "subdomain": found.subdomain,
        "name": found.name,
        "open_registration": open_registration,
    }
    if ended:
        # Only when closing ended any: the answer keeps its shape for everything else.
        updated["revoked_grants"] = ended
    return updated


async def users_create(
    pool: asyncpg.Pool,
    settings: Settings,
    *,
    school: str,
    email: str,
    password: str,
    name: str | None,
    role: str,
) -> dict[str, Any]:
    found = await _school(pool, school)
    try:
        user, created = await users.create_user(
            pool, school_id=found.id, email=email, password=password, name=name, role=role
        )
    except users.UserError as exc:
        raise CommandError(str(exc)) from None
    ended = 0
    if not created:
        # A role given to an existing account may be lower than before: what it no longer
        # allows ends now, at every gateway.
        async with _redis(settings) as redis_client:
            ended = await users.end_grants_beyond_role(
                pool, redis_client, settings, school_id=found.id, user_id=user.id
            )
    return {
        "user_id": str(user.id),
        "email": user.email,
        "name": user.name,
        "school_id": found.id,
        "role": role,
        "created": created,
        "revoked_grants": ended,
    }


async def clients_create(
    pool: asyncpg.Pool,
    settings: Settings,
    *,
    school: str,
    name: str,
    redirect_uris: list[str],
    public: bool,
    scope: str,
    origins: list[str],
) -> dict[str, Any]:
    found = await _school(pool, school)
    try:
        made = await clients.create_client(
            pool,
            settings,
            school=found,
            name=name,
            redirect_uris=redirect_uris,
            public=public,
            scopes=catalogue.parse(scope),
            origins=origins,
            created_via="cli",
        )
    except clients.METADATA_ERRORS as exc:
        raise CommandError(f"{exc.error}: {exc.description}") from None
    c = made.client
    result: dict[str, Any] = {
        "client_id": c.id,
        "name": c.name,
        "school_id": c.school_id,
        "token_endpoint_auth_method": c.token_endpoint_auth_method,
        "redirect_uris": list(c.redirect_uris),
        "scope": " ".join(c.scopes),
        "allowed_origins": list(c.allowed_origins),
    }
    if made.client_secret:
        result["client_secret"] = made.client_secret
    return result


async def keys_rotate(
    pool: asyncpg.Pool, settings: Settings, *, school: str | None
) -> dict[str, Any]:
    school_id = (await _school(pool, school)).id if school else None
    await keys.ensure_issuer_keys(pool, settings, school_id)
    changes = await keys.rotate(pool, settings, school_id)
    async with _redis(settings) as redis_client:
        await keys.announce(redis_client, settings, school_id, "rotated")
    return {"school_id": school_id, "keys": changes}


# Passes of `keys rewrap` before it gives up on rows that keep changing under it (a secret
# rotated between a pass's read and its write): each pass is idempotent, so one more is safe.
_REWRAP_PASSES = 5


async def keys_rewrap(pool: asyncpg.Pool, settings: Settings) -> dict[str, Any]:
    """Seal every sealed secret (signing keys, webhook signing secrets) under
    KEY_ENCRYPTION_KEY; then record it as the database's key, so that dropping
    KEY_ENCRYPTION_KEYS_PREVIOUS is safe (README "Key rotation")."""
    from services.webhooks import rewrap as webhooks_rewrap

    totals: dict[str, dict[str, int]] = {}
    for _ in range(_REWRAP_PASSES):
        passes = {
            "signing_keys": await keys.rewrap(pool, settings),
            "webhook_subscriptions": await webhooks_rewrap.rewrap(pool, settings),
        }
        for part, counts in passes.items():
            total = totals.setdefault(part, dict.fromkeys(counts, 0))
            total["resealed"] += counts["resealed"]
            # What the last pass found: earlier passes' "already" and races are this one's.
            for name in ("already", "raced", "unopenable"):
                total[name] = counts[name]
        if not any(counts["raced"] for counts in passes.values()):
            break
    unopenable = sum(t["unopenable"] for t in totals.values())
    raced = sum(t["raced"] for t in totals.values())
    if unopenable or raced:
        raise CommandError(
            f"{unopenable} sealed values open under none of the configured keys and {raced}"
            " kept changing; everything else is sealed under KEY_ENCRYPTION_KEY. Keep"
            " KEY_ENCRYPTION_KEYS_PREVIOUS until a rewrap finishes without this error"
        )
    recorded = await secret_checks.recorded_key(pool, settings)
    if recorded is not None and recorded != settings.key_encryption_key:
        await secret_checks.record_newest(
            pool, "KEY_ENCRYPTION_KEY", recorded, settings.key_encryption_key
        )
    return {"kek_id": keys.kek_id(settings.key_encryption_key), **totals}


COMMANDS: dict[tuple[str, str], Command] = {
    ("schools", "create"): schools_create,
    ("schools", "list"): schools_list,
    ("schools", "update"): schools_update,
    ("users", "create"): users_create,
    ("clients", "create"): clients_create,
    ("keys", "rotate"): keys_rotate,
    ("keys", "rewrap"): keys_rewrap,
}
