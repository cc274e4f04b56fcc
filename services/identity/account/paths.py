"""The account area's addresses on a school origin."""

from __future__ import annotations

ACCOUNT_PATH = "/account"
LOGIN_PATH = "/account/login"
APPS_PATH = "/account/apps"
REVOKE_PATH = "/account/apps/revoke"
ACTIVITY_PATH = "/account/activity"
BUTTON_PATH = "/account/button"
