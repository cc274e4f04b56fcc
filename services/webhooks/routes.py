"""The webhooks service's HTTP surface: thin handlers over subscriptions.py.

`/api/v1/webhooks...` is reached only through a gateway, which vouches for the caller in
`X-Connect-*` headers and proves it is a gateway with `X-Connect-Internal-Token`. The
`/v1/webhooks/event-types` and `/v1/webhooks/egress-ips` documents are public.
"""

from __future__ import annotations

import hmac
from typing import Any
from uuid import UUID

import orjson
import structlog
from aiohttp import web

from libs.common.errors import bearer_challenge, json_response
from libs.common.scopes import parse as parse_scopes
from libs.common.web import Handler
from services.webhooks import admin_api, event_types, openapi, subscriptions
from services.webhooks.context import context
from services.webhooks.subscriptions import ApiError, Caller

CALLER = web.RequestKey("caller", Caller)
_NO_STORE = {"Cache-Control": "no-store"}
_PUBLIC_CACHE = {"Cache-Control": "public, max-age=300"}


@web.middleware
async def api_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        headers = {}
        if exc.status == 403 and exc.error == "insufficient_scope":
            headers["WWW-Authenticate"] = bearer_challenge(
                exc.error, exc.description, scope=exc.extra.get("scope")
            )
        return json_response(exc.body(), status=exc.status, headers=headers)


def _unauthorized(description: str) -> ApiError:
    return ApiError(401, "unauthorized", description)


def caller_of(request: web.Request, internal_token: str) -> Caller:
    """The identity a gateway verified, or 401 when the call did not come through one."""
    presented = request.headers.get("X-Connect-Internal-Token", "")
    if not internal_token or not hmac.compare_digest(presented.encode(), internal_token.encode()):
        raise _unauthorized("Calls reach this service through the gateway only.")
    h = request.headers
    school = h.get("X-Connect-School-Id", "")
    client_id = h.get("X-Connect-Client-Id", "")
    try:
        grant_id = UUID(h.get("X-Connect-Grant-Id", ""))
    except ValueError:
        raise _unauthorized("The gateway sent no grant.") from None
    if not school.isdigit() or int(school) <= 0 or not client_id:
        raise _unauthorized("The gateway sent no school or client.")
    return Caller(
        school_id=int(school),
        client_id=client_id,
        grant_id=grant_id,
        subject=h.get("X-Connect-Subject") or None,
        scopes=tuple(parse_scopes(h.get("X-Connect-Scopes", ""))),
    )


@web.middleware
async def require_gateway(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/api/"):
        caller = caller_of(request, context(request).settings.internal_token)
        request[CALLER] = caller
        structlog.contextvars.bind_contextvars(school=caller.school_id, client_id=caller.client_id)
    return await handler(request)


async def _json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        raise ApiError(400, "invalid_request", "The body must be JSON.") from None


def _id(request: web.Request) -> UUID:
    return subscriptions.parse_id(request.match_info["id"])


def _delivery_id(request: web.Request) -> UUID:
    return subscriptions.parse_id(request.match_info["delivery_id"], "delivery")


# -- subscriptions -----------------------------------------------------------------------------


async def create_subscription(request: web.Request) -> web.Response:
    sub, secret = await subscriptions.create(
        context(request), request[CALLER], await _json(request)
    )
    body = {**subscriptions.present(sub), "secret": secret}
    return json_response(body, status=201, headers=_NO_STORE)


async def list_subscriptions(request: web.Request) -> web.Response:
    page, cursor = await subscriptions.list_page(
        context(request),
        request[CALLER],
        cursor=request.query.get("cursor"),
        limit=subscriptions.parse_limit(request.query.get("limit")),
    )
    return json_response(
        {"data": [subscriptions.present(s) for s in page], "next_cursor": cursor},
        headers=_NO_STORE,
    )


async def get_subscription(request: web.Request) -> web.Response:
    sub = await subscriptions.get(context(request), request[CALLER], _id(request))
    return json_response(subscriptions.present(sub), headers=_NO_STORE)


async def update_subscription(request: web.Request) -> web.Response:
    sub = await subscriptions.update(
        context(request), request[CALLER], _id(request), await _json(request)
    )
    return json_response(subscriptions.present(sub), headers=_NO_STORE)


async def delete_subscription(request: web.Request) -> web.Response:
    await subscriptions.delete(context(request), request[CALLER], _id(request))
    return web.Response(status=204)


async def rotate_secret(request: web.Request) -> web.Response:
    sub, secret = await subscriptions.rotate_secret(context(request), request[CALLER], _id(request))
    body = {
        "id": str(sub.id),
        "secret": secret,
        "previous_secret_expires_at": sub.previous_secret_expires_at,
    }
    return json_response(body, headers=_NO_STORE)


# -- deliveries --------------------------------------------------------------------------------


async def list_deliveries(request: web.Request) -> web.Response:
    page, cursor = await subscriptions.deliveries_page(
        context(request),
        request[CALLER],
        _id(request),
        status=request.query.get("status"),
        cursor=request.query.get("cursor"),
        limit=subscriptions.parse_limit(request.query.get("limit")),
    )
    return json_response(
        {"data": [subscriptions.present_delivery(d) for d in page], "next_cursor": cursor},
        headers=_NO_STORE,
    )


async def get_delivery(request: web.Request) -> web.Response:
    found = await subscriptions.delivery(
        context(request), request[CALLER], _id(request), _delivery_id(request)
    )
    return json_response(subscriptions.present_delivery(found), headers=_NO_STORE)


async def retry_delivery(request: web.Request) -> web.Response:
    found = await subscriptions.retry(
        context(request), request[CALLER], _id(request), _delivery_id(request)
    )
    return json_response(subscriptions.present_delivery(found), status=202, headers=_NO_STORE)


# -- public documents --------------------------------------------------------------------------


async def list_event_types(_request: web.Request) -> web.Response:
    return json_response(event_types.catalogue(), headers=_PUBLIC_CACHE)


async def egress_ips(request: web.Request) -> web.Response:
    published = context(request).settings.webhooks.published_egress_ips
    return json_response({"egress_ips": list(published)}, headers=_PUBLIC_CACHE)


async def openapi_document(_request: web.Request) -> web.Response:
    document = openapi.document()
    document["paths"].update(admin_api.OPENAPI_PATHS)
    return json_response(document)


def setup(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/v1/webhooks", create_subscription)
    r.add_get("/api/v1/webhooks", list_subscriptions)
    r.add_get("/api/v1/webhooks/{id}", get_subscription)
    r.add_patch("/api/v1/webhooks/{id}", update_subscription)
    r.add_delete("/api/v1/webhooks/{id}", delete_subscription)
    r.add_post("/api/v1/webhooks/{id}/rotate-secret", rotate_secret)
    r.add_get("/api/v1/webhooks/{id}/deliveries", list_deliveries)
    r.add_get("/api/v1/webhooks/{id}/deliveries/{delivery_id}", get_delivery)
    r.add_post("/api/v1/webhooks/{id}/deliveries/{delivery_id}/retry", retry_delivery)
    r.add_get("/v1/webhooks/event-types", list_event_types)
    r.add_get("/v1/webhooks/egress-ips", egress_ips)
    r.add_get("/openapi.json", openapi_document)
    admin_api.setup(app)
