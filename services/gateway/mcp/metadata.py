"""The MCP endpoint as an OAuth protected resource (RFC 9728, RFC 8707).

The MCP server is one platform-level resource, `{PLATFORM_URL}/mcp`, whose authorization
server is the platform issuer: MCP clients register and authorize there (contract 9), and the
user picks the school during consent, so the token itself names the school. School origins
have no MCP endpoint and no metadata for it: a document served at `demo.localhost` naming
`localhost/mcp` as its resource would fail the client's RFC 9728 3.3 check anyway.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from libs.common import scopes as catalogue
from libs.common.config import Settings
from libs.common.errors import json_response

PATH = "/mcp"
METADATA_ROOT = "/.well-known/oauth-protected-resource"
METADATA_PATH = METADATA_ROOT + PATH


def resource(settings: Settings) -> str:
    """The resource identifier tokens must name in `aud`: identity's resources.mcp_resource."""
    return settings.urls.platform_url + PATH


def metadata_url(settings: Settings) -> str:
    return settings.urls.platform_url + METADATA_PATH


def document(settings: Settings) -> dict[str, Any]:
    return {
        "resource": resource(settings),
        # Exactly the `issuer` of the platform's discovery document (identity's Issuer).
        "authorization_servers": [settings.urls.platform_url],
        "scopes_supported": [
            name for name, scope in catalogue.CATALOGUE.items() if scope.kind != "admin"
        ],
        "bearer_methods_supported": ["header"],
        "resource_name": "Loopwise Connect MCP server",
        "resource_documentation": settings.urls.platform_url + "/openapi.json",
    }


def on_platform(host: str, settings: Settings) -> bool:
    return settings.urls.subdomain_of(host) == ""


def not_here(settings: Settings) -> web.Response:
    return json_response(
        {
            "error": "not_found",
            "error_description": f"The MCP server answers at {resource(settings)} only.",
        },
        status=404,
    )


def openapi_paths(settings: Settings) -> dict[str, Any]:
    """The MCP endpoint and its metadata, for the gateway's /openapi.json."""
    metadata_get = {
        "get": {
            "summary": "OAuth protected resource metadata of the MCP endpoint (RFC 9728)",
            "description": f"Served on the platform origin ({settings.urls.platform_url}).",
            "responses": {
                "200": {"description": "The metadata document"},
                "404": {"description": "Not the platform origin"},
            },
        }
    }
    return {
        PATH: {
            "post": {
                "summary": "Model Context Protocol server (streamable HTTP, stateless, JSON)",
                "description": (
                    f"On the platform origin only. Needs a bearer token issued by "
                    f"{settings.urls.platform_url} for the resource {resource(settings)} "
                    "(RFC 8707); each tool needs the scope of seed 002's table, and tools/list "
                    "shows the tools the token's scopes allow."
                ),
                "security": [{"loopwise": []}],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {
                    "200": {"description": "The JSON-RPC response"},
                    "202": {"description": "A notification, accepted"},
                    "401": {
                        "description": (
                            "No token, or one not valid for this resource; WWW-Authenticate "
                            "names the resource metadata"
                        )
                    },
                    "404": {"description": "Not the platform origin"},
                    "429": {"description": "Rate limited; Retry-After says when to try again"},
                    "503": {"description": "The gateway cannot check the call right now"},
                },
            }
        },
        METADATA_ROOT: metadata_get,
        METADATA_PATH: metadata_get,
    }
