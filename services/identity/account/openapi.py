"""The OpenAPI paths of the account pages (a declarative table)."""

from __future__ import annotations

from typing import Any

from services.identity.account.paths import (
    ACTIVITY_PATH,
    APPS_PATH,
    BUTTON_PATH,
    LOGIN_PATH,
    REVOKE_PATH,
)

_HTML = {"description": "An HTML page", "content": {"text/html": {}}}
_SEE_OTHER = {"description": "Redirect (post-redirect-get, or to sign in)"}


def _form(*names: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {"type": "object", "properties": {n: {"type": "string"} for n in names}}
            }
        },
    }


OPENAPI_PATHS: dict[str, Any] = {
    BUTTON_PATH: {
        "get": {"summary": "The Connect with Loopwise button kit", "responses": {"200": _HTML}}
    },
    LOGIN_PATH: {
        "get": {
            "summary": "Sign in to the account pages",
            "responses": {"200": _HTML, "303": _SEE_OTHER},
        },
        "post": {
            "summary": "Sign in (form post with the pre-session CSRF token)",
            "requestBody": _form("csrf_token", "email", "password", "return_to"),
            "responses": {"303": _SEE_OTHER, "400": _HTML, "403": _HTML, "429": _HTML},
        },
    },
    APPS_PATH: {
        "get": {
            "summary": "Connected apps: each app's scopes, when granted, last use",
            "responses": {"200": _HTML, "303": _SEE_OTHER},
        }
    },
    REVOKE_PATH: {
        "post": {
            "summary": "Revoke an app's access and forget the consent",
            "requestBody": _form("csrf_token", "grant_id", "client_id"),
            "responses": {"303": _SEE_OTHER, "403": _HTML, "404": _HTML},
        }
    },
    ACTIVITY_PATH: {
        "get": {
            "summary": "The signed-in user's access history, newest first",
            "parameters": [
                {"name": "before", "in": "query", "required": False, "schema": {"type": "string"}}
            ],
            "responses": {"200": _HTML, "303": _SEE_OTHER},
        }
    },
}
