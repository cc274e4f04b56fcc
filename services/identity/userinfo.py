"""The OIDC UserInfo endpoint (OIDC Core 5.3), a protected resource of the issuer itself.

The access token comes in `Authorization: Bearer` or, for POST, as the `access_token` form
parameter (RFC 6750 2.2). It must be this issuer's, live, minted for the school's API (not
for another RFC 8707 resource), of a grant not revoked, and hold `openid`; the claims
released follow the scopes: `name` with `profile`, `email` and `email_verified` with `email`.
Errors are RFC 6750 challenges.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from libs.common import jwt
from libs.common.errors import (
    AuthenticationRequired,
    InsufficientScope,
    InvalidRequest,
    InvalidToken,
    OAuthError,
    json_response,
)
from libs.common.logging import get_logger
from services.identity import client_auth, cors, resources, store, token_state
from services.identity.context import IdentityContext, context, issuer
from services.identity.schools import Issuer
from services.identity.store import grants as grant_store

log = get_logger(__name__)

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


async def bearer_token(request: web.Request) -> str:
    """The one access token the request carries (RFC 6750 2.1, 2.2)."""
    header = request.headers.get("Authorization")
    from_header: str | None = None
    if header is not None:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise InvalidRequest("use the Bearer scheme", status=401)
        from_header = value.strip()
    from_body: str | None = None
    if request.method == "POST" and request.content_type == client_auth.FORM_CONTENT_TYPE:
        form = await request.post()
        values = form.getall("access_token", [])
        if len(values) > 1 or (values and not isinstance(values[0], str)):
            raise InvalidRequest("one access_token, please")
        from_body = str(values[0]) if values else None
    if from_header and from_body:
        raise InvalidRequest("send the token in one place only")
    token = from_header or from_body
    if not token:
        # RFC 6750 3.1: no credentials at all gets a bare challenge, without an error code.
        raise AuthenticationRequired()
    return token


async def _meant_for_userinfo(
    ctx: IdentityContext, state: token_state.TokenState, iss: Issuer, claims: dict[str, Any]
) -> bool:
    """Whether `aud` is the audience identity mints for its own API: the school's API origin,
    the audience of every token whose client named no other resource (resources.py).

    An openid flow's token that named no resource is meant, among others, for UserInfo (OIDC
    Core 5.3), and that is this audience. A token the client asked for another resource
    (RFC 8707, the MCP endpoint) is restricted to that resource: accepting it here would let
    whoever that resource hands it to read the user's profile and email with it.
    """
    school = iss.school or await state.school(ctx.pool, int(claims["school_id"]))
    if school is None:
        return False
    aud = claims.get("aud")
    held = aud if isinstance(aud, list) else [aud]
    return resources.api_resource(ctx.settings, school) in held


async def claims_for(
    ctx: IdentityContext,
    state: token_state.TokenState,
    iss: Issuer,
    token: str,
    *,
    admit: Callable[[str], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """The UserInfo claims the token's scopes release.

    `admit` is shown the token's client as soon as the signature proves it, before any other
    check, so the client's origin rules apply to every answer that follows (a revoked
    token's 401 included).
    """
    try:
        claims = await token_state.verify_own_access_token(state, ctx.pool, iss, token)
    except jwt.TokenError as exc:
        log.info("userinfo_refused", reason=exc.reason)
        raise InvalidToken("the access token is invalid or expired") from None
    if admit is not None:
        await admit(str(claims["client_id"]))
    if not await _meant_for_userinfo(ctx, state, iss, claims):
        log.info("userinfo_refused", reason="audience")
        raise InvalidToken("the access token is not meant for this endpoint")
    grant = await grant_store.grant_status(ctx.pool, token_state.grant_uuid(claims))
    if grant is None or grant.revoked or grant.client_id != claims["client_id"]:
        raise InvalidToken("the access token has been revoked")
    granted = set(str(claims.get("scope", "")).split())
    if "openid" not in granted:
        raise InsufficientScope("the openid scope is required")
    user = await store.user_by_id(ctx.pool, grant.user_id) if grant.user_id else None
    if user is None or str(user.id) != claims["sub"]:
        raise InvalidToken("the token has no user")
    answer: dict[str, Any] = {"sub": str(user.id)}
    if "profile" in granted:
        answer["name"] = user.name
    if "email" in granted:
        answer["email"] = user.email
        answer["email_verified"] = user.email_verified
    return answer


async def admit_origin(request: web.Request, ctx: IdentityContext, client_id: str) -> None:
    """Refuse a cross-origin call from an origin the token's client did not register; note
    the client's origins for the response's CORS grant either way."""
    if not cors.cross_origin(request):
        return
    client = await store.cached_client_by_id(ctx.pool, client_id)
    if client is None or not cors.admit(request, client):
        raise InvalidRequest(cors.REFUSED)


async def userinfo_endpoint(request: web.Request) -> web.Response:
    ctx = context(request)
    try:
        token = await bearer_token(request)
        admit = functools.partial(admit_origin, request, ctx)
        state = token_state.state(request)
        answer = await claims_for(ctx, state, issuer(request), token, admit=admit)
    except OAuthError as exc:
        # RFC 6750 3: a protected resource's errors are Bearer challenges; the one for a
        # missing scope names the scope wanted.
        return exc.bearer_response(scope="openid" if isinstance(exc, InsufficientScope) else None)
    return json_response(answer, headers=_NO_STORE)


def setup(app: web.Application) -> None:
    token_state.install(app)
    app.router.add_get("/v1/oauth/userinfo", userinfo_endpoint)
    app.router.add_post("/v1/oauth/userinfo", userinfo_endpoint)


_BEARER_ERROR = {
    "description": "RFC 6750 error, with a WWW-Authenticate: Bearer challenge",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OAuthError"}}},
}
_USERINFO = {
    "type": "object",
    "required": ["sub"],
    "properties": {
        "sub": {"type": "string"},
        "name": {"type": ["string", "null"], "description": "with the profile scope"},
        "email": {"type": "string", "description": "with the email scope"},
        "email_verified": {"type": "boolean", "description": "with the email scope"},
    },
}


def _operation(summary: str, *, form: bool) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {
                "description": "Claims about the user",
                "content": {"application/json": {"schema": _USERINFO}},
            },
            "400": _BEARER_ERROR,
            "401": _BEARER_ERROR,
            "403": _BEARER_ERROR,
        },
    }
    if form:
        operation["requestBody"] = {
            "required": False,
            "content": {
                "application/x-www-form-urlencoded": {
                    "schema": {
                        "type": "object",
                        "properties": {"access_token": {"type": "string"}},
                    }
                }
            },
        }
    return operation


OPENAPI_PATHS: dict[str, Any] = {
    "/v1/oauth/userinfo": {
        "get": _operation("OIDC UserInfo (Bearer token with openid)", form=False),
        "post": _operation("OIDC UserInfo; token in header or access_token field", form=True),
    }
}
