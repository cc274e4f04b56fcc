"""Token introspection (RFC 7662), for confidential clients and resource servers.

Who may learn about a token: the client it was issued to, and first-party confidential
clients of the same issuer (our resource servers). Anyone else, and any token that is
expired, revoked, malformed, tampered with, unsigned, signed by a key not of this issuer or
bound to another school, gets `{"active": false}` and nothing more (RFC 7662 2.2). An issuer
answers for its own tokens only: access tokens by their signature and `iss`, refresh tokens by
their grant's issuer (a platform client's grants are the platform's, a school client's its
school's), whatever `token_type_hint` says.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web

from libs.common import jwt
from libs.common.errors import json_response
from libs.common.logging import get_logger
from services.identity import credentials, grants, resources, store, token_state
from services.identity.context import IdentityContext, context, issuer
from services.identity.revocation import token_kind, token_request
from services.identity.schools import Issuer
from services.identity.store import grants as grant_store
from services.identity.store import refresh_tokens as refresh_store

log = get_logger(__name__)

INACTIVE: dict[str, Any] = {"active": False}
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def may_introspect(caller: store.Client, token_client_id: str) -> bool:
    return caller.id == token_client_id or caller.first_party


async def introspect_access_token(
    ctx: IdentityContext,
    state: token_state.TokenState,
    iss: Issuer,
    caller: store.Client,
    token: str,
) -> dict[str, Any]:
    try:
        claims = await token_state.verify_own_access_token(state, ctx.pool, iss, token)
    except jwt.TokenError as exc:
        log.info("introspection_inactive", reason=exc.reason)
        return INACTIVE
    if not may_introspect(caller, claims["client_id"]):
        return INACTIVE
    grant = await grant_store.grant_status(ctx.pool, token_state.grant_uuid(claims))
    if grant is None or grant.revoked or grant.client_id != claims["client_id"]:
        return INACTIVE
    answer: dict[str, Any] = {
        "active": True,
        "scope": claims.get("scope", ""),
        "client_id": claims["client_id"],
        "sub": claims["sub"],
        "aud": claims.get("aud"),
        "iss": claims["iss"],
        "exp": claims["exp"],
        "iat": claims["iat"],
        "jti": claims.get("jti"),
        "token_type": "Bearer",
        "school_id": claims["school_id"],
        "school_subdomain": claims.get("school_subdomain"),
        "grant_id": claims["grant_id"],
    }
    if "auth_time" in claims:
        answer["auth_time"] = claims["auth_time"]
    return answer


def _unlimited(expires_at: datetime) -> bool:
    # PostgreSQL's 'infinity' reaches asyncpg as datetime.max, without a time zone.
    return expires_at.tzinfo is None or expires_at.year >= 9999


async def introspect_refresh_token(
    ctx: IdentityContext,
    state: token_state.TokenState,
    iss: Issuer,
    caller: store.Client,
    token: str,
) -> dict[str, Any]:
    st = await refresh_store.refresh_token_state(ctx.pool, credentials.token_hash(token))
    # A rotated token is no longer usable, except as a retry inside the grace window, which
    # answers with its successor: it is not active.
    if st is None or st.expired or st.grant_revoked or st.rotated_at is not None:
        return INACTIVE
    if not may_introspect(caller, st.client_id):
        return INACTIVE
    # Only this issuer's: a first-party caller must not learn from the platform about a
    # school's refresh token (answered with the platform as `iss`), nor the reverse.
    owner = (
        caller
        if caller.id == st.client_id
        else await store.cached_client_by_id(ctx.pool, st.client_id)
    )
    if owner is None or not grants.issued_by(iss, owner, st.school_id):
        return INACTIVE
    school = await state.school(ctx.pool, st.school_id)
    if school is None:
        return INACTIVE
    return {
        "active": True,
        "scope": " ".join(st.scopes),
        "client_id": st.client_id,
        "sub": str(st.user_id) if st.user_id else st.client_id,
        "aud": resources.audience(
            ctx.settings,
            school,
            st.resource,
            issuer=iss.issuer,
            client=owner,
        ),
        "iss": iss.issuer,
        # RFC 7662's exp is optional: a token with no idle limit left out has none to give.
        **({} if _unlimited(st.expires_at) else {"exp": int(st.expires_at.timestamp())}),
        "iat": int(st.created_at.timestamp()),
        "token_type": "refresh_token",
        "school_id": school.id,
        "school_subdomain": school.subdomain,
        "grant_id": str(st.grant_id),
    }


async def introspect(
    ctx: IdentityContext,
    state: token_state.TokenState,
    iss: Issuer,
    caller: store.Client,
    token: str,
) -> dict[str, Any]:
    kind = token_kind(token)
    if kind == "access_token":
        return await introspect_access_token(ctx, state, iss, caller, token)
    if kind == "refresh_token":
        return await introspect_refresh_token(ctx, state, iss, caller, token)
    return INACTIVE


async def introspection_endpoint(request: web.Request) -> web.Response:
    client, token = await token_request(request, confidential_only=True)
    answer = await introspect(
        context(request), token_state.state(request), issuer(request), client, token
    )
    return json_response(answer, headers=_NO_STORE)


def setup(app: web.Application) -> None:
    token_state.install(app)
    app.router.add_post("/v1/oauth/introspect", introspection_endpoint)


_ERROR = {
    "description": "RFC 6749 5.2 error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OAuthError"}}},
}
OPENAPI_PATHS: dict[str, Any] = {
    "/v1/oauth/introspect": {
        "post": {
            "summary": "Token introspection for confidential clients and resource servers "
            "(RFC 7662)",
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-www-form-urlencoded": {
                        "schema": {
                            "type": "object",
                            "required": ["token"],
                            "properties": {
                                "token": {"type": "string"},
                                "token_type_hint": {
                                    "type": "string",
                                    "enum": ["access_token", "refresh_token"],
                                },
                                "client_id": {"type": "string"},
                                "client_secret": {"type": "string"},
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": {
                    "description": "The token's state; only `active: false` when inactive",
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["active"],
                                "properties": {
                                    "active": {"type": "boolean"},
                                    "scope": {"type": "string"},
                                    "client_id": {"type": "string"},
                                    "sub": {"type": "string"},
                                    "aud": {"type": "string"},
                                    "iss": {"type": "string"},
                                    "exp": {"type": "integer"},
                                    "iat": {"type": "integer"},
                                    "token_type": {
                                        "type": "string",
                                        "enum": ["Bearer", "refresh_token"],
                                    },
                                    "school_id": {"type": "integer"},
                                    "school_subdomain": {"type": "string"},
                                    "grant_id": {"type": "string", "format": "uuid"},
                                },
                            }
                        }
                    },
                },
                "400": _ERROR,
                "401": _ERROR,
            },
        }
    }
}
