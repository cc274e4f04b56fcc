"""Settings > OAuth Applications: the list, one application, and the forms that change it.

Every POST checks the CSRF token first, every client the path names must belong to this
school, and every change answers with a redirect (post-redirect-get).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

from aiohttp import web
from multidict import MultiMapping

from libs.common import scopes as catalogue
from services.identity import clients, grants, sessions, store
from services.identity.account.viewer import (
    Viewer,
    csrf_refused,
    form_token,
    form_token_ok,
    refused,
    render_page,
    when,
)
from services.identity.admin.access import admin_of, audit_change, client_ip
from services.identity.admin.app_forms import AppForm, offered_scopes
from services.identity.admin.applications import create_app, delete_app, edit_app
from services.identity.admin.paths import APPS_PATH
from services.identity.admin.secret_flash import stash_secret, take_secret
from services.identity.context import context
from services.identity.store import registration as registration_store

_PURPOSE = "admin-apps"


async def _client_of_school(request: web.Request, viewer: Viewer) -> store.Client | None:
    client = await store.client_by_id(context(request).pool, request.match_info["client_id"])
    if client is None or client.school_id != viewer.school.id:
        return None
    return client


def _no_such_app(request: web.Request) -> web.Response:
    return refused(request, "This school has no such application.", status=404)


def _app_path(client_id: str, **query: str) -> str:
    path = f"{APPS_PATH}/{client_id}"
    return f"{path}?{urlencode(query)}" if query else path


def _render_apps(
    request: web.Request,
    viewer: Viewer,
    apps: Sequence[store.Client],
    wanted: AppForm,
    *,
    status: int = 200,
    error: str | None = None,
    deleted: str | None = None,
) -> web.Response:
    return render_page(
        request,
        viewer,
        "admin_apps.html",
        status=status,
        section="admin-apps",
        title="OAuth applications",
        apps=apps,
        when=when,
        wanted=wanted,
        offered=offered_scopes(viewer.school),
        error=error,
        deleted=deleted,
        csrf_token=form_token(viewer, _PURPOSE),
    )


async def admin_home(request: web.Request) -> web.StreamResponse:
    return sessions.see_other(APPS_PATH)


async def apps_page(request: web.Request) -> web.StreamResponse:
    viewer = await admin_of(request)
    if isinstance(viewer, web.Response):
        return viewer
    apps = await store.list_clients(context(request).pool, viewer.school.id)
    deleted = "yes" if request.query.get("deleted") == "1" else None
    return _render_apps(request, viewer, apps, AppForm(), deleted=deleted)


async def create_submit(request: web.Request) -> web.StreamResponse:
    viewer = await admin_of(request)
    if isinstance(viewer, web.Response):
        return viewer
    form = await request.post()
    if not form_token_ok(viewer, _PURPOSE, str(form.get("csrf_token", ""))):
        return csrf_refused(request)
    ctx = context(request)
    wanted = AppForm.read(form)
    try:
        made = await create_app(ctx, viewer, wanted, client_ip(request))
    except clients.METADATA_ERRORS as exc:
        apps = await store.list_clients(ctx.pool, viewer.school.id)
        return _render_apps(request, viewer, apps, wanted, status=400, error=exc.description)
    query = {"created": "1"}
    if made.client_secret is not None:
        flash_id = await stash_secret(request, made.client.id, made.client_secret)
        if flash_id:
            query["shown"] = flash_id
    return sessions.see_other(_app_path(made.client.id, **query))


def _render_app(
    request: web.Request,
    viewer: Viewer,
    client: store.Client,
    *,
    status: int = 200,
    error: str | None = None,
    notice: str | None = None,
    secret: str | None = None,
    redirect_uris: str | None = None,
    origins: str | None = None,
    name: str | None = None,
) -> web.Response:
    return render_page(
        request,
        viewer,
        "admin_app.html",
        status=status,
        section="admin-apps",
        title=client.name,
        app=client,
        scopes=catalogue.describe(client.scopes),
        when=when,
        error=error,
        notice=notice,
        secret=secret,
        name=client.name if name is None else name,
        redirect_uris="\n".join(client.redirect_uris) if redirect_uris is None else redirect_uris,
        origins="\n".join(client.allowed_origins) if origins is None else origins,
        csrf_token=form_token(viewer, _PURPOSE),
        base=_app_path(client.id),
    )


_NOTICES = {
    "created": "The application was created.",
    "rotated": "A new client secret was made; the old one no longer works.",
    "updated": "The changes were saved.",
    "disabled": "The application is disabled: it can no longer sign users in or call the API.",
    "enabled": "The application is enabled again.",
}


async def app_page(request: web.Request) -> web.StreamResponse:
    viewer = await admin_of(request)
    if isinstance(viewer, web.Response):
        return viewer
    client = await _client_of_school(request, viewer)
    if client is None:
        return _no_such_app(request)
    secret = None
    flash_id = request.query.get("shown", "")
    if flash_id:
        secret = await take_secret(request, client.id, flash_id)
    notice = next((text for key, text in _NOTICES.items() if request.query.get(key) == "1"), None)
    return _render_app(request, viewer, client, notice=notice, secret=secret)


async def _posted(
    request: web.Request,
) -> tuple[Viewer, store.Client, MultiMapping[Any]] | web.Response:
    """The admin, the school's client the path names, and the form, once CSRF checks out."""
    viewer = await admin_of(request)
    if isinstance(viewer, web.Response):
        return viewer
    form = await request.post()
    if not form_token_ok(viewer, _PURPOSE, str(form.get("csrf_token", ""))):
        return csrf_refused(request)
    client = await _client_of_school(request, viewer)
    if client is None:
        return _no_such_app(request)
    return viewer, client, form


async def edit_submit(request: web.Request) -> web.StreamResponse:
    posted = await _posted(request)
    if isinstance(posted, web.Response):
        return posted
    viewer, client, form = posted
    try:
        await edit_app(context(request), viewer, client, form, client_ip(request))
    except clients.METADATA_ERRORS as exc:
        return _render_app(
            request,
            viewer,
            client,
            status=400,
            error=exc.description,
            name=str(form.get("name", ""))[:200],
            redirect_uris=str(form.get("redirect_uris", ""))[:50_000],
            origins=str(form.get("origins", ""))[:50_000],
        )
    except LookupError:
        return _no_such_app(request)
    return sessions.see_other(_app_path(client.id, updated="1"))


async def rotate_submit(request: web.Request) -> web.StreamResponse:
    posted = await _posted(request)
    if isinstance(posted, web.Response):
        return posted
    viewer, client, _ = posted
    ctx = context(request)
    try:
        updated, secret = await clients.rotate_secret(ctx.pool, ctx.redis, ctx.settings, client)
    except clients.METADATA_ERRORS as exc:
        return _render_app(request, viewer, client, status=400, error=exc.description)
    await audit_change(ctx, "client.secret_rotated", viewer, updated, client_ip(request))
    query = {"rotated": "1"}
    flash_id = await stash_secret(request, client.id, secret)
    if flash_id:
        query["shown"] = flash_id
    return sessions.see_other(_app_path(client.id, **query))


async def _set_disabled(request: web.Request, disabled: bool) -> web.StreamResponse:
    posted = await _posted(request)
    if isinstance(posted, web.Response):
        return posted
    viewer, client, _ = posted
    ctx = context(request)
    ip = client_ip(request)
    ending: dict[UUID, int] = {}
    action = "client.disabled" if disabled else "client.enabled"
    async with ctx.pool.acquire() as conn, conn.transaction():
        if not await registration_store.lock_client(conn, client.id):
            return _no_such_app(request)
        updated = await store.update_client(
            conn, client.id, disabled_at=datetime.now(UTC) if disabled else None
        )
        if updated is None:
            return _no_such_app(request)
        detail = {}
        if disabled:
            # Every grant ends now: gateways refuse its tokens at once (a disabled client is
            # otherwise seen only when their client cache expires), its webhooks stop, and
            # enabling the app again brings back no token; its users consent afresh.
            ending = {
                g.id: g.school_id
                for g in await registration_store.active_grants_of_client(conn, client.id)
            }
            revoked = await grants.record_revocations(
                conn, list(ending), reason="client_disabled", ip=ip
            )
            detail = {"revoked_grants": len(revoked)}
        await audit_change(ctx, action, viewer, updated, ip, db=conn, **detail)
    # Announced once committed: a rollback above has told no gateway or webhook anything.
    await grants.announce_revocations(ctx.redis, ctx.settings, ending, reason="client_disabled")
    await clients.announce_change(ctx.redis, ctx.settings, client.id)
    return sessions.see_other(_app_path(client.id, **{action.split(".")[1]: "1"}))


async def disable_submit(request: web.Request) -> web.StreamResponse:
    return await _set_disabled(request, True)


async def enable_submit(request: web.Request) -> web.StreamResponse:
    return await _set_disabled(request, False)


async def delete_submit(request: web.Request) -> web.StreamResponse:
    posted = await _posted(request)
    if isinstance(posted, web.Response):
        return posted
    viewer, client, form = posted
    if form.get("confirm") != "yes":
        return _render_app(
            request,
            viewer,
            client,
            status=400,
            error="Tick the box to confirm that the application should be deleted.",
        )
    await delete_app(context(request), viewer, client, client_ip(request))
    return sessions.see_other(f"{APPS_PATH}?deleted=1")
