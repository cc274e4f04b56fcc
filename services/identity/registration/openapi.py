"""The OpenAPI paths of registration and its management (a declarative table)."""

from __future__ import annotations

from typing import Any

from services.identity import clients
from services.identity.registration.metadata import (
    DEFAULT_AUTH_METHOD,
    DEFAULT_SCOPES,
    MAX_CONTACTS,
    MAX_REDIRECT_URIS,
    REGISTRABLE_GRANT_TYPES,
    TEXT_MEMBERS,
    URI_MEMBERS,
)

_ERROR = {
    "description": "RFC 7591 / RFC 6749 error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OAuthError"}}},
}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_METADATA_PROPERTIES: dict[str, Any] = {
    "client_name": {"type": "string", "maxLength": 200},
    "redirect_uris": {**_STRINGS, "maxItems": MAX_REDIRECT_URIS},
    "grant_types": {
        "type": "array",
        "items": {"enum": list(REGISTRABLE_GRANT_TYPES)},
        "default": list(REGISTRABLE_GRANT_TYPES),
    },
    "response_types": {"type": "array", "items": {"enum": ["code"]}, "default": ["code"]},
    "token_endpoint_auth_method": {
        "enum": list(clients.AUTH_METHODS),
        "default": DEFAULT_AUTH_METHOD,
    },
    "scope": {
        "type": "string",
        "description": "Space-separated. Omitted: " + " ".join(DEFAULT_SCOPES) + ". admin:* "
        "scopes are removed; unknown scopes are refused.",
    },
    **{m: {"type": "string", "format": "uri"} for m in URI_MEMBERS},
    "contacts": {**_STRINGS, "maxItems": MAX_CONTACTS},
    **{m: {"type": "string"} for m in TEXT_MEMBERS},
}
_REQUIRED = [
    "client_id",
    "client_name",
    "redirect_uris",
    "grant_types",
    "response_types",
    "token_endpoint_auth_method",
    "scope",
    "registration_client_uri",
]
_INFORMATION_PROPERTIES: dict[str, Any] = {
    "client_id": {"type": "string"},
    **_METADATA_PROPERTIES,
    "client_id_issued_at": {"type": "integer"},
    "registration_client_uri": {"type": "string", "format": "uri"},
}
_INFORMATION = {"type": "object", "required": _REQUIRED, "properties": _INFORMATION_PROPERTIES}
_REGISTERED = {
    "type": "object",
    "required": [*_REQUIRED, "registration_access_token"],
    "properties": {
        **_INFORMATION_PROPERTIES,
        "client_secret": {"type": "string", "description": "Confidential clients; shown once"},
        "client_secret_expires_at": {"type": "integer", "const": 0},
        "registration_access_token": {"type": "string", "description": "Shown once"},
    },
}
_REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {"type": "object", "properties": _METADATA_PROPERTIES}}
    },
}
_BEARER = "Needs `Authorization: Bearer <registration_access_token>`; else 401 invalid_token."
_CLIENT_ID = [{"name": "client_id", "in": "path", "required": True, "schema": {"type": "string"}}]


def _information(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _INFORMATION}}}


_REGISTER_PATH: dict[str, Any] = {
    "post": {
        "summary": "Register a client (RFC 7591); bound to this origin's school or the platform",
        "requestBody": _REQUEST_BODY,
        "responses": {
            "201": {
                "description": "Registered",
                "content": {"application/json": {"schema": _REGISTERED}},
            },
            "400": _ERROR,
            "403": _ERROR,
            "429": _ERROR,
        },
    }
}
_MANAGE_PATH: dict[str, Any] = {
    "parameters": _CLIENT_ID,
    "get": {
        "summary": "Read a registration (RFC 7592)",
        "description": _BEARER,
        "responses": {"200": _information("The client's metadata"), "401": _ERROR},
    },
    "put": {
        "summary": "Replace a registration (RFC 7592); omitted members revert to defaults",
        "description": _BEARER,
        "requestBody": _REQUEST_BODY,
        "responses": {"200": _information("Updated"), "400": _ERROR, "401": _ERROR},
    },
    "delete": {
        "summary": "Delete a registration (RFC 7592); its grants are revoked",
        "description": _BEARER,
        "responses": {"204": {"description": "Deleted"}, "401": _ERROR},
    },
}
OPENAPI_PATHS: dict[str, Any] = {
    "/v1/oauth/register": _REGISTER_PATH,
    "/v1/oauth/register/{client_id}": _MANAGE_PATH,
    "/api/oauth/register": _REGISTER_PATH,
    "/api/oauth/register/{client_id}": _MANAGE_PATH,
}
