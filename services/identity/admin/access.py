"""Who may open the admin pages (the school's admins), and the audit event of each change.

The school always comes from the Host, never from a form; anyone signed in without the admin
role at it gets a 403 page, a visitor not signed in is sent to sign in.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from libs.common import scopes as catalogue
from libs.common.db import Executor
from services.identity import audit, sessions, store
from services.identity.account.viewer import (
    Viewer,
    login_redirect,
    not_here,
    refused,
    viewer_of,
)
from services.identity.context import IdentityContext, issuer


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


def client_ip(request: web.Request) -> str | None:
    return sessions.client_address(request)


async def audit_change(
    ctx: IdentityContext,
    action: str,
    viewer: Viewer,
    client: store.Client,
    ip: str | None,
    db: Executor | None = None,
    **detail: Any,
) -> None:
    """The record of an admin's change to an app; pass `db` to write it in the change's own
    transaction."""
    await audit.write(
        db if db is not None else ctx.pool,
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
