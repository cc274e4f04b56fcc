"""The audit log as CSV (the page's filters), streamed in keyset batches.

A cell that a spreadsheet would run as a formula gets a quote before it (CSV injection).
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from services.identity import pages
from services.identity.account.viewer import (
    refused,
)
from services.identity.admin.access import admin_of
from services.identity.admin.audit_log import read_filters
from services.identity.context import context
from services.identity.store import admin as admin_store

CSV_BATCH = 1000
CSV_MAX_ROWS = 100_000
# Spreadsheets run a cell that starts with one of these as a formula (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")


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
