"""Subscriptions and their delivery logs: the rules behind `/api/v1/webhooks`.

A subscription belongs to a school, a client and the grant it was made (or last changed)
under. Only the owning client at the owning school sees or changes it; everyone else gets
404, as if it did not exist. Every event type it names must be allowed by that grant's scopes
(seed 003: no events outside the granted scopes), and its URL must pass the SSRF checks,
its host resolved by the resolver the sender uses.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from libs.common import keys
from services.webhooks import event_types, signing, ssrf
from services.webhooks.context import WebhooksContext
from services.webhooks.store import deliveries as delivery_store
from services.webhooks.store import queue as queue_store
from services.webhooks.store import revocations as revocation_store
from services.webhooks.store import subscriptions as subscription_store
from services.webhooks.store.deliveries import Delivery
from services.webhooks.store.subscriptions import Subscription

# A client's endpoints per school: enough for any integration, few enough that one client
# cannot multiply the service's outbound traffic without bound.
MAX_SUBSCRIPTIONS_PER_CLIENT = 50
MAX_EVENT_TYPES = 100
MAX_DESCRIPTION = 500
DEFAULT_PAGE = 50
MAX_PAGE = 100
DELIVERY_STATUSES = ("pending", "delivered", "dead", "cancelled")


@dataclass(frozen=True, slots=True)
class Caller:
    """The verified identity the gateway forwarded."""

    school_id: int
    client_id: str
    grant_id: UUID
    subject: str | None
    scopes: tuple[str, ...]


class ApiError(Exception):
    def __init__(self, status: int, error: str, description: str, **extra: Any) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "error_description": self.description, **self.extra}


def _invalid(field: str, description: str) -> ApiError:
    return ApiError(422, "invalid_request", description, field=field)


def _not_found(what: str = "webhook") -> ApiError:
    return ApiError(404, "not_found", f"No such {what}.")


# ---------------------------------------------------------------------------------------------
# Input


def parse_id(raw: str, what: str = "webhook") -> UUID:
    try:
        return UUID(raw)
    except ValueError:
        raise _not_found(what) from None


def _url(ctx: WebhooksContext, raw: Any) -> str:
    if not isinstance(raw, str):
        raise _invalid("url", "url must be a string")
    try:
        return ssrf.check_url(raw, ctx.policy, require_https=not ctx.settings.is_development)
    except ssrf.UnsafeUrl as exc:
        raise _invalid("url", str(exc)) from None


async def _url_resolves_safely(ctx: WebhooksContext, url: str) -> None:
    try:
        await ssrf.check_resolved(url, ctx.policy, resolver=ctx.resolver)
    except ssrf.UnsafeUrl as exc:
        raise _invalid("url", str(exc)) from None


def _event_types(raw: Any, caller: Caller) -> list[str]:
    if not isinstance(raw, list) or not raw or not all(isinstance(t, str) for t in raw):
        raise _invalid("event_types", "event_types must be a non-empty list of strings")
    patterns = list(dict.fromkeys(raw))
    if len(patterns) > MAX_EVENT_TYPES:
        raise _invalid("event_types", f"at most {MAX_EVENT_TYPES} event types")
    try:
        event_types.check_subscribable(patterns, caller.scopes)
    except event_types.UnknownEventType as exc:
        raise _invalid(
            "event_types",
            f"unknown event type {exc.event_type!r}; see GET /v1/webhooks/event-types",
        ) from None
    except event_types.ScopeMissing as exc:
        raise ApiError(
            403,
            "insufficient_scope",
            f"Subscribing to {exc.event_type} needs the {' or '.join(exc.scopes)} scope.",
            scope=" ".join(exc.scopes),
        ) from None
    return patterns


def _description(raw: Any) -> str:
    if raw is None:
        return ""
    if not isinstance(raw, str) or len(raw) > MAX_DESCRIPTION:
        raise _invalid("description", f"description must be text of at most {MAX_DESCRIPTION}")
    return raw


def _body(raw: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ApiError(422, "invalid_request", "The body must be a JSON object.")
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise _invalid(unknown[0], f"unknown field {unknown[0]!r}")
    return raw


def encode_cursor(when: datetime, ident: UUID) -> str:
    return base64.urlsafe_b64encode(f"{when.isoformat()}|{ident}".encode()).decode().rstrip("=")


def decode_cursor(raw: str | None) -> tuple[datetime, UUID] | None:
    if not raw:
        return None
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
        when, ident = text.split("|", 1)
        return datetime.fromisoformat(when), UUID(ident)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise _invalid("cursor", "cursor is not one this API gave") from None


def parse_limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_PAGE
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PAGE:
        raise _invalid("limit", f"limit must be a number from 1 to {MAX_PAGE}")
    return int(raw)


# ---------------------------------------------------------------------------------------------
# Output


def present(sub: Subscription) -> dict[str, Any]:
    return {
        "id": str(sub.id),
        "url": sub.url,
        "event_types": sub.event_types,
        "description": sub.description,
        "status": "active" if sub.active else "disabled",
        "disabled_reason": sub.disabled_reason,
        "disabled_at": sub.disabled_at,
        "failing_since": sub.failing_since,
        "previous_secret_expires_at": sub.previous_secret_expires_at,
        "school_id": sub.school_id,
        "client_id": sub.client_id,
        "created_at": sub.created_at,
        "updated_at": sub.updated_at,
    }


def present_delivery(d: Delivery) -> dict[str, Any]:
    return {
        "id": str(d.id),
        "webhook_id": str(d.subscription_id),
        "event_id": d.event_id,
        "event_type": d.event_type,
        "status": d.status,
        "attempt_count": d.attempt_count,
        "next_attempt_at": d.next_attempt_at,
        "last_response_status": d.last_response_status,
        "delivered_at": d.delivered_at,
        "created_at": d.created_at,
        "attempts": [
            {
                "attempted_at": a.attempted_at,
                "response_status": a.response_status,
                "latency_ms": a.latency_ms,
                "response_excerpt": a.response_excerpt,
                "error": a.error,
                "outcome": a.outcome,
                "next_attempt_at": a.next_attempt_at,
            }
            for a in d.attempts
        ],
    }


# ---------------------------------------------------------------------------------------------
# Subscriptions


async def _grant_revoked_now(ctx: WebhooksContext, caller: Caller) -> bool:
    mark = keys.revoked_mark(ctx.settings, caller.school_id, caller.grant_id)
    return bool(await ctx.redis.exists(mark))


def _revoked() -> ApiError:
    return ApiError(401, "invalid_token", "The grant behind this token was revoked.")


async def create(ctx: WebhooksContext, caller: Caller, raw: Any) -> tuple[Subscription, str]:
    """A new subscription and its secret, which is shown this once."""
    body = _body(raw, {"url", "event_types", "description"})
    patterns = _event_types(body.get("event_types"), caller)
    url = _url(ctx, body.get("url"))
    description = _description(body.get("description"))
    await _url_resolves_safely(ctx, url)
    if await _grant_revoked_now(ctx, caller):
        raise _revoked()
    subscription_id = uuid.uuid4()
    secret, key = signing.new_secret()
    kek = ctx.settings.key_encryption_key
    async with ctx.pool.acquire() as conn, conn.transaction():
        if await revocation_store.lock_grant(conn, caller.grant_id):
            raise _revoked()
        count = await subscription_store.count_subscriptions(
            conn, caller.school_id, caller.client_id
        )
        if count >= MAX_SUBSCRIPTIONS_PER_CLIENT:
            raise ApiError(
                409,
                "limit_reached",
                f"A client may have at most {MAX_SUBSCRIPTIONS_PER_CLIENT} webhooks per school.",
            )
        sub = await subscription_store.insert_subscription(
            conn,
            id=subscription_id,
            school_id=caller.school_id,
            client_id=caller.client_id,
            grant_id=caller.grant_id,
            subject=caller.subject,
            url=url,
            event_types=patterns,
            description=description,
            secret_enc=signing.seal(kek, subscription_id, key),
            kek_id=signing.kek_id(kek),
        )
    return sub, secret


async def list_page(
    ctx: WebhooksContext, caller: Caller, *, cursor: str | None, limit: int
) -> tuple[list[Subscription], str | None]:
    after = decode_cursor(cursor)
    found = await subscription_store.list_subscriptions(
        ctx.pool, caller.school_id, caller.client_id, after=after, limit=limit + 1
    )
    page = found[:limit]
    more = len(found) > limit
    return page, encode_cursor(page[-1].created_at, page[-1].id) if more and page else None


async def get(ctx: WebhooksContext, caller: Caller, subscription_id: UUID) -> Subscription:
    sub = await subscription_store.get_subscription(
        ctx.pool, subscription_id, caller.school_id, caller.client_id
    )
    if sub is None:
        raise _not_found()
    return sub


async def update(
    ctx: WebhooksContext, caller: Caller, subscription_id: UUID, raw: Any
) -> Subscription:
    """Change url, event_types, description or disabled. The result must be within what the
    caller's grant allows, and the subscription then delivers under that grant."""
    body = _body(raw, {"url", "event_types", "description", "disabled"})
    current = await get(ctx, caller, subscription_id)
    patterns = (
        _event_types(body["event_types"], caller)
        if "event_types" in body
        else _event_types(current.event_types, caller)
    )
    url = _url(ctx, body["url"]) if "url" in body else None
    if url is not None:
        await _url_resolves_safely(ctx, url)
    description = _description(body["description"]) if "description" in body else None
    disabled = body.get("disabled")
    if disabled is not None and not isinstance(disabled, bool):
        raise _invalid("disabled", "disabled must be true or false")
    if disabled is False and current.disabled_reason == "admin":
        raise ApiError(
            409,
            "disabled_by_admin",
            "The school's admin disabled this webhook; only they can enable it again.",
        )
    if await _grant_revoked_now(ctx, caller):
        raise _revoked()
    async with ctx.pool.acquire() as conn, conn.transaction():
        if await revocation_store.lock_grant(conn, caller.grant_id):
            raise _revoked()
        sub = await subscription_store.update_subscription(
            conn,
            subscription_id,
            caller.school_id,
            caller.client_id,
            grant_id=caller.grant_id,
            subject=caller.subject,
            url=url,
            event_types=patterns if "event_types" in body else None,
            description=description,
            disabled=disabled,
        )
    if sub is None:
        raise _not_found()
    return sub


async def delete(ctx: WebhooksContext, caller: Caller, subscription_id: UUID) -> None:
    if not await subscription_store.delete_subscription(
        ctx.pool, subscription_id, caller.school_id, caller.client_id
    ):
        raise _not_found()


async def rotate_secret(
    ctx: WebhooksContext, caller: Caller, subscription_id: UUID
) -> tuple[Subscription, str]:
    """A new secret, shown once; the old one keeps signing too for the overlap window."""
    secret, key = signing.new_secret()
    kek = ctx.settings.key_encryption_key
    sub = await subscription_store.rotate_secret(
        ctx.pool,
        subscription_id,
        caller.school_id,
        caller.client_id,
        secret_enc=signing.seal(kek, subscription_id, key),
        kek_id=signing.kek_id(kek),
        overlap_seconds=ctx.settings.webhooks.secret_overlap,
    )
    if sub is None:
        raise _not_found()
    return sub, secret


# ---------------------------------------------------------------------------------------------
# Deliveries


async def deliveries_page(
    ctx: WebhooksContext,
    caller: Caller,
    subscription_id: UUID,
    *,
    status: str | None,
    cursor: str | None,
    limit: int,
) -> tuple[list[Delivery], str | None]:
    await get(ctx, caller, subscription_id)
    if status is not None and status not in DELIVERY_STATUSES:
        raise _invalid("status", f"status must be one of {', '.join(DELIVERY_STATUSES)}")
    found = await delivery_store.list_deliveries(
        ctx.pool, subscription_id, status=status, before=decode_cursor(cursor), limit=limit + 1
    )
    page = found[:limit]
    more = len(found) > limit
    return page, encode_cursor(page[-1].created_at, page[-1].id) if more and page else None


async def delivery(
    ctx: WebhooksContext, caller: Caller, subscription_id: UUID, delivery_id: UUID
) -> Delivery:
    await get(ctx, caller, subscription_id)
    found = await delivery_store.get_delivery(ctx.pool, subscription_id, delivery_id)
    if found is None:
        raise _not_found("delivery")
    return found


async def retry(
    ctx: WebhooksContext, caller: Caller, subscription_id: UUID, delivery_id: UUID
) -> Delivery:
    """Send again now, dead-lettered ones included; not while the subscription is disabled."""
    sub = await get(ctx, caller, subscription_id)
    if not sub.active:
        raise ApiError(
            409,
            "webhook_disabled",
            "This webhook is disabled; re-enable it (PATCH disabled=false) first.",
        )
    if await delivery_store.retry_delivery(ctx.pool, subscription_id, delivery_id) is None:
        raise _not_found("delivery")
    ctx.due.set()
    await queue_store.notify_due(ctx.pool)
    return await delivery(ctx, caller, subscription_id, delivery_id)
