"""RFC 7592 section 2: reading, replacing and deleting a registration.

A replacement (2.2) is a whole new registration: omitted members get their defaults, and a
grant wider than the new registration ends. A deletion (2.3) revokes every grant first, so
gateways stop accepting the client's tokens. Reading is client_information's document.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from libs.common import scopes as catalogue
from libs.common.logging import get_logger
from services.identity import audit, clients, credentials, grants, store
from services.identity.context import IdentityContext
from services.identity.registration.access_token import invalid_token
from services.identity.registration.metadata import _bad, parse_metadata
from services.identity.registration.register import audit_ip
from services.identity.store import registration as registration_store

log = get_logger(__name__)


async def _current_school(ctx: IdentityContext, client: store.Client) -> store.School | None:
    if client.school_id is None:
        return None
    return await store.school_by_id(ctx.pool, client.school_id)


def within_registration(granted: Iterable[str], registered: Iterable[str]) -> bool:
    """True when a client registered for `registered` may still hold every granted scope."""
    effective = catalogue.expand(registered)
    return all(s in catalogue.IDENTITY_SCOPES or s in effective for s in granted)


async def update(
    ctx: IdentityContext, client: store.Client, document: Mapping[str, Any], address: str
) -> store.Client:
    """RFC 7592 2.2: the request replaces the registration; omitted members get defaults."""
    if document.get("client_id") != client.id:
        raise _bad("client_id must be present and name this client")
    secret = document.get("client_secret")
    if secret is not None and not (
        isinstance(secret, str)
        and credentials.matches(ctx.settings.secret_pepper, secret, client.secret_hash)
    ):
        raise _bad("client_secret does not match the client's current secret")
    wanted = parse_metadata(
        document,
        await _current_school(ctx, client),
        ctx.settings,
        current_auth_method=client.token_endpoint_auth_method,
    )
    updated = await store.update_client(
        ctx.pool,
        client.id,
        name=wanted.name,
        redirect_uris=wanted.redirect_uris,
        grant_types=wanted.grant_types,
        response_types=wanted.response_types,
        token_endpoint_auth_method=wanted.auth_method,
        scopes=wanted.scopes,
        metadata=wanted.metadata,
    )
    if updated is None:  # deleted by a concurrent DELETE
        raise invalid_token()
    await clients.announce_change(ctx.redis, ctx.settings, client.id)
    # A client holds no scope it is not registered for: grants wider than the new
    # registration end now rather than live on. "Wider" as authorize judges a request:
    # identity scopes need no registration, and a registered umbrella covers what it stands
    # for (a grant of `courses:read` is within a registration of `read`).
    revoked = 0
    for grant in await registration_store.active_grants_of_client(ctx.pool, client.id):
        if not within_registration(grant.scopes, updated.scopes):
            revoked += await grants.revoke_grant(
                ctx.pool,
                ctx.redis,
                ctx.settings,
                grant.id,
                reason="client_updated",
                ip=audit_ip(address),
            )
    await audit.append(
        ctx.redis,
        ctx.settings,
        audit.record(
            "client.updated",
            school_id=updated.school_id,
            client_id=updated.id,
            subject=updated.id,
            scope=catalogue.format_scopes(updated.scopes),
            ip=audit_ip(address),
            client_name=updated.name,
            redirect_uris=list(updated.redirect_uris),
            revoked_grants=revoked,
        ),
    )
    return updated


async def delete(ctx: IdentityContext, client: store.Client, address: str) -> None:
    """RFC 7592 2.3: revoke every grant (so gateways stop accepting its tokens), then delete.

    The client row stays locked throughout, so no grant can be created between the revokes
    and the delete and escape revocation.
    """
    revoked = 0
    async with ctx.pool.acquire() as conn, conn.transaction():
        if not await registration_store.lock_client(conn, client.id):
            return
        for grant in await registration_store.active_grants_of_client(conn, client.id):
            revoked += await grants.revoke_grant(
                conn,
                ctx.redis,
                ctx.settings,
                grant.id,
                reason="client_deleted",
                ip=audit_ip(address),
            )
        await store.delete_client(conn, client.id)
    await clients.announce_change(ctx.redis, ctx.settings, client.id)
    await audit.append(
        ctx.redis,
        ctx.settings,
        audit.record(
            "client.deleted",
            school_id=client.school_id,
            client_id=client.id,
            subject=client.id,
            ip=audit_ip(address),
            client_name=client.name,
            revoked_grants=revoked,
        ),
    )
    log.info("client_deleted", client_id=client.id, revoked_grants=revoked)
