"""The client_credentials grant (RFC 6749 4.4): a confidential client acting for itself at its
own school, on a standing grant made on its first request, so that revoking it (or disabling
the client) ends its tokens at every gateway like any user's grant."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from libs.common import scopes as catalogue
from libs.common.errors import InvalidScope, InvalidTarget, UnauthorizedClient
from services.identity import audit, keys, minting, resources, store
from services.identity.store import grants as grant_store
from services.identity.token.request import GrantRequest
from services.identity.token.response import access_token_claims, issued_record, token_response


def client_credentials_scopes(
    requested: str | None, client: store.Client, school: store.School
) -> list[str]:
    """The scopes a client may hold on its own: its registered data scopes, as the school
    still allows them; identity scopes need a user and admin scopes are never third-party."""
    school_allows = (
        catalogue.expand(school.allowed_scopes) if school.allowed_scopes is not None else None
    )

    def permitted_by_school(scope: str) -> bool:
        return school_allows is None or scope in school_allows

    registered = [
        s
        for s in client.scopes
        if s not in catalogue.IDENTITY_SCOPES and s not in catalogue.ADMIN_SCOPES
    ]
    asked = catalogue.parse(requested)
    if not asked:
        default = [s for s in registered if permitted_by_school(s)]
        if not default:
            raise InvalidScope("the client has no data scopes to grant itself")
        return default
    effective = catalogue.expand(registered)
    for scope in asked:
        if scope not in catalogue.CATALOGUE:
            raise InvalidScope(f"unknown scope {scope!r}")
        if scope in catalogue.ADMIN_SCOPES:
            raise InvalidScope(f"{scope!r} is not available to applications")
        if scope in catalogue.IDENTITY_SCOPES:
            raise InvalidScope(f"{scope!r} needs a user, which client_credentials has not")
        if scope not in effective or not permitted_by_school(scope):
            raise InvalidScope(f"the client may not hold {scope!r}")
    return asked


async def standing_grant(req: GrantRequest, school: store.School) -> UUID:
    """The client's standing grant at the school, made on first use and recorded as made in the
    same transaction; this process then keeps its id for a few seconds
    (TokenState.standing_grants), so the transaction is rare."""
    ctx, client = req.ctx, req.client
    async with ctx.pool.acquire() as conn, conn.transaction():
        grant_id, created = await grant_store.standing_grant(
            conn, client_id=client.id, school_id=school.id, scopes=client.scopes
        )
        if created:
            await audit.write(
                conn,
                audit.record(
                    "grant.created",
                    ip=req.ip,
                    school_id=school.id,
                    client_id=client.id,
                    subject=client.id,
                    grant_id=str(grant_id),
                    scope=catalogue.format_scopes(client.scopes),
                    grant_type="client_credentials",
                ),
            )
    req.state.standing_grants.put((client.id, school.id), grant_id)
    return grant_id


async def client_credentials_grant(req: GrantRequest) -> dict[str, Any]:
    """RFC 6749 4.4: a confidential client acting for itself at its own school."""
    ctx, client = req.ctx, req.client
    settings = ctx.settings
    if client.is_public:
        raise UnauthorizedClient("client_credentials needs a confidential client")
    if "client_credentials" not in client.grant_types:
        raise UnauthorizedClient("the client may not use client_credentials")
    school = req.issuer.school
    if school is None or client.school_id != school.id:
        # A token must be bound to one school; a platform client has none without a user.
        raise UnauthorizedClient("client_credentials needs a school's client")
    scopes = client_credentials_scopes(req.form.get("scope"), client, school)
    audience = resources.audience(
        settings, school, req.form.get("resource"), issuer=req.issuer.issuer, client=client
    )
    if audience is None:
        raise InvalidTarget("the resource is not one this school serves")
    access_signer = await ctx.keyring.signer(school.id, keys.ACCESS_TOKEN_ALG)
    grant_id = req.state.standing_grants.get((client.id, school.id))
    if grant_id is None:
        grant_id = await standing_grant(req, school)
    claims = access_token_claims(
        req,
        school,
        subject=client.id,
        scopes=scopes,
        audience=audience,
        grant_id=grant_id,
        auth_time=None,
    )
    # Issuing changes nothing stored, so there is no transaction to join: the record is
    # committed before the token is signed and answered (with the records of concurrent
    # requests, in one statement: audit_commit.py), and a crash in between leaves a record of
    # a token nobody received, never a token without its record.
    await ctx.audit.write_row(
        issued_record(req, "token.issued", claims, grant_type="client_credentials")
    )
    token = minting.sign_access_token(access_signer, claims)
    return token_response(token, settings.tokens.access_token_ttl, scopes, school)
