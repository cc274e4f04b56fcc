"""Signing in to the account pages, and where the sign-in sends the user back to.

The form posts a token bound to the pre-session cookie; `return_to` may only name an account
or admin path, so the form cannot be made an open redirect.
"""

from __future__ import annotations

from aiohttp import web

from services.identity import pages, sessions
from services.identity.account.paths import (
    APPS_PATH,
    LOGIN_PATH,
)
from services.identity.account.viewer import (
    csrf_refused,
    not_here,
    viewer_of,
)
from services.identity.context import context, issuer

_LOGIN_PURPOSE = "account-login"
_RETURN_PREFIXES = ("/account", "/admin")


def return_path(value: str) -> str:
    """A local account or admin path to come back to after signing in; anything else is the
    Connected Apps page, so the sign-in form cannot be made an open redirect."""
    path = sessions.safe_return_path(value)
    if any(
        path == p or path.startswith(p + "/") or path.startswith(p + "?") for p in _RETURN_PREFIXES
    ):
        return path
    return APPS_PATH


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
