"""The gateway's OpenAPI 3.1 document: its own endpoints and the protected route table, each
operation with the scopes it needs (any one of them suffices)."""

from __future__ import annotations

from typing import Any

from libs.common import scopes as catalogue
from libs.common.config import Settings
from services.gateway.mcp import metadata as mcp_metadata
from services.gateway.routetable import RouteTable

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string"},
        "error_description": {"type": "string"},
        "scope": {"type": "string"},
    },
}


def _json(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


_PROTECTED_ANSWERS = {
    # Past the gateway's checks the upstream answers, and its errors (404, 405, 422, ...) pass
    # through unchanged.
    "4XX": _json("The upstream service's error; `error` names it"),
    "401": _json("No bearer token, or one not valid here (WWW-Authenticate names the error)"),
    "403": _json(
        "The token lacks the scope (WWW-Authenticate names it); charged to the client's "
        "rate limit like any call"
    ),
    "429": _json("Rate limited; Retry-After says when to try again"),
    "502": _json("The upstream service did not answer"),
    "503": _json(
        "The gateway cannot check the call, or record it in the audit trail, right now; "
        "Retry-After says when to try again"
    ),
    "504": _json("The upstream service took too long"),
}


def document(settings: Settings, routes: RouteTable) -> dict[str, Any]:
    school = settings.urls.school_template
    # OpenAPI requires absolute URIs for the OAuth flow URLs and `{school}` makes none, so the
    # flows name the demo school's endpoints (every school's are the same paths).
    demo = settings.urls.school_origin("demo")
    paths: dict[str, Any] = {
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "ok"}}}},
        "/readyz": {
            "get": {
                "summary": "Readiness: PostgreSQL, Redis and identity reachable (by the "
                "process's own address; 404 on public hosts)",
                "responses": {
                    "200": {"description": "ready"},
                    "503": {"description": "not"},
                    "404": _json("Asked on a school's or the platform's host"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (by the process's own address; 404 on public hosts)",
                "responses": {
                    "200": {"description": "ok"},
                    "404": _json("Asked on a school's or the platform's host"),
                },
            }
        },
        "/openapi.json": {
            "get": {"summary": "This document", "responses": {"200": {"description": "ok"}}}
        },
    }
    paths.update(mcp_metadata.openapi_paths(settings))
    for route in routes.protected:
        operations: dict[str, Any] = {}
        for method in route.allowed_methods:
            if method == "HEAD":
                continue
            needed = list(route.scopes[method])
            operations[method.lower()] = {
                "summary": f"{method} {route.prefix}/... (forwarded to {route.upstream})",
                "description": (
                    "Needs one of: " + ", ".join(needed)
                    if needed
                    else "Any valid access token of the school."
                ),
                "security": [{"loopwise": needed}],
                "responses": {
                    "2XX": {"description": "The upstream's answer"},
                    **_PROTECTED_ANSWERS,
                },
            }
        item = {"x-upstream": route.upstream, **operations}
        paths[route.prefix] = item
        paths[route.prefix + "/{rest}"] = {
            "parameters": [
                {"name": "rest", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            **item,
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Loopwise Connect gateway",
            "version": "1",
            "description": (
                "The public edge. Protected routes need an access token of the school the Host "
                f"names ({school}); public routes ("
                + ", ".join(r.prefix for r in routes.public)
                + ") pass through to their service."
            ),
        },
        "servers": [{"url": school, "variables": {"school": {"default": "demo"}}}],
        "paths": paths,
        "components": {
            "schemas": {"Error": _ERROR},
            "securitySchemes": {
                "loopwise": {
                    "type": "oauth2",
                    "description": f"Each school is its own authorization server ({school}); "
                    "the flow URLs are the demo school's.",
                    "flows": {
                        "authorizationCode": {
                            "authorizationUrl": f"{demo}/v1/oauth/authorize",
                            "tokenUrl": f"{demo}/v1/oauth/token",
                            "refreshUrl": f"{demo}/v1/oauth/token",
                            "scopes": {
                                s.name: s.description
                                for s in catalogue.CATALOGUE.values()
                                if s.kind in ("data", "umbrella")
                            },
                        },
                    },
                }
            },
        },
    }
