"""Identity's HTTP surface: thin handlers over the domain modules.

Each OAuth endpoint is mounted under `/v1/oauth/`; the seed quickstart's paths are aliases.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from libs.common.errors import json_response
from services.identity import (
    account,
    admin,
    authorize,
    cors,
    discovery,
    introspection,
    keys,
    openapi,
    pages,
    registration,
    revocation,
    sessions,
    userinfo,
)
from services.identity import token as token_endpoint
from services.identity.context import context, issuer

# Metadata changes only when a school's settings do; a short shared cache spares the origin.
_PUBLIC_CACHE = {"Cache-Control": "public, max-age=300"}


async def openid_configuration(request: web.Request) -> web.Response:
    return json_response(discovery.metadata(issuer(request)), headers=_PUBLIC_CACHE)


async def jwks(request: web.Request) -> web.Response:
    ctx = context(request)
    document = await keys.jwks(ctx.pool, issuer(request).school_id)
    # Short: verifiers must see a `next` key soon after it is published.
    return json_response(document, headers={"Cache-Control": "public, max-age=60"})


async def openapi_document(_request: web.Request) -> web.Response:
    paths: dict[str, Any] = {}
    for module in ENDPOINT_MODULES:
        paths.update(module.OPENAPI_PATHS)
    return json_response(openapi.document(paths))


# Each endpoint family: its own module with `setup(app)` and `OPENAPI_PATHS`.
ENDPOINT_MODULES = (
    registration,
    token_endpoint,
    revocation,
    introspection,
    userinfo,
    pages,
    sessions,
    authorize,
    account,
    admin,
)


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/.well-known/openid-configuration", openid_configuration)
    r.add_get("/.well-known/oauth-authorization-server", openid_configuration)
    r.add_get("/v1/oauth/jwks", jwks)
    r.add_get("/openapi.json", openapi_document)
    for module in ENDPOINT_MODULES:
        module.setup(app)
    cors.setup(app)
