"""School admin pages: Settings > OAuth Applications, webhooks, and the audit log with CSV export.

Only admins of the school the Host names may open them (a member with role `admin`); anyone
else signed in gets a 403 page, and a visitor who is not signed in is sent to sign in. The
school always comes from the Host, never from a form, and every client a request names must
belong to it. Client changes follow the rules of `clients.py`, the same ones dynamic
registration applies, and each appends an audit event naming the admin who made it.

Where each part lives:
- paths.py: the pages' URLs; access.py: who may (admin_of) and the audit event of a change.
- app_forms.py: what the application forms hold and how they are checked.
- applications.py: creating, editing and deleting an application.
- secret_flash.py: a new secret, sealed for the one page load that shows it.
- application_pages.py: the OAuth Applications pages and their forms.
- audit_log.py: the audit log page and its filters; audit_csv.py: the CSV export.
- webhooks.py: the webhooks of the school's apps, asked of the webhooks service.
- openapi.py: the pages' OpenAPI paths; setup below mounts the routes.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from services.identity.admin import openapi, webhooks
from services.identity.admin.application_pages import (
    admin_home,
    app_page,
    apps_page,
    create_submit,
    delete_submit,
    disable_submit,
    edit_submit,
    enable_submit,
    rotate_submit,
)
from services.identity.admin.audit_csv import audit_csv
from services.identity.admin.audit_log import audit_page
from services.identity.admin.paths import ADMIN_PATH, APPS_PATH, AUDIT_CSV_PATH, AUDIT_PATH

__all__ = ["OPENAPI_PATHS", "setup"]

OPENAPI_PATHS: dict[str, Any] = {**openapi.OPENAPI_PATHS, **webhooks.OPENAPI_PATHS}


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
    webhooks.setup(app)
