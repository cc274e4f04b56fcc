"""The token endpoint (RFC 6749 3.2): one module per grant, and the `grant_type` table here.

- `authorization_code.py`: RFC 6749 4.1.3 with PKCE (RFC 7636 4.5; the check is `pkce.py`)
- `refresh_token.py`: RFC 6749 6 with rotation and reuse detection (Security BCP 4.14.2)
- `client_credentials.py`: RFC 6749 4.4 on a standing grant
- `request.py`: what every grant reads (`GrantRequest`, required parameters, school, audience)
- `response.py`: what every grant answers with (the access token, RFC 6749 5.1's JSON, audit)

The aiohttp handler only reads the form, authenticates the client (`client_auth.py`) and looks
the grant up in `GRANTS`. Each grant is a plain async function over the request; it runs its
database work in one transaction and signs after it commits, with signers fetched before it
began, so no connection is held while anything slow happens.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from libs.common.errors import InvalidRequest, UnsupportedGrantType, json_response
from services.identity import client_auth, cors, token_state
from services.identity.context import context, issuer
from services.identity.token.authorization_code import authorization_code_grant
from services.identity.token.client_credentials import client_credentials_grant
from services.identity.token.refresh_token import refresh_token_grant
from services.identity.token.request import GrantRequest
from services.identity.token.response import NO_STORE

# RFC 6749 4.1.3, 6, 4.4: each grant_type this server offers, and its handler.
GRANTS: dict[str, Callable[[GrantRequest], Awaitable[dict[str, Any]]]] = {
    "authorization_code": authorization_code_grant,
    "refresh_token": refresh_token_grant,
    "client_credentials": client_credentials_grant,
}


async def token_endpoint(request: web.Request) -> web.Response:
    """POST /v1/oauth/token (and the quickstart's /api/oauth/token): RFC 6749 3.2."""
    ctx = context(request)
    form = await client_auth.read_form(request)
    iss = issuer(request)
    authenticated = await client_auth.authenticate(
        ctx.pool,
        ctx.settings,
        iss,
        authorization=request.headers.get("Authorization"),
        form=form,
    )
    if not cors.admit(request, authenticated.client):
        raise InvalidRequest(cors.REFUSED)
    grant_type = form.get("grant_type")
    if not grant_type:
        raise InvalidRequest("grant_type is required")
    handler = GRANTS.get(grant_type)
    if handler is None:
        raise UnsupportedGrantType(f"{grant_type!r} is not supported")
    req = GrantRequest(
        ctx=ctx,
        state=token_state.state(request),
        issuer=iss,
        client=authenticated.client,
        form=form,
        ip=client_auth.client_ip(request, ctx.settings),
    )
    body = await handler(req)
    ctx.metrics.tokens_issued.labels(grant_type).inc()
    return json_response(body, headers=NO_STORE)


def setup(app: web.Application) -> None:
    token_state.install(app)
    app.router.add_post("/v1/oauth/token", token_endpoint)
    # The seed quickstart's path (contract section 2).
    app.router.add_post("/api/oauth/token", token_endpoint)


_ERROR = {
    "description": "RFC 6749 5.2 error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OAuthError"}}},
}
_TOKEN_REQUEST = {
    "type": "object",
    "required": ["grant_type"],
    "properties": {
        "grant_type": {"type": "string", "enum": list(GRANTS)},
        "code": {"type": "string"},
        "redirect_uri": {"type": "string", "format": "uri"},
        "code_verifier": {"type": "string", "minLength": 43, "maxLength": 128},
        "refresh_token": {"type": "string"},
        "scope": {"type": "string", "description": "space-separated scopes"},
        "resource": {"type": "string", "format": "uri", "description": "RFC 8707"},
        "client_id": {"type": "string"},
        "client_secret": {"type": "string"},
    },
}
_TOKEN_RESPONSE = {
    "type": "object",
    "required": [
        "access_token",
        "token_type",
        "expires_in",
        "scope",
        "school_id",
        "school_subdomain",
    ],
    "properties": {
        "access_token": {"type": "string", "description": "RFC 9068 JWT (typ at+jwt)"},
        "token_type": {"type": "string", "const": "Bearer"},
        "expires_in": {"type": "integer", "examples": [7200]},
        "refresh_token": {"type": "string"},
        "scope": {"type": "string"},
        "school_id": {"type": "integer"},
        "school_subdomain": {"type": "string"},
        "id_token": {"type": "string", "description": "when openid was granted"},
    },
}
_TOKEN_OPERATION = {
    "summary": "Token endpoint: authorization_code (PKCE S256), refresh_token, "
    "client_credentials (RFC 6749 3.2, RFC 7636)",
    "requestBody": {
        "required": True,
        "content": {"application/x-www-form-urlencoded": {"schema": _TOKEN_REQUEST}},
    },
    "responses": {
        "200": {
            "description": "Tokens",
            "headers": {"Cache-Control": {"schema": {"type": "string", "const": "no-store"}}},
            "content": {"application/json": {"schema": _TOKEN_RESPONSE}},
        },
        "400": _ERROR,
        "401": _ERROR,
    },
}
OPENAPI_PATHS: dict[str, Any] = {
    "/v1/oauth/token": {"post": _TOKEN_OPERATION},
    "/api/oauth/token": {"post": {**_TOKEN_OPERATION, "deprecated": True}},
}
