"""Issuing the authorization code (RFC 6749 4.1.2): consent, grant and code in one transaction.

The code carries what the token endpoint checks it against (RFC 6749 4.1.3, RFC 7636 4.6): the
redirect URI, the PKCE challenge, the nonce and the resource. A code issued on a remembered
consent reads that consent again inside the transaction, and holds it, so a Revoke on the
account page in between is never missed.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from libs.common import scopes as catalogue
from services.identity import audit, consent, credentials, grants, sessions
from services.identity.authorize.request import AuthorizationRequest
from services.identity.context import context
from services.identity.store import authorize as flow_store
from services.identity.store.authorize import Session


async def issue_code(
    request: web.Request,
    authz: AuthorizationRequest,
    *,
    school_id: int,
    session: Session,
    remember_consent: bool,
) -> str | None:
    """Record consent (when the user just gave it), create the grant and the code; None when
    the remembered consent a code was to be issued on has been withdrawn meanwhile."""
    ctx = context(request)
    code = credentials.new_secret(credentials.AUTHORIZATION_CODE_PREFIX)
    async with ctx.pool.acquire() as conn, conn.transaction():
        if remember_consent:
            await consent.remember(
                conn,
                user_id=session.user_id,
                client_id=authz.client_id,
                school_id=school_id,
                scopes=authz.scopes,
            )
        else:
            # Read again, and held: the user may have disconnected the app (account page)
            # since the flow read it, and that Revoke must see this grant to end it.
            held = await flow_store.held_consent(
                conn, user_id=session.user_id, client_id=authz.client_id, school_id=school_id
            )
            if held is None or not consent.covers(held, authz.scopes):
                return None
        grant = await grants.create_grant(
            conn,
            school_id=school_id,
            client_id=authz.client_id,
            user_id=session.user_id,
            scopes=authz.scopes,
        )
        await flow_store.insert_authorization_code(
            conn,
            code_hash=credentials.token_hash(code),
            grant_id=grant.id,
            client_id=authz.client_id,
            school_id=school_id,
            user_id=session.user_id,
            # The URI the client sent, or its only registered one when it sent none: the
            # token endpoint compares against this.
            redirect_uri=authz.redirect_uri,
            scopes=authz.scopes,
            code_challenge=authz.code_challenge,
            nonce=authz.nonce,
            resource=authz.resource,
            auth_time=session.authenticated_at,
            ttl_seconds=ctx.settings.tokens.authorization_code_ttl,
        )
        # In the same transaction: the grant exists with its record, or neither does.
        common: dict[str, Any] = {
            "school_id": school_id,
            "client_id": authz.client_id,
            "subject": str(session.user_id),
            "scope": catalogue.format_scopes(authz.scopes),
            "ip": sessions.client_address(request),
        }
        if remember_consent:
            await audit.write(conn, audit.record("consent.granted", **common))
        await audit.write(conn, audit.record("grant.created", grant_id=str(grant.id), **common))
    return code
