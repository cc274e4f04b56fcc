"""The access history: the user's own audit records at this school, newest first.

Every record whose subject is the user, each action named in words.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlencode

from aiohttp import web

from services.identity.account.pagination import cursor_of, parse_cursor
from services.identity.account.paths import (
    ACTIVITY_PATH,
)
from services.identity.account.viewer import (
    login_redirect,
    not_here,
    render_page,
    viewer_of,
    when,
)
from services.identity.context import context, issuer
from services.identity.store import account as account_store

ACTIVITY_PAGE_SIZE = 50

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
