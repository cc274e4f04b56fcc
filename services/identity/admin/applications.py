"""Creating, editing and deleting a school's OAuth application, each with its audit event."""

from __future__ import annotations

from typing import Any

from multidict import MultiMapping

from libs.common.errors import InvalidClientMetadata, InvalidRedirectUri
from services.identity import clients, grants, store
from services.identity.account.viewer import (
    Viewer,
)
from services.identity.admin.access import audit_change
from services.identity.admin.app_forms import AppForm, origins_of, redirect_uris_of
from services.identity.context import IdentityContext
from services.identity.store import registration as registration_store


async def create_app(
    ctx: IdentityContext, viewer: Viewer, wanted: AppForm, ip: str | None
) -> clients.NewClient:
    grant_types = ["authorization_code", "refresh_token"]
    if wanted.machine:
        grant_types.append("client_credentials")
    school = await store.school_by_id(ctx.pool, viewer.school.id)
    made = await clients.create_client(
        ctx.pool,
        ctx.settings,
        school=school,
        name=wanted.name,
        redirect_uris=redirect_uris_of(wanted.redirect_uris),
        public=wanted.public,
        scopes=wanted.scopes,
        origins=origins_of(wanted.origins),
        grant_types=grant_types,
        created_via="admin",
    )
    client = made.client
    await audit_change(
        ctx,
        "client.created",
        viewer,
        client,
        ip,
        token_endpoint_auth_method=client.token_endpoint_auth_method,
        redirect_uris=list(client.redirect_uris),
        allowed_origins=list(client.allowed_origins),
        grant_types=list(client.grant_types),
    )
    return made


async def edit_app(
    ctx: IdentityContext,
    viewer: Viewer,
    client: store.Client,
    form: MultiMapping[Any],
    ip: str | None,
) -> store.Client:
    name = str(form.get("name", client.name)).strip()
    if not name or len(name) > 200:
        raise InvalidClientMetadata("the name must be 1-200 characters")
    uris = redirect_uris_of(str(form.get("redirect_uris", "")))
    if "authorization_code" in client.grant_types and not uris:
        raise InvalidRedirectUri("at least one redirect URI is required")
    origins = origins_of(str(form.get("origins", "")))
    updated = await store.update_client(
        ctx.pool, client.id, name=name, redirect_uris=uris, allowed_origins=origins
    )
    if updated is None:
        raise LookupError(client.id)
    await clients.announce_change(ctx.redis, ctx.settings, client.id)
    await audit_change(
        ctx,
        "client.updated",
        viewer,
        updated,
        ip,
        redirect_uris=list(updated.redirect_uris),
        allowed_origins=list(updated.allowed_origins),
    )
    return updated


async def delete_app(
    ctx: IdentityContext, viewer: Viewer, client: store.Client, ip: str | None
) -> int:
    """Revoke every grant (gateways stop accepting its tokens), then delete the client.

    The client row stays locked throughout, as in RFC 7592 deletion, so no grant can appear
    between the revokes and the delete and escape revocation.
    """
    async with ctx.pool.acquire() as conn, conn.transaction():
        if not await registration_store.lock_client(conn, client.id):
            return 0
        ending = {
            g.id: g.school_id
            for g in await registration_store.active_grants_of_client(conn, client.id)
        }
        revoked = await grants.record_revocations(
            conn, list(ending), reason="client_deleted", ip=ip
        )
        await store.delete_client(conn, client.id)
        await audit_change(
            ctx, "client.deleted", viewer, client, ip, db=conn, revoked_grants=len(revoked)
        )
    # Announced once committed: a rollback above has told no gateway or webhook anything.
    await grants.announce_revocations(ctx.redis, ctx.settings, ending, reason="client_deleted")
    await clients.announce_change(ctx.redis, ctx.settings, client.id)
    return len(revoked)
