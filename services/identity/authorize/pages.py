"""The flow's three pages: sign in, pick a school (platform clients), consent.

Each stores the request it shows (bound to this browser on its first showing) and lets its
form's redirect chain end at the client's redirect URI (the page's CSP `form-action`).
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from aiohttp import web

from services.identity import clients, consent, sessions, store
from services.identity.authorize.paths import CONSENT_PATH, LOGIN_PATH, SELECT_SCHOOL_PATH
from services.identity.authorize.request import AuthorizationRequest, save_shown
from services.identity.authorize.responses import resume_url
from services.identity.authorize.school_choice import SchoolChoice
from services.identity.context import context, issuer
from services.identity.pages import render as render_page
from services.identity.store.authorize import Session


async def show_login(
    request: web.Request,
    authz: AuthorizationRequest,
    *,
    status: int = 200,
    error: str | None = None,
    email: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    ctx, iss = context(request), issuer(request)
    value = await save_shown(request, authz)
    response = render_page(
        request,
        "login.html",
        status=status,
        form_action=[authz.redirect_uri],
        headers=headers,
        title="Sign in",
        client_name=authz.client_name,
        school_name=iss.school.name if iss.school else None,
        request_id=authz.id,
        csrf_token=sessions.login_csrf_token(ctx.settings, value, authz.id),
        email=email or authz.login_hint or "",
        error=error,
        action=LOGIN_PATH,
    )
    sessions.set_presession_cookie(response, request, value)
    return response


async def show_picker(
    request: web.Request,
    authz: AuthorizationRequest,
    session: Session,
    choices: list[SchoolChoice],
    *,
    status: int = 200,
    error: str | None = None,
) -> web.Response:
    ctx = context(request)
    value = await save_shown(request, authz)
    user = await store.user_by_id(ctx.pool, session.user_id)
    response = render_page(
        request,
        "school_picker.html",
        status=status,
        form_action=[authz.redirect_uri],
        title="Choose a school",
        client_name=authz.client_name,
        user_email=user.email if user else "",
        choices=choices,
        default_school_id=next((c.school_id for c in choices if c.problem is None), None),
        request_id=authz.id,
        csrf_token=sessions.session_csrf_token(session, "select-school", authz.id),
        logout_csrf_token=sessions.logout_csrf_token(session),
        resume_url=resume_url(authz),
        error=error,
        action=SELECT_SCHOOL_PATH,
    )
    sessions.set_presession_cookie(response, request, value)
    return response


def _redirect_host(uri: str) -> str:
    parts = urlsplit(uri)
    return parts.netloc or f"{parts.scheme}:"


async def show_consent(
    request: web.Request,
    authz: AuthorizationRequest,
    session: Session,
    need: consent.ConsentNeed,
    *,
    withheld: Sequence[str] = (),
) -> web.Response:
    ctx, iss = context(request), issuer(request)
    value = await save_shown(request, authz)
    user = await store.user_by_id(ctx.pool, session.user_id)
    client = await store.client_by_id(ctx.pool, authz.client_id)
    school_name = iss.school.name if iss.school else (authz.school_name or "")
    response = render_page(
        request,
        "consent.html",
        form_action=[authz.redirect_uri],
        title=f"Allow {authz.client_name}?",
        client_name=authz.client_name,
        # Self-registered (RFC 7591) apps are not reviewed by anyone; say so.
        unreviewed=bool(client and not clients.reviewed(client)),
        redirect_host=_redirect_host(authz.redirect_uri),
        school_name=school_name,
        platform=iss.school is None,
        user_email=user.email if user else "",
        new_scopes=consent.lines(need.new),
        previous_scopes=consent.lines(need.previously),
        withheld_scopes=consent.lines(withheld),
        request_id=authz.id,
        csrf_token=sessions.session_csrf_token(session, "consent", authz.id),
        logout_csrf_token=sessions.logout_csrf_token(session),
        resume_url=resume_url(authz),
        action=CONSENT_PATH,
    )
    sessions.set_presession_cookie(response, request, value)
    return response
