"""The gateway's MCP server (CONTRACT.md section 9).

`POST /mcp` on the platform origin is a Model Context Protocol server (streamable HTTP) whose
tools (tools.py, seed 002's table) act on the token's school through the school API
(schoolapi.py). It is an OAuth protected resource: the token is checked as on every protected
route, for this resource (auth.py), and RFC 9728 metadata says where to get one (metadata.py).
The SDK's ASGI transport is served from aiohttp by asgi.py.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from aiohttp import web

from libs.common.errors import json_response
from services.gateway.context import context
from services.gateway.forwarded import host_of
from services.gateway.mcp import metadata
from services.gateway.mcp.server import Endpoint

ENDPOINT = web.AppKey("gateway_mcp", Endpoint)


def _version() -> str:
    try:
        return version("loopwise-connect")
    except PackageNotFoundError:
        return "0"


async def _metadata(request: web.Request) -> web.Response:
    ctx = context(request)
    if not metadata.on_platform(host_of(request, ctx), ctx.settings):
        return metadata.not_here(ctx.settings)
    return json_response(metadata.document(ctx.settings))


def setup(app: web.Application) -> None:
    """Register /mcp and the metadata documents (before the gateway's catch-all route)."""
    endpoint = Endpoint(_version())
    app[ENDPOINT] = endpoint
    app.router.add_route("*", metadata.PATH, endpoint.handle)
    app.router.add_get(metadata.METADATA_ROOT, _metadata)
    app.router.add_get(metadata.METADATA_PATH, _metadata)
    app.cleanup_ctx.append(endpoint.lifespan)
