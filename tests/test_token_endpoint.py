"""The token endpoint's authorization_code grant, client authentication, and the tokens it
mints, over real HTTP against the running identity service."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import orjson
import pytest
from joserfc import jws
from joserfc.jwk import ECKey

from libs.common import jwt
from libs.common.config import Settings
from services.identity import clients, credentials, grants, keys, resources, schools, store, users
from services.identity.client_auth import basic_credentials
from tests.token_helpers import (
    REDIRECT_URI,
    World,
    audit_actions,
    basic,
    code_flow,
    insert_code,
    introspect,
    make_world,
    origin_of,
    pkce_pair,
    refresh,
    revocation_marked,
    token,
    verify_with_jwks,
)


@pytest.fixture
async def world(
    identity_url: str, pool: Any, settings: Settings, unique: str, identity_port: int
) -> World:
    """The school, user and clients of one test, served by this run's identity."""
    return await make_world(pool, settings, unique, identity_port)


@dataclass(frozen=True)
class StoredCode:
    """A code as the authorize flow stores it, and the form its rightful client redeems it with."""

    form: dict[str, str]
    challenge: str
    grant_id: UUID


async def new_code(
    pool: Any,
    settings: Settings,
    world: World,
    client_id: str,
    *,
    scopes: Sequence[str] = ("read",),
    school_id: int | None = None,
    redirect_uri: str = REDIRECT_URI,
    resource: str | None = None,
) -> StoredCode:
    """A code for `world`'s user and `client_id`, of `world`'s school unless told."""
    verifier, challenge = pkce_pair()
    code, grant_id = await insert_code(
        pool,
        settings,
        school_id=world.school.id if school_id is None else school_id,
        client_id=client_id,
        user_id=world.user.id,
        scopes=scopes,
        challenge=challenge,
        redirect_uri=redirect_uri,
        resource=resource,
    )
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "code_verifier": verifier,
    }
    return StoredCode(form, challenge, grant_id)


def without(form: dict[str, str], field: str) -> dict[str, str]:
    """The form as a client that omits `field` sends it."""
    return {k: v for k, v in form.items() if k != field}


def confidential_basic(world: World) -> str:
    """HTTP Basic credentials of `world`'s confidential client, the usual authenticated caller."""
    return basic(world.confidential.id, world.secret)


async def served_lookup(
    http: Any, origin: str
) -> Callable[[str], Awaitable[jwt.VerificationKey | None]]:
    """The shared verifier's key lookup over the JWKS `origin` serves, as a gateway builds it."""
    async with http.get(origin + "/v1/oauth/jwks") as resp:
        key_set = jwt.KeySet.from_jwks(await resp.json())

    async def lookup(kid: str) -> jwt.VerificationKey | None:
        return key_set.get(kid)

    return lookup


async def test_code_exchange_answers_the_seed_shape(
    world: World, http: Any, pool: Any, settings: Settings
) -> None:
    answer, _ = await code_flow(http, pool, settings, world)
    assert answer.status == 200, answer.body
    body = answer.body
    assert set(body) == {
        "access_token",
        "token_type",
        "expires_in",
        "refresh_token",
        "scope",
        "school_id",
        "school_subdomain",
    }
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 7200
    # Granted scopes as asked, the umbrella `read` not expanded (seed 001).
    assert body["scope"] == "read courses:read students:read"
    assert body["school_id"] == world.school.id and isinstance(body["school_id"], int)
    assert body["school_subdomain"] == world.school.subdomain
    assert body["refresh_token"].startswith("lcr_")
    assert answer.headers["Cache-Control"] == "no-store"
    assert answer.headers["Pragma"] == "no-cache"


async def test_quickstart_alias_with_a_public_client(
    world: World, http: Any, pool: Any, settings: Settings
) -> None:
    """Seed 001 step 3, verbatim: /api/oauth/token, client_id in the body, no secret."""
    code = await new_code(pool, settings, world, world.public.id)
    async with http.post(
        world.origin + "/api/oauth/token", data={**code.form, "client_id": world.public.id}
    ) as resp:
        body = await resp.json()
        assert resp.status == 200, body
    assert body["school_id"] == world.school.id and body["refresh_token"]


async def test_access_token_verifies_against_the_served_jwks_with_every_claim(
    world: World, http: Any, pool: Any, settings: Settings
) -> None:
    answer, grant_id = await code_flow(http, pool, settings, world)
    header, claims = await verify_with_jwks(http, world.origin, answer.body["access_token"])
    assert header["typ"] == "at+jwt" and header["alg"] == "ES256" and header["kid"]
    assert claims["iss"] == world.origin
    assert claims["sub"] == str(world.user.id)
    assert claims["aud"] == world.origin  # no resource named: the school's API origin
    assert claims["client_id"] == world.confidential.id
    assert claims["scope"] == "read courses:read students:read"
    assert claims["school_id"] == world.school.id
    assert claims["school_subdomain"] == world.school.subdomain
    assert claims["grant_id"] == str(grant_id)
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 16
    assert claims["exp"] - claims["iat"] == 7200
    assert abs(claims["iat"] - time.time()) < 30
    assert claims["auth_time"] <= claims["iat"]

    # The shared verifier (the gateway's) accepts it with the served keys.
    lookup = await served_lookup(http, world.origin)
    verified = await jwt.verify_access_token(
        answer.body["access_token"], lookup, issuer=world.origin, audience=world.origin
    )
    assert verified["jti"] == claims["jti"]


async def test_id_token_is_rs256_with_nonce_and_at_hash(
    world: World, http: Any, pool: Any, settings: Settings
) -> None:
    answer, _ = await code_flow(
        http,
        pool,
        settings,
        world,
        scopes=["openid", "profile", "courses:read"],
        nonce="n-0S6_WzA2Mj",
    )
    assert answer.status == 200, answer.body
    id_token = answer.body["id_token"]
    header, claims = await verify_with_jwks(http, world.origin, id_token)
    assert header["alg"] == "RS256" and header["typ"] == "JWT"
    assert claims["iss"] == world.origin
    assert claims["aud"] == world.confidential.id and claims["azp"] == world.confidential.id
    assert claims["sub"] == str(world.user.id)
    assert claims["nonce"] == "n-0S6_WzA2Mj"
    assert claims["school_id"] == world.school.id
    assert claims["exp"] > time.time() and claims["auth_time"] <= claims["iat"]
    digest = hashlib.sha256(answer.body["access_token"].encode()).digest()
    expected = base64.urlsafe_b64encode(digest[:16]).rstrip(b"=").decode()
    assert claims["at_hash"] == expected
    # An ID token is not an access token: the shared verifier refuses it on typ.
    lookup = await served_lookup(http, world.origin)
    with pytest.raises(jwt.WrongTokenType):
        await jwt.verify_access_token(id_token, lookup, issuer=world.origin, audience=None)


async def test_pkce_missing_or_wrong_verifier_is_invalid_grant(
    world: World, http: Any, pool: Any, settings: Settings
) -> None:
    code = await new_code(pool, settings, world, world.confidential.id)
    auth = confidential_basic(world)
    base = without(code.form, "code_verifier")
    for extra in (
        {},
        {"code_verifier": pkce_pair()[0]},
        {"code_verifier": "short"},
        {"code_verifier": code.form["code_verifier"] + "!"},
        # `plain` would compare the challenge itself; never accepted.
        {"code_verifier": code.challenge},
    ):
        answer = await token(http, world.origin, {**base, **extra}, authorization=auth)
        assert answer.status == 400, extra
        assert answer.body["error"] == "invalid_grant"
    # Failed attempts did not consume the code: its rightful holder still redeems it.
    answer = await token(http, world.origin, code.form, authorization=auth)
    assert answer.status == 200, answer.body


async def test_code_replay_fails_and_revokes_what_the_first_redemption_issued(
    world: World, http: Any, pool: Any, redis: Any, settings: Settings
) -> None:
    code = await new_code(pool, settings, world, world.confidential.id)
    grant_id = code.grant_id
    auth = confidential_basic(world)
    first = await token(http, world.origin, code.form, authorization=auth)
    assert first.status == 200
    assert (await introspect(http, world, first.body["access_token"]))["active"] is True

    second = await token(http, world.origin, code.form, authorization=auth)
    assert second.status == 400 and second.body["error"] == "invalid_grant"
    # The revocation was complete before the answer: PostgreSQL, Redis mark, stream.
    assert await revocation_marked(redis, settings, grant_id) == (True, True)
    row = await pool.fetchrow("SELECT revoked_reason FROM grants WHERE id = $1", grant_id)
    assert row["revoked_reason"] == "code_replay"
    assert (await introspect(http, world, first.body["access_token"])) == {"active": False}
    assert (await introspect(http, world, first.body["refresh_token"])) == {"active": False}
    after = await refresh(http, world, first.body["refresh_token"])
    assert after.status == 400 and after.body["error"] == "invalid_grant"
    assert "code.replayed" in await audit_actions(redis, settings, grant_id)


async def test_a_used_code_presented_by_anyone_but_its_client_revokes_nothing(
    world: World,
    http: Any,
    pool: Any,
    redis: Any,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    """Holding a leaked, already used code is no power over its grant: another client of the
    school, a client of another school, or the code's public client without the PKCE
    verifier get a plain invalid_grant and the grant lives on."""
    elsewhere = await make_world(pool, settings, unique, identity_port, label="rpx")
    code = await new_code(pool, settings, world, world.public.id, scopes=["openid", "read"])
    data, grant_id = code.form, code.grant_id
    first = await token(http, world.origin, {**data, "client_id": world.public.id})
    assert first.status == 200, first.body

    attempts = [
        # Another client of the same school, authenticated, with the right verifier.
        (world.origin, data, confidential_basic(world)),
        # A client of another school, at its own school.
        (elsewhere.origin, data, confidential_basic(elsewhere)),
        (elsewhere.origin, {**data, "client_id": elsewhere.public.id}, None),
        # The code's own public client, but without proof it is the one that asked.
        (world.origin, {**data, "client_id": world.public.id, "code_verifier": "x" * 43}, None),
        (world.origin, without(data, "code_verifier") | {"client_id": world.public.id}, None),
    ]
    for origin, form, authorization in attempts:
        answer = await token(http, origin, form, authorization=authorization)
        assert answer.status == 400 and answer.body["error"] == "invalid_grant", answer.body
        assert "already been used" not in answer.body.get("error_description", "")
    assert await pool.fetchval("SELECT revoked_at FROM grants WHERE id = $1", grant_id) is None
    assert (await revocation_marked(redis, settings, grant_id))[0] is False
    userinfo = world.origin + "/v1/oauth/userinfo"
    bearer = {"Authorization": f"Bearer {first.body['access_token']}"}
    async with http.get(userinfo, headers=bearer) as resp:
        assert resp.status == 200

    # The code's own client, proving it with the verifier: the replay ends the grant.
    again = await token(http, world.origin, {**data, "client_id": world.public.id})
    assert again.status == 400 and again.body["error"] == "invalid_grant"
    row = await pool.fetchrow("SELECT revoked_reason FROM grants WHERE id = $1", grant_id)
    assert row["revoked_reason"] == "code_replay"
    async with http.get(userinfo, headers=bearer) as resp:
        assert resp.status == 401


async def test_expired_code_is_invalid_grant(
    world: World, http: Any, pool: Any, settings: Settings
) -> None:
    code = await new_code(pool, settings, world, world.confidential.id)
    await pool.execute(
        "UPDATE authorization_codes SET expires_at = now() - interval '1 second'"
        " WHERE code_hash = $1",
        credentials.token_hash(code.form["code"]),
    )
    answer = await token(http, world.origin, code.form, authorization=confidential_basic(world))
    assert answer.status == 400 and answer.body["error"] == "invalid_grant"


async def test_redirect_uri_must_be_identical(
    world: World, http: Any, pool: Any, settings: Settings
) -> None:
    code = await new_code(pool, settings, world, world.confidential.id)
    auth = confidential_basic(world)
    base = without(code.form, "redirect_uri")
    for uri in (REDIRECT_URI + "/", REDIRECT_URI.upper(), REDIRECT_URI + "?x=1"):
        answer = await token(http, world.origin, {**base, "redirect_uri": uri}, authorization=auth)
        assert answer.status == 400 and answer.body["error"] == "invalid_grant", uri
    # Omitted, as the authorize request may omit it for a client with one registered URI
    # (RFC 6749 4.1.3); the failed attempts above left the code unredeemed.
    omitted = await token(http, world.origin, base, authorization=auth)
    assert omitted.status == 200, omitted.body

    two_uris = await clients.create_client(
        pool,
        settings,
        school=world.school,
        name="Two Callbacks",
        redirect_uris=[REDIRECT_URI, "https://app.example.com/other"],
        scopes=["read"],
    )
    assert two_uris.client_secret is not None
    code2 = await new_code(pool, settings, world, two_uris.client.id)
    missing = await token(
        http,
        world.origin,
        without(code2.form, "redirect_uri"),
        authorization=basic(two_uris.client.id, two_uris.client_secret),
    )
    assert missing.status == 400 and missing.body["error"] == "invalid_request"


async def test_code_of_another_client_and_of_a_revoked_grant_are_invalid_grant(
    world: World, http: Any, pool: Any, redis: Any, settings: Settings
) -> None:
    code = await new_code(pool, settings, world, world.public.id)
    stolen = await token(http, world.origin, code.form, authorization=confidential_basic(world))
    assert stolen.status == 400 and stolen.body["error"] == "invalid_grant"

    code2 = await new_code(pool, settings, world, world.public.id)
    await grants.revoke_grant(pool, redis, settings, code2.grant_id, reason="user")
    revoked = await token(http, world.origin, {**code2.form, "client_id": world.public.id})
    assert revoked.status == 400 and revoked.body["error"] == "invalid_grant"


async def test_client_of_school_a_at_school_b_is_invalid_client(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    a = await make_world(pool, settings, unique, identity_port, label="sa")
    b = await make_world(pool, settings, unique, identity_port, label="sb")
    data = (await new_code(pool, settings, a, a.confidential.id)).form
    answer = await token(http, b.origin, data, authorization=confidential_basic(a))
    assert answer.status == 401 and answer.body["error"] == "invalid_client"
    public = await token(http, b.origin, {**data, "client_id": a.public.id})
    assert public.status == 401 and public.body["error"] == "invalid_client"
    # And at its own school the same code still works.
    ok = await token(http, a.origin, data, authorization=confidential_basic(a))
    assert ok.status == 200, ok.body


async def test_a_client_id_no_client_can_have_is_invalid_client(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    # A NUL in client_id once reached PostgreSQL, which refused it: a 500, not RFC 6749 5.2.
    world = await make_world(pool, settings, unique, identity_port, label="nul")
    form = {"grant_type": "client_credentials"}
    for client_id in ("x\x00y", "ünï"):
        answers = [
            await token(http, world.origin, {**form, "client_id": client_id}),
            await token(http, world.origin, form, authorization=basic(client_id, "secret")),
        ]
        for answer in answers:
            assert answer.status == 401, answer.body
            assert answer.body["error"] == "invalid_client"


async def test_client_authentication_methods(
    world: World, http: Any, pool: Any, settings: Settings
) -> None:
    cid, secret = world.confidential.id, world.secret

    async def exchange(extra: dict[str, str], authorization: str | None = None) -> Any:
        code = await new_code(pool, settings, world, cid)
        return await token(http, world.origin, {**code.form, **extra}, authorization=authorization)

    # client_secret_basic and client_secret_post both work.
    assert (await exchange({}, basic(cid, secret))).status == 200
    assert (await exchange({"client_id": cid, "client_secret": secret})).status == 200
    # Basic plus a client_id in the body naming the same client is fine (the seed sends one).
    assert (await exchange({"client_id": cid}, basic(cid, secret))).status == 200

    wrong = await exchange({}, basic(cid, secret + "x"))
    assert wrong.status == 401 and wrong.body["error"] == "invalid_client"
    assert wrong.headers["WWW-Authenticate"].startswith("Basic")
    wrong_post = await exchange({"client_id": cid, "client_secret": "nope"})
    assert wrong_post.status == 401 and wrong_post.body["error"] == "invalid_client"
    no_secret = await exchange({"client_id": cid})
    assert no_secret.status == 401 and no_secret.body["error"] == "invalid_client"
    unknown = await exchange({}, basic("no-such-client", secret))
    assert unknown.status == 401 and unknown.body["error"] == "invalid_client"
    nobody = await exchange({})
    assert nobody.status == 401 and nobody.body["error"] == "invalid_client"
    both = await exchange({"client_secret": secret}, basic(cid, secret))
    assert both.status == 400 and both.body["error"] == "invalid_request"
    garbled = await exchange({}, "Basic %%%not-base64")
    assert garbled.status == 401 and garbled.body["error"] == "invalid_client"

    # A public client may not present a secret.
    public_with_secret = await token(
        http,
        world.origin,
        {
            "grant_type": "refresh_token",
            "refresh_token": "lcr_x",
            "client_id": world.public.id,
            "client_secret": "anything",
        },
    )
    assert public_with_secret.status == 401 and public_with_secret.body["error"] == "invalid_client"

    # A disabled client is refused.
    await store.update_client(pool, cid, disabled_at=datetime.now(UTC))
    disabled = await exchange({}, basic(cid, secret))
    assert disabled.status == 401 and disabled.body["error"] == "invalid_client"


def test_basic_credentials_are_form_urldecoded() -> None:
    raw = base64.b64encode(b"my%3Aclient:s%2Bcr%25t+x").decode()
    assert basic_credentials("Basic " + raw) == ("my:client", "s+cr%t x")
    assert basic_credentials(None) is None
    assert basic_credentials("Bearer abc") is None


async def test_request_errors(world: World, http: Any) -> None:
    auth = confidential_basic(world)
    missing = await token(http, world.origin, {}, authorization=auth)
    assert missing.status == 400 and missing.body["error"] == "invalid_request"
    unknown = await token(http, world.origin, {"grant_type": "password"}, authorization=auth)
    assert unknown.status == 400 and unknown.body["error"] == "unsupported_grant_type"
    not_allowed = await token(
        http, world.origin, {"grant_type": "client_credentials"}, authorization=auth
    )
    assert not_allowed.status == 400 and not_allowed.body["error"] == "unauthorized_client"
    no_code = await token(
        http, world.origin, {"grant_type": "authorization_code"}, authorization=auth
    )
    assert no_code.status == 400 and no_code.body["error"] == "invalid_request"
    bad_code = await token(
        http,
        world.origin,
        {
            "grant_type": "authorization_code",
            "code": "lcc_nothing",
            "redirect_uri": REDIRECT_URI,
            "code_verifier": pkce_pair()[0],
        },
        authorization=auth,
    )
    assert bad_code.status == 400 and bad_code.body["error"] == "invalid_grant"
    async with http.post(
        world.origin + "/v1/oauth/token",
        json={"grant_type": "authorization_code"},
        headers={"Authorization": auth},
    ) as resp:
        assert resp.status == 400 and (await resp.json())["error"] == "invalid_request"
    async with http.post(
        world.origin + "/v1/oauth/token",
        data="grant_type=refresh_token&grant_type=client_credentials",
        headers={"Authorization": auth, "Content-Type": "application/x-www-form-urlencoded"},
    ) as resp:
        assert resp.status == 400 and (await resp.json())["error"] == "invalid_request"
    async with http.get(world.origin + "/v1/oauth/token") as resp:
        assert resp.status == 405


async def test_resource_indicator_sets_the_audience(
    world: World, http: Any, pool: Any, settings: Settings
) -> None:
    mcp = resources.mcp_resource(settings)
    auth = confidential_basic(world)

    async def code_for(resource: str) -> dict[str, str]:
        code = await new_code(
            pool, settings, world, world.confidential.id, scopes=["courses:read"], resource=resource
        )
        return code.form

    data = await code_for(world.origin)
    other = await token(http, world.origin, {**data, "resource": mcp}, authorization=auth)
    assert other.status == 400 and other.body["error"] == "invalid_target"
    answer = await token(http, world.origin, {**data, "resource": world.origin}, authorization=auth)
    assert answer.status == 200, answer.body
    _, claims = await verify_with_jwks(http, world.origin, answer.body["access_token"])
    assert claims["aud"] == world.origin
    refreshed = await refresh(http, world, answer.body["refresh_token"])
    _, claims = await verify_with_jwks(http, world.origin, refreshed.body["access_token"])
    assert claims["aud"] == world.origin

    # The MCP resource is the platform's alone: a school's code bound to it mints nothing.
    refused = await token(http, world.origin, await code_for(mcp), authorization=auth)
    assert refused.status == 400 and refused.body["error"] == "invalid_target"


async def test_platform_client_gets_a_platform_token_for_the_picked_school(
    world: World, http: Any, pool: Any, settings: Settings, identity_port: int
) -> None:
    platform = await clients.create_client(
        pool,
        settings,
        school=None,
        name="MCP Client",
        redirect_uris=["http://127.0.0.1:33418/callback"],
        public=True,
        scopes=["openid", "courses:read"],
        created_via="registration",
    )
    code = await new_code(
        pool,
        settings,
        world,
        platform.client.id,
        scopes=["openid", "courses:read"],
        redirect_uri="http://127.0.0.1:33418/callback",
        resource=resources.mcp_resource(settings),
    )
    data = {**code.form, "client_id": platform.client.id}
    # Not at a school's origin: a platform client belongs to the platform issuer.
    at_school = await token(http, world.origin, data)
    assert at_school.status == 401 and at_school.body["error"] == "invalid_client"
    platform_origin = f"http://localhost:{identity_port}"
    answer = await token(http, platform_origin, data)
    assert answer.status == 200, answer.body
    assert answer.body["school_id"] == world.school.id
    assert answer.body["school_subdomain"] == world.school.subdomain
    _, claims = await verify_with_jwks(http, platform_origin, answer.body["access_token"])
    assert claims["iss"] == platform_origin
    assert claims["aud"] == resources.mcp_resource(settings)
    assert claims["school_id"] == world.school.id and claims["grant_id"] == str(code.grant_id)
    _, id_claims = await verify_with_jwks(http, platform_origin, answer.body["id_token"])
    assert id_claims["iss"] == platform_origin
    # Its refresh works on the platform too, and stays bound to the picked school.
    refreshed = await token(
        http,
        platform_origin,
        {
            "grant_type": "refresh_token",
            "refresh_token": answer.body["refresh_token"],
            "client_id": platform.client.id,
        },
    )
    assert refreshed.status == 200, refreshed.body
    assert refreshed.body["school_id"] == world.school.id


# The shared verifier (libs/common/jwt.py) on its own ----------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{_b64(orjson.dumps(header))}.{_b64(orjson.dumps(claims))}."


async def test_shared_verifier_refuses_what_it_must(
    pool: Any, settings: Settings, unique: str
) -> None:
    school = await schools.create_school(pool, settings, f"jv{unique}", "Verifier School")
    signer = await keys.KeyRing(pool, settings).signer(school.id, keys.ACCESS_TOKEN_ALG)
    own_keys = jwt.KeySet.from_jwks(await keys.jwks(pool, school.id))

    async def lookup(kid: str) -> jwt.VerificationKey | None:
        return own_keys.get(kid)

    iss, aud = "https://demo.example", "https://demo.example/api"
    now = int(time.time())
    good = {"iss": iss, "aud": aud, "sub": "u", "iat": now, "exp": now + 60}

    def signed(claims: dict[str, Any], typ: str = "at+jwt") -> str:
        header = {"alg": signer.alg, "kid": signer.kid, "typ": typ}
        return jws.serialize_compact(header, orjson.dumps(claims), signer.key, algorithms=["ES256"])

    assert (await jwt.verify_access_token(signed(good), lookup, issuer=iss, audience=aud))["sub"]
    # Leeway: a token a few seconds past exp still passes, a minute past does not.
    late = {**good, "exp": now - 5}
    await jwt.verify_access_token(signed(late), lookup, issuer=iss, audience=aud)
    cases: list[tuple[str, type[jwt.TokenError]]] = [
        (signed({**good, "exp": now - 120}), jwt.TokenExpired),
        (signed({**good, "nbf": now + 120}), jwt.TokenNotYetValid),
        (signed({**good, "iat": now + 120}), jwt.TokenNotYetValid),
        (signed({k: v for k, v in good.items() if k != "exp"}), jwt.MissingClaim),
        (signed({**good, "iss": "https://evil.example"}), jwt.InvalidIssuer),
        (signed({**good, "aud": "https://other.example"}), jwt.InvalidAudience),
        (signed(good, typ="JWT"), jwt.WrongTokenType),
        (
            _unsigned({"alg": "none", "typ": "at+jwt", "kid": signer.kid}, good),
            jwt.DisallowedAlgorithm,
        ),
        ("not-a-token", jwt.MalformedToken),
        ("a.b", jwt.MalformedToken),
        ("!!!.???.***", jwt.MalformedToken),
    ]
    # HS256 with the public key as the "secret": the classic algorithm confusion.
    public_pem = own_keys.get(signer.kid).key.as_pem(private=False)  # type: ignore[union-attr]
    hs_input = f"{_b64(orjson.dumps({'alg': 'HS256', 'kid': signer.kid, 'typ': 'at+jwt'}))}"
    hs_input += f".{_b64(orjson.dumps(good))}"
    hs_sig = hmac.new(public_pem, hs_input.encode(), hashlib.sha256).digest()
    hs = f"{hs_input}.{_b64(hs_sig)}"
    cases.append((hs, jwt.DisallowedAlgorithm))
    # Signed by a stranger's key that claims our kid.
    stranger = ECKey.generate_key("P-256", private=True)
    forged = jws.serialize_compact(
        {"alg": "ES256", "kid": signer.kid, "typ": "at+jwt"},
        orjson.dumps(good),
        stranger,
        algorithms=["ES256"],
    )
    cases.append((forged, jwt.InvalidSignature))
    unknown_kid = jws.serialize_compact(
        {"alg": "ES256", "kid": "nope", "typ": "at+jwt"},
        orjson.dumps(good),
        stranger,
        algorithms=["ES256"],
    )
    cases.append((unknown_kid, jwt.UnknownKey))
    # A valid signature over a changed payload.
    head, _, sig = signed(good).split(".")
    tampered = f"{head}.{_b64(orjson.dumps({**good, 'sub': 'admin'}))}.{sig}"
    cases.append((tampered, jwt.InvalidSignature))
    for value, error in cases:
        with pytest.raises(error):
            await jwt.verify_access_token(value, lookup, issuer=iss, audience=aud)


async def test_user_with_two_schools_gets_tokens_bound_to_the_code_school(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    """The school comes from the code, and the code must be of the issuer's school."""
    a = await make_world(pool, settings, unique, identity_port, label="ua")
    b = await make_world(pool, settings, unique, identity_port, label="ub")
    await users.create_user(
        pool, school_id=b.school.id, email=a.user.email, password="irrelevant-here"
    )
    # A code claiming school B for A's client cannot be redeemed at A.
    code = await new_code(pool, settings, a, a.confidential.id, school_id=b.school.id)
    answer = await token(http, a.origin, code.form, authorization=confidential_basic(a))
    assert answer.status == 400 and answer.body["error"] == "invalid_grant"
    assert origin_of(a.school.subdomain, identity_port) == a.origin
