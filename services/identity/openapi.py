"""Identity's OpenAPI 3.1 document: every public endpoint, as the contract names it."""

from __future__ import annotations

from typing import Any

_OAUTH_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}, "error_description": {"type": "string"}},
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def document(endpoint_paths: dict[str, Any] | None = None) -> dict[str, Any]:
    """The service's document: discovery and probes here, each endpoint module's own paths."""
    error = _json({"$ref": "#/components/schemas/OAuthError"}, "RFC 6749 error")
    obj = {"type": "object"}
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Loopwise Connect identity",
            "version": "1",
            "description": "The OAuth 2.0 and OpenID Connect authorization server of every "
            "school (https://{school}.loopwise.com) and of the platform.",
        },
        "paths": {
            "/.well-known/openid-configuration": {
                "get": {
                    "summary": "OpenID Connect Discovery metadata of this issuer",
                    "responses": {"200": _json(obj, "Metadata"), "404": error},
                }
            },
            "/.well-known/oauth-authorization-server": {
                "get": {
                    "summary": "RFC 8414 metadata of this issuer",
                    "responses": {"200": _json(obj, "Metadata"), "404": error},
                }
            },
            "/v1/oauth/jwks": {
                "get": {
                    "summary": "The issuer's public signing keys (RFC 7517)",
                    "responses": {"200": _json(obj, "JWK Set")},
                }
            },
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": _json(obj, "ok")}}},
            "/readyz": {
                "get": {
                    "summary": "Readiness: PostgreSQL and Redis reachable",
                    "responses": {"200": _json(obj, "ready"), "503": _json(obj, "unavailable")},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": {"description": "text exposition format"}},
                }
            },
        },
        "components": {"schemas": {"OAuthError": _OAUTH_ERROR}},
    }
    doc["paths"].update(endpoint_paths or {})
    return doc
