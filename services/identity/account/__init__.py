"""The account pages on a school origin: Connected Apps (revoke an app) and the access history.

Pages are server-rendered and work without JavaScript. A visitor who is not signed in (or is
signed in as someone who does not belong to the school) is sent to the account sign-in page
and back. Every form posts a token bound to the session's CSRF secret and the school, and
every post answers with a redirect (post-redirect-get).

Where each part lives:
- paths.py: the area's URLs; viewer.py: who is asking (Viewer), CSRF tokens of its forms, and
  the page frame, shared with the admin pages; pagination.py: keyset cursors.
- login.py: the sign-in form and where it may send the user back to.
- connected_apps.py: each app with access, and revoking one (grants and consent).
- activity.py: the user's access history; button_kit.py: the Connect with Loopwise button.
- openapi.py: the pages' OpenAPI paths; setup below mounts the routes.
"""

from __future__ import annotations

from aiohttp import web

from services.identity.account.activity import activity_page
from services.identity.account.button_kit import button_kit
from services.identity.account.connected_apps import account_home, apps_page, revoke_submit
from services.identity.account.login import login_page, login_submit
from services.identity.account.openapi import OPENAPI_PATHS
from services.identity.account.paths import (
    ACCOUNT_PATH,
    ACTIVITY_PATH,
    APPS_PATH,
    BUTTON_PATH,
    LOGIN_PATH,
    REVOKE_PATH,
)

__all__ = ["OPENAPI_PATHS", "setup"]


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get(ACCOUNT_PATH, account_home, allow_head=False)
    r.add_get(LOGIN_PATH, login_page, allow_head=False)
    r.add_post(LOGIN_PATH, login_submit)
    r.add_get(APPS_PATH, apps_page, allow_head=False)
    r.add_post(REVOKE_PATH, revoke_submit)
    r.add_get(ACTIVITY_PATH, activity_page, allow_head=False)
    r.add_get(BUTTON_PATH, button_kit)
