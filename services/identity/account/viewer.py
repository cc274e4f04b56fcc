"""Who is asking, and the frame of every account and admin page.

A Viewer is the signed-in user at the school the Host names, with their role there. Forms
carry a CSRF token bound to the session and the school (form_token); every page of the area
shares the navigation and the sign-out form (render_page). The admin pages use the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from services.identity import pages, sessions, store
from services.identity.account.paths import (
    LOGIN_PATH,
)
from services.identity.context import context, issuer
from services.identity.store import authorize as flow_store
from services.identity.store.authorize import Session


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
