"""The school's audit log page: filters read from the query string, keyset pages."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlencode
from uuid import UUID

from aiohttp import web
from multidict import MultiMapping

from services.identity import store
from services.identity.account.pagination import cursor_of, parse_cursor
from services.identity.account.viewer import (
    render_page,
    when,
)
from services.identity.admin.access import admin_of
from services.identity.admin.paths import AUDIT_CSV_PATH, AUDIT_PATH
from services.identity.context import IdentityContext, context
from services.identity.store import admin as admin_store

AUDIT_PAGE_SIZE = 100
_ACTION = re.compile(r"^[a-z_]{1,40}(\.[a-z_]{1,40}){0,3}$")

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
