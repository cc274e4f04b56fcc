"""The OpenAPI paths of the school admin pages (a declarative table)."""

from __future__ import annotations

from typing import Any

from services.identity.admin.paths import APPS_PATH, AUDIT_CSV_PATH, AUDIT_PATH

_HTML = {"description": "An HTML page", "content": {"text/html": {}}}
_SEE_OTHER = {"description": "Redirect (post-redirect-get, or to sign in)"}
_ADMIN_ONLY = {"403": {**_HTML, "description": "Not an admin of this school, or CSRF"}}
_CLIENT_ID = [{"name": "client_id", "in": "path", "required": True, "schema": {"type": "string"}}]
_FILTERS = [
    {"name": n, "in": "query", "required": False, "schema": {"type": "string"}}
    for n in ("from", "to", "client", "user", "action", "before")
]


def _post(summary: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "parameters": _CLIENT_ID,
            "responses": {"303": _SEE_OTHER, "400": _HTML, "404": _HTML, **_ADMIN_ONLY},
        }
    }


OPENAPI_PATHS: dict[str, Any] = {
    APPS_PATH: {
        "get": {
            "summary": "School admin: the school's OAuth applications",
            "responses": {"200": _HTML, "303": _SEE_OTHER, **_ADMIN_ONLY},
        },
        "post": {
            "summary": "School admin: create an application (its secret is shown once)",
            "responses": {"303": _SEE_OTHER, "400": _HTML, **_ADMIN_ONLY},
        },
    },
    APPS_PATH + "/{client_id}": {
        "get": {
            "summary": "School admin: one application",
            "parameters": _CLIENT_ID,
            "responses": {"200": _HTML, "404": _HTML, **_ADMIN_ONLY},
        }
    },
    APPS_PATH + "/{client_id}/edit": _post("Edit name, redirect URIs and allowed origins"),
    APPS_PATH + "/{client_id}/rotate-secret": _post("Make a new client secret (shown once)"),
    APPS_PATH + "/{client_id}/disable": _post("Disable the application"),
    APPS_PATH + "/{client_id}/enable": _post("Enable the application again"),
    APPS_PATH + "/{client_id}/delete": _post("Revoke every grant and delete the application"),
    AUDIT_PATH: {
        "get": {
            "summary": "School admin: the audit log, filtered, newest first",
            "parameters": _FILTERS,
            "responses": {"200": _HTML, "400": _HTML, **_ADMIN_ONLY},
        }
    },
    AUDIT_CSV_PATH: {
        "get": {
            "summary": "School admin: the audit log as CSV (same filters), as an attachment",
            "parameters": _FILTERS[:-1],
            "responses": {
                "200": {"description": "text/csv"},
                "400": {**_HTML, "description": "A filter is not valid"},
                **_ADMIN_ONLY,
            },
        }
    },
}
