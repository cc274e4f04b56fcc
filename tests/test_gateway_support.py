"""Shared pieces of the gateway tests (no tests here): a real echo upstream, schools with
clients and grants, access tokens signed the way identity signs them, extra gateways."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import orjson
import pytest
from aiohttp import web
from joserfc import jws

from libs.common.config import Settings, load_settings
from services.identity import clients, grants, keys, schools, store, users
from tests.support import free_port, running

PARTNER_ORIGIN = "https://partner.example"
OTHER_ORIGIN = "https://other-partner.example"


# The echo upstream ----------------------------------------------------------------------------


async def _echo(request: web.Request) -> web.StreamResponse:
    """Answers with what it received: method, path, query and every header, in order."""
    tail = request.match_info["tail"]
    if tail.endswith("slow"):
        await asyncio.sleep(float(request.query.get("s", "5")))
    if tail.endswith("large"):
        size = int(request.query.get("bytes", str(8 * 1024 * 1024)))
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        chunk = bytes(range(256)) * 256  # 64 KiB, deterministic
        sent = 0
        while sent < size:
            piece = chunk[: min(len(chunk), size - sent)]
            await response.write(piece)
            sent += len(piece)
        await response.write_eof()
        return response
    if tail.endswith("broken"):
        # Starts a long answer, then dies: the gateway must not pass it on as complete.
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        await response.write(b"x" * 512 * 1024)
        await asyncio.sleep(0.05)
        if request.transport is not None:
            request.transport.abort()
        return response
    digest = hashlib.sha256()
    length = 0
    async for piece in request.content.iter_chunked(64 * 1024):
        digest.update(piece)
        length += len(piece)
    body = {
        "method": request.method,
        "path": request.path,
        "raw_path": request.raw_path,
        "headers": [[k, v] for k, v in request.headers.items()],
        "body_length": length,
        "body_sha256": digest.hexdigest(),
        "chunked": request.headers.get("Transfer-Encoding", "").lower() == "chunked",
    }
    headers: dict[str, str] = {}
    if tail.endswith("hop"):
        headers = {
            "Connection": "X-Upstream-Hop",
            "X-Upstream-Hop": "must not pass",
            "Keep-Alive": "timeout=5",
            "Proxy-Authenticate": "Basic",
            "X-Upstream-Kept": "yes",
        }
    if tail.endswith("cors"):
        headers = {"Access-Control-Allow-Origin": "*", "Vary": "Accept-Encoding"}
    if tail.endswith("redirect"):
        return web.Response(
            status=302,
            headers={
                "Location": "https://elsewhere.example/next",
                "Set-Cookie": "upstream_session=abc123; Path=/; HttpOnly",
            },
        )
    return web.Response(
        body=orjson.dumps(body), content_type="application/json", headers=headers or None
    )


def echo_app() -> web.Application:
    app = web.Application(client_max_size=1024**3)
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app


def received_headers(body: dict[str, Any]) -> dict[str, list[str]]:
    """The echo's headers by lower-cased name (a list, to see duplicates)."""
    out: dict[str, list[str]] = {}
    for name, value in body["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


# Schools, clients, grants ---------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    school: store.School
    user: store.User
    client: store.Client  # confidential, client_credentials, origin PARTNER_ORIGIN
    secret: str
    other: store.Client  # another client of the school, origin OTHER_ORIGIN
    other_secret: str
    gateway_port: int

    @property
    def host(self) -> str:
        """The Host of the school's public origin (through the gateway)."""
        return f"{self.school.subdomain}.localhost:{self.gateway_port}"

    @property
    def origin(self) -> str:
        return f"http://{self.host}"


async def make_world(
    pool: Any,
    settings: Settings,
    label: str,
    gateway_port: int,
    *,
    scopes: Sequence[str] = ("read", "write", "courses:read", "students:read", "school:read"),
) -> World:
    # An explicit id far above the seeded ones: the identity sequence stays where other tests
    # expect it (the quickstart's `demo` school is created with school_id 42).
    school = await schools.create_school(
        pool,
        settings,
        f"gw{label}{secrets.token_hex(3)}",
        f"Gateway {label}",
        1_000_000 + secrets.randbelow(1_000_000_000),
    )
    user, _ = await users.create_user(
        pool,
        school_id=school.id,
        email=f"gw-{label}-{secrets.token_hex(4)}@example.com",
        password="correct horse battery",
        name="Grace Hopper",
    )
    made = await clients.create_client(
        pool,
        settings,
        school=school,
        name="Partner App",
        redirect_uris=["https://partner.example/callback"],
        scopes=scopes,
        origins=[PARTNER_ORIGIN],
        grant_types=["authorization_code", "refresh_token", "client_credentials"],
    )
    other = await clients.create_client(
        pool,
        settings,
        school=school,
        name="Other App",
        redirect_uris=["https://other-partner.example/callback"],
        scopes=scopes,
        origins=[OTHER_ORIGIN],
        grant_types=["authorization_code", "refresh_token", "client_credentials"],
    )
    assert made.client_secret is not None
    assert other.client_secret is not None
    return World(
        school,
        user,
        made.client,
        made.client_secret,
        other.client,
        other.client_secret,
        gateway_port,
    )


async def user_grant(pool: Any, world: World, scopes: Sequence[str], client_id: str = "") -> UUID:
    grant = await grants.create_grant(
        pool,
        school_id=world.school.id,
        client_id=client_id or world.client.id,
        user_id=world.user.id,
        scopes=list(scopes),
    )
    return grant.id


# Tokens ---------------------------------------------------------------------------------------


def sign(key: Any, header: dict[str, Any], claims: dict[str, Any]) -> str:
    return jws.serialize_compact(header, orjson.dumps(claims), key, algorithms=[header["alg"]])


def access_claims(
    settings: Settings,
    world: World,
    grant_id: UUID,
    scope: str,
    /,
    *,
    client_id: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """The claims identity puts in an access token (services/identity/minting.py)."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": settings.urls.school_origin(world.school.subdomain),
        "sub": str(world.user.id),
        "aud": settings.urls.school_origin(world.school.subdomain),
        "client_id": client_id or world.client.id,
        "scope": scope,
        "school_id": world.school.id,
        "school_subdomain": world.school.subdomain,
        "jti": secrets.token_urlsafe(16),
        "iat": now,
        "exp": now + 7200,
        "grant_id": str(grant_id),
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


async def mint(
    keyring: keys.KeyRing,
    school_id: int | None,
    claims: dict[str, Any],
    *,
    alg: str = "ES256",
    typ: str = "at+jwt",
    **header: Any,
) -> str:
    """Sign as identity does: the issuer's current key of `alg`, its kid, `typ`."""
    signer = await keyring.signer(school_id, alg)
    return sign(signer.key, {"alg": alg, "kid": signer.kid, "typ": typ, **header}, claims)


async def real_token(
    http: Any, base: str, world: World, *, scope: str | None = None, other: bool = False
) -> dict[str, Any]:
    """A token from identity's token endpoint (client_credentials) through the gateway."""
    import aiohttp

    client, secret = (world.other, world.other_secret) if other else (world.client, world.secret)
    form = {"grant_type": "client_credentials"}
    if scope:
        form["scope"] = scope
    async with http.post(
        f"{base}/v1/oauth/token",
        data=form,
        headers={"Host": world.host, "Authorization": aiohttp.encode_basic_auth(client.id, secret)},
    ) as resp:
        body: dict[str, Any] = await resp.json()
        assert resp.status == 200, body
        return body


# Extra gateways -------------------------------------------------------------------------------


@asynccontextmanager
async def extra_gateway(
    gateway_env: dict[str, str], routes_file: str | None = None, **env: str
) -> AsyncIterator[str]:
    """Another gateway of the same system (same public origins) on a port of its own, with
    `env` changed; yields its 127.0.0.1 base URL (send the school's Host header)."""
    from services.gateway.app import create_app

    settings = load_settings({**gateway_env, **env})
    async with running(create_app(settings, routes_file=routes_file), free_port()) as url:
        yield url


@pytest.fixture(scope="module")
async def echo_upstream(gateway_upstream_port: int) -> AsyncIterator[str]:
    """The echo upstream where the gateway expects the school API (import it to use it)."""
    async with running(echo_app(), gateway_upstream_port) as url:
        yield url
