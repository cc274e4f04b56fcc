"""The suite's own school on the system under test: a school, a user, a public app, and the
tokens the workload uses, all minted the way a partner gets them.

Codes are inserted exactly as the authorize flow stores them (as tests/token_helpers.py's
`insert_code` and the bench do: a consent grant, then the hashed code bound to client,
redirect URI, PKCE challenge, school and user) and exchanged at the real token endpoint on
the public origin, so every token and refresh token is the system's own.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import aiohttp
import asyncpg
import orjson

from libs.common.config import Settings

REDIRECT_URI = "https://app.example.com/callback"
SCOPES = ("openid", "courses:read", "courses:write", "students:read")
# The workload's calls must never meet the client's rate limit: its 429s would be the
# workload's doing, not a fault's.
RATE_LIMIT_PER_MINUTE = 100_000_000


@dataclass(frozen=True, slots=True)
class World:
    school_id: int
    subdomain: str
    user_id: UUID
    app_id: str
    public_url: str  # where the load balancer (or the only gateway) listens
    host: str  # the school's Host on it

    def headers(self, token: str | None = None, **extra: str) -> dict[str, str]:
        headers = {"Host": self.host, **extra}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return headers


async def seed(pool: asyncpg.Pool, settings: Settings, public_url: str, port: int) -> World:
    """A school of its own (a fresh subdomain each run), an admin user, a public app."""
    from services.identity import clients, schools, users
    from services.school_api.seed import seed_school

    subdomain = f"faults{secrets.token_hex(3)}"
    school = await schools.create_school(pool, settings, subdomain, "Fault Suite School")
    await seed_school(pool, school.id, "Fault Suite School")
    user, _ = await users.create_user(
        pool,
        school_id=school.id,
        email=f"faults-{secrets.token_hex(4)}@example.com",
        password=secrets.token_urlsafe(16),
        name="Fault Suite",
        # Staff who connect apps: a member's grant of write scopes ends at its first refresh.
        role="admin",
    )
    app = await clients.create_client(
        pool,
        settings,
        school=school,
        name="Fault Suite App",
        redirect_uris=[REDIRECT_URI],
        public=True,
        scopes=SCOPES,
    )
    await pool.execute(
        "UPDATE clients SET rate_limit_per_minute = $2 WHERE id = $1",
        app.client.id,
        RATE_LIMIT_PER_MINUTE,
    )
    return World(
        school_id=school.id,
        subdomain=school.subdomain,
        user_id=user.id,
        app_id=app.client.id,
        public_url=public_url,
        host=f"{school.subdomain}.localhost:{port}",
    )


async def mint_code(pool: asyncpg.Pool, world: World, ttl: int = 60) -> dict[str, str]:
    """A code on a grant of its own; returns the token request's form that redeems it."""
    from services.identity import credentials, pkce

    verifier = secrets.token_urlsafe(48)
    code = credentials.new_secret(credentials.AUTHORIZATION_CODE_PREFIX)
    async with pool.acquire() as conn, conn.transaction():
        grant_id = await conn.fetchval(
            "INSERT INTO grants (school_id, client_id, user_id, scopes, last_used_at)"
            " VALUES ($1, $2, $3, $4, now()) RETURNING id",
            world.school_id,
            world.app_id,
            world.user_id,
            list(SCOPES),
        )
        await conn.execute(
            "INSERT INTO authorization_codes (code_hash, grant_id, client_id, school_id,"
            " user_id, redirect_uri, scopes, code_challenge, nonce, resource, auth_time,"
            " expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, NULL,"
            " now() - interval '5 seconds', now() + make_interval(secs => $9))",
            credentials.token_hash(code),
            grant_id,
            world.app_id,
            world.school_id,
            world.user_id,
            REDIRECT_URI,
            list(SCOPES),
            pkce.s256_challenge(verifier),
            ttl,
        )
    return {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier,
        "client_id": world.app_id,
    }


async def post_form(
    http: aiohttp.ClientSession, world: World, path: str, form: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    """POST a form to the public origin: (status, JSON body or {}); status 0 when no answer."""
    try:
        async with http.post(world.public_url + path, data=form, headers=world.headers()) as resp:
            raw = await resp.read()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError):
        return 0, {}
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        body = {}
    return status, body if isinstance(body, dict) else {}
