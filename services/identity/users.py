"""Users: one account per email across the platform, with a role in each school they belong to."""

from __future__ import annotations

import asyncio
import re
from uuid import UUID

import asyncpg
import redis.asyncio as redis

from libs.common.config import Settings
from services.identity import credentials, grants, roles, store

ROLES = ("admin", "lecturer", "member")
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s]{1,63}$")
MIN_PASSWORD_LENGTH = 8


class UserError(ValueError):
    pass


def validate_email(email: str) -> str:
    email = email.strip()
    if not _EMAIL.match(email):
        raise UserError("email is not a valid address")
    return email


async def create_user(
    pool: asyncpg.Pool,
    *,
    school_id: int,
    email: str,
    password: str,
    name: str | None = None,
    role: str = "member",
    platform_admin: bool = False,
) -> tuple[store.User, bool]:
    """Create the account (or find it by email) and give it `role` at the school.

    Returns the user and whether the account is new. An existing account keeps its password:
    adding someone to a second school must not let the caller reset their credentials.
    """
    email = validate_email(email)
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    password_hash = await asyncio.to_thread(credentials.hash_password, password)
    async with pool.acquire() as conn, conn.transaction():
        user = await store.user_by_email(conn, email)
        created = user is None
        if user is None:
            user = await store.insert_user(
                conn,
                email,
                password_hash,
                name,
                platform_admin=platform_admin,
            )
        await store.upsert_membership(conn, school_id, user.id, role)
    return user, created


async def authenticate(
    pool: asyncpg.Pool,
    email: str,
    password: str,
    *,
    gate: credentials.PasswordGate | None = None,
) -> store.User | None:
    """The user whose email and password these are, or None; a miss costs what a hit costs.

    A serving process passes its `gate`, which bounds how many argon2 runs (and their memory)
    it has going at once; a one-off caller (the CLI, a test) may do without.
    """
    user = await store.user_by_email(pool, email.strip())
    stored = user.password_hash if user else None
    # argon2id takes tens of milliseconds of CPU on purpose: off the event loop, so one
    # sign-in does not stall every other request of the process.
    if gate is not None:
        ok = await gate.verify(stored, password)
    else:
        ok = await asyncio.to_thread(credentials.verify_password, stored, password)
    if not ok:
        return None
    assert user is not None
    if credentials.password_needs_rehash(user.password_hash):
        if gate is not None:
            rehashed = await gate.hash(password)
        else:
            rehashed = await asyncio.to_thread(credentials.hash_password, password)
        await store.update_password_hash(pool, user.id, rehashed)
    return user


async def end_grants_beyond_role(
    pool: asyncpg.Pool,
    redis_client: redis.Redis,
    settings: Settings,
    *,
    school_id: int,
    user_id: UUID,
) -> int:
    """After a role change: revoke the user's grants at the school that their role no longer
    allows, everywhere at once. A refresh would find out too, but only at the next refresh,
    while the access tokens already issued keep working for up to their lifetime."""
    user = await store.user_by_id(pool, user_id)
    role = await store.membership_role(pool, school_id, user_id)
    top = roles.ceiling(role, platform_admin=bool(user and user.is_platform_admin))
    ended = 0
    for grant in await store.active_grants_of(pool, user_id=user_id, school_id=school_id):
        if roles.exceeds(grant.scopes, top):
            ended += await grants.revoke_grant(
                pool, redis_client, settings, grant.id, reason="role_lowered"
            )
    return ended
