"""The aiohttp handlers of the authorization endpoint and of its flow's pages' forms.

`authorize` checks the request (checks.py) and hands it to the flow (flow.py); `resume` picks
a stored request up again; the three form handlers record what the user did (signed in,
picked a school, allowed or denied) and send the browser on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web
from multidict import MultiDictProxy, MultiMapping

from libs.common import scopes as catalogue
from libs.common.errors import AccessDenied, InvalidRequest, OAuthError
from services.identity import audit, clients, roles, sessions, store
from services.identity.authorize.checks import (
    MAX_LOGIN_HINT,
    MAX_STATE,
    build_request,
    single,
    trusted_redirect,
)
from services.identity.authorize.flow import NEEDS_ADMIN, advance
from services.identity.authorize.issue import issue_code
from services.identity.authorize.pages import show_login, show_picker
from services.identity.authorize.paths import (
    AUTHORIZE_ALIAS,
    AUTHORIZE_PATH,
    CONSENT_PATH,
    LOGIN_PATH,
    RESUME_PATH,
    SELECT_SCHOOL_PATH,
)
from services.identity.authorize.request import (
    AuthorizationRequest,
    consume_pending,
    load_pending,
    save_pending,
)
from services.identity.authorize.responses import (
    client_gone,
    code_redirect,
    csrf_refused,
    error_page,
    error_redirect,
    expired,
    request_error,
    resume_url,
)
from services.identity.authorize.school_choice import school_choices
from services.identity.context import context, issuer
from services.identity.store import authorize as flow_store
from services.identity.store.authorize import Session


async def authorize(request: web.Request) -> web.StreamResponse:
    params: MultiMapping[Any] = await request.post() if request.method == "POST" else request.query
    ctx, iss = context(request), issuer(request)
    try:
        client_id = single(params, "client_id")
    except InvalidRequest:
        return error_page(request, "The request names more than one application.")
    if client_id is None:
        return error_page(request, "The request does not say which application sent you here.")
    loaded = await flow_store.authorize_state(
        ctx.pool,
        client_id=client_id,
        session_hash=sessions.session_hash(request),
        school_id=iss.school_id,
    )
    try:
        redirect_uri = trusted_redirect(params, iss, loaded.client)
    except OAuthError as exc:
        # Not yet known good: never a redirect (checks.trusted_redirect).
        return error_page(request, str(exc))
    assert loaded.client is not None
    try:
        authz = build_request(params, ctx.settings, iss, loaded.client, redirect_uri)
    except OAuthError as exc:
        state = params.get("state")
        state = str(state) if state and len(str(state)) <= MAX_STATE else None
        return request_error(request, loaded.client, redirect_uri, state, exc, interacted=False)
    # Nothing is stored until a page is shown: the returning user's code costs no Redis write.
    return await advance(request, authz, loaded, pending=False)


async def resume(request: web.Request) -> web.StreamResponse:
    authz = await load_pending(request, request.query.get("request_id", ""))
    if authz is None:
        return expired(request)
    return await advance(request, authz, pending=True)


async def login_submit(request: web.Request) -> web.StreamResponse:
    ctx, iss = context(request), issuer(request)
    form = await request.post()
    request_id = str(form.get("request_id", ""))
    if not sessions.check_login_csrf(request, str(form.get("csrf_token", "")), request_id):
        return csrf_refused(request)
    authz = await load_pending(request, request_id)
    if authz is None:
        return expired(request)
    email = str(form.get("email", ""))[:MAX_LOGIN_HINT]
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
        return await show_login(
            request,
            authz,
            status=429,
            email=email,
            error="Too many unsuccessful sign-in attempts. Please try again later.",
            headers={"Retry-After": str(result.retry_after or 60)},
        )
    if result.outcome == "invalid":
        return await show_login(
            request, authz, status=400, email=email, error="Incorrect email or password."
        )
    if result.outcome == "not_member" or result.session is None or result.cookie_value is None:
        school = iss.school.name if iss.school else "this school"
        return await show_login(
            request,
            authz,
            status=403,
            email=email,
            error=f"This account is not a member of {school}. Sign in with another account.",
        )
    authz.login_session = result.session.id_hash.hex()
    authz.interacted = True
    if iss.school is None:
        # A school picked before this sign-in was someone else's choice.
        authz.school_id = authz.school_name = None
    await save_pending(ctx, authz)
    response = sessions.see_other(resume_url(authz))
    sessions.set_session_cookie(response, request, result.cookie_value)
    sessions.set_device_cookie(response, request, result.device_cookie)
    return response


async def _signed_in_form(
    request: web.Request, purpose: str
) -> (
    tuple[MultiDictProxy[str | bytes | bytearray | web.FileField], Session, AuthorizationRequest]
    | web.Response
):
    """The posted form of a signed-in page, its session and pending request; the refusal when
    its CSRF token is not the session's for `purpose` and this request, or the request is gone."""
    form = await request.post()
    request_id = str(form.get("request_id", ""))
    session = await sessions.current_session(request)
    token = str(form.get("csrf_token", ""))
    if session is None or not sessions.check_session_csrf(session, purpose, request_id, token):
        return csrf_refused(request)
    authz = await load_pending(request, request_id)
    if authz is None:
        return expired(request)
    return form, session, authz


async def select_school_submit(request: web.Request) -> web.StreamResponse:
    ctx, iss = context(request), issuer(request)
    submitted = await _signed_in_form(request, "select-school")
    if isinstance(submitted, web.Response):
        return submitted
    form, session, authz = submitted
    if iss.school is not None:
        return expired(request)
    if form.get("decision") == "cancel":
        if not await consume_pending(ctx, authz.id):
            return expired(request)
        denied = AccessDenied("The user cancelled the request.")
        return error_redirect(iss, authz.redirect_uri, authz.state, denied, status=303)
    client = await store.client_by_id(ctx.pool, authz.client_id)
    if client is None or client.disabled_at is not None or not clients.belongs_to(client, None):
        return client_gone(request)
    everything = await school_choices(ctx, authz, session.user_id, client)
    picked = next((c for c in everything if str(c.school_id) == form.get("school_id")), None)
    if picked is not None and picked.closed:
        # Never offered, so posted by hand: refuse the request rather than the form.
        if not await consume_pending(ctx, authz.id):
            return expired(request)
        closed = AccessDenied(
            f"{picked.name} does not accept applications that registered themselves.",
        )
        return error_redirect(iss, authz.redirect_uri, authz.state, closed, status=303)
    choices = [c for c in everything if not c.closed]
    if picked is None or picked.problem is not None:
        return await show_picker(
            request, authz, session, choices, status=400, error="Choose one of your schools."
        )
    authz.school_id = picked.school_id
    authz.school_name = picked.name
    authz.interacted = True
    await save_pending(ctx, authz)
    return sessions.see_other(resume_url(authz))


async def consent_submit(request: web.Request) -> web.StreamResponse:
    ctx, iss = context(request), issuer(request)
    submitted = await _signed_in_form(request, "consent")
    if isinstance(submitted, web.Response):
        return submitted
    form, session, authz = submitted
    school_id = iss.school_id if iss.school is not None else authz.school_id
    if school_id is None:
        return expired(request)
    loaded = await flow_store.authorize_state(
        ctx.pool, client_id=authz.client_id, session_hash=session.id_hash, school_id=school_id
    )
    client = loaded.client
    if (
        client is None
        or client.disabled_at is not None
        or not clients.belongs_to(client, iss.school_id)
    ):
        return client_gone(request)
    if not loaded.session_may_use_school:
        return csrf_refused(request)
    # One decision per request: a double click or a replayed form finds nothing left.
    if not await consume_pending(ctx, authz.id):
        return expired(request)
    if form.get("decision") != "allow":
        await ctx.audit.write(
            audit.record(
                "consent.denied",
                school_id=school_id,
                client_id=authz.client_id,
                subject=str(session.user_id),
                scope=catalogue.format_scopes(authz.scopes),
                ip=sessions.client_address(request),
            ),
        )
        denied = AccessDenied("The user denied the request.")
        return error_redirect(iss, authz.redirect_uri, authz.state, denied, status=303)
    # The role now, not when the page was shown; and never more than the page offered.
    top = roles.ceiling(loaded.role, platform_admin=loaded.platform_admin)
    offered = authz.offered if authz.offered is not None else authz.scopes
    granted = [s for s in roles.narrow(authz.scopes, top).granted if s in offered]
    if not granted:
        denied = AccessDenied(NEEDS_ADMIN)
        return error_redirect(iss, authz.redirect_uri, authz.state, denied, status=303)
    code = await issue_code(
        request,
        dataclasses.replace(authz, scopes=granted),
        school_id=school_id,
        session=session,
        remember_consent=True,
    )
    assert code is not None  # only a remembered consent can have been withdrawn
    return code_redirect(iss, authz, code, status=303)


def setup(app: web.Application) -> None:
    r = app.router
    for path in (AUTHORIZE_PATH, AUTHORIZE_ALIAS):
        # No HEAD: a HEAD that issued a code would be a side effect nobody sees.
        r.add_get(path, authorize, allow_head=False)
        r.add_post(path, authorize)
    r.add_get(RESUME_PATH, resume, allow_head=False)
    r.add_post(LOGIN_PATH, login_submit)
    r.add_post(SELECT_SCHOOL_PATH, select_school_submit)
    r.add_post(CONSENT_PATH, consent_submit)
