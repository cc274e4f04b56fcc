"""Token revocation (RFC 7009): revoking an access or a refresh token ends its whole grant.

The answer is 200 with an empty body whether or not anything was revoked (RFC 7009 2.2): an
unknown, malformed or expired token, and a token of another client, are all answered alike,
so the endpoint tells a caller nothing about tokens that are not its own. A token of another
client is left alone: holding a token is not the right to end someone else's grant.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from aiohttp import web

from libs.common import jwt
from libs.common.errors import InvalidRequest
from libs.common.logging import get_logger
from services.identity import audit, client_auth, cors, credentials, grants, store, token_state
from services.identity.context import IdentityContext, context, issuer
from services.identity.schools import Issuer
from services.identity.store import refresh_tokens as refresh_store

log = get_logger(__name__)

TOKEN_TYPE_HINTS = ("access_token", "refresh_token")


def token_kind(token: str) -> str | None:
    """Which of our tokens this looks like. The shapes cannot be confused, so a
    `token_type_hint` (RFC 7009 2.1) is never needed to find a token."""
    if token.startswith(credentials.REFRESH_TOKEN_PREFIX):
        return "refresh_token"
    if token.count(".") == 2:
        return "access_token"
    return None


async def grant_of_token(
    ctx: IdentityContext,
    state: token_state.TokenState,
    iss: Issuer,
    client: store.Client,
    token: str,
) -> tuple[UUID, str] | None:
    """The grant a live token of `client` at this issuer descends from, with the token kind."""
    kind = token_kind(token)
    if kind == "access_token":
        try:
            claims = await token_state.verify_own_access_token(state, ctx.pool, iss, token)
        except jwt.TokenError as exc:
            log.info("revocation_ignored", reason=exc.reason)
            return None
        if claims["client_id"] != client.id:
            log.info("revocation_ignored", reason="other_client")
            return None
        return token_state.grant_uuid(claims), kind
    if kind == "refresh_token":
        st = await refresh_store.refresh_token_state(ctx.pool, credentials.token_hash(token))
        if st is None or st.expired:
            return None
        if st.client_id != client.id:
            log.info("revocation_ignored", reason="other_client")
            return None
        if not grants.issued_by(iss, client, st.school_id):
            return None
        return st.grant_id, kind
    return None


async def revoke(
    ctx: IdentityContext,
    state: token_state.TokenState,
    iss: Issuer,
    client: store.Client,
    token: str,
    *,
    ip: str | None,
) -> bool:
    """Revoke the grant of `token` if it is the client's own; True when a grant was ended.

    `grants.revoke_grant` writes PostgreSQL, marks Redis and announces on
    connect:revocations before it returns, so once this returns no gateway accepts the grant.
    """
    found = await grant_of_token(ctx, state, iss, client, token)
    if found is None:
        return False
    grant_id, kind = found
    # The record commits with the revocation (a grant already revoked: with nothing else).
    record = audit.record(
        "token.revoked",
        school_id=iss.school_id,
        client_id=client.id,
        grant_id=str(grant_id),
        ip=ip,
        token_type=kind,
    )
    revoked = await grants.revoke_grant(
        ctx.pool,
        ctx.redis,
        ctx.settings,
        grant_id,
        reason="client_revocation",
        ip=ip,
        records=[record],
    )
    state.forget_grant(grant_id)
    return revoked


async def token_request(
    request: web.Request, *, confidential_only: bool = False
) -> tuple[store.Client, str]:
    """The authenticated client and the `token` of a revocation (RFC 7009) or introspection
    (RFC 7662) request; a cross-origin call from an origin the client has not registered is
    refused before anything is looked up."""
    ctx = context(request)
    form = await client_auth.read_form(request)
    authenticated = await client_auth.authenticate(
        ctx.pool,
        ctx.settings,
        issuer(request),
        authorization=request.headers.get("Authorization"),
        form=form,
        confidential_only=confidential_only,
    )
    if not cors.admit(request, authenticated.client):
        raise InvalidRequest(cors.REFUSED)
    token = form.get("token")
    if not token:
        raise InvalidRequest("token is required")
    return authenticated.client, token


async def revocation_endpoint(request: web.Request) -> web.Response:
    ctx = context(request)
    client, token = await token_request(request)
    await revoke(
        ctx,
        token_state.state(request),
        issuer(request),
        client,
        token,
        ip=client_auth.client_ip(request, ctx.settings),
    )
    return web.Response(status=200, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


def setup(app: web.Application) -> None:
    token_state.install(app)
    app.router.add_post("/v1/oauth/revoke", revocation_endpoint)


_ERROR = {
    "description": "RFC 6749 5.2 error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OAuthError"}}},
}
OPENAPI_PATHS: dict[str, Any] = {
    "/v1/oauth/revoke": {
        "post": {
            "summary": "Revoke an access or refresh token and its whole grant (RFC 7009)",
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
                                    "enum": list(TOKEN_TYPE_HINTS),
                                },
                                "client_id": {"type": "string"},
                                "client_secret": {"type": "string"},
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": {"description": "Revoked, or nothing to revoke (never distinguished)"},
                "400": _ERROR,
                "401": _ERROR,
            },
        }
    }
}
