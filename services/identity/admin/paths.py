"""The school admin pages' addresses on a school origin."""

from __future__ import annotations

ADMIN_PATH = "/admin"
APPS_PATH = "/admin/apps"
AUDIT_PATH = "/admin/audit"
AUDIT_CSV_PATH = "/admin/audit.csv"
