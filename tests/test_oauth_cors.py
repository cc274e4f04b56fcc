"""CORS on identity's browser-facing endpoints, over real HTTP: discovery and the JWKS for
anyone; token, revocation, introspection and UserInfo only for the client's registered
origins, the preflight for any origin, and never with credentials."""

from __future__ import annotations

from typing import Any

import orjson

from libs.common.config import Settings
from services.identity import clients
from tests.token_helpers import (
    REDIRECT_URI,
    Answer,
    basic,
    insert_code,
    make_world,
    pkce_pair,
)

SPA = "https://spa.example.com"
STRANGER = "https://evil.example.net"
ACAO = "Access-Control-Allow-Origin"
ACAC = "Access-Control-Allow-Credentials"


async def _post(
    http: Any, url: str, data: dict[str, str], origin: str | None, **headers: str
) -> Answer:
    if origin is not None:
        headers["Origin"] = origin
    async with http.post(url, data=data, headers=headers) as resp:
        raw = await resp.read()
        return Answer(resp.status, orjson.loads(raw) if raw else {}, resp.headers)


async def _preflight(http: Any, url: str, origin: str, method: str, headers: str) -> Any:
    async with http.options(
        url,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": headers,
        },
    ) as resp:
        await resp.read()
        return resp


async def _spa_world(pool: Any, settings: Settings, unique: str, port: int) -> tuple[Any, Any]:
    world = await make_world(pool, settings, unique, port, label="cors")
    spa = await clients.create_client(
        pool,
        settings,
        school=world.school,
        name="Single Page App",
        redirect_uris=[REDIRECT_URI],
        public=True,
        scopes=["openid", "profile", "read"],
        origins=[SPA],
    )
    return world, spa.client


async def _code(pool: Any, settings: Settings, world: Any, client_id: str) -> tuple[str, str]:
    verifier, challenge = pkce_pair()
    code, _ = await insert_code(
        pool,
        settings,
        school_id=world.school.id,
        client_id=client_id,
        user_id=world.user.id,
        scopes=["openid", "profile", "read"],
        challenge=challenge,
    )
    return code, verifier


def _exchange(client_id: str, code: str, verifier: str) -> dict[str, str]:
    return {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT_URI,
        "code_verifier": verifier,
        "client_id": client_id,
    }


async def test_discovery_and_jwks_are_open_to_every_origin(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    world, _ = await _spa_world(pool, settings, unique, identity_port)
    for base in (world.origin, f"http://localhost:{identity_port}"):
        for path in (
            "/.well-known/openid-configuration",
            "/.well-known/oauth-authorization-server",
            "/v1/oauth/jwks",
        ):
            async with http.get(base + path, headers={"Origin": STRANGER}) as resp:
                assert resp.status == 200
                assert resp.headers[ACAO] == "*"
                assert ACAC not in resp.headers
            resp = await _preflight(http, base + path, STRANGER, "GET", "x-requested-with")
            assert resp.status == 204
            assert resp.headers[ACAO] == "*"
            assert "GET" in resp.headers["Access-Control-Allow-Methods"]
            assert ACAC not in resp.headers


async def test_preflight_is_answered_for_any_origin(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    world, _ = await _spa_world(pool, settings, unique, identity_port)
    for path, method in (
        ("/v1/oauth/token", "POST"),
        ("/api/oauth/token", "POST"),
        ("/v1/oauth/revoke", "POST"),
        ("/v1/oauth/introspect", "POST"),
        ("/v1/oauth/userinfo", "GET"),
    ):
        for origin in (SPA, STRANGER):
            resp = await _preflight(
                http, world.origin + path, origin, method, "authorization, content-type"
            )
            assert resp.status == 204, path
            # No client is named yet: the actual request decides.
            assert resp.headers[ACAO] == origin
            assert method in resp.headers["Access-Control-Allow-Methods"]
            allowed = resp.headers["Access-Control-Allow-Headers"].lower()
            assert "authorization" in allowed and "content-type" in allowed
            assert "Origin" in resp.headers["Vary"]
            assert ACAC not in resp.headers


async def test_token_endpoint_grants_cors_only_to_the_clients_origins(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    world, spa = await _spa_world(pool, settings, unique, identity_port)
    url = world.origin + "/v1/oauth/token"
    code, verifier = await _code(pool, settings, world, spa.id)

    # An origin the client did not register is refused before anything happens, ungranted.
    refused = await _post(http, url, _exchange(spa.id, code, verifier), STRANGER)
    assert refused.status == 400 and refused.body["error"] == "invalid_request"
    assert ACAO not in refused.headers
    assert ACAC not in refused.headers

    # The code was not spent: the app's own origin redeems it and may read the answer.
    answer = await _post(http, url, _exchange(spa.id, code, verifier), SPA)
    assert answer.status == 200, answer.body
    assert answer.headers[ACAO] == SPA
    assert "Origin" in answer.headers["Vary"]
    assert ACAC not in answer.headers
    refresh_token = answer.body["refresh_token"]

    # A refresh from another origin is refused and leaves the token unrotated.
    refresh = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": spa.id}
    rotated = await _post(http, url, refresh, STRANGER)
    assert rotated.status == 400 and ACAO not in rotated.headers
    rotated = await _post(http, url, refresh, SPA)
    assert rotated.status == 200, rotated.body
    assert rotated.headers[ACAO] == SPA

    # Errors after the client is known are readable by its origin (an app must see
    # invalid_grant to start over).
    again = await _post(http, url, _exchange(spa.id, code, verifier), SPA)
    assert again.status == 400 and again.body["error"] == "invalid_grant"
    assert again.headers[ACAO] == SPA

    # A client with no origins registered grants none; server-side calls (no Origin) and
    # the issuer's own pages (same origin) are untouched.
    other_code, other_verifier = await _code(pool, settings, world, world.public.id)
    for origin in (SPA, STRANGER):
        answer = await _post(
            http, url, _exchange(world.public.id, other_code, other_verifier), origin
        )
        assert answer.status == 400 and ACAO not in answer.headers
    answer = await _post(
        http, url, _exchange(world.public.id, other_code, other_verifier), world.origin
    )
    assert answer.status == 200, answer.body
    assert ACAO not in answer.headers
    third_code, third_verifier = await _code(pool, settings, world, spa.id)
    answer = await _post(http, url, _exchange(spa.id, third_code, third_verifier), None)
    assert answer.status == 200 and ACAO not in answer.headers


async def test_revocation_userinfo_and_introspection_follow_the_client(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    world, spa = await _spa_world(pool, settings, unique, identity_port)
    code, verifier = await _code(pool, settings, world, spa.id)
    tokens = await _post(
        http, world.origin + "/v1/oauth/token", _exchange(spa.id, code, verifier), SPA
    )
    assert tokens.status == 200, tokens.body
    access_token = tokens.body["access_token"]

    userinfo = world.origin + "/v1/oauth/userinfo"
    bearer = {"Authorization": f"Bearer {access_token}"}
    async with http.get(userinfo, headers={**bearer, "Origin": SPA}) as resp:
        assert resp.status == 200
        assert resp.headers[ACAO] == SPA
        assert "WWW-Authenticate" in resp.headers["Access-Control-Expose-Headers"]
        assert ACAC not in resp.headers
    async with http.get(userinfo, headers={**bearer, "Origin": STRANGER}) as resp:
        assert resp.status == 400
        assert ACAO not in resp.headers
    async with http.get(userinfo, headers=bearer) as resp:
        assert resp.status == 200 and ACAO not in resp.headers

    # Introspection: a confidential client with the SPA's origin registered.
    backend = await clients.create_client(
        pool,
        settings,
        school=world.school,
        name="Backend for frontend",
        redirect_uris=[REDIRECT_URI],
        scopes=["read"],
        origins=[SPA],
    )
    assert backend.client_secret is not None
    auth = basic(backend.client.id, backend.client_secret)
    introspect = world.origin + "/v1/oauth/introspect"
    seen = await _post(http, introspect, {"token": access_token}, SPA, Authorization=auth)
    assert seen.status == 200 and seen.headers[ACAO] == SPA
    unseen = await _post(http, introspect, {"token": access_token}, STRANGER, Authorization=auth)
    assert unseen.status == 400 and ACAO not in unseen.headers

    # Revocation from a stranger is refused and revokes nothing; from the app it works.
    revoke = world.origin + "/v1/oauth/revoke"
    form = {"token": tokens.body["refresh_token"], "client_id": spa.id}
    refused = await _post(http, revoke, form, STRANGER)
    assert refused.status == 400 and ACAO not in refused.headers
    async with http.get(userinfo, headers=bearer) as resp:
        assert resp.status == 200
    done = await _post(http, revoke, form, SPA)
    assert done.status == 200 and done.headers[ACAO] == SPA
    async with http.get(userinfo, headers={**bearer, "Origin": SPA}) as resp:
        assert resp.status == 401
        # The app can read why: the token is no longer good.
        assert resp.headers[ACAO] == SPA
        assert "WWW-Authenticate" in resp.headers["Access-Control-Expose-Headers"]
