"""The account pages on a school origin: Connected Apps (revoke an app) and the access history.

Pages are server-rendered and work without JavaScript. A visitor who is not signed in (or is
signed in as someone who does not belong to the school) is sent to the account sign-in page
and back. Every form posts a token bound to the session's CSRF secret and the school, and
every post answers with a redirect (post-redirect-get).

Revoking an app ends every live grant the user holds for it at this school through
`grants.revoke_grant` (PostgreSQL, the Redis mark, `connect:revocations`), so gateways refuse
its tokens as soon as the page answers, and forgets the remembered consent, so the app's next
authorization request asks the user again.

Last use of an app is the latest of: a token issued or refreshed for one of its grants
(`grants.last_used_at`) and an API call the gateway recorded for one (`audit_log`, action
`api.call`). The access history is the user's own audit records at this school: every record
whose subject is the user.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

from aiohttp import web

from services.identity import audit, consent, grants, pages, sessions, store
from services.identity.context import IdentityContext, context, issuer
from services.identity.store import account as account_store
from services.identity.store import authorize as flow_store
from services.identity.store.authorize import Session

ACCOUNT_PATH = "/account"
LOGIN_PATH = "/account/login"
APPS_PATH = "/account/apps"
REVOKE_PATH = "/account/apps/revoke"
ACTIVITY_PATH = "/account/activity"
BUTTON_PATH = "/account/button"

ACTIVITY_PAGE_SIZE = 50
_LOGIN_PURPOSE = "account-login"
_APPS_PURPOSE = "account-apps"
_RETURN_PREFIXES = ("/account", "/admin")

_ACTIONS = {
    "api.call": "API call",
    "token.issued": "Access token issued",
    "token.refreshed": "Access token refreshed",
    "token.revoked": "Token revoked by the app",
    "grant.created": "Access granted",
    "grant.revoked": "Access ended",
    "consent.granted": "Permission given",
    "consent.denied": "Permission refused",
    "consent.revoked": "App disconnected",
    "login.succeeded": "Signed in",
    "login.failed": "Sign-in refused",
    "refresh.reuse_detected": "A used refresh token came back: access ended",
    "code.replayed": "A used authorization code came back: access ended",
}


# Who is asking -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Viewer:
    """The signed-in user of an account or admin page, at the school the Host names."""

    session: Session
    user: store.User
    school: store.School
    role: str | None

    @property
    def is_school_admin(self) -> bool:
        return self.role == "admin"


def when(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if moment else ""


def return_path(value: str) -> str:
    """A local account or admin path to come back to after signing in; anything else is the
    Connected Apps page, so the sign-in form cannot be made an open redirect."""
    path = sessions.safe_return_path(value)
    if any(
        path == p or path.startswith(p + "/") or path.startswith(p + "?") for p in _RETURN_PREFIXES
    ):
        return path
    return APPS_PATH


def login_redirect(request: web.Request) -> web.Response:
    return sessions.see_other(f"{LOGIN_PATH}?{urlencode({'return_to': request.path_qs})}")


def not_here(request: web.Request) -> web.Response:
    return pages.render(
        request,
        "error.html",
        status=404,
        title="Open your school's address",
        message="Your account pages are on your school's Loopwise address.",
    )


def refused(request: web.Request, message: str, *, status: int = 403) -> web.Response:
    return pages.render(
        request, "error.html", status=status, title="Request refused", message=message
    )


def csrf_refused(request: web.Request) -> web.Response:
    return refused(
        request, "This form has expired or did not come from this page. Reload it and try again."
    )


async def viewer_of(request: web.Request) -> Viewer | None:
    """The signed-in user, when they may act at this school (a member or platform admin)."""
    ctx, iss = context(request), issuer(request)
    if iss.school is None:
        return None
    session = await sessions.current_session(request)
    if session is None or not await flow_store.may_use_school(
        ctx.pool, session.user_id, iss.school.id
    ):
        return None
    user = await store.user_by_id(ctx.pool, session.user_id)
    if user is None:
        return None
    role = await store.membership_role(ctx.pool, iss.school.id, user.id)
    return Viewer(session, user, iss.school, role)


def form_token(viewer: Viewer, purpose: str) -> str:
    """A CSRF token for one kind of form, bound to the session and to this school."""
    return sessions.session_csrf_token(viewer.session, purpose, str(viewer.school.id))


def form_token_ok(viewer: Viewer, purpose: str, token: str) -> bool:
    return sessions.check_session_csrf(viewer.session, purpose, str(viewer.school.id), token)


def render_page(
    request: web.Request,
    viewer: Viewer,
    template: str,
    *,
    section: str,
    title: str,
    status: int = 200,
    **page: Any,
) -> web.Response:
    """A page of the account area: the shared navigation, who is signed in, sign-out."""
    return pages.render(
        request,
        template,
        status=status,
        title=title,
        section=section,
        is_school_admin=viewer.is_school_admin,
        user_email=viewer.user.email,
        school_name=viewer.school.name,
        logout_csrf_token=sessions.logout_csrf_token(viewer.session),
        **page,
    )


# Keyset pagination ---------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def cursor_of(moment: datetime, row_id: int) -> str:
    micros = (moment - _EPOCH) // timedelta(microseconds=1)
    return f"{micros}.{row_id}"


def parse_cursor(value: str) -> tuple[datetime, int] | None:
    micros, _, row_id = value.partition(".")
    if not (micros.isascii() and micros.isdigit() and row_id.isascii() and row_id.isdigit()):
        return None
    if len(micros) > 18 or len(row_id) > 18:
        return None
    return _EPOCH + timedelta(microseconds=int(micros)), int(row_id)


# Connected Apps ----------------------------------------------------------------------------


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
        # Revoked again even when already revoked: revoke_grant then re-marks and re-announces,
        # which repairs a revoke that died between PostgreSQL and Redis.
        named.append(grant.id)
    elif not client_id:
        return None
    # One transaction: the delete waits for a code being issued on the consent's strength
    # (authorize.issue_code holds the row), and the list that follows sees its grant.
    async with ctx.pool.acquire() as conn, conn.transaction():
        forgot = await flow_store.delete_consent(
            conn, user_id=user_id, client_id=client_id, school_id=school_id
        )
        live = await account_store.live_grant_ids_of_app(
            conn, user_id=user_id, school_id=school_id, client_id=client_id
        )
    if not named and not live and not forgot:
        return None
    ended = 0
    for gid in dict.fromkeys([*named, *live]):
        ended += await grants.revoke_grant(
            ctx.pool, ctx.redis, ctx.settings, gid, reason="user_revoked", ip=ip
        )
    await audit.append(
        ctx.redis,
        ctx.settings,
        audit.record(
            "consent.revoked",
            school_id=school_id,
            client_id=client_id,
            subject=str(user_id),
            ip=ip,
            via="account",
            revoked_grants=ended,
        ),
    )
    return client_id


# Access history ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ActivityLine:
    occurred_at: datetime
    when: str
    app: str
    what: str
    detail: str
    scope: str


def describe(row: account_store.ActivityRow) -> ActivityLine:
    what = _ACTIONS.get(row.action, row.action)
    detail = ""
    if row.action == "api.call":
        detail = f"{row.method or ''} {row.path or ''}".strip()
        if row.status is not None:
            detail += f" → {row.status}"
    elif row.action in ("grant.revoked", "login.failed"):
        detail = str(row.detail.get("reason", ""))
    return ActivityLine(
        occurred_at=row.occurred_at,
        when=when(row.occurred_at),
        app=row.client_name or row.client_id or "",
        what=what,
        detail=detail,
        scope=row.scope or "",
    )


# Handlers ----------------------------------------------------------------------------------


async def login_page(request: web.Request) -> web.StreamResponse:
    if issuer(request).school is None:
        return not_here(request)
    back = return_path(request.query.get("return_to", ""))
    if await viewer_of(request) is not None:
        return sessions.see_other(back)
    return _login_form(request, back)


def _login_form(
    request: web.Request,
    back: str,
    *,
    status: int = 200,
    error: str | None = None,
    email: str = "",
    headers: dict[str, str] | None = None,
) -> web.Response:
    ctx, iss = context(request), issuer(request)
    value, is_new = sessions.presession(request)
    response = pages.render(
        request,
        "account_login.html",
        status=status,
        headers=headers,
        title="Sign in",
        school_name=iss.school.name if iss.school else "",
        csrf_token=sessions.login_csrf_token(ctx.settings, value, _LOGIN_PURPOSE),
        return_to=back,
        email=email,
        error=error,
        action=LOGIN_PATH,
    )
    if is_new:
        sessions.set_presession_cookie(response, request, value)
    return response


async def login_submit(request: web.Request) -> web.StreamResponse:
    ctx, iss = context(request), issuer(request)
    if iss.school is None:
        return not_here(request)
    form = await request.post()
    back = return_path(str(form.get("return_to", "")))
    if not sessions.check_login_csrf(request, str(form.get("csrf_token", "")), _LOGIN_PURPOSE):
        return csrf_refused(request)
    email = str(form.get("email", ""))[: sessions.MAX_EMAIL_LENGTH]
    result = await sessions.sign_in(
        ctx,
        email=email,
        password=str(form.get("password", "")),
        school=iss.school,
        address=sessions.client_address(request),
        user_agent=request.headers.get("User-Agent"),
        previous_session=sessions.session_hash(request),
        device_cookie=sessions.device_cookie(request),
    )
    if result.outcome == "throttled":
        return _login_form(
            request,
            back,
            status=429,
            email=email,
            error="Too many unsuccessful sign-in attempts. Please try again later.",
            headers={"Retry-After": str(result.retry_after or 60)},
        )
    if result.outcome == "invalid":
        return _login_form(
            request, back, status=400, email=email, error="Incorrect email or password."
        )
    if result.outcome != "ok" or result.cookie_value is None:
        return _login_form(
            request,
            back,
            status=403,
            email=email,
            error=(
                f"This account is not a member of {iss.school.name}. Sign in with another account."
            ),
        )
    response = sessions.see_other(back)
    sessions.set_session_cookie(response, request, result.cookie_value)
    sessions.set_device_cookie(response, request, result.device_cookie)
    return response


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


async def activity_page(request: web.Request) -> web.StreamResponse:
    if issuer(request).school is None:
        return not_here(request)
    viewer = await viewer_of(request)
    if viewer is None:
        return login_redirect(request)
    before = parse_cursor(request.query.get("before", ""))
    rows = await account_store.activity(
        context(request).pool,
        user_id=viewer.user.id,
        school_id=viewer.school.id,
        before=before,
        limit=ACTIVITY_PAGE_SIZE + 1,
    )
    more = len(rows) > ACTIVITY_PAGE_SIZE
    rows = rows[:ACTIVITY_PAGE_SIZE]
    older = (
        f"{ACTIVITY_PATH}?{urlencode({'before': cursor_of(rows[-1].occurred_at, rows[-1].id)})}"
        if more
        else None
    )
    return render_page(
        request,
        viewer,
        "account_activity.html",
        section="activity",
        title="Access history",
        lines=[describe(r) for r in rows],
        older_url=older,
        newest_url=ACTIVITY_PATH if before else None,
    )


# The button kit ----------------------------------------------------------------------------

BUTTON_HTML = (
    '<a class="lw-connect" href="https://YOUR-SCHOOL.loopwise.com/v1/oauth/authorize?...">\n'
    '  <span class="lw-connect-mark" aria-hidden="true"></span>Connect with Loopwise\n'
    "</a>"
)


def _button_css() -> str:
    """The kit's rules, cut from the stylesheet the page itself uses, so the two never differ."""
    css = (pages.STATIC_DIR / "connect.css").read_text(encoding="utf-8")
    start = css.index(".lw-connect {")
    return css[start : css.index(".snippet {")].strip()


async def button_kit(request: web.Request) -> web.StreamResponse:
    return pages.render(
        request,
        "button_kit.html",
        title="Connect with Loopwise button",
        html_snippet=BUTTON_HTML,
        css_snippet=_button_css(),
        authorize_path="/v1/oauth/authorize",
    )


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get(ACCOUNT_PATH, account_home, allow_head=False)
    r.add_get(LOGIN_PATH, login_page, allow_head=False)
    r.add_post(LOGIN_PATH, login_submit)
    r.add_get(APPS_PATH, apps_page, allow_head=False)
    r.add_post(REVOKE_PATH, revoke_submit)
    r.add_get(ACTIVITY_PATH, activity_page, allow_head=False)
    r.add_get(BUTTON_PATH, button_kit)


_HTML = {"description": "An HTML page", "content": {"text/html": {}}}
_SEE_OTHER = {"description": "Redirect (post-redirect-get, or to sign in)"}


def _form(*names: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {"type": "object", "properties": {n: {"type": "string"} for n in names}}
            }
        },
    }


OPENAPI_PATHS: dict[str, Any] = {
    BUTTON_PATH: {
        "get": {"summary": "The Connect with Loopwise button kit", "responses": {"200": _HTML}}
    },
    LOGIN_PATH: {
        "get": {
            "summary": "Sign in to the account pages",
            "responses": {"200": _HTML, "303": _SEE_OTHER},
        },
        "post": {
            "summary": "Sign in (form post with the pre-session CSRF token)",
            "requestBody": _form("csrf_token", "email", "password", "return_to"),
            "responses": {"303": _SEE_OTHER, "400": _HTML, "403": _HTML, "429": _HTML},
        },
    },
    APPS_PATH: {
        "get": {
            "summary": "Connected apps: each app's scopes, when granted, last use",
            "responses": {"200": _HTML, "303": _SEE_OTHER},
        }
    },
    REVOKE_PATH: {
        "post": {
            "summary": "Revoke an app's access and forget the consent",
            "requestBody": _form("csrf_token", "grant_id", "client_id"),
            "responses": {"303": _SEE_OTHER, "403": _HTML, "404": _HTML},
        }
    },
    ACTIVITY_PATH: {
        "get": {
            "summary": "The signed-in user's access history, newest first",
            "parameters": [
                {"name": "before", "in": "query", "required": False, "schema": {"type": "string"}}
            ],
            "responses": {"200": _HTML, "303": _SEE_OTHER},
        }
    },
}
