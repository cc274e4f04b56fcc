"""School admin pages: Settings > OAuth Applications, and the school's audit log with CSV export.

Only admins of the school the Host names may open them (a member with role `admin`); anyone
else signed in gets a 403 page, and a visitor who is not signed in is sent to sign in. The
school always comes from the Host, never from a form, and every client a request names must
belong to it.

Client changes follow the rules of `clients.py`, the same ones dynamic registration applies
(redirect URIs https or loopback http without fragments or wildcards, no `admin:*` scope,
only what the school allows), and each appends an audit event naming the admin who made it.

A new or rotated client secret is shown once. It crosses the post-redirect-get in Redis for a
few minutes, sealed with AES-GCM under a key derived from the admin's session cookie (which
the server never stores), and is deleted by the first page load that shows it.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

import orjson
from aiohttp import web
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from multidict import MultiMapping

from libs.common import scopes as catalogue
from libs.common.errors import InvalidClientMetadata, InvalidRedirectUri
from services.identity import (
    audit,
    clients,
    grants,
    pages,
    redirect_uris,
    registration,
    sessions,
    store,
)
from services.identity.account import (
    Viewer,
    csrf_refused,
    cursor_of,
    form_token,
    form_token_ok,
    login_redirect,
    not_here,
    parse_cursor,
    refused,
    render_page,
    viewer_of,
    when,
)
from services.identity.context import IdentityContext, context, issuer
from services.identity.store import admin as admin_store
from services.identity.store import registration as registration_store

ADMIN_PATH = "/admin"
APPS_PATH = "/admin/apps"
AUDIT_PATH = "/admin/audit"
AUDIT_CSV_PATH = "/admin/audit.csv"

AUDIT_PAGE_SIZE = 100
CSV_BATCH = 1000
CSV_MAX_ROWS = 100_000
_PURPOSE = "admin-apps"
_FLASH_KEY = "connect:flash:"
_FLASH_TTL = 300
_FLASH_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_ACTION = re.compile(r"^[a-z_]{1,40}(\.[a-z_]{1,40}){0,3}$")
# Spreadsheets run a cell that starts with one of these as a formula (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")

# The events the audit filter offers; any well-formed action name is accepted too.
AUDIT_ACTIONS = (
    "api.call",
    "token.issued",
    "token.refreshed",
    "token.revoked",
    "grant.created",
    "grant.revoked",
    "consent.granted",
    "consent.denied",
    "consent.revoked",
    "login.succeeded",
    "login.failed",
    "client.created",
    "client.registered",
    "client.updated",
    "client.secret_rotated",
    "client.disabled",
    "client.enabled",
    "client.deleted",
    "webhook.disabled",
    "webhook.enabled",
    "webhook.delivery_retried",
    "code.replayed",
    "refresh.reuse_detected",
)


# Who may -------------------------------------------------------------------------------------


async def admin_of(request: web.Request) -> Viewer | web.Response:
    """The signed-in admin of this school, or the answer for anyone else."""
    if issuer(request).school is None:
        return not_here(request)
    viewer = await viewer_of(request)
    if viewer is None:
        if await sessions.current_session(request) is not None:
            # Signed in, but as someone with no place at this school: an admin of another
            # school among them.
            return _forbidden(request)
        return login_redirect(request)
    if not viewer.is_school_admin:
        return _forbidden(request)
    return viewer


def _forbidden(request: web.Request) -> web.Response:
    return refused(request, "Only the school's admins can open this page.")


def _ip(request: web.Request) -> str | None:
    return sessions.client_address(request)


async def _audit_change(
    ctx: IdentityContext,
    action: str,
    viewer: Viewer,
    client: store.Client,
    ip: str | None,
    **detail: Any,
) -> None:
    await audit.append(
        ctx.redis,
        ctx.settings,
        audit.record(
            action,
            school_id=viewer.school.id,
            client_id=client.id,
            subject=str(viewer.user.id),
            scope=catalogue.format_scopes(client.scopes),
            ip=ip,
            via="admin",
            client_name=client.name,
            **detail,
        ),
    )


# The secret, once ----------------------------------------------------------------------------


def _flash_cipher(request: web.Request, flash_id: str) -> AESGCM | None:
    cookie = request.cookies.get(sessions.SESSION_COOKIE, "")
    if not cookie:
        return None
    key = hmac.new(cookie.encode(), f"lc-admin-flash\x00{flash_id}".encode(), hashlib.sha256)
    return AESGCM(key.digest())


async def stash_secret(request: web.Request, client_id: str, secret: str) -> str | None:
    """Seal the secret for the next page load; the id to name it by, None without a cookie."""
    ctx = context(request)
    flash_id = secrets.token_urlsafe(18)
    cipher = _flash_cipher(request, flash_id)
    if cipher is None:
        return None
    nonce = secrets.token_bytes(12)
    sealed = nonce + cipher.encrypt(nonce, secret.encode(), client_id.encode())
    await ctx.redis.set(ctx.settings.stream(_FLASH_KEY + flash_id), sealed, ex=_FLASH_TTL)
    return flash_id


async def take_secret(request: web.Request, client_id: str, flash_id: str) -> str | None:
    """The sealed secret, deleted as it is read: a reload, or anyone else, finds nothing."""
    if not _FLASH_ID.match(flash_id):
        return None
    ctx = context(request)
    sealed = await ctx.redis.getdel(ctx.settings.stream(_FLASH_KEY + flash_id))
    cipher = _flash_cipher(request, flash_id)
    if not isinstance(sealed, bytes) or cipher is None or len(sealed) < 13:
        return None
    try:
        return cipher.decrypt(sealed[:12], sealed[12:], client_id.encode()).decode()
    except InvalidTag:
        return None


# Forms ---------------------------------------------------------------------------------------


def _lines(value: str) -> list[str]:
    return list(dict.fromkeys(line.strip() for line in value.splitlines() if line.strip()))


def redirect_uris_of(raw: str) -> list[str]:
    """Redirect URIs, one a line, checked as dynamic registration checks them."""
    uris = _lines(raw)
    if len(uris) > registration.MAX_REDIRECT_URIS:
        raise InvalidRedirectUri(f"at most {registration.MAX_REDIRECT_URIS} redirect URIs")
    if any(len(u) > registration.MAX_URI_LENGTH for u in uris):
        raise InvalidRedirectUri("a redirect URI is too long")
    return [redirect_uris.validate_redirect_uri(u) for u in uris]


def origins_of(raw: str) -> list[str]:
    origins = _lines(raw)
    if len(origins) > registration.MAX_REDIRECT_URIS:
        raise InvalidClientMetadata(f"at most {registration.MAX_REDIRECT_URIS} origins")
    return list(dict.fromkeys(clients.validate_origin(o) for o in origins))


def offered_scopes(school: store.School) -> list[catalogue.Scope]:
    """What an app of this school may be registered for: never admin scopes, only what the
    school allows."""
    allowed = school.allowed_scopes
    return [
        catalogue.CATALOGUE[s]
        for s in catalogue.PUBLIC_SCOPES
        if allowed is None or s in allowed or s in catalogue.IDENTITY_SCOPES
    ]


@dataclass(frozen=True, slots=True)
class AppForm:
    """What the create form holds, echoed back when it has to be corrected."""

    name: str = ""
    redirect_uris: str = ""
    origins: str = ""
    scopes: tuple[str, ...] = ("openid",)
    public: bool = False
    machine: bool = False

    @classmethod
    def read(cls, form: MultiMapping[Any]) -> AppForm:
        return cls(
            name=str(form.get("name", ""))[:200],
            redirect_uris=str(form.get("redirect_uris", ""))[:50_000],
            origins=str(form.get("origins", ""))[:50_000],
            scopes=tuple(str(s) for s in form.getall("scope", []))[:100],
            public=form.get("client_type") == "public",
            machine=form.get("client_credentials") == "yes",
        )


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
    await _audit_change(
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
    await _audit_change(
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
    revoked = 0
    async with ctx.pool.acquire() as conn, conn.transaction():
        if not await registration_store.lock_client(conn, client.id):
            return 0
        for grant in await registration_store.active_grants_of_client(conn, client.id):
            revoked += await grants.revoke_grant(
                conn, ctx.redis, ctx.settings, grant.id, reason="client_deleted", ip=ip
            )
        await store.delete_client(conn, client.id)
    await clients.announce_change(ctx.redis, ctx.settings, client.id)
    await _audit_change(ctx, "client.deleted", viewer, client, ip, revoked_grants=revoked)
    return revoked


# Pages: OAuth applications -------------------------------------------------------------------


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
        made = await create_app(ctx, viewer, wanted, _ip(request))
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
        await edit_app(context(request), viewer, client, form, _ip(request))
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
    await _audit_change(ctx, "client.secret_rotated", viewer, updated, _ip(request))
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
    ip = _ip(request)
    revoked = 0
    async with ctx.pool.acquire() as conn, conn.transaction():
        if not await registration_store.lock_client(conn, client.id):
            return _no_such_app(request)
        updated = await store.update_client(
            conn, client.id, disabled_at=datetime.now(UTC) if disabled else None
        )
        if updated is None:
            return _no_such_app(request)
        if disabled:
            # Every grant ends now: gateways refuse its tokens at once (a disabled client is
            # otherwise seen only when their client cache expires), its webhooks stop, and
            # enabling the app again brings back no token; its users consent afresh.
            for grant in await registration_store.active_grants_of_client(conn, client.id):
                revoked += await grants.revoke_grant(
                    conn, ctx.redis, ctx.settings, grant.id, reason="client_disabled", ip=ip
                )
    await clients.announce_change(ctx.redis, ctx.settings, client.id)
    action = "client.disabled" if disabled else "client.enabled"
    detail = {"revoked_grants": revoked} if disabled else {}
    await _audit_change(ctx, action, viewer, updated, ip, **detail)
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
    await delete_app(context(request), viewer, client, _ip(request))
    return sessions.see_other(f"{APPS_PATH}?deleted=1")


# Pages: audit log ----------------------------------------------------------------------------


def _moment(value: str) -> datetime:
    """A `datetime-local` (or date) value, read as UTC."""
    text = value.strip()
    moment = datetime.fromisoformat(text)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class AuditQuery:
    filters: admin_store.AuditFilters
    # The form's values, echoed back as typed.
    values: dict[str, str]
    error: str | None


async def read_filters(
    ctx: IdentityContext, school_id: int, query: MultiMapping[str]
) -> AuditQuery:
    """The filters of the audit page and its CSV export, from the query string."""
    values = {
        k: str(query.get(k, ""))[:320].strip() for k in ("from", "to", "client", "user", "action")
    }
    error = None
    since = until = None
    try:
        since = _moment(values["from"]) if values["from"] else None
        until = _moment(values["to"]) if values["to"] else None
    except ValueError:
        error = "Times must look like 2025-01-31T13:45 (UTC)."
    action = values["action"] or None
    if action is not None and not _ACTION.match(action):
        error = "That is not an event type."
    subject = None
    if values["user"]:
        text = values["user"]
        try:
            subject = str(UUID(text))
        except ValueError:
            if "@" in text:
                found = await admin_store.member_by_email(ctx.pool, school_id, text)
                if found is None:
                    error = "No member of this school has that email address."
                subject = str(found) if found else None
            else:
                # A client id: the subject of client_credentials records.
                subject = text
    filters = admin_store.AuditFilters(
        since=since,
        until=until,
        client_id=values["client"] or None,
        subject=subject,
        action=action,
    )
    return AuditQuery(filters, values, error)


def csv_cell(value: Any) -> str:
    """A cell a spreadsheet shows as text: a leading formula character gets a quote before it."""
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


CSV_COLUMNS = (
    "occurred_at",
    "action",
    "client_id",
    "client_name",
    "subject",
    "user_email",
    "grant_id",
    "method",
    "path",
    "status",
    "scope",
    "ip",
    "detail",
)


def csv_row(entry: admin_store.AuditEntry) -> list[str]:
    values = [
        entry.occurred_at.astimezone(UTC).isoformat(),
        entry.action,
        entry.client_id,
        entry.client_name,
        entry.subject,
        entry.user_email,
        entry.grant_id,
        entry.method,
        entry.path,
        entry.status,
        entry.scope,
        entry.ip,
        orjson.dumps(entry.detail, option=orjson.OPT_SORT_KEYS).decode() if entry.detail else "",
    ]
    return [csv_cell(v) for v in values]


async def audit_page(request: web.Request) -> web.StreamResponse:
    viewer = await admin_of(request)
    if isinstance(viewer, web.Response):
        return viewer
    ctx = context(request)
    asked = await read_filters(ctx, viewer.school.id, request.query)
    before = parse_cursor(request.query.get("before", ""))
    entries: list[admin_store.AuditEntry] = []
    more = False
    if asked.error is None:
        entries = await admin_store.audit_entries(
            ctx.pool, viewer.school.id, asked.filters, before=before, limit=AUDIT_PAGE_SIZE + 1
        )
        more = len(entries) > AUDIT_PAGE_SIZE
        entries = entries[:AUDIT_PAGE_SIZE]
    kept = {k: v for k, v in asked.values.items() if v}
    older = None
    if more:
        cursor = cursor_of(entries[-1].occurred_at, entries[-1].id)
        older = f"{AUDIT_PATH}?{urlencode({**kept, 'before': cursor})}"
    return render_page(
        request,
        viewer,
        "admin_audit.html",
        status=400 if asked.error else 200,
        section="admin-audit",
        title="Audit log",
        entries=entries,
        when=when,
        values=asked.values,
        error=asked.error,
        actions=AUDIT_ACTIONS,
        apps=await store.list_clients(ctx.pool, viewer.school.id),
        older_url=older,
        newest_url=f"{AUDIT_PATH}?{urlencode(kept)}" if before else None,
        csv_url=f"{AUDIT_CSV_PATH}?{urlencode(kept)}" if kept else AUDIT_CSV_PATH,
    )


async def audit_csv(request: web.Request) -> web.StreamResponse:
    viewer = await admin_of(request)
    if isinstance(viewer, web.Response):
        return viewer
    ctx = context(request)
    asked = await read_filters(ctx, viewer.school.id, request.query)
    if asked.error is not None:
        return refused(request, asked.error, status=400)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    response = web.StreamResponse(
        headers={
            **pages.security_headers(),
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": (
                f'attachment; filename="audit-{viewer.school.subdomain}-{stamp}.csv"'
            ),
        }
    )
    await response.prepare(request)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    before = None
    written = 0
    # Batches by keyset: memory stays flat however long the school's history is.
    while written < CSV_MAX_ROWS:
        batch = await admin_store.audit_entries(
            ctx.pool, viewer.school.id, asked.filters, before=before, limit=CSV_BATCH
        )
        for entry in batch:
            writer.writerow(csv_row(entry))
        written += len(batch)
        await response.write(buffer.getvalue().encode())
        buffer.seek(0)
        buffer.truncate()
        if len(batch) < CSV_BATCH:
            break
        before = (batch[-1].occurred_at, batch[-1].id)
    await response.write_eof()
    return response


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get(ADMIN_PATH, admin_home, allow_head=False)
    r.add_get(APPS_PATH, apps_page, allow_head=False)
    r.add_post(APPS_PATH, create_submit)
    r.add_get(APPS_PATH + "/{client_id}", app_page, allow_head=False)
    r.add_post(APPS_PATH + "/{client_id}/edit", edit_submit)
    r.add_post(APPS_PATH + "/{client_id}/rotate-secret", rotate_submit)
    r.add_post(APPS_PATH + "/{client_id}/disable", disable_submit)
    r.add_post(APPS_PATH + "/{client_id}/enable", enable_submit)
    r.add_post(APPS_PATH + "/{client_id}/delete", delete_submit)
    r.add_get(AUDIT_PATH, audit_page, allow_head=False)
    r.add_get(AUDIT_CSV_PATH, audit_csv, allow_head=False)


_HTML = {"description": "An HTML page", "content": {"text/html": {}}}
_SEE_OTHER = {"description": "Redirect (post-redirect-get, or to sign in)"}
_ADMIN_ONLY = {"403": {**_HTML, "description": "Not an admin of this school, or CSRF"}}
_CLIENT_ID = [{"name": "client_id", "in": "path", "required": True, "schema": {"type": "string"}}]
_FILTERS = [
    {"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
    for n in ("from", "to", "client", "user", "action", "before")
]


def _post(summary: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "parameters": _CLIENT_ID,
            "responses": {"303": _SEE_OTHER, "400": _HTML, "404": _HTML, **_ADMIN_ONLY},
        }
    }


OPENAPI_PATHS: dict[str, Any] = {
    APPS_PATH: {
        "get": {
            "summary": "School admin: the school's OAuth applications",
            "responses": {"200": _HTML, "303": _SEE_OTHER, **_ADMIN_ONLY},
        },
        "post": {
            "summary": "School admin: create an application (its secret is shown once)",
            "responses": {"303": _SEE_OTHER, "400": _HTML, **_ADMIN_ONLY},
        },
    },
    APPS_PATH + "/{client_id}": {
        "get": {
            "summary": "School admin: one application",
            "parameters": _CLIENT_ID,
            "responses": {"200": _HTML, "404": _HTML, **_ADMIN_ONLY},
        }
    },
    APPS_PATH + "/{client_id}/edit": _post("Edit name, redirect URIs and allowed origins"),
    APPS_PATH + "/{client_id}/rotate-secret": _post("Make a new client secret (shown once)"),
    APPS_PATH + "/{client_id}/disable": _post("Disable the application"),
    APPS_PATH + "/{client_id}/enable": _post("Enable the application again"),
    APPS_PATH + "/{client_id}/delete": _post("Revoke every grant and delete the application"),
    AUDIT_PATH: {
        "get": {
            "summary": "School admin: the audit log, filtered, newest first",
            "parameters": _FILTERS,
            "responses": {"200": _HTML, "400": _HTML, **_ADMIN_ONLY},
        }
    },
    AUDIT_CSV_PATH: {
        "get": {
            "summary": "School admin: the audit log as CSV (same filters), as an attachment",
            "parameters": _FILTERS[:-1],
            "responses": {
                "200": {"description": "text/csv"},
                "400": {**_HTML, "description": "A filter is not valid"},
                **_ADMIN_ONLY,
            },
        }
    },
}
