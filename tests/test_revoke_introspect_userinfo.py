"""Revocation (RFC 7009), introspection (RFC 7662) and UserInfo (OIDC Core 5.3)."""

from __future__ import annotations

import base64
import time
from typing import Any

import orjson
from joserfc import jws
from joserfc.jwk import ECKey

from libs.common import jwt
from libs.common.config import Settings
from services.identity import clients, grants, keys, minting, resources, schools, token_state
from services.identity.schools import Issuer
from tests.token_helpers import (
    REDIRECT_URI,
    World,
    basic,
    code_flow,
    code_grant,
    insert_code,
    introspect,
    make_world,
    pkce_pair,
    post_form,
    refresh,
    revocation_marked,
    token,
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def _revoke(http: Any, world: World, value: str, **extra: str) -> Any:
    return await post_form(
        http,
        world.origin + "/v1/oauth/revoke",
        {"token": value, **extra},
        authorization=basic(world.confidential.id, world.secret),
    )


async def _userinfo(http: Any, world: World, value: str | None, method: str = "GET") -> Any:
    headers = {"Authorization": f"Bearer {value}"} if value is not None else {}
    async with http.request(method, world.origin + "/v1/oauth/userinfo", headers=headers) as resp:
        raw = await resp.read()
        return resp.status, (orjson.loads(raw) if raw else {}), resp.headers


# Introspection -------------------------------------------------------------------------------


async def test_introspection_of_a_live_access_token(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    world = await make_world(pool, settings, unique, identity_port)
    answer, grant_id = await code_flow(http, pool, settings, world)
    info = await introspect(http, world, answer.body["access_token"])
    assert info["active"] is True
    assert info["token_type"] == "Bearer"
    assert info["scope"] == "read courses:read students:read"
    assert info["client_id"] == world.confidential.id
    assert info["sub"] == str(world.user.id)
    assert info["aud"] == world.origin and info["iss"] == world.origin
    assert info["exp"] - info["iat"] == 7200
    assert info["school_id"] == world.school.id
    assert info["school_subdomain"] == world.school.subdomain
    assert info["grant_id"] == str(grant_id)

    rt = await introspect(http, world, answer.body["refresh_token"])
    assert rt["active"] is True and rt["token_type"] == "refresh_token"
    assert rt["client_id"] == world.confidential.id and rt["sub"] == str(world.user.id)
    assert rt["school_id"] == world.school.id and rt["grant_id"] == str(grant_id)
    assert rt["exp"] > time.time() + 86400


async def test_introspection_says_inactive_for_every_bad_token(
    identity_url: str,
    http: Any,
    pool: Any,
    redis: Any,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    world = await make_world(pool, settings, unique, identity_port, label="ia")
    other = await make_world(pool, settings, unique, identity_port, label="ib")
    answer, grant_id = await code_flow(http, pool, settings, world)
    access = answer.body["access_token"]
    head, payload, sig = access.split(".")
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=="))

    tampered = f"{head}.{_b64(orjson.dumps({**claims, 'scope': 'write'}))}.{sig}"
    unsigned = (
        f"{_b64(orjson.dumps({'alg': 'none', 'typ': 'at+jwt'}))}.{_b64(orjson.dumps(claims))}."
    )
    stranger = ECKey.generate_key("P-256", private=True)
    header = orjson.loads(base64.urlsafe_b64decode(head + "=="))
    foreign_key = jws.serialize_compact(
        header, orjson.dumps(claims), stranger, algorithms=["ES256"]
    )

    # Signed with this school's real current key, but expired.
    signer = await keys.KeyRing(pool, settings).signer(world.school.id, keys.ACCESS_TOKEN_ALG)
    old = {**claims, "iat": int(time.time()) - 9000, "exp": int(time.time()) - 1800}
    expired = minting.sign_access_token(signer, old)
    # Another school's genuine token, presented at this school.
    elsewhere, _ = await code_flow(http, pool, settings, other)
    # A token of this school's key whose claims say another school.
    wrong_school = minting.sign_access_token(signer, {**claims, "school_id": other.school.id})

    for value in (
        tampered,
        unsigned,
        foreign_key,
        expired,
        elsewhere.body["access_token"],
        wrong_school,
        "garbage",
        "a.b.c",
        "lcr_unknown",
        "",
    ):
        if not value:
            continue
        assert (await introspect(http, world, value)) == {"active": False}, value[:40]

    # And once revoked, the genuine one too.
    assert (await introspect(http, world, access))["active"] is True
    await grants.revoke_grant(pool, redis, settings, grant_id, reason="test")
    assert (await introspect(http, world, access)) == {"active": False}


async def test_introspection_is_for_confidential_clients_and_the_tokens_own(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    world = await make_world(pool, settings, unique, identity_port)
    answer, _ = await code_flow(http, pool, settings, world)
    access = answer.body["access_token"]
    url = world.origin + "/v1/oauth/introspect"
    public = await post_form(http, url, {"token": access, "client_id": world.public.id})
    assert public.status == 401 and public.body["error"] == "invalid_client"
    unauthenticated = await post_form(http, url, {"token": access})
    assert unauthenticated.status == 401
    missing = await post_form(
        http, url, {}, authorization=basic(world.confidential.id, world.secret)
    )
    assert missing.status == 400 and missing.body["error"] == "invalid_request"

    async def client_of_school(first_party: bool) -> tuple[str, str]:
        made = await clients.create_client(
            pool,
            settings,
            school=world.school,
            name="Resource Server" if first_party else "Nosy App",
            redirect_uris=["https://rs.example.com/cb"],
            first_party=first_party,
        )
        assert made.client_secret is not None
        return made.client.id, made.client_secret

    nosy = await client_of_school(False)
    seen = await post_form(http, url, {"token": access}, authorization=basic(*nosy))
    assert seen.status == 200 and seen.body == {"active": False}
    resource_server = await client_of_school(True)
    seen = await post_form(http, url, {"token": access}, authorization=basic(*resource_server))
    assert seen.body["active"] is True and seen.body["client_id"] == world.confidential.id
    assert seen.headers["Cache-Control"] == "no-store"


async def test_introspection_answers_only_for_tokens_of_its_own_issuer(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    """School A's tokens at school B or at the platform, the platform's tokens (a platform
    client's grant at school A) at school A: inactive, access and refresh tokens alike,
    whatever the hint; each issuer answers active for its own, with itself as `iss`. The
    callers are first-party resource servers, which may introspect any client's tokens of
    their issuer."""
    a = await make_world(pool, settings, unique, identity_port, label="isa")
    b = await make_world(pool, settings, unique, identity_port, label="isb")
    platform_origin = settings.urls.platform_url
    await keys.ensure_issuer_keys(pool, settings, None)

    async def resource_server(school: Any) -> tuple[str, str]:
        made = await clients.create_client(
            pool,
            settings,
            school=school,
            name="Resource Server",
            redirect_uris=["https://rs.example.com/cb"],
            first_party=True,
        )
        assert made.client_secret is not None
        return made.client.id, made.client_secret

    callers = {
        a.origin: await resource_server(a.school),
        b.origin: await resource_server(b.school),
        platform_origin: await resource_server(None),
    }

    # A platform client's grant at school A, its code redeemed at the platform's endpoint.
    platform_app = await clients.create_client(
        pool,
        settings,
        school=None,
        name="Platform App",
        redirect_uris=[REDIRECT_URI],
        scopes=["read", "courses:read"],
    )
    assert platform_app.client_secret is not None
    issued, platform_grant = await code_grant(
        http,
        pool,
        settings,
        platform_origin,
        school_id=a.school.id,
        client_id=platform_app.client.id,
        secret=platform_app.client_secret,
        user_id=a.user.id,
        scopes=["courses:read"],
    )
    assert issued.status == 200, issued.body
    assert issued.body["school_id"] == a.school.id

    of_a, a_grant = await code_flow(http, pool, settings, a)
    of_b, b_grant = await code_flow(http, pool, settings, b)
    tokens_of = {
        a.origin: (of_a.body, a_grant),
        b.origin: (of_b.body, b_grant),
        platform_origin: (issued.body, platform_grant),
    }

    for where, caller in callers.items():
        for issuer, (body, grant_id) in tokens_of.items():
            for kind in ("access_token", "refresh_token"):
                for hint in (None, "access_token", "refresh_token"):
                    form = {"token": body[kind]}
                    if hint is not None:
                        form["token_type_hint"] = hint
                    answer = await post_form(
                        http, where + "/v1/oauth/introspect", form, authorization=basic(*caller)
                    )
                    assert answer.status == 200, answer.body
                    case = (where, issuer, kind, hint)
                    if where != issuer:
                        assert answer.body == {"active": False}, case
                        continue
                    assert answer.body["active"] is True, case
                    assert answer.body["iss"] == issuer, case
                    assert answer.body["grant_id"] == str(grant_id), case
                    assert answer.body["school_id"] == (b if issuer == b.origin else a).school.id

    # The platform client itself, at the platform: its own refresh token is active there.
    own = await post_form(
        http,
        platform_origin + "/v1/oauth/introspect",
        {"token": issued.body["refresh_token"]},
        authorization=basic(platform_app.client.id, platform_app.client_secret),
    )
    assert own.body["active"] is True and own.body["iss"] == platform_origin


# Revocation ----------------------------------------------------------------------------------


async def test_revoking_the_access_token_ends_the_grant_before_answering(
    identity_url: str,
    http: Any,
    pool: Any,
    redis: Any,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    world = await make_world(pool, settings, unique, identity_port)
    answer, grant_id = await code_flow(http, pool, settings, world)
    assert await revocation_marked(redis, settings, grant_id) == (False, False)
    revoked = await _revoke(
        http, world, answer.body["access_token"], token_type_hint="access_token"
    )
    assert revoked.status == 200 and revoked.body == {}
    # Everything a gateway relies on is in place the moment the answer arrives.
    assert await revocation_marked(redis, settings, grant_id) == (True, True)
    reason = await pool.fetchval("SELECT revoked_reason FROM grants WHERE id = $1", grant_id)
    assert reason == "client_revocation"
    after = await refresh(http, world, answer.body["refresh_token"])
    assert after.status == 400 and after.body["error"] == "invalid_grant"
    assert (await introspect(http, world, answer.body["access_token"])) == {"active": False}
    status, _, _ = await _userinfo(http, world, answer.body["access_token"])
    assert status == 401


async def test_revoking_the_refresh_token_ends_the_access_token_too(
    identity_url: str,
    http: Any,
    pool: Any,
    redis: Any,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    world = await make_world(pool, settings, unique, identity_port)
    answer, grant_id = await code_flow(http, pool, settings, world)
    # A misleading hint does not stop the server finding the token (RFC 7009 2.1).
    revoked = await _revoke(
        http, world, answer.body["refresh_token"], token_type_hint="access_token"
    )
    assert revoked.status == 200
    assert (await revocation_marked(redis, settings, grant_id))[0]
    assert (await introspect(http, world, answer.body["access_token"])) == {"active": False}


async def test_public_client_revokes_its_own_token_with_client_id_only(
    identity_url: str,
    http: Any,
    pool: Any,
    redis: Any,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    world = await make_world(pool, settings, unique, identity_port)
    answer, grant_id = await code_flow(http, pool, settings, world, public=True)
    assert answer.status == 200, answer.body
    revoked = await post_form(
        http,
        world.origin + "/v1/oauth/revoke",
        {"token": answer.body["refresh_token"], "client_id": world.public.id},
    )
    assert revoked.status == 200
    assert (await revocation_marked(redis, settings, grant_id))[0]


async def test_unknown_or_foreign_tokens_answer_200_and_change_nothing(
    identity_url: str,
    http: Any,
    pool: Any,
    redis: Any,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    world = await make_world(pool, settings, unique, identity_port)
    for value in ("lcr_" + "a" * 43, "not-a-token", "a.b.c"):
        answer = await _revoke(http, world, value)
        assert answer.status == 200 and answer.body == {}
    missing = await post_form(
        http,
        world.origin + "/v1/oauth/revoke",
        {},
        authorization=basic(world.confidential.id, world.secret),
    )
    assert missing.status == 400 and missing.body["error"] == "invalid_request"
    unauthenticated = await post_form(http, world.origin + "/v1/oauth/revoke", {"token": "x"})
    assert unauthenticated.status == 401 and unauthenticated.body["error"] == "invalid_client"

    # The public client's token, presented by the confidential client: 200, still alive.
    theirs, grant_id = await code_flow(http, pool, settings, world, public=True)
    for value in (theirs.body["access_token"], theirs.body["refresh_token"]):
        answer = await _revoke(http, world, value)
        assert answer.status == 200 and answer.body == {}
    assert await revocation_marked(redis, settings, grant_id) == (False, False)
    assert await pool.fetchval("SELECT revoked_at FROM grants WHERE id = $1", grant_id) is None


# UserInfo ------------------------------------------------------------------------------------


async def test_userinfo_releases_claims_by_scope(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    world = await make_world(pool, settings, unique, identity_port)
    full, _ = await code_flow(
        http, pool, settings, world, scopes=["openid", "profile", "email", "courses:read"]
    )
    status, body, headers = await _userinfo(http, world, full.body["access_token"])
    assert status == 200, body
    assert body == {
        "sub": str(world.user.id),
        "name": "Ada Lovelace",
        "email": world.user.email,
        "email_verified": False,
    }
    assert headers["Cache-Control"] == "no-store"

    only_openid, _ = await code_flow(http, pool, settings, world, scopes=["openid"])
    status, body, _ = await _userinfo(http, world, only_openid.body["access_token"])
    assert status == 200 and body == {"sub": str(world.user.id)}

    profile, _ = await code_flow(http, pool, settings, world, scopes=["openid", "profile"])
    status, body, _ = await _userinfo(http, world, profile.body["access_token"], method="POST")
    assert status == 200 and body == {"sub": str(world.user.id), "name": "Ada Lovelace"}

    # RFC 6750 2.2: the token as a form field of a POST.
    async with http.post(
        world.origin + "/v1/oauth/userinfo", data={"access_token": full.body["access_token"]}
    ) as resp:
        assert resp.status == 200 and (await resp.json())["email"] == world.user.email


async def test_userinfo_errors_are_bearer_challenges(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    world = await make_world(pool, settings, unique, identity_port)
    no_openid, _ = await code_flow(http, pool, settings, world, scopes=["courses:read"])
    status, body, headers = await _userinfo(http, world, no_openid.body["access_token"])
    assert status == 403 and body["error"] == "insufficient_scope"
    assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    assert 'scope="openid"' in headers["WWW-Authenticate"]

    status, body, headers = await _userinfo(http, world, "eyJhbGciOiJub25lIn0.e30.")
    assert status == 401 and body["error"] == "invalid_token"
    assert headers["WWW-Authenticate"].startswith("Bearer ")
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]

    status, _, headers = await _userinfo(http, world, None)
    assert status == 401 and "error=" not in headers["WWW-Authenticate"]

    # Another school's token at this school's UserInfo.
    other = await make_world(pool, settings, unique, identity_port, label="uo")
    theirs, _ = await code_flow(http, pool, settings, other, scopes=["openid"])
    status, body, _ = await _userinfo(http, world, theirs.body["access_token"])
    assert status == 401 and body["error"] == "invalid_token"

    # Two tokens at once is a malformed request.
    async with http.post(
        world.origin + "/v1/oauth/userinfo",
        data={"access_token": theirs.body["access_token"]},
        headers={"Authorization": f"Bearer {theirs.body['access_token']}"},
    ) as resp:
        assert resp.status == 400


async def test_userinfo_refuses_tokens_meant_for_another_resource(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    """UserInfo is the issuer's own API: a token a client asked for another resource (RFC 8707,
    the MCP endpoint) is restricted to it, openid or not; one that named none works."""
    world = await make_world(pool, settings, unique, identity_port)
    callback = "http://127.0.0.1:33419/callback"
    platform = await clients.create_client(
        pool,
        settings,
        school=None,
        name="MCP Client",
        redirect_uris=[callback],
        public=True,
        scopes=["openid", "profile", "courses:read"],
        # Made by an operator: a self-registered one is MCP-only (resources.mcp_only).
        created_via="admin",
    )
    platform_origin = f"http://localhost:{identity_port}"

    async def platform_token(resource: str | None) -> str:
        verifier, challenge = pkce_pair()
        code, _ = await insert_code(
            pool,
            settings,
            school_id=world.school.id,
            client_id=platform.client.id,
            user_id=world.user.id,
            scopes=["openid", "profile", "courses:read"],
            challenge=challenge,
            redirect_uri=callback,
            resource=resource,
        )
        answer = await token(
            http,
            platform_origin,
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": callback,
                "code_verifier": verifier,
                "client_id": platform.client.id,
            },
        )
        assert answer.status == 200, answer.body
        return str(answer.body["access_token"])

    async def userinfo_at(origin: str, value: str) -> tuple[int, dict[str, Any], Any]:
        headers = {"Authorization": f"Bearer {value}"}
        async with http.get(origin + "/v1/oauth/userinfo", headers=headers) as resp:
            return resp.status, await resp.json(), resp.headers

    mcp_token = await platform_token(resources.mcp_resource(settings))
    status, body, headers = await userinfo_at(platform_origin, mcp_token)
    assert status == 401 and body["error"] == "invalid_token", body
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]

    api_token = await platform_token(None)
    status, body, _ = await userinfo_at(platform_origin, api_token)
    assert status == 200 and body == {"sub": str(world.user.id), "name": "Ada Lovelace"}

    # At a school issuer: its own token works; the same claims for another audience do not.
    own, _ = await code_flow(http, pool, settings, world, scopes=["openid"])
    status, _, _ = await _userinfo(http, world, own.body["access_token"])
    assert status == 200
    claims = orjson.loads(base64.urlsafe_b64decode(own.body["access_token"].split(".")[1] + "=="))
    signer = await keys.KeyRing(pool, settings).signer(world.school.id, keys.ACCESS_TOKEN_ALG)
    for aud in (resources.mcp_resource(settings), "https://elsewhere.example"):
        foreign = minting.sign_access_token(signer, {**claims, "aud": aud})
        status, body, _ = await _userinfo(http, world, foreign)
        assert status == 401 and body["error"] == "invalid_token", aud


async def test_identity_verifies_tokens_of_a_key_rotated_in_elsewhere(
    identity_url: str,
    http: Any,
    pool: Any,
    redis: Any,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    """A rotation by another process (the CLI) must not make fresh tokens unverifiable."""
    world = await make_world(pool, settings, unique, identity_port)
    before, _ = await code_flow(http, pool, settings, world, scopes=["openid"])
    status, _, _ = await _userinfo(http, world, before.body["access_token"])
    assert status == 200  # caches this school's keys in the service
    await keys.rotate(pool, settings, world.school.id)
    signer = await keys.KeyRing(pool, settings).signer(world.school.id, keys.ACCESS_TOKEN_ALG)
    claims = orjson.loads(
        base64.urlsafe_b64decode(before.body["access_token"].split(".")[1] + "==")
    )
    fresh = minting.sign_access_token(signer, {**claims, "iat": int(time.time())})
    status, body, _ = await _userinfo(http, world, fresh)
    assert status == 200, body
    # The retired key still verifies what it signed.
    status, _, _ = await _userinfo(http, world, before.body["access_token"])
    assert status == 200


async def test_verify_own_access_token_checks_the_school_binding(
    pool: Any, settings: Settings, unique: str
) -> None:
    school = await schools.create_school(pool, settings, f"vb{unique}", "Binding School")
    issuer = Issuer(school, settings.urls.school_origin(school.subdomain))
    state = token_state.TokenState()
    signer = await keys.KeyRing(pool, settings).signer(school.id, keys.ACCESS_TOKEN_ALG)
    now = int(time.time())
    base = {
        "iss": issuer.issuer,
        "aud": issuer.issuer,
        "sub": "u",
        "client_id": "c",
        "scope": "openid",
        "school_id": school.id,
        "jti": "j",
        "iat": now,
        "exp": now + 60,
        "grant_id": "6f1c7ad4-4a7e-4cf3-9b0e-6d7a0c6d1b11",
    }
    claims = await token_state.verify_own_access_token(
        state, pool, issuer, minting.sign_access_token(signer, base)
    )
    assert claims["school_id"] == school.id
    for bad in (
        {**base, "school_id": school.id + 1},
        {**base, "grant_id": "not-a-uuid"},
        {k: v for k, v in base.items() if k != "client_id"},
        {**base, "school_id": True},
    ):
        try:
            await token_state.verify_own_access_token(
                state, pool, issuer, minting.sign_access_token(signer, bad)
            )
        except jwt.TokenError:
            continue
        raise AssertionError(f"accepted {bad}")
