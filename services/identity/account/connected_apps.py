"""Connected Apps: each app with access at this school, and revoking one.

Revoking an app ends every live grant the user holds for it at this school through
`grants.revoke_grant` (PostgreSQL, the Redis mark, `connect:revocations`), so gateways refuse
its tokens as soon as the page answers, and forgets the remembered consent, so the app's next
authorization request asks the user again.

Last use of an app is the latest of: a token issued or refreshed for one of its grants
(`grants.last_used_at`) and an API call the gateway recorded for one (`audit_log`, action
`api.call`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlencode
from uuid import UUID

from aiohttp import web

from services.identity import audit, consent, grants, sessions, store
from services.identity.account.paths import (
    APPS_PATH,
    REVOKE_PATH,
)
from services.identity.account.viewer import (
    csrf_refused,
    form_token,
    form_token_ok,
    login_redirect,
    not_here,
    refused,
    render_page,
    viewer_of,
    when,
)
from services.identity.context import IdentityContext, context, issuer
from services.identity.store import account as account_store
from services.identity.store import authorize as flow_store

_APPS_PURPOSE = "account-apps"


@dataclass(frozen=True, slots=True)
class ConnectedApp:
    client_id: str
    name: str
    scopes: list[consent.ScopeLine]
    granted_at: datetime
    last_used_at: datetime | None
    # The newest live grant, which the Revoke form names; None when only consent is left.
    grant_id: UUID | None


def _union(scope_lists: Sequence[Sequence[str]]) -> list[str]:
    return list(dict.fromkeys(s for scopes in scope_lists for s in scopes))


async def connected_apps(ctx: IdentityContext, user_id: UUID, school_id: int) -> list[ConnectedApp]:
    """Each app with live access or a remembered consent: a user re-authorizing an app gets
    a grant per authorization, and sees the app once, with what all of them allow."""
    live = await account_store.live_grants(ctx.pool, user_id=user_id, school_id=school_id)
    remembered = await account_store.remembered_consents(
        ctx.pool, user_id=user_id, school_id=school_id
    )
    by_client: dict[str, list[account_store.LiveGrant]] = {}
    for grant in live:
        by_client.setdefault(grant.client_id, []).append(grant)
    apps = []
    for client_id, held in by_client.items():
        oldest_first = sorted(held, key=lambda g: g.created_at)
        uses = [t for g in held for t in (g.token_used_at, g.api_used_at) if t is not None]
        apps.append(
            ConnectedApp(
                client_id=client_id,
                name=held[0].client_name,
                scopes=consent.lines(_union([g.scopes for g in oldest_first])),
                granted_at=oldest_first[0].created_at,
                last_used_at=max(uses) if uses else None,
                grant_id=held[0].id,
            )
        )
    for kept in remembered:
        if kept.client_id not in by_client:
            apps.append(
                ConnectedApp(
                    client_id=kept.client_id,
                    name=kept.client_name,
                    scopes=consent.lines(kept.scopes),
                    granted_at=kept.granted_at,
                    last_used_at=None,
                    grant_id=None,
                )
            )
    return sorted(apps, key=lambda a: (a.name.casefold(), a.client_id))


async def revoke_app(
    ctx: IdentityContext,
    *,
    user_id: UUID,
    school_id: int,
    grant_id: str,
    client_id: str,
    ip: str | None,
) -> str | None:
    """End the user's access for one app at the school; the app's client id, or None when
    the request names nothing of this user's here (then nothing is changed).

    The form names the app by one of its grants (or, for an app with only a remembered
    consent, by its client id); every live grant of the user for that app goes, since each
    authorization made one.
    """
    named: list[UUID] = []
    if grant_id:
        try:
            wanted = UUID(grant_id)
        except ValueError:
            return None
        grant = await store.grant_by_id(ctx.pool, wanted)
        if grant is None or grant.user_id != user_id or grant.school_id != school_id:
            return None
        client_id = grant.client_id
        named.append(grant.id)
    elif not client_id:
        return None
    # One transaction: the delete waits for a code being issued on the consent's strength
    # (authorize.issue.issue_code holds the row), the list that follows sees its grant, and the
    # grants' revocations and the consent.revoked record commit with the consent's deletion.
    async with ctx.pool.acquire() as conn, conn.transaction():
        forgot = await flow_store.delete_consent(
            conn, user_id=user_id, client_id=client_id, school_id=school_id
        )
        live = await account_store.live_grant_ids_of_app(
            conn, user_id=user_id, school_id=school_id, client_id=client_id
        )
        if not named and not live and not forgot:
            return None
        ending = list(dict.fromkeys([*named, *live]))
        revoked = await grants.record_revocations(conn, ending, reason="user_revoked", ip=ip)
        await audit.write(
            conn,
            audit.record(
                "consent.revoked",
                school_id=school_id,
                client_id=client_id,
                subject=str(user_id),
                ip=ip,
                via="account",
                revoked_grants=len(revoked),
            ),
        )
    # Announced once committed (grants.py); a grant named that was revoked already is
    # announced again, which repairs a revoke that died between PostgreSQL and Redis.
    await grants.announce_revocations(
        ctx.redis, ctx.settings, dict.fromkeys(ending, school_id), reason="user_revoked"
    )
    return client_id


async def account_home(request: web.Request) -> web.StreamResponse:
    return sessions.see_other(APPS_PATH)


async def apps_page(request: web.Request) -> web.StreamResponse:
    if issuer(request).school is None:
        return not_here(request)
    viewer = await viewer_of(request)
    if viewer is None:
        return login_redirect(request)
    ctx = context(request)
    apps = await connected_apps(ctx, viewer.user.id, viewer.school.id)
    revoked_name = None
    revoked_id = request.query.get("revoked")
    if revoked_id:
        # The name comes from the database, never from the URL: a link cannot make this
        # page say something it did not do.
        client = await store.client_by_id(ctx.pool, revoked_id)
        if client is not None and client.school_id in (None, viewer.school.id):
            revoked_name = client.name
    return render_page(
        request,
        viewer,
        "account_apps.html",
        section="apps",
        title="Connected apps",
        apps=apps,
        when=when,
        revoked_name=revoked_name,
        csrf_token=form_token(viewer, _APPS_PURPOSE),
        action=REVOKE_PATH,
    )


async def revoke_submit(request: web.Request) -> web.StreamResponse:
    if issuer(request).school is None:
        return not_here(request)
    viewer = await viewer_of(request)
    form = await request.post()
    if viewer is None:
        return csrf_refused(request)
    if not form_token_ok(viewer, _APPS_PURPOSE, str(form.get("csrf_token", ""))):
        return csrf_refused(request)
    ctx = context(request)
    client_id = await revoke_app(
        ctx,
        user_id=viewer.user.id,
        school_id=viewer.school.id,
        grant_id=str(form.get("grant_id", ""))[:64],
        client_id=str(form.get("client_id", ""))[:200],
        ip=sessions.client_address(request),
    )
    if client_id is None:
        return refused(
            request,
            "That app is not connected to your account here. Reload Connected apps and try again.",
            status=404,
        )
    return sessions.see_other(f"{APPS_PATH}?{urlencode({'revoked': client_id})}")
