"""The OpenAPI fragment of the authorization endpoint and its flow's forms."""

from __future__ import annotations

from typing import Any

from services.identity.authorize import paths

_STRING = {"type": "string"}
_HTML = {"description": "An HTML page", "content": {"text/html": {}}}
_FOUND = {"description": "Redirect to the client with code, state and iss, or error"}


def _form(*names: str) -> dict[str, Any]:
    props = {n: {"type": "string"} for n in names}
    return {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {"schema": {"type": "object", "properties": props}}
        },
    }


_AUTHORIZE_PARAMS = [
    {"name": n, "in": "query", "required": n in req, "schema": {"type": "string"}}
    for req in [("response_type", "client_id", "code_challenge", "code_challenge_method")]
    for n in (
        "response_type",
        "client_id",
        "redirect_uri",
        "scope",
        "state",
        "code_challenge",
        "code_challenge_method",
        "nonce",
        "prompt",
        "max_age",
        "resource",
        "login_hint",
    )
]

_AUTHORIZE_OP = {
    "summary": "Authorization endpoint (RFC 6749 4.1, PKCE S256 required, RFC 9207 iss)",
    "parameters": _AUTHORIZE_PARAMS,
    "responses": {
        "200": {**_HTML, "description": "Sign-in, school picker or consent page"},
        "302": _FOUND,
        "400": {
            **_HTML,
            "description": "Unknown client or unregistered redirect URI; or, for a client that"
            " registered itself, any error before the user acted (RFC 9700 4.11.2)",
        },
    },
}

OPENAPI_PATHS: dict[str, Any] = {
    paths.AUTHORIZE_PATH: {"get": _AUTHORIZE_OP},
    paths.AUTHORIZE_ALIAS: {"get": {**_AUTHORIZE_OP, "summary": "Alias of /v1/oauth/authorize"}},
    paths.RESUME_PATH: {
        "get": {
            "summary": "Continue a pending authorization request",
            "parameters": [
                {
                    "name": "request_id",
                    "in": "query",
                    "required": True,
                    "schema": {"type": "string"},
                }
            ],
            "responses": {"200": _HTML, "302": _FOUND, "400": _HTML},
        }
    },
    paths.LOGIN_PATH: {
        "post": {
            "summary": "Sign in during an authorization request",
            "requestBody": _form("request_id", "csrf_token", "email", "password"),
            "responses": {
                "303": {"description": "Signed in; continue the request"},
                "400": {**_HTML, "description": "Incorrect email or password"},
                "403": {**_HTML, "description": "CSRF check failed, or not a member"},
                "429": {**_HTML, "description": "Too many failed attempts"},
            },
        }
    },
    paths.SELECT_SCHOOL_PATH: {
        "post": {
            "summary": "Pick the school a platform-level client is granted",
            "requestBody": _form("request_id", "csrf_token", "school_id", "decision"),
            "responses": {"303": {"description": "Continue"}, "400": _HTML, "403": _HTML},
        }
    },
    paths.CONSENT_PATH: {
        "post": {
            "summary": "Allow or deny the requested scopes",
            "requestBody": _form("request_id", "csrf_token", "decision"),
            "responses": {"303": _FOUND, "400": _HTML, "403": _HTML},
        }
    },
}
