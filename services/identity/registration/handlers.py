"""The HTTP side of registration: JSON in, RFC 7591 / 7592 answers out, and the routes.

`POST /v1/oauth/register` (alias `/api/oauth/register`, the seed quickstart's path) and
`GET`/`PUT`/`DELETE` on `registration_client_uri`. Every answer is `no-store`: it may carry a
secret or the registration access token.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from libs.common.errors import json_response
from services.identity import ratelimit
from services.identity.context import context, issuer
from services.identity.registration.access_token import managed_client
from services.identity.registration.client_information import (
    client_information,
    registration_response,
)
from services.identity.registration.manage import delete, update
from services.identity.registration.metadata import _bad
from services.identity.registration.register import register, registering_school
from services.identity.registration.throttle import check_rate

MAX_BODY_BYTES = 64 * 1024
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


async def _json_object(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise _bad("the request body must be application/json")
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise _bad("the request body is too large")
    body = await request.read()
    if len(body) > MAX_BODY_BYTES:
        raise _bad("the request body is too large")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _bad("the request body is not valid JSON") from None
    if not isinstance(document, dict):
        raise _bad("the request body must be a JSON object")
    return document


async def register_endpoint(request: web.Request) -> web.Response:
    ctx, where = context(request), issuer(request)
    address = ratelimit.client_address(request, ctx.settings)
    school = await registering_school(ctx, where)
    await check_rate(ctx, where, address)
    document = await _json_object(request)
    made = await register(ctx, where, school, document, address)
    return json_response(
        registration_response(made, where.issuer), status=201, headers=dict(_NO_STORE)
    )


async def read_endpoint(request: web.Request) -> web.Response:
    ctx, where = context(request), issuer(request)
    client = await managed_client(
        ctx, where, request.match_info["client_id"], request.headers.get("Authorization")
    )
    return json_response(client_information(client, where.issuer), headers=dict(_NO_STORE))


async def update_endpoint(request: web.Request) -> web.Response:
    ctx, where = context(request), issuer(request)
    client = await managed_client(
        ctx, where, request.match_info["client_id"], request.headers.get("Authorization")
    )
    document = await _json_object(request)
    address = ratelimit.client_address(request, ctx.settings)
    updated = await update(ctx, client, document, address)
    return json_response(client_information(updated, where.issuer), headers=dict(_NO_STORE))


async def delete_endpoint(request: web.Request) -> web.Response:
    ctx, where = context(request), issuer(request)
    client = await managed_client(
        ctx, where, request.match_info["client_id"], request.headers.get("Authorization")
    )
    await delete(ctx, client, ratelimit.client_address(request, ctx.settings))
    return web.Response(status=204, headers=dict(_NO_STORE))


def setup(app: web.Application) -> None:
    r = app.router
    for base in ("/v1/oauth/register", "/api/oauth/register"):
        r.add_post(base, register_endpoint)
        r.add_get(base + "/{client_id}", read_endpoint, allow_head=False)
        r.add_put(base + "/{client_id}", update_endpoint)
        r.add_delete(base + "/{client_id}", delete_endpoint)
