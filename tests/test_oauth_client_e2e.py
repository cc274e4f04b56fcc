"""The whole flow as a partner's app sees it, driven by a real OAuth client library (Authlib).

Discovery, dynamic registration, authorize with PKCE (S256), sign-in and consent in a
cookie-keeping browser, the code exchange, the ID token checked against the JWKS (signature,
iss, aud, nonce, at_hash), refresh with rotation, revocation, and introspection.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx2 as httpx  # the client Authlib drives (it prefers httpx2 when installed)
import pytest
from authlib.integrations.httpx_client import AsyncOAuth2Client
from joserfc import jwt
from joserfc.jwk import KeySet

from libs.common.config import Settings
from services.identity import clients
from tests.test_authorize import PASSWORD, Browser, make_school, make_user

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from authlib.oidc.core import CodeIDToken


class LocalhostTransport(httpx.AsyncBaseTransport):
    """Sends *.localhost requests to 127.0.0.1, leaving the URL and Host header as written."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host == "localhost" or host.endswith(".localhost"):
            request.url = request.url.copy_with(host="127.0.0.1")
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    b = Browser()
    yield b
    await b.close()


async def test_partner_app_runs_the_whole_flow_with_authlib(
    identity_url: str,
    identity_port: int,
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
    browser: Browser,
) -> None:
    school = await make_school(pool, settings, f"e2e{unique}")
    user = await make_user(pool, school, unique, name="Grace Hopper")
    issuer = f"http://{school.subdomain}.localhost:{identity_port}"
    redirect_uri = "http://127.0.0.1:9/callback"  # never contacted: the browser stops at it
    transport = LocalhostTransport()

    async with httpx.AsyncClient(transport=transport) as plain:
        meta = (await plain.get(f"{issuer}/.well-known/openid-configuration")).json()
        assert meta["issuer"] == issuer
        registered = await plain.post(
            meta["registration_endpoint"],
            json={
                "client_name": "Authlib Partner",
                "redirect_uris": [redirect_uri],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "token_endpoint_auth_method": "none",
                "scope": "openid profile email courses:read",
            },
        )
        assert registered.status_code == 201, registered.text
        client_id = registered.json()["client_id"]
        jwks = KeySet.import_key_set((await plain.get(meta["jwks_uri"])).json())

    # A resource server of the school, allowed to introspect the school's tokens.
    resource_server = await clients.create_client(
        pool,
        settings,
        school=school,
        name="Course API",
        redirect_uris=[],
        grant_types=["client_credentials"],
        scopes=["courses:read"],
        first_party=True,
    )

    oauth = AsyncOAuth2Client(
        client_id=client_id,
        redirect_uri=redirect_uri,
        scope="openid profile email courses:read",
        code_challenge_method="S256",
        token_endpoint_auth_method="none",
        transport=LocalhostTransport(),
    )
    verifier = secrets.token_urlsafe(48)
    nonce = secrets.token_urlsafe(12)
    url, state = oauth.create_authorization_url(
        meta["authorization_endpoint"], code_verifier=verifier, nonce=nonce
    )

    # The user signs in and allows, in a browser that keeps cookies.
    status, headers, page = await browser.get(url)
    assert status == 200, page
    status, headers, page = await browser.login(issuer, page, user.email, PASSWORD)
    status, headers, page = await browser.follow(issuer, status, headers, page)
    assert status == 200, page
    status, headers, _ = await browser.decide(issuer, page, "allow")
    assert status == 303
    callback = headers["Location"]
    query = {k: v[0] for k, v in parse_qs(urlsplit(callback).query).items()}
    assert query["iss"] == issuer  # RFC 9207: the answer names who sent it
    assert query["state"] == state

    token = await oauth.fetch_token(
        meta["token_endpoint"], authorization_response=callback, code_verifier=verifier
    )
    assert token["token_type"] == "Bearer"
    assert token["expires_in"] == 7200
    assert token["scope"] == "openid profile email courses:read"
    assert token["school_id"] == school.id
    assert token["school_subdomain"] == school.subdomain

    # The ID token: signature against the published JWKS, then the OIDC claim rules.
    decoded = jwt.decode(token["id_token"], jwks, algorithms=["RS256"])
    assert decoded.header["alg"] == "RS256"
    claims = CodeIDToken(
        decoded.claims,
        decoded.header,
        options={"iss": {"essential": True, "value": issuer}},
        params={"nonce": nonce, "client_id": client_id, "access_token": token["access_token"]},
    )
    claims.validate()  # iss, aud, exp, iat, nonce, at_hash
    assert claims["sub"] == str(user.id)
    assert claims["aud"] == client_id or client_id in claims["aud"]

    # The access token is an RFC 9068 JWT from the same issuer.
    access = jwt.decode(token["access_token"], jwks, algorithms=["ES256"])
    assert access.header["typ"] == "at+jwt"
    assert access.claims["iss"] == issuer
    assert access.claims["client_id"] == client_id
    assert access.claims["school_id"] == school.id

    async with httpx.AsyncClient(transport=LocalhostTransport()) as plain:
        info = await plain.get(
            meta["userinfo_endpoint"],
            headers={"Authorization": f"Bearer {token['access_token']}"},
        )
    assert info.status_code == 200
    assert info.json() == {
        "sub": str(user.id),
        "name": "Grace Hopper",
        "email": user.email,
        "email_verified": False,
    }

    # Refresh rotates: a new refresh token, and the old one no longer works.
    first_refresh = token["refresh_token"]
    refreshed = await oauth.refresh_token(meta["token_endpoint"], refresh_token=first_refresh)
    assert refreshed["refresh_token"] != first_refresh
    assert refreshed["access_token"] != token["access_token"]

    introspector = AsyncOAuth2Client(
        client_id=resource_server.client.id,
        client_secret=resource_server.client_secret,
        transport=LocalhostTransport(),
    )
    active = (
        await introspector.introspect_token(
            meta["introspection_endpoint"], token=refreshed["access_token"]
        )
    ).json()
    assert active["active"] is True
    assert active["client_id"] == client_id
    assert active["school_id"] == school.id

    # Revoking the refresh token ends the whole grant: every token of it turns inactive.
    revoked = await oauth.revoke_token(
        meta["revocation_endpoint"], token=refreshed["refresh_token"]
    )
    assert revoked.status_code == 200
    for candidate in (refreshed["access_token"], token["access_token"]):
        answer = (
            await introspector.introspect_token(meta["introspection_endpoint"], token=candidate)
        ).json()
        assert answer == {"active": False}

    async with httpx.AsyncClient(transport=LocalhostTransport()) as plain:
        after = await plain.post(
            meta["token_endpoint"],
            data={
                "grant_type": "refresh_token",
                "refresh_token": refreshed["refresh_token"],
                "client_id": client_id,
            },
        )
    assert after.status_code == 400
    assert after.json()["error"] == "invalid_grant"
    await oauth.aclose()
    await introspector.aclose()
