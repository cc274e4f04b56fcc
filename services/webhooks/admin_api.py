"""The school admin's view of webhooks: an internal API behind identity's admin pages.

Identity owns schools, users and admins; this service owns subscriptions and deliveries. So
the admin pages ask here, over `/internal/v1/schools/{school_id}/webhooks...`, rather than
reading this service's schema. The caller proves it is one of ours with the internal token
(`X-Connect-Internal-Token`, the one gateways send) and names the school it has already
checked the admin against; every lookup is keyed by that school, so a subscription of any
other school is 404, as if it did not exist.

Nothing public reaches `/internal/`: the gateway proxies only the prefixes of its route table,
and this is none of them. Secrets are never part of an answer.
"""

from __future__ import annotations

import functools
import hmac
from typing import Any
from uuid import UUID

import structlog
from aiohttp import web

from libs.common.errors import json_response
from libs.common.web import Handler
from services.webhooks import subscriptions
from services.webhooks.context import context
from services.webhooks.store import admin as admin_store
from services.webhooks.store import deliveries as delivery_store
from services.webhooks.store import queue as queue_store
from services.webhooks.store import revocations as revocation_store
from services.webhooks.store.admin import SchoolSubscription
from services.webhooks.store.deliveries import Delivery
from services.webhooks.subscriptions import ApiError

PREFIX = "/internal/v1/schools/{school_id}/webhooks"
TOKEN_HEADER = "X-Connect-Internal-Token"
# "Recent" deliveries, as counted on the list: a week shows a pattern without a full scan.
RECENT_SECONDS = 7 * 24 * 3600.0
# Off for a reason the admin cannot undo: the app switched it off itself (the app turns it on
# again), or the consent it delivered under was revoked (the app must subscribe anew).
NOT_ADMIN_ENABLEABLE = ("client", "grant_revoked")
_NO_STORE = {"Cache-Control": "no-store"}
_MAX_SCHOOL_ID = 2**63 - 1

SCHOOL = web.RequestKey("admin_school_id", int)


def _check_token(request: web.Request) -> None:
    presented = request.headers.get(TOKEN_HEADER, "")
    if not presented:
        raise ApiError(401, "unauthorized", "This internal API needs the internal token.")
    expected = context(request).settings.internal_token
    # Constant time: the comparison must not tell a caller how much of a guess was right.
    if not expected or not hmac.compare_digest(presented.encode(), expected.encode()):
        raise ApiError(403, "forbidden", "The internal token is not this deployment's.")


def _school_of(request: web.Request) -> int:
    raw = request.match_info["school_id"]
    if not raw.isascii() or not raw.isdigit() or not 0 < int(raw) <= _MAX_SCHOOL_ID:
        raise ApiError(404, "not_found", "No such school.")
    return int(raw)


def internal(handler: Handler) -> Handler:
    """The token first (before anything else is looked at), then the school of the path."""

    @functools.wraps(handler)
    async def checked(request: web.Request) -> web.StreamResponse:
        _check_token(request)
        school_id = _school_of(request)
        request[SCHOOL] = school_id
        structlog.contextvars.bind_contextvars(school=school_id, via="admin")
        return await handler(request)

    return checked


def present(found: SchoolSubscription) -> dict[str, Any]:
    sub = found.subscription
    return {
        **subscriptions.present(sub),
        "grant_revoked": found.grant_revoked,
        "recent_deliveries": {**found.recent, "window_seconds": int(RECENT_SECONDS)},
        "admin_can_enable": not sub.active
        and not found.grant_revoked
        and sub.disabled_reason not in NOT_ADMIN_ENABLEABLE,
    }


def present_delivery(d: Delivery) -> dict[str, Any]:
    return {**subscriptions.present_delivery(d), "dead_lettered": d.status == "dead"}


def _id(request: web.Request) -> UUID:
    return subscriptions.parse_id(request.match_info["id"])


async def _subscription_of_school(request: web.Request) -> SchoolSubscription:
    found = await admin_store.school_subscription(
        context(request).pool, request[SCHOOL], _id(request), recent_seconds=RECENT_SECONDS
    )
    if found is None:
        raise ApiError(404, "not_found", "No such webhook at this school.")
    return found


# -- reads -------------------------------------------------------------------------------------


@internal
async def list_webhooks(request: web.Request) -> web.Response:
    limit = subscriptions.parse_limit(request.query.get("limit"))
    found = await admin_store.school_subscriptions(
        context(request).pool,
        request[SCHOOL],
        recent_seconds=RECENT_SECONDS,
        before=subscriptions.decode_cursor(request.query.get("cursor")),
        limit=limit + 1,
    )
    page = found[:limit]
    cursor = None
    if len(found) > limit and page:
        last = page[-1].subscription
        cursor = subscriptions.encode_cursor(last.created_at, last.id)
    return json_response(
        {"data": [present(f) for f in page], "next_cursor": cursor}, headers=_NO_STORE
    )


@internal
async def get_webhook(request: web.Request) -> web.Response:
    return json_response(present(await _subscription_of_school(request)), headers=_NO_STORE)


@internal
async def list_deliveries(request: web.Request) -> web.Response:
    found = await _subscription_of_school(request)
    status = request.query.get("status") or None
    if status is not None and status not in subscriptions.DELIVERY_STATUSES:
        raise ApiError(
            422,
            "invalid_request",
            f"status must be one of {', '.join(subscriptions.DELIVERY_STATUSES)}",
            field="status",
        )
    limit = subscriptions.parse_limit(request.query.get("limit"))
    rows = await delivery_store.list_deliveries(
        context(request).pool,
        found.subscription.id,
        status=status,
        before=subscriptions.decode_cursor(request.query.get("cursor")),
        limit=limit + 1,
    )
    page = rows[:limit]
    cursor = None
    if len(rows) > limit and page:
        cursor = subscriptions.encode_cursor(page[-1].created_at, page[-1].id)
    return json_response(
        {"data": [present_delivery(d) for d in page], "next_cursor": cursor}, headers=_NO_STORE
    )


# -- actions -----------------------------------------------------------------------------------


@internal
async def retry_delivery(request: web.Request) -> web.Response:
    """Send a dead-lettered delivery once more, as the app's own retry does (one manual
    attempt, then back to the dead-letter list if it fails again)."""
    ctx = context(request)
    found = await _subscription_of_school(request)
    sub = found.subscription
    delivery_id = subscriptions.parse_id(request.match_info["delivery_id"], "delivery")
    if not sub.active:
        raise ApiError(409, "webhook_disabled", "This webhook is disabled; enable it first.")
    was = await delivery_store.retry_delivery(ctx.pool, sub.id, delivery_id, only_status="dead")
    if was is None:
        if await delivery_store.get_delivery(ctx.pool, sub.id, delivery_id) is None:
            raise ApiError(404, "not_found", "No such delivery of this webhook.")
        raise ApiError(409, "not_dead_lettered", "Only dead-lettered deliveries can be retried.")
    ctx.due.set()
    await queue_store.notify_due(ctx.pool)
    retried = await delivery_store.get_delivery(ctx.pool, sub.id, delivery_id)
    if retried is None:  # the webhook was deleted in between
        raise ApiError(404, "not_found", "No such delivery of this webhook.")
    return json_response(present_delivery(retried), status=202, headers=_NO_STORE)


@internal
async def disable(request: web.Request) -> web.Response:
    ctx = context(request)
    if await admin_store.admin_disable(ctx.pool, request[SCHOOL], _id(request)) is None:
        raise ApiError(404, "not_found", "No such webhook at this school.")
    return json_response(present(await _subscription_of_school(request)), headers=_NO_STORE)


@internal
async def enable(request: web.Request) -> web.Response:
    ctx = context(request)
    current = (await _subscription_of_school(request)).subscription
    async with ctx.pool.acquire() as conn, conn.transaction():
        # Under the grant's lock, as revocations are applied: one landing now either is seen
        # here or finds the subscription enabled and disables it.
        if await revocation_store.lock_grant(conn, current.grant_id):
            raise ApiError(
                409,
                "grant_revoked",
                "The app's access was revoked, so this webhook cannot deliver again; "
                "the app has to subscribe anew.",
            )
        if current.disabled_reason == "client":
            raise ApiError(
                409,
                "disabled_by_app",
                "The app turned this webhook off itself; only the app can turn it on again.",
            )
        updated = await admin_store.admin_enable(
            conn, request[SCHOOL], current.id, refused_reasons=NOT_ADMIN_ENABLEABLE
        )
    if updated is None:
        raise ApiError(409, "conflict", "The webhook changed meanwhile; reload and try again.")
    return json_response(present(await _subscription_of_school(request)), headers=_NO_STORE)


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get(PREFIX, list_webhooks, allow_head=False)
    r.add_get(PREFIX + "/{id}", get_webhook, allow_head=False)
    r.add_post(PREFIX + "/{id}/disable", disable)
    r.add_post(PREFIX + "/{id}/enable", enable)
    r.add_get(PREFIX + "/{id}/deliveries", list_deliveries, allow_head=False)
    r.add_post(PREFIX + "/{id}/deliveries/{delivery_id}/retry", retry_delivery)


_SCHOOL_PARAM = {
    "name": "school_id",
    "in": "path",
    "required": True,
    "schema": {"type": "integer", "minimum": 1},
}
_ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_DELIVERY_PARAM = {**_ID_PARAM, "name": "delivery_id"}
_TOKEN_PARAM = {
    "name": TOKEN_HEADER,
    "in": "header",
    "required": True,
    "schema": {"type": "string"},
}
_JSON = {"description": "JSON", "content": {"application/json": {}}}
_REFUSALS = {
    "401": {"description": "No internal token"},
    "403": {"description": "Wrong internal token"},
    "404": {"description": "No such webhook (or delivery) at this school"},
    "422": {"description": "A malformed limit, cursor or status"},
}


def _op(
    summary: str, *params: dict[str, Any], ok: str = "200", conflict: str | None = None
) -> dict[str, Any]:
    responses: dict[str, Any] = {ok: _JSON, **_REFUSALS}
    if conflict:
        responses["409"] = {"description": conflict}
    return {
        "summary": f"Internal, for the school admin pages: {summary}",
        "parameters": [_TOKEN_PARAM, _SCHOOL_PARAM, *params],
        "responses": responses,
    }


OPENAPI_PATHS: dict[str, Any] = {
    PREFIX: {"get": _op("the school's webhooks, every app's, newest first")},
    PREFIX + "/{id}": {"get": _op("one webhook of the school", _ID_PARAM)},
    PREFIX + "/{id}/deliveries": {"get": _op("its deliveries, newest first", _ID_PARAM)},
    PREFIX + "/{id}/deliveries/{delivery_id}/retry": {
        "post": _op(
            "send a dead-lettered delivery again",
            _ID_PARAM,
            _DELIVERY_PARAM,
            ok="202",
            conflict="Disabled webhook, or not dead-lettered",
        )
    },
    PREFIX + "/{id}/disable": {"post": _op("switch the webhook off", _ID_PARAM)},
    PREFIX + "/{id}/enable": {
        "post": _op(
            "switch it on again",
            _ID_PARAM,
            conflict="Disabled by the app, or its grant was revoked",
        )
    },
}
