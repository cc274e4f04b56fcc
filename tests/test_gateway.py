"""The gateway on real sockets: identity behind it, a real echo upstream, real tokens.

Every check of contract section 6, in its order; the upstream contract (identity headers,
hop-by-hop, streaming, failures); CORS, rate limits, the audit trail and the probes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from joserfc.jwk import ECKey
from yarl import URL

from libs.common import streams
from libs.common.config import Settings
from services.identity import audit, clients, keys, store
from tests.support import free_port
from tests.test_gateway_support import (
    OTHER_ORIGIN,
    PARTNER_ORIGIN,
    World,
    access_claims,
    echo_upstream,
    extra_gateway,
    make_world,
    mint,
    real_token,
    received_headers,
    sign,
    user_grant,
)

__all__ = ["echo_upstream"]

pytestmark = pytest.mark.usefixtures("echo_upstream")


@pytest.fixture(scope="module")
def keyring(pool: Any, gateway_settings: Settings) -> keys.KeyRing:
    return keys.KeyRing(pool, gateway_settings)


@pytest.fixture(scope="module")
async def world(pool: Any, gateway_settings: Settings, gateway_port: int) -> World:
    return await make_world(pool, gateway_settings, "a", gateway_port)


@pytest.fixture(scope="module")
async def world_b(pool: Any, gateway_settings: Settings, gateway_port: int) -> World:
    return await make_world(pool, gateway_settings, "b", gateway_port)


def _headers(host: str, token: str | None = None, **extra: str) -> dict[str, str]:
    headers = {"Host": host}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    headers.update(extra)
    return headers


async def _token(
    keyring: keys.KeyRing, settings: Settings, pool: Any, world: World, scope: str
) -> str:
    grant_id = await user_grant(pool, world, scope.split())
    return await mint(keyring, world.school.id, access_claims(settings, world, grant_id, scope))


async def _get(
    http: Any, url: str, host: str, token: str | None = None, **extra: str
) -> tuple[int, Any, Any]:
    async with http.get(url, headers=_headers(host, token, **extra)) as resp:
        text = await resp.text()
        body = orjson.loads(text) if text and resp.content_type == "application/json" else text
        return resp.status, resp.headers, body


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# Public routes ---------------------------------------------------------------------------------


async def test_discovery_passes_through_with_the_host_kept(
    gateway_url: str, http: Any, world: World, gateway_port: int
) -> None:
    """Identity answers for the school the Host names: the issuer is the gateway origin."""
    url = f"http://{world.host}/.well-known/openid-configuration"
    async with http.get(url) as resp:
        assert resp.status == 200
        meta = await resp.json()
    assert meta["issuer"] == world.origin
    async with http.get(f"http://localhost:{gateway_port}/.well-known/openid-configuration") as r:
        assert (await r.json())["issuer"] == f"http://localhost:{gateway_port}"
    # An unknown school is identity's 404; a Host that is no origin of ours is the gateway's.
    async with http.get(
        f"http://nosuchschool.localhost:{gateway_port}/.well-known/openid-configuration"
    ) as resp:
        assert resp.status == 404
    status, _, body = await _get(
        http, gateway_url + "/.well-known/openid-configuration", "evil.example.com"
    )
    assert status == 404
    assert body["error"] == "not_found"


async def test_real_tokens_from_the_token_endpoint_work_through_the_gateway(
    gateway_url: str, http: Any, world: World, gateway_settings: Settings
) -> None:
    issued = await real_token(http, gateway_url, world, scope="courses:read")
    assert issued["school_id"] == world.school.id
    status, headers, body = await _get(
        http, gateway_url + "/api/v1/courses?limit=5", world.host, issued["access_token"]
    )
    assert status == 200, body
    seen = received_headers(body)
    assert seen["x-connect-school-id"] == [str(world.school.id)]
    assert seen["x-connect-client-id"] == [world.client.id]
    assert seen["x-connect-subject"] == [world.client.id]
    assert seen["x-connect-scopes"] == ["courses:read"]
    assert seen["x-connect-internal-token"] == [gateway_settings.internal_token]
    assert body["raw_path"] == "/api/v1/courses?limit=5"
    assert headers["RateLimit-Limit"] == "100"
    # The quickstart's alias of the token endpoint works the same way.
    async with http.post(
        gateway_url + "/api/oauth/token",
        data={"grant_type": "client_credentials", "scope": "students:read"},
        headers={
            "Host": world.host,
            "Authorization": aiohttp.encode_basic_auth(world.client.id, world.secret),
        },
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["scope"] == "students:read"


@pytest.fixture
def echo_public_routes(tmp_path: Path, gateway_settings: Settings) -> str:
    """The default route table plus a public route to the echo upstream."""
    routes = tmp_path / "routes.toml"
    routes.write_text(
        Path(gateway_settings.gateway.routes_file).read_text()
        + '\n[[public]]\nprefix = "/echo-public"\nupstream = "school_api"\n'
    )
    return str(routes)


async def test_public_routes_pass_redirects_and_cookies_back_untouched(
    http: Any, world: World, gateway_env: dict[str, str], echo_public_routes: str
) -> None:
    async with extra_gateway(gateway_env, echo_public_routes) as base:
        async with http.get(
            base + "/echo-public/redirect",
            headers={"Host": world.host, "Cookie": "sid=1"},
            allow_redirects=False,
        ) as resp:
            assert resp.status == 302
            assert resp.headers["Location"] == "https://elsewhere.example/next"
            assert resp.headers["Set-Cookie"] == "upstream_session=abc123; Path=/; HttpOnly"
        async with http.get(
            base + "/echo-public/x",
            headers={
                "Host": world.host,
                "Cookie": "sid=1",
                "Authorization": "Basic abc",
                "X-Connect-School-Id": "999",
                "X-Forwarded-For": "6.6.6.6",
            },
        ) as resp:
            seen = received_headers(await resp.json())
        # Public calls keep the caller's credentials (identity needs its cookies and client
        # authentication) but never a claimed identity or a forged forwarding chain.
        assert seen["host"] == [world.host]
        assert seen["cookie"] == ["sid=1"]
        assert seen["authorization"] == ["Basic abc"]
        assert "x-connect-school-id" not in seen
        assert seen["x-forwarded-for"] == ["127.0.0.1"]
        assert seen["x-forwarded-proto"] == ["http"]


# Protected routes: the checks in order ---------------------------------------------------------


async def test_no_token_is_401_with_a_bare_challenge(
    gateway_url: str, http: Any, world: World
) -> None:
    for extra in ({}, {"Authorization": "Basic dXNlcjpwYXNz"}):
        status, headers, body = await _get(
            http, gateway_url + "/api/v1/courses", world.host, **extra
        )
        assert status == 401
        assert headers["WWW-Authenticate"] == 'Bearer realm="loopwise-connect"'
        assert body["error"] == "unauthorized"


async def test_a_token_of_school_a_is_refused_at_school_b(
    gateway_url: str,
    http: Any,
    world: World,
    world_b: World,
    keyring: keys.KeyRing,
    gateway_settings: Settings,
    pool: Any,
) -> None:
    token = await _token(keyring, gateway_settings, pool, world, "courses:read")
    status, _, _ = await _get(http, gateway_url + "/api/v1/courses", world.host, token)
    assert status == 200
    status, headers, body = await _get(http, gateway_url + "/api/v1/courses", world_b.host, token)
    assert status == 401
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert body["error"] == "invalid_token"
    assert token not in str(body)
    # Signed by A but claiming to be B's (iss, aud, school_id): B's keys refuse it.
    grant_id = await user_grant(pool, world, ["courses:read"])
    claims = access_claims(gateway_settings, world, grant_id, "courses:read")
    claims.update(
        iss=world_b.origin,
        aud=world_b.origin,
        school_id=world_b.school.id,
        client_id=world_b.client.id,
    )
    forged = await mint(keyring, world.school.id, claims)
    status, _, _ = await _get(http, gateway_url + "/api/v1/courses", world_b.host, forged)
    assert status == 401


async def test_a_token_without_the_scope_is_403_naming_it(
    gateway_url: str,
    http: Any,
    world: World,
    keyring: keys.KeyRing,
    gateway_settings: Settings,
    pool: Any,
) -> None:
    token = await _token(keyring, gateway_settings, pool, world, "students:read")
    status, headers, body = await _get(http, gateway_url + "/api/v1/courses", world.host, token)
    assert status == 403
    assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    assert 'scope="courses:read"' in headers["WWW-Authenticate"]
    assert body == {
        "error": "insufficient_scope",
        "error_description": "The access token does not hold the scope this call needs",
        "scope": "courses:read",
    }
    # Any-of: the appearance reads with appearance:read or school:read; the 403 names both.
    look = gateway_url + "/api/v1/settings/appearance"
    status, headers, _ = await _get(http, look, world.host, token)
    assert status == 403
    assert 'scope="appearance:read school:read"' in headers["WWW-Authenticate"]
    appearance = await _token(keyring, gateway_settings, pool, world, "appearance:read")
    status, _, _ = await _get(http, look, world.host, appearance)
    assert status == 200
    # The longest prefix wins: the whole settings stay school:read's (seed 002).
    status, headers, _ = await _get(http, gateway_url + "/api/v1/settings", world.host, appearance)
    assert status == 403
    assert 'scope="school:read"' in headers["WWW-Authenticate"]
    # A write needs the write scope even when reads are allowed.
    async with http.post(
        gateway_url + "/api/v1/members", headers=_headers(world.host, token), json={}
    ) as resp:
        assert resp.status == 403
        assert 'scope="students:write"' in resp.headers["WWW-Authenticate"]


async def test_umbrella_scopes_are_honoured(
    gateway_url: str,
    http: Any,
    world: World,
    keyring: keys.KeyRing,
    gateway_settings: Settings,
    pool: Any,
) -> None:
    read = await _token(keyring, gateway_settings, pool, world, "read")
    for path in ("/api/v1/courses", "/api/v1/members/7", "/api/v1/analytics", "/api/v1/orders"):
        status, _, body = await _get(http, gateway_url + path, world.host, read)
        assert status == 200, (path, body)
        assert received_headers(body)["x-connect-scopes"] == ["read"]
    async with http.post(
        gateway_url + "/api/v1/courses", headers=_headers(world.host, read), json={"t": 1}
    ) as resp:
        assert resp.status == 403
    write = await _token(keyring, gateway_settings, pool, world, "write")
    async with http.patch(
        gateway_url + "/api/v1/courses/3", headers=_headers(world.host, write), json={"t": 1}
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["method"] == "PATCH"


async def test_bad_tokens_are_401_and_never_echoed(
    gateway_url: str,
    http: Any,
    world: World,
    keyring: keys.KeyRing,
    gateway_settings: Settings,
    pool: Any,
) -> None:
    settings = gateway_settings
    grant_id = await user_grant(pool, world, ["courses:read"])
    now = int(time.time())

    def claims(**overrides: Any) -> dict[str, Any]:
        scope = overrides.pop("scope", "courses:read")
        return access_claims(settings, world, grant_id, scope, **overrides)

    good = await mint(keyring, world.school.id, claims())
    signer = await keyring.signer(world.school.id, "ES256")
    public_pem = signer.key.as_pem(private=False)
    header_b64, payload_b64, signature_b64 = good.split(".")

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    def hs256(secret: bytes) -> str:
        header = b64(orjson.dumps({"alg": "HS256", "kid": signer.kid, "typ": "at+jwt"}))
        payload = b64(orjson.dumps(claims()))
        mac = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{b64(mac)}"

    stranger = ECKey.generate_key("P-256", private=True)
    tampered_payload = b64(orjson.dumps(claims(scope="courses:read courses:write write")))
    id_token_claims = claims(aud=world.client.id, azp=world.client.id)

    cases = {
        "expired": await mint(keyring, world.school.id, claims(iat=now - 9000, exp=now - 1800)),
        "not yet valid": await mint(keyring, world.school.id, claims(nbf=now + 3600)),
        "wrong aud": await mint(
            keyring, world.school.id, claims(aud=f"{settings.urls.platform_url}/mcp")
        ),
        "wrong iss": await mint(
            keyring, world.school.id, claims(iss="http://evil.localhost:1", aud=world.origin)
        ),
        "alg none": b64(orjson.dumps({"alg": "none", "typ": "at+jwt", "kid": signer.kid}))
        + f".{payload_b64}.",
        "HS256 with the public key": hs256(public_pem),
        "tampered payload": f"{header_b64}.{tampered_payload}.{signature_b64}",
        "unknown kid": sign(
            stranger, {"alg": "ES256", "kid": "not-a-kid-of-ours", "typ": "at+jwt"}, claims()
        ),
        "ID token (typ JWT)": await mint(
            keyring, world.school.id, id_token_claims, alg="RS256", typ="JWT"
        ),
        "access claims with typ JWT": await mint(keyring, world.school.id, claims(), typ="JWT"),
        "no school_id": await mint(keyring, world.school.id, claims(school_id=None)),
        "grant id not a UUID": await mint(keyring, world.school.id, claims(grant_id="abc")),
        "unknown client": await mint(keyring, world.school.id, claims(client_id="lc_nobody")),
        "garbage": "not.a.token",
        "empty": "",
    }
    for name, token in cases.items():
        status, headers, body = await _get(http, gateway_url + "/api/v1/courses", world.host, token)
        assert status == 401, name
        assert 'error="invalid_token"' in headers["WWW-Authenticate"], name
        assert body["error"] == "invalid_token", name
        if token:
            assert token not in str(body) and token not in str(dict(headers)), name
    status, _, body = await _get(http, gateway_url + "/api/v1/courses", world.host, good)
    assert status == 200, body


async def test_a_token_of_bytes_that_are_not_text_is_401(gateway_url: str, world: World) -> None:
    """Sent over a raw socket: no client library lets a header carry such bytes, an attacker's
    socket does."""
    port = URL(gateway_url).port
    for token in (b"a\xffb", b"eyJhbGciOiJFUzI1NiJ9.\xc3\x28.x"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                b"GET /api/v1/courses HTTP/1.1\r\nHost: "
                + world.host.encode()
                + b"\r\nAuthorization: Bearer "
                + token
                + b"\r\nConnection: close\r\n\r\n"
            )
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1")
        assert head.startswith("HTTP/1.1 401"), (token, head)
        assert 'error="invalid_token"' in head


async def test_platform_tokens_are_accepted_for_the_school_they_were_granted_for(
    gateway_url: str,
    http: Any,
    world: World,
    world_b: World,
    keyring: keys.KeyRing,
    gateway_settings: Settings,
    pool: Any,
) -> None:
    """A platform-level client's token (issued by the platform, the user having picked this
    school) works at that school's host only, and only for the school's API audience."""
    settings = gateway_settings
    made = await clients.create_client(
        pool,
        settings,
        school=None,
        name="MCP Client",
        redirect_uris=["http://127.0.0.1/callback"],
        public=True,
        scopes=["courses:read"],
    )
    await keys.ensure_issuer_keys(pool, settings, None)
    grant_id = await user_grant(pool, world, ["courses:read"], client_id=made.client.id)
    claims = access_claims(settings, world, grant_id, "courses:read", client_id=made.client.id)
    claims["iss"] = settings.urls.platform_url
    token = await mint(keyring, None, claims)
    status, _, body = await _get(http, gateway_url + "/api/v1/courses", world.host, token)
    assert status == 200, body
    assert received_headers(body)["x-connect-client-id"] == [made.client.id]
    assert (await _get(http, gateway_url + "/api/v1/courses", world_b.host, token))[0] == 401
    mcp = await mint(keyring, None, {**claims, "aud": f"{settings.urls.platform_url}/mcp"})
    assert (await _get(http, gateway_url + "/api/v1/courses", world.host, mcp))[0] == 401
    # A school's own client cannot present a platform-issued token.
    school_client = await mint(keyring, None, {**claims, "client_id": world.client.id})
    assert (await _get(http, gateway_url + "/api/v1/courses", world.host, school_client))[0] == 401


async def test_a_disabled_client_is_refused(
    gateway_url: str,
    http: Any,
    pool: Any,
    gateway_settings: Settings,
    gateway_port: int,
    keyring: keys.KeyRing,
) -> None:
    world = await make_world(pool, gateway_settings, "dis", gateway_port)
    token = await _token(keyring, gateway_settings, pool, world, "courses:read")
    await store.update_client(pool, world.client.id, disabled_at=datetime.now(UTC))
    status, _, _ = await _get(http, gateway_url + "/api/v1/courses", world.host, token)
    assert status == 401


async def test_routing_answers(
    gateway_url: str,
    http: Any,
    world: World,
    keyring: keys.KeyRing,
    gateway_settings: Settings,
    pool: Any,
    gateway_port: int,
) -> None:
    token = await _token(keyring, gateway_settings, pool, world, "read write")
    # No route, an unknown school, the platform host: 404 before any token is looked at.
    assert (await _get(http, gateway_url + "/nowhere", world.host, token))[0] == 404
    assert (await _get(http, gateway_url + "/api/v1/coursesX", world.host, token))[0] == 404
    unknown = f"nosuch{secrets.token_hex(3)}.localhost:{gateway_port}"
    assert (await _get(http, gateway_url + "/api/v1/courses", unknown, token))[0] == 404
    platform = f"localhost:{gateway_port}"
    assert (await _get(http, gateway_url + "/api/v1/courses", platform, token))[0] == 404
    # A method the route does not name.
    async with http.delete(
        gateway_url + "/api/v1/orders/1", headers=_headers(world.host, token)
    ) as resp:
        assert resp.status == 405
        assert resp.headers["Allow"] == "GET, HEAD"
    # Paths not in normal form never reach an upstream under another route's scope.
    for raw in (
        "/api/v1/courses/..%2Fmembers",
        "/api/v1/courses/%2e%2e/members",
        "/api/v1/courses/../members",
        "/api/v1/courses//x",
    ):
        async with http.get(
            URL(gateway_url + raw, encoded=True), headers=_headers(world.host, token)
        ) as resp:
            assert resp.status == 400, raw
    # HEAD follows GET's scopes and gets no body.
    async with http.head(gateway_url + "/api/v1/courses", headers=_headers(world.host, token)) as r:
        assert r.status == 200
        assert await r.read() == b""


# Upstream contract ----------------------------------------------------------------------------


async def test_identity_headers_are_stripped_and_replaced(
    gateway_url: str,
    http: Any,
    world: World,
    keyring: keys.KeyRing,
    gateway_settings: Settings,
    pool: Any,
) -> None:
    grant_id = await user_grant(pool, world, ["courses:read"])
    token = await mint(
        keyring,
        world.school.id,
        access_claims(gateway_settings, world, grant_id, "courses:read"),
    )
    spoofed = {
        "X-Connect-School-Id": "999",
        "x-connect-subject": "someone-else",
        "X-Connect-Client-Id": "lc_evil",
        "X-Connect-Scopes": "write",
        "X-Connect-Grant-Id": "00000000-0000-0000-0000-000000000000",
        "X-Connect-Internal-Token": "guessed",
        "X-Connect-Anything": "1",
        "X-Forwarded-For": "6.6.6.6",
        "X-Forwarded-Host": "evil.example",
        "Forwarded": "for=6.6.6.6",
        "Cookie": "lc_session=secret",
        "X-Request-Id": "caller-chosen-id",
    }
    status, headers, body = await _get(
        http, gateway_url + "/api/v1/courses/1/reviews", world.host, token, **spoofed
    )
    assert status == 200
    seen = received_headers(body)
    assert seen["x-connect-school-id"] == [str(world.school.id)]
    assert seen["x-connect-subject"] == [str(world.user.id)]
    assert seen["x-connect-client-id"] == [world.client.id]
    assert seen["x-connect-scopes"] == ["courses:read"]
    assert seen["x-connect-grant-id"] == [str(grant_id)]
    assert seen["x-connect-internal-token"] == [gateway_settings.internal_token]
    assert "x-connect-anything" not in seen
    assert "authorization" not in seen
    assert "cookie" not in seen
    assert "forwarded" not in seen
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert seen["x-forwarded-host"] == [world.host]
    assert seen["host"] == [world.host]
    # The request id is the caller's when well-formed, the same on both sides.
    assert seen["x-request-id"] == ["caller-chosen-id"]
    assert headers["X-Request-Id"] == "caller-chosen-id"
    assert token not in orjson.dumps(body).decode()


async def test_hop_by_hop_headers_are_dropped_both_ways(
    gateway_url: str,
    http: Any,
    world: World,
    keyring: keys.KeyRing,
    gateway_settings: Settings,
    pool: Any,
) -> None:
    token = await _token(keyring, gateway_settings, pool, world, "courses:read")
    status, headers, body = await _get(
        http,
        gateway_url + "/api/v1/courses/hop",
        world.host,
        token,
        **{
            "Connection": "keep-alive, X-Caller-Hop",
            "X-Caller-Hop": "must not pass",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Trailer": "X-Checksum",
            "Proxy-Authorization": "Basic eDp5",
            "X-Caller-Kept": "yes",
        },
    )
    assert status == 200
    seen = received_headers(body)
    for name in ("x-caller-hop", "keep-alive", "te", "trailer", "proxy-authorization"):
        assert name not in seen, name
    assert seen["x-caller-kept"] == ["yes"]
    assert "X-Upstream-Hop" not in headers
    assert "Proxy-Authenticate" not in headers
    assert "Keep-Alive" not in headers
    assert headers["X-Upstream-Kept"] == "yes"


async def test_large_bodies_stream_both_ways(
    gateway_url: str,
    http: Any,
    world: World,
    keyring: keys.KeyRing,
    gateway_settings: Settings,
    pool: Any,
) -> None:
    token = await _token(keyring, gateway_settings, pool, world, "read write")
    size = 24 * 1024 * 1024
    chunk = secrets.token_bytes(1024 * 1024)
    expected = hashlib.sha256(chunk * (size // len(chunk))).hexdigest()

    async def body() -> Any:
        for _ in range(size // len(chunk)):
            yield chunk

    async with http.post(
        gateway_url + "/api/v1/courses/upload", headers=_headers(world.host, token), data=body()
    ) as resp:
        answer = await resp.json()
    assert resp.status == 200
    assert answer["body_length"] == size
    assert answer["body_sha256"] == expected
    assert answer["chunked"] is True  # relayed as it came, not gathered first
    # Downloads: chunked through, never buffered whole.
    async with http.get(
        gateway_url + f"/api/v1/courses/large?bytes={size}", headers=_headers(world.host, token)
    ) as resp:
        assert resp.status == 200
        assert "Content-Length" not in resp.headers
        digest, total = hashlib.sha256(), 0
        async for piece in resp.content.iter_chunked(256 * 1024):
            digest.update(piece)
            total += len(piece)
    pattern = bytes(range(256)) * 256
    assert total == size
    assert digest.hexdigest() == hashlib.sha256(pattern * (size // len(pattern))).hexdigest()


async def test_an_upstream_dying_mid_answer_is_not_passed_on_as_complete(
    gateway_url: str,
    http: Any,
    world: World,
    keyring: keys.KeyRing,
    gateway_settings: Settings,
    pool: Any,
) -> None:
    token = await _token(keyring, gateway_settings, pool, world, "courses:read")
    async with http.get(
        gateway_url + "/api/v1/courses/broken", headers=_headers(world.host, token)
    ) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    # The gateway itself is fine afterwards.
    assert (await _get(http, gateway_url + "/api/v1/courses", world.host, token))[0] == 200


async def test_slow_and_dead_upstreams_answer_504_and_502_json(
    http: Any,
    world: World,
    keyring: keys.KeyRing,
    gateway_settings: Settings,
    gateway_env: dict[str, str],
    gateway_identity_url: str,
    pool: Any,
) -> None:
    token = await _token(keyring, gateway_settings, pool, world, "read")
    async with extra_gateway(gateway_env, GATEWAY_UPSTREAM_TIMEOUT="0.5") as base:
        started = time.monotonic()
        status, _, body = await _get(http, base + "/api/v1/courses/slow?s=3", world.host, token)
        assert status == 504
        assert body["error"] == "upstream_timeout"
        assert time.monotonic() - started < 2.5
    async with extra_gateway(gateway_env, SCHOOL_API_URL=f"http://127.0.0.1:{free_port()}") as base:
        status, _, body = await _get(http, base + "/api/v1/courses", world.host, token)
        assert status == 502
        assert body["error"] == "bad_gateway"


async def test_against_the_school_api_when_it_is_built(
    http: Any,
    world: World,
    keyring: keys.KeyRing,
    gateway_settings: Settings,
    gateway_env: dict[str, str],
    gateway_identity_url: str,
    pool: Any,
    request: pytest.FixtureRequest,
) -> None:
    try:
        import services.school_api.app  # noqa: F401
    except ImportError:
        pytest.skip("services/school_api is not built yet")
    school_api_url = request.getfixturevalue("school_api_url")
    token = await _token(keyring, gateway_settings, pool, world, "courses:read")
    async with extra_gateway(gateway_env, SCHOOL_API_URL=school_api_url) as base:
        status, _, body = await _get(http, base + "/api/v1/courses", world.host, token)
        assert status == 200, body
        assert "data" in body and "next_cursor" in body
        assert all(row["school_id"] == world.school.id for row in body["data"])
        status, _, _ = await _get(http, base + "/api/v1/members", world.host, token)
        assert status == 403


async def test_against_the_webhooks_service(
    http: Any,
    world: World,
    keyring: keys.KeyRing,
    gateway_settings: Settings,
    gateway_env: dict[str, str],
    gateway_identity_url: str,
    webhooks_url: str,
    pool: Any,
) -> None:
    """Any valid token reaches the webhooks service, which gates event types by the scopes
    the gateway passed on; its public documents pass through without a token."""
    token = await _token(keyring, gateway_settings, pool, world, "courses:read")
    async with extra_gateway(gateway_env, WEBHOOKS_URL=webhooks_url) as base:
        headers = _headers(world.host, token)
        async with http.post(
            base + "/api/v1/webhooks",
            headers=headers,
            json={"url": "https://hooks.example.com/in", "event_types": ["course.updated"]},
        ) as resp:
            made = await resp.json()
            assert resp.status == 201, made
            assert made["secret"].startswith("whsec_")
        async with http.post(
            base + "/api/v1/webhooks",
            headers=headers,
            json={"url": "https://hooks.example.com/in", "event_types": ["member.enrolled"]},
        ) as resp:
            assert 400 <= resp.status < 500
        status, _, listed = await _get(http, base + "/api/v1/webhooks", world.host, token)
        assert status == 200
        assert [w["id"] for w in listed["data"]] == [made["id"]]
        status, _, _ = await _get(http, base + "/v1/webhooks/egress-ips", world.host)
        assert status == 200


# Rate limits ----------------------------------------------------------------------------------


async def test_rate_limit_per_client_with_headers_and_retry_after(
    gateway_url: str,
    http: Any,
    pool: Any,
    gateway_settings: Settings,
    gateway_port: int,
    keyring: keys.KeyRing,
) -> None:
    world = await make_world(pool, gateway_settings, "rl", gateway_port)
    await store.update_client(pool, world.client.id, rate_limit_per_minute=6)
    token = await _token(keyring, gateway_settings, pool, world, "courses:read")
    remaining = []
    for _ in range(6):
        status, headers, _ = await _get(http, gateway_url + "/api/v1/courses", world.host, token)
        assert status == 200
        assert headers["RateLimit-Limit"] == "6"
        assert headers["RateLimit-Policy"] == "6;w=60"
        remaining.append(int(headers["RateLimit-Remaining"]))
    assert remaining == [5, 4, 3, 2, 1, 0]
    status, headers, body = await _get(http, gateway_url + "/api/v1/courses", world.host, token)
    assert status == 429
    assert body["error"] == "rate_limited"
    assert 1 <= int(headers["Retry-After"]) <= 10
    assert headers["RateLimit-Remaining"] == "0"
    assert int(headers["RateLimit-Reset"]) > 0
    # Another client of the same school has its own bucket (the default one).
    other_grant = await user_grant(pool, world, ["courses:read"], client_id=world.other.id)
    other = await mint(
        keyring,
        world.school.id,
        access_claims(
            gateway_settings, world, other_grant, "courses:read", client_id=world.other.id
        ),
    )
    status, headers, _ = await _get(http, gateway_url + "/api/v1/courses", world.host, other)
    assert status == 200
    assert headers["RateLimit-Limit"] == "100"


# CORS -----------------------------------------------------------------------------------------


async def test_cors_only_for_origins_registered_on_the_tokens_client(
    gateway_url: str,
    http: Any,
    world: World,
    keyring: keys.KeyRing,
    gateway_settings: Settings,
    pool: Any,
) -> None:
    preflight = {
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    }
    async with http.options(
        gateway_url + "/api/v1/courses",
        headers={"Host": world.host, "Origin": PARTNER_ORIGIN, **preflight},
    ) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == PARTNER_ORIGIN
        assert resp.headers["Vary"] == "Origin"
        assert "GET" in resp.headers["Access-Control-Allow-Methods"]
        assert "Authorization" in resp.headers["Access-Control-Allow-Headers"]
        assert int(resp.headers["Access-Control-Max-Age"]) > 0
    async with http.options(
        gateway_url + "/api/v1/courses",
        headers={"Host": world.host, "Origin": "https://evil.example", **preflight},
    ) as resp:
        assert resp.status == 204
        assert "Access-Control-Allow-Origin" not in resp.headers

    token = await _token(keyring, gateway_settings, pool, world, "courses:read")
    status, headers, _ = await _get(
        http, gateway_url + "/api/v1/courses/cors", world.host, token, Origin=PARTNER_ORIGIN
    )
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == PARTNER_ORIGIN
    assert "Origin" in headers["Vary"] and "Accept-Encoding" in headers["Vary"]
    assert "RateLimit-Remaining" in headers["Access-Control-Expose-Headers"]
    # Registered at the school, but on another client: no grant for this token's answers.
    status, headers, _ = await _get(
        http, gateway_url + "/api/v1/courses/cors", world.host, token, Origin=OTHER_ORIGIN
    )
    assert status == 200
    assert "Access-Control-Allow-Origin" not in headers  # the upstream's `*` is dropped too
    assert "Origin" in headers["Vary"]
    status, headers, _ = await _get(
        http, gateway_url + "/api/v1/courses", world.host, token, Origin="https://evil.example"
    )
    assert "Access-Control-Allow-Origin" not in headers
    # A 401 is readable by any origin registered at the school (so a page knows to refresh),
    # and by no other.
    for origin, granted in ((OTHER_ORIGIN, True), ("https://evil.example", False)):
        status, headers, _ = await _get(
            http, gateway_url + "/api/v1/courses", world.host, Origin=origin
        )
        assert status == 401
        assert (headers.get("Access-Control-Allow-Origin") == origin) is granted


async def test_an_origin_registered_with_its_default_port_matches_what_browsers_send(
    gateway_url: str,
    http: Any,
    world: World,
    keyring: keys.KeyRing,
    gateway_settings: Settings,
    pool: Any,
) -> None:
    """Browsers never send a scheme's default port, nor capitals: an origin registered that
    way is stored in the browser form, and rows stored before that are read in it."""

    async def register(name: str, origin: str) -> store.Client:
        host = name.lower()
        made = await clients.create_client(
            pool,
            gateway_settings,
            school=world.school,
            name=f"{name} App",
            redirect_uris=[f"https://{host}.example/callback"],
            scopes=["courses:read"],
            origins=[origin],
            grant_types=["authorization_code"],
        )
        return made.client

    ported = await register("Ported", "HTTPS://Ported.Example:443")
    assert list(ported.allowed_origins) == ["https://ported.example"]
    legacy = await register("Legacy", "https://legacy.example")
    # As an earlier version stored it: the port kept.
    await pool.execute(
        "UPDATE clients SET allowed_origins = ARRAY['https://Legacy.example:443'] WHERE id = $1",
        legacy.id,
    )
    for client_id, origin in (
        (ported.id, "https://ported.example"),
        (legacy.id, "https://legacy.example"),
    ):
        grant_id = await user_grant(pool, world, ["courses:read"], client_id)
        claims = access_claims(
            gateway_settings, world, grant_id, "courses:read", client_id=client_id
        )
        token = await mint(keyring, world.school.id, claims)
        status, headers, _ = await _get(
            http, gateway_url + "/api/v1/courses", world.host, token, Origin=origin
        )
        assert status == 200
        assert headers["Access-Control-Allow-Origin"] == origin
        # Sent with the default port by a non-browser client: the same origin.
        status, headers, _ = await _get(
            http, gateway_url + "/api/v1/courses", world.host, token, Origin=origin + ":443"
        )
        assert headers["Access-Control-Allow-Origin"] == origin


# Audit ----------------------------------------------------------------------------------------


async def test_each_protected_call_lands_in_the_audit_stream_and_log(
    gateway_url: str,
    http: Any,
    world: World,
    keyring: keys.KeyRing,
    gateway_settings: Settings,
    pool: Any,
    redis: Any,
) -> None:
    grant_id = await user_grant(pool, world, ["read"])
    token = await mint(
        keyring, world.school.id, access_claims(gateway_settings, world, grant_id, "read")
    )
    request_id = f"audit-{secrets.token_hex(6)}"
    status, _, _ = await _get(
        http, gateway_url + "/api/v1/courses/42", world.host, token, **{"X-Request-Id": request_id}
    )
    assert status == 200
    denied_id = f"audit-{secrets.token_hex(6)}"
    async with http.post(
        gateway_url + "/api/v1/courses",
        headers=_headers(world.host, token, **{"X-Request-Id": denied_id}),
        json={},
    ) as resp:
        assert resp.status == 403

    stream = gateway_settings.stream(streams.AUDIT)
    deadline = time.monotonic() + 5
    found: dict[str, dict[str, Any]] = {}
    while time.monotonic() < deadline and len(found) < 2:
        for _, fields in await redis.xrevrange(stream, count=500):
            for data in audit.records_of(orjson.loads(fields[b"data"])):
                rid = (data.get("detail") or {}).get("request_id")
                if rid in (request_id, denied_id):
                    found[rid] = data
        await asyncio.sleep(0.05)
    record = found[request_id]
    assert record["action"] == "api.call"
    assert record["school_id"] == world.school.id
    assert record["client_id"] == world.client.id
    assert record["subject"] == str(world.user.id)
    assert record["grant_id"] == str(grant_id)
    assert record["method"] == "GET"
    assert record["path"] == "/api/v1/courses/42"
    assert record["status"] == 200
    assert record["scope"] == "read"  # the granted scope that satisfied courses:read
    assert record["ip"] == "127.0.0.1"
    assert found[denied_id]["status"] == 403
    assert found[denied_id]["scope"] is None

    row = None
    deadline = time.monotonic() + 10
    while row is None and time.monotonic() < deadline:
        row = await pool.fetchrow(
            "SELECT * FROM audit_log WHERE action = 'api.call' AND detail->>'request_id' = $1",
            request_id,
        )
        await asyncio.sleep(0.1)
    assert row is not None, "identity's consumer did not store the record"
    assert row["client_id"] == world.client.id
    assert row["path"] == "/api/v1/courses/42"
    assert row["status"] == 200


# Failure of Redis, probes ---------------------------------------------------------------------


async def test_without_redis_protected_calls_fail_closed(
    http: Any,
    world: World,
    keyring: keys.KeyRing,
    gateway_settings: Settings,
    gateway_env: dict[str, str],
    gateway_identity_url: str,
    pool: Any,
) -> None:
    token = await _token(keyring, gateway_settings, pool, world, "courses:read")
    async with extra_gateway(gateway_env, REDIS_URL=f"redis://127.0.0.1:{free_port()}/0") as base:
        status, headers, body = await _get(http, base + "/api/v1/courses", world.host, token)
        assert status == 503
        assert body["error"] == "temporarily_unavailable"
        assert headers["Retry-After"] == "1"
        async with http.get(base + "/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["checks"]["redis"] is False


async def test_probes_and_metrics_are_for_operators_not_the_public_origins(
    gateway_url: str, http: Any, world: World, gateway_settings: Settings
) -> None:
    """/readyz costs a round trip to every store and /metrics shows every school's traffic:
    on a school's or the platform's host they do not exist; by the process's own address
    (probes, scrapers) they do."""
    platform = gateway_settings.urls.platform_host
    for path in ("/readyz", "/metrics"):
        for host in (world.host, platform):
            async with http.get(gateway_url + path, headers={"Host": host}) as resp:
                assert resp.status == 404, (path, host)
                assert (await resp.json())["error"] == "not_found"
        forwarded = {"X-Forwarded-Host": world.host}
        async with http.get(gateway_url + path, headers=forwarded) as resp:
            assert resp.status == 404
        # Names the routes do not serve, which a load balancer's host rule may still pass on.
        port = URL(gateway_url).port
        for host in (f"{world.host}.", f"{platform}:443", "evil.example", f"{platform}."):
            async with http.get(gateway_url + path, headers={"Host": host}) as resp:
                assert resp.status == 404, (path, host)
        # By address, as probes and scrapers call it.
        for host in (f"127.0.0.1:{port}", "localhost", f"[::1]:{port}", "10.0.0.7"):
            async with http.get(gateway_url + path, headers={"Host": host}) as resp:
                assert resp.status == 200, (path, host)
        async with http.get(gateway_url + path) as resp:
            assert resp.status == 200
    async with http.get(gateway_url + "/healthz", headers={"Host": world.host}) as resp:
        assert resp.status == 200


async def test_probes_metrics_and_openapi(gateway_url: str, http: Any, world: World) -> None:
    async with http.get(gateway_url + "/healthz") as resp:
        assert resp.status == 200
    async with http.get(gateway_url + "/readyz") as resp:
        body = await resp.json()
        assert resp.status == 200, body
        # Not identity: its outage must not take every gateway out of the balancer; the
        # supervised followers (revocations, keys) instead.
        assert body["checks"] == {"postgresql": True, "redis": True, "background": True}
    await _get(http, gateway_url + "/api/v1/courses", world.host, "garbage")
    async with http.get(gateway_url + "/metrics") as resp:
        text = await resp.text()
    assert 'gateway_requests_total{route="/api/v1/courses",status="401"}' in text
    assert 'gateway_token_rejections_total{reason="malformed"}' in text
    assert "gateway_upstream_duration_seconds_bucket" in text
    assert "gateway_audit_dropped_total" in text
    async with http.get(gateway_url + "/openapi.json") as resp:
        doc = await resp.json()
    assert doc["openapi"].startswith("3.")
    courses = doc["paths"]["/api/v1/courses"]
    assert courses["get"]["security"] == [{"loopwise": ["courses:read"]}]
    assert courses["post"]["security"] == [{"loopwise": ["courses:write"]}]
    assert doc["paths"]["/api/v1/settings"]["get"]["security"] == [{"loopwise": ["school:read"]}]
    assert doc["paths"]["/api/v1/settings/appearance"]["get"]["security"] == [
        {"loopwise": ["appearance:read", "school:read"]}
    ]
    assert "/readyz" in doc["paths"]
    assert (
        "admin:read"
        not in doc["components"]["securitySchemes"]["loopwise"]["flows"]["authorizationCode"][
            "scopes"
        ]
    )


# JWKS ------------------------------------------------------------------------------------------


async def test_random_kids_cannot_flood_identity_and_rotation_is_followed(
    http: Any,
    pool: Any,
    gateway_settings: Settings,
    gateway_env: dict[str, str],
    gateway_identity_url: str,
    gateway_port: int,
    keyring: keys.KeyRing,
    redis: Any,
) -> None:
    world = await make_world(pool, gateway_settings, "kid", gateway_port)
    async with extra_gateway(gateway_env, GATEWAY_JWKS_REFRESH_INTERVAL="1") as base:

        async def fetches() -> float:
            async with http.get(base + "/metrics") as resp:
                return _metric(await resp.text(), "gateway_jwks_fetches_total")

        token = await _token(keyring, gateway_settings, pool, world, "courses:read")
        assert (await _get(http, base + "/api/v1/courses", world.host, token))[0] == 200
        assert await fetches() == 1

        grant_id = await user_grant(pool, world, ["courses:read"])
        stranger = ECKey.generate_key("P-256", private=True)

        def forged() -> str:
            header = {"alg": "ES256", "kid": secrets.token_hex(8), "typ": "at+jwt"}
            return sign(
                stranger, header, access_claims(gateway_settings, world, grant_id, "courses:read")
            )

        async def flood(count: int) -> None:
            answers = await asyncio.gather(
                *(_get(http, base + "/api/v1/courses", world.host, forged()) for _ in range(count))
            )
            assert {a[0] for a in answers} == {401}

        await flood(100)
        assert await fetches() == 1  # fetched moments ago: no refresh at all
        await asyncio.sleep(1.1)
        await flood(100)
        await flood(50)
        assert await fetches() == 2  # one refresh for the whole flood

        # A key the gateway has never seen (rotated in twice, no announcement): found by the
        # unknown-kid refresh once the interval has passed.
        await keys.rotate(pool, gateway_settings, world.school.id)
        await keys.rotate(pool, gateway_settings, world.school.id)
        fresh = keys.KeyRing(pool, gateway_settings)
        await asyncio.sleep(1.1)
        token = await _token(fresh, gateway_settings, pool, world, "courses:read")
        assert (await _get(http, base + "/api/v1/courses", world.host, token))[0] == 200

        # Announced on connect:keys: refreshed without waiting for an unknown kid.
        before = await fetches()
        await keys.rotate(pool, gateway_settings, world.school.id)
        await keys.announce(redis, gateway_settings, world.school.id, "rotated")
        for _ in range(60):
            if await fetches() > before:
                break
            await asyncio.sleep(0.05)
        assert await fetches() > before


async def test_behind_a_trusted_proxy_its_forwarded_headers_are_used(
    gateway_url: str,
    http: Any,
    world: World,
    keyring: keys.KeyRing,
    gateway_settings: Settings,
    gateway_env: dict[str, str],
    gateway_identity_url: str,
    pool: Any,
) -> None:
    token = await _token(keyring, gateway_settings, pool, world, "courses:read")
    spoofed = {"X-Forwarded-For": "6.6.6.6, 203.0.113.9", "X-Forwarded-Proto": "https"}
    async with extra_gateway(gateway_env, GATEWAY_TRUST_FORWARDED="true") as base:
        status, _, body = await _get(
            http,
            base + "/api/v1/courses",
            "balancer.internal",
            token,
            **{"X-Forwarded-Host": world.host, **spoofed},
        )
        assert status == 200, body
        seen = received_headers(body)
        # The client is the hop the trusted balancer appended; what the caller wrote is gone.
        assert seen["x-forwarded-for"] == ["203.0.113.9"]
        assert seen["x-forwarded-proto"] == ["https"]
        assert seen["x-forwarded-host"] == [world.host]
    # A balancer that appends to X-Forwarded-For but passes a caller's X-Forwarded-Host on
    # (AWS ALB): trusted for the address, never for the school.
    async with extra_gateway(gateway_env, GATEWAY_TRUSTED_PROXIES="127.0.0.0/8") as base:
        status, _, body = await _get(
            http,
            base + "/api/v1/courses",
            world.host,
            token,
            **{
                "X-Forwarded-Host": "evil.localhost",
                **spoofed,
                # A second proxy of ours, appended after the client.
                "X-Forwarded-For": "6.6.6.6, 203.0.113.9, 127.0.0.5",
            },
        )
        assert status == 200, body
        seen = received_headers(body)
        assert seen["x-forwarded-for"] == ["203.0.113.9"]
        assert seen["x-forwarded-proto"] == ["https"]
        assert seen["x-forwarded-host"] == [world.host]
    # Without the trust, the same headers are the caller's word and count for nothing.
    status, _, body = await _get(
        http,
        gateway_url + "/api/v1/courses",
        world.host,
        token,
        **spoofed,
    )
    assert status == 200
    assert received_headers(body)["x-forwarded-for"] == ["127.0.0.1"]
    assert received_headers(body)["x-forwarded-proto"] == ["http"]


async def test_without_identity_unknown_keys_fail_closed_and_fast(
    http: Any,
    pool: Any,
    keyring: keys.KeyRing,
    gateway_settings: Settings,
    gateway_env: dict[str, str],
    gateway_port: int,
) -> None:
    """No JWKS can be had: the call is refused 503 (never let through), and the gateway does
    not retry identity on every call meanwhile."""
    world = await make_world(pool, gateway_settings, "noid", gateway_port)
    token = await _token(keyring, gateway_settings, pool, world, "courses:read")
    async with extra_gateway(gateway_env, IDENTITY_URL=f"http://127.0.0.1:{free_port()}") as base:
        answers = [await _get(http, base + "/api/v1/courses", world.host, token) for _ in range(5)]
        assert [a[0] for a in answers] == [503] * 5
        assert answers[0][2]["error"] == "temporarily_unavailable"
        async with http.get(base + "/metrics") as resp:
            assert _metric(await resp.text(), "gateway_jwks_fetches_total") == 1
        # Still ready: an identity outage must not take every gateway out of the balancer
        # (tokens of cached keys are still served).
        async with http.get(base + "/readyz") as resp:
            assert resp.status == 200
            assert "identity" not in (await resp.json())["checks"]


async def test_calls_that_come_with_a_schools_first_key_fetch_wait_for_it(
    http: Any,
    pool: Any,
    keyring: keys.KeyRing,
    gateway_settings: Settings,
    gateway_env: dict[str, str],
    gateway_identity_url: str,
    gateway_port: int,
) -> None:
    """A gateway's first calls for a school arrive together (a gateway just started, a school
    just made): they all wait for the one fetch of its keys and are served, not 503 but for
    the first; without identity they are all 503 after that one fetch."""
    world = await make_world(pool, gateway_settings, "firstkeys", gateway_port)
    token = await _token(keyring, gateway_settings, pool, world, "courses:read")
    async with extra_gateway(gateway_env) as base:
        answers = await asyncio.gather(
            *(_get(http, base + "/api/v1/courses", world.host, token) for _ in range(8))
        )
        assert [a[0] for a in answers] == [200] * 8, [a[2] for a in answers]
        async with http.get(base + "/metrics") as resp:
            assert _metric(await resp.text(), "gateway_jwks_fetches_total") == 1
    async with extra_gateway(gateway_env, IDENTITY_URL=f"http://127.0.0.1:{free_port()}") as base:
        answers = await asyncio.gather(
            *(_get(http, base + "/api/v1/courses", world.host, token) for _ in range(8))
        )
        assert [a[0] for a in answers] == [503] * 8
        async with http.get(base + "/metrics") as resp:
            assert _metric(await resp.text(), "gateway_jwks_fetches_total") == 1
