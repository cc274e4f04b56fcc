"""Users and their memberships of schools (the role each holds there)."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

import asyncpg

from libs.common.db import Executor


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


def _user(r: asyncpg.Record) -> User:
    return User(
        r["id"],
        r["email"],
        r["email_verified"],
        r["name"],
        r["password_hash"],
        r["is_platform_admin"],
    )


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
