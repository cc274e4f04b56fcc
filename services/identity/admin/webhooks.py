"""School admin pages: the webhooks of the school's apps and their deliveries.

The webhooks service owns subscriptions and deliveries; identity must not read its schema. So
these pages ask it over its internal admin API (`/internal/v1/schools/{school_id}/...` at
WEBHOOKS_URL, with the internal token), always naming the school of the Host the admin was
checked against, never one from a form or a path. A subscription of another school is 404
there, and so here.

The same rules as the other admin pages: only the school's admins, CSRF on every POST,
post-redirect-get, and each action appends an audit event naming the admin. When the webhooks
service does not answer (or answers nonsense), the page says so with a 503 instead of failing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

import aiohttp
import orjson
from aiohttp import web
from multidict import MultiMapping

from libs.common.logging import get_logger
from libs.common.web import REQUEST_ID_KEY
from services.identity import audit, sessions, store
from services.identity.account.viewer import (
    Viewer,
    csrf_refused,
    form_token,
    form_token_ok,
    refused,
    render_page,
    when,
)
from services.identity.admin.access import admin_of
from services.identity.context import CONTEXT, IdentityContext, context

log = get_logger(__name__)

WEBHOOKS_PATH = "/admin/webhooks"
_PURPOSE = "admin-webhooks"
# An admin page waits this long for the webhooks service before saying it is unavailable.
CALL_TIMEOUT = 5.0
CONNECT_TIMEOUT = 2.0
# The webhooks service's own page-size bounds.
LIST_PAGE_SIZE = 50
DELIVERY_PAGE_SIZE = 25
DELIVERY_STATUSES = ("pending", "delivered", "dead", "cancelled")
_MAX_CURSOR = 200

DISABLED_REASONS = {
    "admin": "switched off by a school admin",
    "client": "switched off by the app",
    "gone": "the receiver answered 410 Gone",
    "failing": "every delivery failed for days",
    "grant_revoked": "the app's access was revoked",
}


# The webhooks service's internal admin API --------------------------------------------------


class WebhooksUnavailable(Exception):
    """No usable answer: down, too slow, refusing our token, or answering nonsense."""


class WebhooksRefused(Exception):
    """A considered refusal (404, 409, 422) the page can explain."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description


class WebhooksAdminClient:
    def __init__(self, base_url: str, token: str) -> None:
        self._base = base_url.rstrip("/")
        self._token = token
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=CALL_TIMEOUT, connect=CONNECT_TIMEOUT, sock_connect=CONNECT_TIMEOUT
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            # The internal token must go only where WEBHOOKS_URL says, never via a proxy the
            # environment names.
            trust_env=False,
        )

    async def close(self) -> None:
        await self._session.close()

    async def call(
        self,
        method: str,
        school_id: int,
        path: str = "",
        *,
        query: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> Any:
        """`path` is built from parsed UUIDs only, so no caller input shapes the URL."""
        url = f"{self._base}/internal/v1/schools/{int(school_id)}/webhooks{path}"
        headers = {"X-Connect-Internal-Token": self._token, "Accept": "application/json"}
        if request_id:
            headers["X-Request-Id"] = request_id
        try:
            async with self._session.request(
                method, url, params=dict(query or {}), headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                raw = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("webhooks_admin_unreachable", error=type(exc).__name__)
            raise WebhooksUnavailable from exc
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        if status in (200, 202) and body is not None:
            return body
        if status in (404, 409, 422) and isinstance(body, dict):
            raise WebhooksRefused(
                status, str(body.get("error", "")), str(body.get("error_description", ""))
            )
        # 401/403 mean our token is not the service's: a deployment mistake, not the admin's.
        log.warning("webhooks_admin_failed", status=status)
        raise WebhooksUnavailable


CLIENT = web.AppKey("webhooks_admin_client", WebhooksAdminClient)


async def _client_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[CONTEXT].settings
    client = WebhooksAdminClient(settings.upstreams.webhooks, settings.internal_token)
    app[CLIENT] = client
    try:
        yield
    finally:
        await client.close()


# What the pages show ------------------------------------------------------------------------


def _moment(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) and value else None


@dataclass(frozen=True, slots=True)
class Hook:
    id: str
    client_id: str
    url: str
    description: str
    event_types: list[str]
    active: bool
    disabled_at: datetime | None
    disabled_reason: str | None
    failing_since: datetime | None
    created_at: datetime | None
    recent: dict[str, int]
    admin_can_enable: bool
    grant_revoked: bool

    @property
    def reason_text(self) -> str:
        reason = self.disabled_reason or ""
        return DISABLED_REASONS.get(reason, reason)

    @classmethod
    def read(cls, raw: Any) -> Hook:
        recent = raw.get("recent_deliveries") or {}
        return cls(
            id=str(UUID(raw["id"])),
            client_id=str(raw["client_id"]),
            url=str(raw["url"]),
            description=str(raw.get("description") or ""),
            event_types=[str(t) for t in raw["event_types"]],
            active=raw["status"] == "active",
            disabled_at=_moment(raw.get("disabled_at")),
            disabled_reason=raw.get("disabled_reason"),
            failing_since=_moment(raw.get("failing_since")),
            created_at=_moment(raw.get("created_at")),
            recent={s: int(recent.get(s, 0)) for s in DELIVERY_STATUSES},
            admin_can_enable=bool(raw.get("admin_can_enable")),
            grant_revoked=bool(raw.get("grant_revoked")),
        )


@dataclass(frozen=True, slots=True)
class Attempt:
    attempted_at: datetime | None
    response_status: int | None
    latency_ms: int
    excerpt: str
    error: str
    outcome: str
    next_attempt_at: datetime | None


@dataclass(frozen=True, slots=True)
class Delivery:
    id: str
    event_id: str
    event_type: str
    status: str
    attempt_count: int
    next_attempt_at: datetime | None
    last_response_status: int | None
    created_at: datetime | None
    dead_lettered: bool
    attempts: list[Attempt]

    @classmethod
    def read(cls, raw: Any) -> Delivery:
        return cls(
            id=str(UUID(raw["id"])),
            event_id=str(raw["event_id"]),
            event_type=str(raw["event_type"]),
            status=str(raw["status"]),
            attempt_count=int(raw["attempt_count"]),
            next_attempt_at=_moment(raw.get("next_attempt_at")),
            last_response_status=raw.get("last_response_status"),
            created_at=_moment(raw.get("created_at")),
            dead_lettered=bool(raw.get("dead_lettered")),
            attempts=[
                Attempt(
                    attempted_at=_moment(a.get("attempted_at")),
                    response_status=a.get("response_status"),
                    latency_ms=int(a.get("latency_ms") or 0),
                    excerpt=str(a.get("response_excerpt") or ""),
                    error=str(a.get("error") or ""),
                    outcome=str(a.get("outcome") or ""),
                    next_attempt_at=_moment(a.get("next_attempt_at")),
                )
                for a in raw.get("attempts") or []
            ],
        )


def _read_page(body: Any, item: Any) -> tuple[list[Any], str | None]:
    try:
        cursor = body.get("next_cursor")
        return [item(r) for r in body["data"]], str(cursor) if cursor else None
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        log.warning("webhooks_admin_bad_answer", error=type(exc).__name__)
        raise WebhooksUnavailable from exc


def _read_hook(body: Any) -> Hook:
    try:
        return Hook.read(body)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        log.warning("webhooks_admin_bad_answer", error=type(exc).__name__)
        raise WebhooksUnavailable from exc


# Helpers ------------------------------------------------------------------------------------


async def _call(
    request: web.Request,
    viewer: Viewer,
    method: str,
    path: str = "",
    query: Mapping[str, str] | None = None,
) -> Any:
    return await request.app[CLIENT].call(
        method,
        viewer.school.id,
        path,
        query=query,
        request_id=request.get(REQUEST_ID_KEY),
    )


def _unavailable(request: web.Request) -> web.Response:
    response = refused(
        request,
        "The webhooks service is not answering right now, so the school's webhooks cannot be "
        "shown or changed. Try again in a minute.",
        status=503,
    )
    response.headers["Retry-After"] = "30"
    return response


def _no_such_hook(request: web.Request) -> web.Response:
    return refused(request, "This school has no such webhook.", status=404)


def _hook_id(request: web.Request) -> str | None:
    try:
        return str(UUID(request.match_info["webhook_id"]))
    except ValueError:
        return None


def _hook_path(hook_id: str, **query: str) -> str:
    path = f"{WEBHOOKS_PATH}/{hook_id}"
    return f"{path}?{urlencode(query)}" if query else path


def _cursor(query: MultiMapping[str]) -> str:
    value = str(query.get("before", ""))
    return value if len(value) <= _MAX_CURSOR else ""


async def _app_names(ctx: IdentityContext, school_id: int) -> dict[str, str]:
    """App names come from identity's own clients table, not from the webhooks service."""
    return {c.id: c.name for c in await store.list_clients(ctx.pool, school_id)}


async def _audit(
    request: web.Request, viewer: Viewer, action: str, hook: Hook, **detail: Any
) -> None:
    ctx = context(request)
    await audit.write(
        ctx.pool,
        audit.record(
            action,
            school_id=viewer.school.id,
            client_id=hook.client_id,
            subject=str(viewer.user.id),
            ip=sessions.client_address(request),
            method=request.method,
            path=request.path,
            via="admin",
            webhook_id=hook.id,
            url=hook.url,
            **detail,
        ),
    )


# Pages --------------------------------------------------------------------------------------


async def webhooks_page(request: web.Request) -> web.StreamResponse:
    viewer = await admin_of(request)
    if isinstance(viewer, web.Response):
        return viewer
    before = _cursor(request.query)
    query = {"limit": str(LIST_PAGE_SIZE)}
    if before:
        query["cursor"] = before
    try:
        body = await _call(request, viewer, "GET", query=query)
        hooks, next_cursor = _read_page(body, Hook.read)
    except WebhooksRefused:
        return refused(request, "That page link is not one this page made.", status=400)
    except WebhooksUnavailable:
        return _unavailable(request)
    return render_page(
        request,
        viewer,
        "admin_webhooks.html",
        section="admin-webhooks",
        title="Webhooks",
        hooks=hooks,
        apps=await _app_names(context(request), viewer.school.id),
        when=when,
        older_url=f"{WEBHOOKS_PATH}?{urlencode({'before': next_cursor})}" if next_cursor else None,
        newest_url=WEBHOOKS_PATH if before else None,
    )


_NOTICES = {
    "disabled": "The webhook is switched off: nothing more is delivered until it is enabled.",
    "enabled": "The webhook is enabled again.",
    "retried": "The delivery is being sent again; reload to see how it went.",
}


async def _render_hook(
    request: web.Request,
    viewer: Viewer,
    hook_id: str,
    *,
    status: int = 200,
    error: str | None = None,
    notice: str | None = None,
) -> web.Response:
    wanted = str(request.query.get("status", ""))
    wanted = wanted if wanted in DELIVERY_STATUSES else ""
    before = _cursor(request.query)
    query = {"limit": str(DELIVERY_PAGE_SIZE)}
    if wanted:
        query["status"] = wanted
    if before:
        query["cursor"] = before
    try:
        hook_body, deliveries_body = await asyncio.gather(
            _call(request, viewer, "GET", f"/{hook_id}"),
            _call(request, viewer, "GET", f"/{hook_id}/deliveries", query),
        )
        hook = _read_hook(hook_body)
        deliveries, next_cursor = _read_page(deliveries_body, Delivery.read)
    except WebhooksRefused as exc:
        if exc.status == 404:
            return _no_such_hook(request)
        return refused(request, "That page link is not one this page made.", status=400)
    except WebhooksUnavailable:
        return _unavailable(request)
    kept = {"status": wanted} if wanted else {}
    apps = await _app_names(context(request), viewer.school.id)
    return render_page(
        request,
        viewer,
        "admin_webhook.html",
        status=status,
        section="admin-webhooks",
        title="Webhook",
        hook=hook,
        app_name=apps.get(hook.client_id),
        deliveries=deliveries,
        statuses=DELIVERY_STATUSES,
        wanted=wanted,
        when=when,
        error=error,
        notice=notice,
        csrf_token=form_token(viewer, _PURPOSE),
        base=_hook_path(hook_id),
        older_url=_hook_path(hook_id, **kept, before=next_cursor) if next_cursor else None,
        newest_url=_hook_path(hook_id, **kept) if before else None,
    )


async def webhook_page(request: web.Request) -> web.StreamResponse:
    viewer = await admin_of(request)
    if isinstance(viewer, web.Response):
        return viewer
    hook_id = _hook_id(request)
    if hook_id is None:
        return _no_such_hook(request)
    notice = next((text for key, text in _NOTICES.items() if request.query.get(key) == "1"), None)
    return await _render_hook(request, viewer, hook_id, notice=notice)


async def _posted(request: web.Request) -> tuple[Viewer, str] | web.Response:
    """The admin and the webhook id the path names, once CSRF checks out."""
    viewer = await admin_of(request)
    if isinstance(viewer, web.Response):
        return viewer
    form = await request.post()
    if not form_token_ok(viewer, _PURPOSE, str(form.get("csrf_token", ""))):
        return csrf_refused(request)
    hook_id = _hook_id(request)
    if hook_id is None:
        return _no_such_hook(request)
    return viewer, hook_id


async def _refusal_page(
    request: web.Request, viewer: Viewer, hook_id: str, exc: WebhooksRefused
) -> web.Response:
    if exc.status == 404:
        return _no_such_hook(request)
    return await _render_hook(
        request, viewer, hook_id, status=exc.status, error=exc.description or "Refused."
    )


async def _switch(request: web.Request, action: str) -> web.StreamResponse:
    posted = await _posted(request)
    if isinstance(posted, web.Response):
        return posted
    viewer, hook_id = posted
    try:
        hook = _read_hook(await _call(request, viewer, "POST", f"/{hook_id}/{action}"))
    except WebhooksRefused as exc:
        return await _refusal_page(request, viewer, hook_id, exc)
    except WebhooksUnavailable:
        return _unavailable(request)
    done = f"{action}d"
    await _audit(request, viewer, f"webhook.{done}", hook)
    return sessions.see_other(_hook_path(hook_id, **{done: "1"}))


async def disable_submit(request: web.Request) -> web.StreamResponse:
    return await _switch(request, "disable")


async def enable_submit(request: web.Request) -> web.StreamResponse:
    return await _switch(request, "enable")


async def retry_submit(request: web.Request) -> web.StreamResponse:
    posted = await _posted(request)
    if isinstance(posted, web.Response):
        return posted
    viewer, hook_id = posted
    try:
        delivery_id = str(UUID(request.match_info["delivery_id"]))
    except ValueError:
        return refused(request, "This webhook has no such delivery.", status=404)
    try:
        # Whose webhook it is, for the audit record (and a 404 for another school's).
        hook = _read_hook(await _call(request, viewer, "GET", f"/{hook_id}"))
    except WebhooksRefused as exc:
        return await _refusal_page(request, viewer, hook_id, exc)
    except WebhooksUnavailable:
        return _unavailable(request)
    try:
        retried = await _call(request, viewer, "POST", f"/{hook_id}/deliveries/{delivery_id}/retry")
    except WebhooksRefused as exc:
        if exc.status == 404:
            return refused(request, "This webhook has no such delivery.", status=404)
        return await _refusal_page(request, viewer, hook_id, exc)
    except WebhooksUnavailable:
        return _unavailable(request)
    event_type = retried.get("event_type") if isinstance(retried, dict) else None
    await _audit(
        request,
        viewer,
        "webhook.delivery_retried",
        hook,
        delivery_id=delivery_id,
        event_type=event_type,
    )
    return sessions.see_other(_hook_path(hook_id, retried="1"))


def setup(app: web.Application) -> None:
    app.cleanup_ctx.append(_client_ctx)
    r = app.router
    r.add_get(WEBHOOKS_PATH, webhooks_page, allow_head=False)
    r.add_get(WEBHOOKS_PATH + "/{webhook_id}", webhook_page, allow_head=False)
    r.add_post(WEBHOOKS_PATH + "/{webhook_id}/disable", disable_submit)
    r.add_post(WEBHOOKS_PATH + "/{webhook_id}/enable", enable_submit)
    r.add_post(WEBHOOKS_PATH + "/{webhook_id}/deliveries/{delivery_id}/retry", retry_submit)


_HTML = {"description": "An HTML page", "content": {"text/html": {}}}
_SEE_OTHER = {"description": "Redirect (post-redirect-get, or to sign in)"}
_ADMIN_ONLY = {"403": {**_HTML, "description": "Not an admin of this school, or CSRF"}}
_DOWN = {"503": {**_HTML, "description": "The webhooks service is not answering"}}
_WEBHOOK_ID = {"name": "webhook_id", "in": "path", "required": True, "schema": {"type": "string"}}
_DELIVERY_ID = {**_WEBHOOK_ID, "name": "delivery_id"}
_BEFORE = {"name": "before", "in": "query", "required": False, "schema": {"type": "string"}}
# Any other value shows every status.
_STATUS = {**_BEFORE, "name": "status", "description": ", ".join(DELIVERY_STATUSES)}


def _post(summary: str, *params: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "parameters": [_WEBHOOK_ID, *params],
            "responses": {"303": _SEE_OTHER, "404": _HTML, "409": _HTML, **_ADMIN_ONLY, **_DOWN},
        }
    }


OPENAPI_PATHS: dict[str, Any] = {
    WEBHOOKS_PATH: {
        "get": {
            "summary": "School admin: the webhooks of the school's apps",
            "parameters": [_BEFORE],
            "responses": {"200": _HTML, "303": _SEE_OTHER, "400": _HTML, **_ADMIN_ONLY, **_DOWN},
        }
    },
    WEBHOOKS_PATH + "/{webhook_id}": {
        "get": {
            "summary": "School admin: one webhook and its deliveries",
            "parameters": [_WEBHOOK_ID, _STATUS, _BEFORE],
            "responses": {
                "200": _HTML,
                "303": _SEE_OTHER,
                "400": _HTML,
                "404": _HTML,
                **_ADMIN_ONLY,
                **_DOWN,
            },
        }
    },
    WEBHOOKS_PATH + "/{webhook_id}/disable": _post("Switch the webhook off"),
    WEBHOOKS_PATH + "/{webhook_id}/enable": _post("Switch the webhook on again"),
    WEBHOOKS_PATH + "/{webhook_id}/deliveries/{delivery_id}/retry": _post(
        "Send a dead-lettered delivery again", _DELIVERY_ID
    ),
}
