"""Shared steps of the token tests: a school with a user and clients, codes as the authorize
flow stores them, token requests over real HTTP, and verification against the served JWKS."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus
from uuid import UUID

import orjson
from joserfc import jws
from joserfc.jwk import KeySet

from libs.common import keys, streams
from libs.common.config import Settings
from services.identity import clients, credentials, grants, schools, store, users
from tests.support import identity_records

REDIRECT_URI = "https://app.example.com/callback"
PASSWORD = "correct horse battery"


@dataclass(frozen=True)
class World:
    """One school, one user (an admin unless told), a confidential and a public client, and
    where they live."""

    school: store.School
    user: store.User
    confidential: store.Client
    secret: str
    public: store.Client
    origin: str


def origin_of(subdomain: str, port: int) -> str:
    return f"http://{subdomain}.localhost:{port}"


async def make_world(
    pool: Any,
    settings: Settings,
    unique: str,
    port: int,
    *,
    label: str = "tok",
    scopes: Sequence[str] = ("openid", "profile", "email", "read", "courses:read", "students:read"),
    grant_types: Sequence[str] = ("authorization_code", "refresh_token"),
    user_name: str | None = "Ada Lovelace",
    role: str = "admin",
) -> World:
    school = await schools.create_school(
        pool, settings, f"{label}{unique}{secrets.token_hex(2)}", "Token School"
    )
    user, _ = await users.create_user(
        pool,
        school_id=school.id,
        email=f"{label}-{unique}-{secrets.token_hex(3)}@example.com",
        password=PASSWORD,
        name=user_name,
        # An admin by default, the one who connects apps (seed 000): a member's grant of these
        # data scopes would be revoked at its first refresh, being beyond a member's role.
        role=role,
    )
    confidential = await clients.create_client(
        pool,
        settings,
        school=school,
        name="Confidential App",
        redirect_uris=[REDIRECT_URI],
        scopes=scopes,
        grant_types=grant_types,
    )
    public = await clients.create_client(
        pool,
        settings,
        school=school,
        name="Public App",
        redirect_uris=[REDIRECT_URI],
        public=True,
        scopes=scopes,
    )
    assert confidential.client_secret is not None
    return World(
        school,
        user,
        confidential.client,
        confidential.client_secret,
        public.client,
        origin_of(school.subdomain, port),
    )


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def insert_code(
    pool: Any,
    settings: Settings,
    *,
    school_id: int,
    client_id: str,
    user_id: UUID,
    scopes: Sequence[str],
    challenge: str,
    redirect_uri: str = REDIRECT_URI,
    nonce: str | None = None,
    resource: str | None = None,
    grant_id: UUID | None = None,
) -> tuple[str, UUID]:
    """A code exactly as the authorize flow stores it: hashed, bound to a consent grant."""
    if grant_id is None:
        grant = await grants.create_grant(
            pool, school_id=school_id, client_id=client_id, user_id=user_id, scopes=scopes
        )
        grant_id = grant.id
    code = credentials.new_secret(credentials.AUTHORIZATION_CODE_PREFIX)
    await pool.execute(
        "INSERT INTO authorization_codes (code_hash, grant_id, client_id, school_id, user_id,"
        " redirect_uri, scopes, code_challenge, nonce, resource, auth_time, expires_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now() - interval '5 seconds',"
        " now() + make_interval(secs => $11))",
        credentials.token_hash(code),
        grant_id,
        client_id,
        school_id,
        user_id,
        redirect_uri,
        list(scopes),
        challenge,
        nonce,
        resource,
        settings.tokens.authorization_code_ttl,
    )
    return code, grant_id


def basic(client_id: str, secret: str) -> str:
    """RFC 6749 2.3.1: each part form-urlencoded, then HTTP Basic."""
    raw = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return "Basic " + base64.b64encode(raw).decode()


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]
    headers: Any


async def post_form(
    http: Any,
    url: str,
    data: dict[str, str],
    *,
    authorization: str | None = None,
) -> Answer:
    headers = {"Authorization": authorization} if authorization else {}
    async with http.post(url, data=data, headers=headers) as resp:
        raw = await resp.read()
        body = orjson.loads(raw) if raw else {}
        return Answer(resp.status, body, resp.headers)


async def token(
    http: Any, world_origin: str, data: dict[str, str], *, authorization: str | None = None
) -> Answer:
    return await post_form(
        http, world_origin + "/v1/oauth/token", data, authorization=authorization
    )


async def redeem(
    http: Any,
    origin: str,
    code: str,
    verifier: str,
    *,
    client_id: str,
    secret: str | None,
    redirect_uri: str = REDIRECT_URI,
) -> Answer:
    """The client's authorization_code request with its PKCE verifier: a confidential client
    authenticates with HTTP Basic, a public one (`secret` None) names itself in the form."""
    data = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "code_verifier": verifier,
    }
    if secret is None:
        return await token(http, origin, {**data, "client_id": client_id})
    return await token(http, origin, data, authorization=basic(client_id, secret))


async def code_grant(
    http: Any,
    pool: Any,
    settings: Settings,
    origin: str,
    *,
    school_id: int,
    client_id: str,
    secret: str | None,
    user_id: UUID,
    scopes: Sequence[str],
    redirect_uri: str = REDIRECT_URI,
    nonce: str | None = None,
) -> tuple[Answer, UUID]:
    """A code inserted (as authorize stores it) and redeemed at `origin`; returns the token
    answer and the grant id."""
    verifier, challenge = pkce_pair()
    code, grant_id = await insert_code(
        pool,
        settings,
        school_id=school_id,
        client_id=client_id,
        user_id=user_id,
        scopes=scopes,
        challenge=challenge,
        redirect_uri=redirect_uri,
        nonce=nonce,
    )
    answer = await redeem(
        http,
        origin,
        code,
        verifier,
        client_id=client_id,
        secret=secret,
        redirect_uri=redirect_uri,
    )
    return answer, grant_id


async def code_flow(
    http: Any,
    pool: Any,
    settings: Settings,
    world: World,
    *,
    scopes: Sequence[str] = ("read", "courses:read", "students:read"),
    nonce: str | None = None,
    public: bool = False,
) -> tuple[Answer, UUID]:
    """Insert a code for the world's user and exchange it; returns the token answer and the
    grant id."""
    client = world.public if public else world.confidential
    return await code_grant(
        http,
        pool,
        settings,
        world.origin,
        school_id=world.school.id,
        client_id=client.id,
        secret=None if public else world.secret,
        user_id=world.user.id,
        scopes=scopes,
        nonce=nonce,
    )


async def refresh(http: Any, world: World, refresh_token: str, **extra: str) -> Answer:
    return await token(
        http,
        world.origin,
        {"grant_type": "refresh_token", "refresh_token": refresh_token, **extra},
        authorization=basic(world.confidential.id, world.secret),
    )


async def introspect(http: Any, world: World, value: str) -> dict[str, Any]:
    answer = await post_form(
        http,
        world.origin + "/v1/oauth/introspect",
        {"token": value},
        authorization=basic(world.confidential.id, world.secret),
    )
    assert answer.status == 200, answer.body
    return answer.body


async def served_jwks(http: Any, origin: str) -> KeySet:
    async with http.get(origin + "/v1/oauth/jwks") as resp:
        assert resp.status == 200
        return KeySet.import_key_set(await resp.json())


async def verify_with_jwks(
    http: Any, origin: str, value: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a token, its signature checked against the JWKS fetched over HTTP."""
    key_set = await served_jwks(http, origin)
    header = orjson.loads(base64.urlsafe_b64decode(value.split(".")[0] + "=="))
    key = key_set.get_by_kid(header["kid"])
    obj = jws.deserialize_compact(value, key, algorithms=[header["alg"]])
    return obj.headers(), orjson.loads(obj.payload or b"{}")


async def revocation_marked(redis: Any, settings: Settings, grant_id: UUID) -> tuple[bool, bool]:
    """(the Redis mark exists, connect:revocations names the grant) — what gateways rely on."""
    # The mark is in its school's slot; found by its grant id alone.
    pattern = keys.revoked_pattern(settings).removesuffix("*") + str(grant_id)
    mark = [k async for k in redis.scan_iter(match=pattern, count=1000)]
    entries = await redis.xrevrange(settings.stream(streams.REVOCATIONS), count=500)
    announced = any(
        orjson.loads(fields[b"data"]).get("grant_id") == str(grant_id) for _, fields in entries
    )
    return bool(mark), announced


async def audit_actions(redis: Any, settings: Settings, grant_id: UUID | str) -> list[str]:
    """Actions identity recorded for one grant, oldest first (in audit_log, written with what
    they record)."""
    return [r["action"] for r in await identity_records(settings.database_url, grant_id=grant_id)]
