"""RFC 7592 section 2: reading, replacing and deleting a registration.

A replacement (2.2) is a whole new registration: omitted members get their defaults, and a
grant wider than the new registration ends. A deletion (2.3) revokes every grant first, so
gateways stop accepting the client's tokens. Reading is client_information's document.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from libs.common import scopes as catalogue
from libs.common.logging import get_logger
from services.identity import audit, clients, grants, store
from services.identity.context import IdentityContext
from services.identity.grants import within_registration
from services.identity.registration.access_token import invalid_token
from services.identity.registration.metadata import _bad, parse_metadata
from services.identity.registration.register import audit_ip
from services.identity.store import registration as registration_store

log = get_logger(__name__)


async def _current_school(ctx: IdentityContext, client: store.Client) -> store.School | None:
    if client.school_id is None:
        return None
    return await store.school_by_id(ctx.pool, client.school_id)


async def update(
    ctx: IdentityContext, client: store.Client, document: Mapping[str, Any], address: str
) -> store.Client:
    """RFC 7592 2.2: the request replaces the registration; omitted members get defaults."""
    if document.get("client_id") != client.id:
        raise _bad("client_id must be present and name this client")
    secret = document.get("client_secret")
    if secret is not None and not (
        isinstance(secret, str)
        and await clients.check_secret(ctx.pool, ctx.settings, client, secret)
    ):
        raise _bad("client_secret does not match the client's current secret")
    wanted = parse_metadata(
        document,
        await _current_school(ctx, client),
        ctx.settings,
        current_auth_method=client.token_endpoint_auth_method,
    )
    # One transaction, the client's row locked: the registration changes and every grant
    # wider than it ends together or not at all (a crash or a failure midway used to leave
    # wider grants that refreshed for ever), and no grant can be made meanwhile (making one
    # takes a key-share lock on its client). "Wider" as authorize judges a request: identity
    # scopes need no registration, and a registered umbrella covers what it stands for (a
    # grant of `courses:read` is within a registration of `read`). A grant made after this
    # commits from a registration read before it is refused at redemption and refresh
    # (token/authorization_code.py, token/refresh_token.py).
    async with ctx.pool.acquire() as conn, conn.transaction():
        if not await registration_store.lock_client(conn, client.id):
            raise invalid_token()  # deleted by a concurrent DELETE
        updated = await store.update_client(
            conn,
            client.id,
            name=wanted.name,
            redirect_uris=wanted.redirect_uris,
            grant_types=wanted.grant_types,
            response_types=wanted.response_types,
            token_endpoint_auth_method=wanted.auth_method,
            scopes=wanted.scopes,
            metadata=wanted.metadata,
        )
        if updated is None:
            raise invalid_token()
        wider = {
            g.id: g.school_id
            for g in await registration_store.active_grants_of_client(conn, client.id)
            if not within_registration(g.scopes, updated.scopes)
        }
        revoked = await grants.record_revocations(
            conn, list(wider), reason="client_updated", ip=audit_ip(address)
        )
        await audit.write(
            conn,
            audit.record(
                "client.updated",
                school_id=updated.school_id,
                client_id=updated.id,
                subject=updated.id,
                scope=catalogue.format_scopes(updated.scopes),
                ip=audit_ip(address),
                client_name=updated.name,
                redirect_uris=list(updated.redirect_uris),
                revoked_grants=len(revoked),
            ),
        )
    # Announced once committed (grants.py).
    await grants.announce_revocations(ctx.redis, ctx.settings, wider, reason="client_updated")
    await clients.announce_change(ctx.redis, ctx.settings, client.id)
    return updated


async def delete(ctx: IdentityContext, client: store.Client, address: str) -> None:
    """RFC 7592 2.3: revoke every grant (so gateways stop accepting its tokens), then delete.

    The client row stays locked throughout, so no grant can be created between the revokes
    and the delete and escape revocation.
    """
    async with ctx.pool.acquire() as conn, conn.transaction():
        if not await registration_store.lock_client(conn, client.id):
            return
        ending = {
            g.id: g.school_id
            for g in await registration_store.active_grants_of_client(conn, client.id)
        }
        revoked = await grants.record_revocations(
            conn, list(ending), reason="client_deleted", ip=audit_ip(address)
        )
        await store.delete_client(conn, client.id)
        await audit.write(
            conn,
            audit.record(
                "client.deleted",
                school_id=client.school_id,
                client_id=client.id,
                subject=client.id,
                ip=audit_ip(address),
                client_name=client.name,
                revoked_grants=len(revoked),
            ),
        )
    # Announced once committed: a rollback above has told no gateway or webhook anything.
    await grants.announce_revocations(ctx.redis, ctx.settings, ending, reason="client_deleted")
    await clients.announce_change(ctx.redis, ctx.settings, client.id)
    log.info("client_deleted", client_id=client.id, revoked_grants=len(revoked))
