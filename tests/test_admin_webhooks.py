"""The school admin's webhooks pages, on real sockets: identity's pages over the webhooks
service's internal admin API, real receivers, real PostgreSQL and Redis.

Identity here runs on a port of its own with WEBHOOKS_URL pointing at this run's webhooks
service (conftest `webhooks_url`, retries on a 0.2/0.4/0.8 s schedule); a second identity
points at a port nobody listens on, for the page that says the service is down.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as redis_asyncio
from aiohttp import web
from yarl import URL

from libs.common import streams
from libs.common.config import Settings, load_settings
from services.gateway import routetable
from services.identity import sessions, users
from tests.support import client_session, free_port, running
from tests.test_account_pages import sign_in
from tests.test_admin_pages import CSP_FRAME, School, make_school, stream_actions
from tests.test_authorize import Browser, form
from tests.test_webhooks import Api, Caller, Receiver, eventually, publish, receivers
from tests.token_helpers import PASSWORD

__all__ = ["receivers"]

pytestmark = pytest.mark.timeout(60)

INTERNAL = "/internal/v1/schools"


@dataclass(frozen=True)
class Identity:
    settings: Settings
    port: int
    url: str


def _identity_env(base_env: dict[str, str], port: int, webhooks: str) -> dict[str, str]:
    return {
        **base_env,
        "IDENTITY_PORT": str(port),
        "PUBLIC_URL_TEMPLATE": f"http://{{school}}.localhost:{port}",
        "PLATFORM_URL": f"http://localhost:{port}",
        "WEBHOOKS_URL": webhooks,
    }


@pytest.fixture(scope="module")
async def identity(
    base_env: dict[str, str], webhooks_url: str, migrated: None
) -> AsyncIterator[Identity]:
    """Identity whose admin pages reach this run's webhooks service."""
    from services.identity.app import create_app

    port = free_port()
    settings = load_settings(_identity_env(base_env, port, webhooks_url))
    async with running(create_app(settings), port) as url:
        yield Identity(settings, port, url)


@pytest.fixture(scope="module")
async def identity_without_webhooks(
    base_env: dict[str, str], migrated: None
) -> AsyncIterator[Identity]:
    """Identity whose WEBHOOKS_URL answers nothing: the webhooks service is down."""
    from services.identity.app import create_app

    port = free_port()
    settings = load_settings(_identity_env(base_env, port, f"http://127.0.0.1:{free_port()}"))
    async with running(create_app(settings), port) as url:
        yield Identity(settings, port, url)


@pytest.fixture(autouse=True)
async def _fresh_address_counter(redis: redis_asyncio.Redis, settings: Settings) -> Any:
    key = sessions.address_throttle_key(settings, "127.0.0.1")
    await redis.delete(key)
    yield
    await redis.delete(key)


@pytest.fixture
async def api(webhooks_url: str, webhooks_settings: Settings) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as http:
        yield Api(http, webhooks_url, webhooks_settings)


@pytest.fixture
async def browsers() -> AsyncIterator[Callable[[], Browser]]:
    made: list[Browser] = []

    def new() -> Browser:
        b = Browser()
        made.append(b)
        return b

    yield new
    for b in made:
        await b.close()


async def new_school(pool: asyncpg.Pool, site: Identity, unique: str) -> tuple[School, Caller]:
    school = await make_school(pool, site.settings, unique + uuid.uuid4().hex[:4], site.port)
    return school, Caller(school.world.school.id, client_id=school.world.confidential.id)


async def admin_of(new: Callable[[], Browser], school: School) -> Browser:
    b = new()
    status, _, body = await sign_in(b, school.origin, school.admin.email)
    assert status == 303, body
    return b


async def dead_letter(
    api: Api, receivers: Any, redis: redis_asyncio.Redis, settings: Settings, caller: Caller
) -> tuple[dict[str, Any], Receiver, dict[str, Any], Callable[[bool], None]]:
    """A webhook whose receiver fails until told otherwise, and its dead-lettered delivery."""
    healthy = [False]

    async def flaky(_n: int, _request: web.Request) -> web.Response:
        if healthy[0]:
            return web.Response(text="ok")
        return web.Response(status=503, text="down for <maintenance>")

    receiver = await receivers(flaky)
    made = await api.subscribe(caller, receiver.url)
    await publish(redis, settings, caller.school_id)
    await receiver.wait_for(4, timeout=8)

    async def dead() -> bool:
        return bool(await api.deliveries(caller, made["id"], "?status=dead"))

    await eventually(dead, timeout=8)
    (letter,) = await api.deliveries(caller, made["id"], "?status=dead")

    def heal(value: bool) -> None:
        healthy[0] = value

    return made, receiver, letter, heal


async def as_the_app_sees_it(api: Api, caller: Caller, hook: dict[str, Any]) -> dict[str, Any]:
    """The webhook read through the app's own API, where an admin's action must show, or a
    refused one must not."""
    status, sub = await api.call("GET", f"/api/v1/webhooks/{hook['id']}", caller)
    assert status == 200, sub
    shown: dict[str, Any] = sub
    return shown


async def webhook_page(
    admin: Browser, school: School, hook: dict[str, Any]
) -> tuple[str, dict[str, str]]:
    """The URL of the admin's page of one webhook, and the fields (its CSRF token) of the
    page's disable form, which the page's other forms share."""
    page_url = f"{school.origin}/admin/webhooks/{hook['id']}"
    _, _, body = await admin.get(page_url)
    return page_url, form(body, f"/admin/webhooks/{hook['id']}/disable").fields


async def internal(
    http: aiohttp.ClientSession,
    base: str,
    method: str,
    path: str,
    token: str | None,
) -> tuple[int, Any]:
    headers = {"X-Connect-Internal-Token": token} if token is not None else {}
    async with http.request(method, base + INTERNAL + path, headers=headers) as r:
        body = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, body


# Who sees what ---------------------------------------------------------------------------------


async def test_an_admin_sees_their_schools_webhooks_and_deliveries_and_no_other_schools(
    identity: Identity,
    pool: asyncpg.Pool,
    api: Api,
    receivers: Any,
    redis: redis_asyncio.Redis,
    webhooks_settings: Settings,
    browsers: Callable[[], Browser],
    unique: str,
) -> None:
    a, caller_a = await new_school(pool, identity, unique)
    _, caller_b = await new_school(pool, identity, unique)
    ears_a, ears_b = await receivers(), await receivers()
    hook_a = await api.subscribe(caller_a, ears_a.url, ["course.*"], description="CRM <sync>")
    hook_b = await api.subscribe(caller_b, ears_b.url, ["course.*"])
    event_a = await publish(redis, webhooks_settings, caller_a.school_id)
    await publish(redis, webhooks_settings, caller_b.school_id)
    await ears_a.wait_for(1)
    await ears_b.wait_for(1)

    async def delivered() -> bool:
        found = await api.deliveries(caller_a, hook_a["id"])
        return bool(found) and found[0]["status"] == "delivered"

    await eventually(delivered)

    admin = await admin_of(browsers, a)
    status, headers, body = await admin.get(a.origin + "/admin/webhooks")
    assert status == 200, body
    assert CSP_FRAME in headers["Content-Security-Policy"]
    assert f'href="/admin/webhooks/{hook_a["id"]}"' in body
    assert ears_a.url in body
    assert "Confidential App" in body  # the app's name, from identity's own table
    assert hook_b["id"] not in body and ears_b.url not in body
    assert hook_a["secret"] not in body
    assert 'href="/admin/webhooks" aria-current="page"' in body

    status, headers, body = await admin.get(f"{a.origin}/admin/webhooks/{hook_a['id']}")
    assert status == 200, body
    assert CSP_FRAME in headers["Content-Security-Policy"]
    assert event_a["id"] in body
    assert "course.updated" in body
    assert "HTTP 200" in body
    # Escaped: what apps and receivers write is shown, never run.
    assert "CRM &lt;sync&gt;" in body and "CRM <sync>" not in body
    assert hook_a["secret"] not in body
    assert form(body, f"/admin/webhooks/{hook_a['id']}/disable").fields["csrf_token"]

    # The other school's webhook, by its id, does not exist for this admin.
    status, _, body = await admin.get(f"{a.origin}/admin/webhooks/{hook_b['id']}")
    assert status == 404
    assert ears_b.url not in body

    # The other pages link here.
    status, _, body = await admin.get(a.origin + "/admin/apps")
    assert status == 200
    assert 'href="/admin/webhooks"' in body


async def test_another_schools_webhook_is_404_and_nothing_changes(
    identity: Identity,
    pool: asyncpg.Pool,
    api: Api,
    receivers: Any,
    redis: redis_asyncio.Redis,
    webhooks_settings: Settings,
    browsers: Callable[[], Browser],
    unique: str,
) -> None:
    a, caller_a = await new_school(pool, identity, unique)
    _, caller_b = await new_school(pool, identity, unique)
    own = await api.subscribe(caller_a, (await receivers()).url)
    theirs, their_receiver, letter, _ = await dead_letter(
        api, receivers, redis, webhooks_settings, caller_b
    )
    sent_before = len(their_receiver.received)

    admin = await admin_of(browsers, a)
    _, fields = await webhook_page(admin, a, own)
    csrf_token = fields["csrf_token"]
    for path in (
        f"/admin/webhooks/{theirs['id']}/disable",
        f"/admin/webhooks/{theirs['id']}/enable",
        f"/admin/webhooks/{theirs['id']}/deliveries/{letter['id']}/retry",
        # Their delivery under our webhook's id: keyed by webhook, so not found either.
        f"/admin/webhooks/{own['id']}/deliveries/{letter['id']}/retry",
    ):
        status, _, body = await admin.post(a.origin + path, {"csrf_token": csrf_token})
        assert status == 404, (path, body)

    assert (await as_the_app_sees_it(api, caller_b, theirs))["status"] == "active"
    (still,) = await api.deliveries(caller_b, theirs["id"])
    assert (still["status"], still["attempt_count"]) == ("dead", letter["attempt_count"])
    await asyncio.sleep(0.5)
    assert len(their_receiver.received) == sent_before

    # The internal API itself is keyed by school the same way.
    token = webhooks_settings.internal_token
    async with aiohttp.ClientSession() as http:
        base = api.base
        school_a = caller_a.school_id
        status, _ = await internal(http, base, "GET", f"/{school_a}/webhooks/{theirs['id']}", token)
        assert status == 404
        status, _ = await internal(
            http, base, "POST", f"/{school_a}/webhooks/{theirs['id']}/disable", token
        )
        assert status == 404
        status, listed = await internal(http, base, "GET", f"/{school_a}/webhooks", token)
        assert status == 200
        assert [h["id"] for h in listed["data"]] == [own["id"]]
    assert (await as_the_app_sees_it(api, caller_b, theirs))["status"] == "active"


async def test_only_the_schools_admins_may_open_the_webhook_pages(
    identity: Identity,
    pool: asyncpg.Pool,
    api: Api,
    browsers: Callable[[], Browser],
    unique: str,
) -> None:
    a, caller_a = await new_school(pool, identity, unique)
    b, _ = await new_school(pool, identity, unique)
    hook = await api.subscribe(caller_a, "https://hooks.example.com/in")

    member = browsers()
    status, _, body = await sign_in(member, a.origin, a.world.user.email)
    assert status == 303, body
    # An admin of another school, also a member here.
    outsider = await admin_of(browsers, b)
    await users.create_user(
        pool, school_id=a.world.school.id, email=b.admin.email, password=PASSWORD
    )
    status, _, body = await sign_in(outsider, a.origin, b.admin.email)
    assert status == 303, body

    for browser in (member, outsider):
        for path in ("/admin/webhooks", f"/admin/webhooks/{hook['id']}"):
            status, headers, body = await browser.get(a.origin + path)
            assert status == 403, (path, body)
            assert CSP_FRAME in headers["Content-Security-Policy"]
            assert "hooks.example.com" not in body
        status, _, _ = await browser.post(
            f"{a.origin}/admin/webhooks/{hook['id']}/disable", {"csrf_token": "x"}
        )
        assert status == 403

    anonymous = browsers()
    status, headers, _ = await anonymous.get(a.origin + "/admin/webhooks")
    assert status == 303
    assert headers["Location"].startswith("/account/login?")

    assert (await as_the_app_sees_it(api, caller_a, hook))["status"] == "active"


# Actions ---------------------------------------------------------------------------------------


async def test_an_admin_retries_a_dead_lettered_delivery_and_it_is_sent_again(
    identity: Identity,
    pool: asyncpg.Pool,
    api: Api,
    receivers: Any,
    redis: redis_asyncio.Redis,
    settings: Settings,
    webhooks_settings: Settings,
    browsers: Callable[[], Browser],
    unique: str,
) -> None:
    a, caller = await new_school(pool, identity, unique)
    made, receiver, letter, heal = await dead_letter(
        api, receivers, redis, webhooks_settings, caller
    )
    admin = await admin_of(browsers, a)
    page_url = f"{a.origin}/admin/webhooks/{made['id']}"
    status, _, body = await admin.get(page_url + "?status=dead")
    assert status == 200, body
    assert "Dead-lettered" in body
    # The receiver's words are shown escaped.
    assert "down for &lt;maintenance&gt;" in body
    retry_action = f"/admin/webhooks/{made['id']}/deliveries/{letter['id']}/retry"
    fields = form(body, retry_action).fields

    heal(True)
    sent = len(receiver.received)
    status, headers, body = await admin.post(a.origin + retry_action, fields)
    assert status == 303, body
    assert headers["Location"] == f"/admin/webhooks/{made['id']}?retried=1"
    resent = (await receiver.wait_for(sent + 1, timeout=5))[sent]
    assert resent.headers["webhook-id"] == receiver.received[0].headers["webhook-id"]

    async def delivered() -> bool:
        (found,) = await api.deliveries(caller, made["id"])
        return bool(found["status"] == "delivered")

    await eventually(delivered)
    status, _, body = await admin.get(page_url + "?retried=1")
    assert status == 200
    assert "being sent again" in body
    assert retry_action not in body  # delivered now: nothing to retry

    # Only dead-lettered deliveries are retried: the delivered one is refused, not re-sent.
    status, _, body = await admin.post(a.origin + retry_action, fields)
    assert status == 409, body
    assert "Only dead-lettered deliveries" in body
    await asyncio.sleep(0.5)
    assert len(receiver.received) == sent + 1

    actions = [
        r
        for r in await stream_actions(redis, settings, a.world.confidential.id)
        if r["action"] == "webhook.delivery_retried"
    ]
    assert len(actions) == 1
    record = actions[0]
    assert record["subject"] == str(a.admin.id)
    assert record["school_id"] == a.world.school.id
    assert record["detail"]["delivery_id"] == letter["id"]
    assert record["detail"]["webhook_id"] == made["id"]
    assert record["detail"]["via"] == "admin"


async def test_an_admin_disables_and_enables_a_webhook(
    identity: Identity,
    pool: asyncpg.Pool,
    api: Api,
    receivers: Any,
    redis: redis_asyncio.Redis,
    settings: Settings,
    webhooks_settings: Settings,
    browsers: Callable[[], Browser],
    unique: str,
) -> None:
    a, caller = await new_school(pool, identity, unique)
    receiver = await receivers()
    made = await api.subscribe(caller, receiver.url)
    admin = await admin_of(browsers, a)
    page_url, fields = await webhook_page(admin, a, made)

    status, headers, body = await admin.post(page_url + "/disable", fields)
    assert status == 303, body
    assert headers["Location"] == f"/admin/webhooks/{made['id']}?disabled=1"
    sub = await as_the_app_sees_it(api, caller, made)
    assert (sub["status"], sub["disabled_reason"]) == ("disabled", "admin")
    # The app cannot undo the admin's choice.
    status, body = await api.call(
        "PATCH", f"/api/v1/webhooks/{made['id']}", caller, {"disabled": False}
    )
    assert (status, body["error"]) == (409, "disabled_by_admin")
    await publish(redis, webhooks_settings, caller.school_id)
    await asyncio.sleep(0.5)
    assert receiver.received == []

    _, _, body = await admin.get(page_url + "?disabled=1")
    assert "switched off by a school admin" in body
    fields = form(body, f"/admin/webhooks/{made['id']}/enable").fields
    status, headers, _ = await admin.post(page_url + "/enable", fields)
    assert status == 303
    assert headers["Location"] == f"/admin/webhooks/{made['id']}?enabled=1"
    sub = await as_the_app_sees_it(api, caller, made)
    assert (sub["status"], sub["disabled_reason"]) == ("active", None)
    event = await publish(redis, webhooks_settings, caller.school_id)
    (got,) = await receiver.wait_for(1)
    assert got.headers["webhook-id"] == event["id"]

    # What the app switched off itself stays the app's to switch on.
    status, _ = await api.call(
        "PATCH", f"/api/v1/webhooks/{made['id']}", caller, {"disabled": True}
    )
    assert status == 200
    _, _, body = await admin.get(page_url)
    assert f"/admin/webhooks/{made['id']}/enable" not in body
    status, _, body = await admin.post(page_url + "/enable", fields)
    assert status == 409, body
    assert "only the app can turn it on again" in body
    sub = await as_the_app_sees_it(api, caller, made)
    assert (sub["status"], sub["disabled_reason"]) == ("disabled", "client")

    actions = [
        r["action"]
        for r in await stream_actions(redis, settings, a.world.confidential.id)
        if r["action"].startswith("webhook.")
    ]
    assert actions == ["webhook.disabled", "webhook.enabled"]


async def test_a_webhook_whose_grant_was_revoked_cannot_be_enabled_by_the_admin(
    identity: Identity,
    pool: asyncpg.Pool,
    api: Api,
    redis: redis_asyncio.Redis,
    webhooks_settings: Settings,
    browsers: Callable[[], Browser],
    unique: str,
) -> None:
    a, caller = await new_school(pool, identity, unique)
    made = await api.subscribe(caller, "https://hooks.example.com/in")
    admin = await admin_of(browsers, a)
    page_url, fields = await webhook_page(admin, a, made)
    status, _, _ = await admin.post(page_url + "/disable", fields)
    assert status == 303
    # Identity announces the revoke of the grant the webhook delivers under.
    await streams.append(
        redis,
        webhooks_settings.stream(streams.REVOCATIONS),
        {"grant_id": caller.grant_id, "reason": "user", "at": time.time(), "ttl": 60},
    )
    token = webhooks_settings.internal_token
    path = f"/{caller.school_id}/webhooks/{made['id']}"

    async def revoked() -> bool:
        async with aiohttp.ClientSession() as http:
            _, shown = await internal(http, api.base, "GET", path, token)
        return bool(shown["grant_revoked"])

    await eventually(revoked)
    _, _, body = await admin.get(page_url)
    assert "subscribe anew" in body
    assert f"/admin/webhooks/{made['id']}/enable" not in body
    status, _, body = await admin.post(page_url + "/enable", fields)
    assert status == 409, body
    assert (await as_the_app_sees_it(api, caller, made))["status"] == "disabled"


async def test_a_post_without_the_forms_csrf_token_is_refused(
    identity: Identity,
    pool: asyncpg.Pool,
    api: Api,
    browsers: Callable[[], Browser],
    unique: str,
) -> None:
    a, caller = await new_school(pool, identity, unique)
    b, _ = await new_school(pool, identity, unique)
    made = await api.subscribe(caller, "https://hooks.example.com/in")
    admin = await admin_of(browsers, a)
    # A token of another session (another school's admin) is no better than none.
    other = await admin_of(browsers, b)
    _, _, apps_page = await other.get(b.origin + "/admin/apps")
    foreign = form(apps_page, "/admin/apps").fields["csrf_token"]
    for data in ({}, {"csrf_token": ""}, {"csrf_token": "forged"}, {"csrf_token": foreign}):
        status, headers, body = await admin.post(
            f"{a.origin}/admin/webhooks/{made['id']}/disable", data
        )
        assert status == 403, body
        assert CSP_FRAME in headers["Content-Security-Policy"]
    assert (await as_the_app_sees_it(api, caller, made))["status"] == "active"


# The internal API and the edge -----------------------------------------------------------------


async def test_the_internal_api_needs_the_internal_token(
    api: Api, webhooks_settings: Settings
) -> None:
    caller = Caller(1_000_000 + uuid.uuid4().int % 1_000_000_000)
    made = await api.subscribe(caller, "https://hooks.example.com/in")
    token = webhooks_settings.internal_token
    paths = [
        ("GET", f"/{caller.school_id}/webhooks"),
        ("GET", f"/{caller.school_id}/webhooks/{made['id']}"),
        ("GET", f"/{caller.school_id}/webhooks/{made['id']}/deliveries"),
        ("POST", f"/{caller.school_id}/webhooks/{made['id']}/disable"),
        ("POST", f"/{caller.school_id}/webhooks/{made['id']}/enable"),
        ("POST", f"/{caller.school_id}/webhooks/{made['id']}/deliveries/{uuid.uuid4()}/retry"),
    ]
    async with aiohttp.ClientSession() as http:
        for method, path in paths:
            status, _ = await internal(http, api.base, method, path, None)
            assert status == 401, path
            status, _ = await internal(http, api.base, method, path, token[:-1] + "x")
            assert status == 403, path
            # The gateway's identity headers are no substitute for the token.
            async with http.request(
                method,
                api.base + INTERNAL + path,
                headers=caller.headers(webhooks_settings) | {"X-Connect-Internal-Token": ""},
            ) as r:
                assert r.status == 401
        status, _ = await internal(
            http, api.base, "GET", f"/{caller.school_id}/webhooks/{made['id']}", token
        )
        assert status == 200
        status, body = await internal(http, api.base, "GET", f"/{caller.school_id}/webhooks", token)
        assert status == 200
        (shown,) = body["data"]
        assert shown["id"] == made["id"]
        assert "secret" not in shown and made["secret"] not in str(body)
        assert shown["recent_deliveries"]["dead"] == 0
        for bad in ("0", "-1", "abc", "99999999999999999999"):
            status, _ = await internal(http, api.base, "GET", f"/{bad}/webhooks", token)
            assert status == 404, bad
    assert (await as_the_app_sees_it(api, caller, made))["status"] == "active"


async def test_the_gateway_does_not_expose_the_internal_api(
    gateway_url: str,
    gateway_settings: Settings,
    gateway_port: int,
    pool: asyncpg.Pool,
    http: aiohttp.ClientSession,
    unique: str,
) -> None:
    table = routetable.load(gateway_settings.gateway.routes_file, gateway_settings)
    for path in ("/internal/v1/schools/1/webhooks", "/internal", "/internal/"):
        assert table.match(path) is None, path
    school = await make_school(pool, gateway_settings, unique, gateway_port)
    token = gateway_settings.internal_token
    for origin in (school.origin, f"http://localhost:{gateway_port}"):
        for method in ("GET", "POST"):
            for headers in ({}, {"X-Connect-Internal-Token": token}):
                url = f"{origin}/internal/v1/schools/{school.world.school.id}/webhooks"
                async with http.request(method, url, headers=headers) as r:
                    assert r.status == 404, (origin, method)


async def test_the_page_says_so_when_the_webhooks_service_is_down(
    identity: Identity,
    identity_without_webhooks: Identity,
    pool: asyncpg.Pool,
    api: Api,
    redis: redis_asyncio.Redis,
    settings: Settings,
    browsers: Callable[[], Browser],
    unique: str,
) -> None:
    a, caller = await new_school(pool, identity, unique)
    made = await api.subscribe(caller, "https://hooks.example.com/in")
    admin = await admin_of(browsers, a)
    _, fields = await webhook_page(admin, a, made)
    # The same admin session at an identity whose webhooks service does not answer (sessions
    # live in the shared stores, so the cookie carries over).
    down_origin = a.origin.replace(f":{identity.port}", f":{identity_without_webhooks.port}")
    down = browsers()
    session = admin.cookie("lc_session")
    assert session
    down.session.cookie_jar.update_cookies({"lc_session": session}, URL(down_origin))

    for path in ("/admin/webhooks", f"/admin/webhooks/{made['id']}"):
        status, headers, body = await down.get(down_origin + path)
        assert status == 503, body
        assert CSP_FRAME in headers["Content-Security-Policy"]
        assert "webhooks service is not answering" in body
        assert headers["Retry-After"]
    for action in ("disable", "enable"):
        status, _, body = await down.post(
            f"{down_origin}/admin/webhooks/{made['id']}/{action}", fields
        )
        assert status == 503, body
    status, _, body = await down.post(
        f"{down_origin}/admin/webhooks/{made['id']}/deliveries/{uuid.uuid4()}/retry", fields
    )
    assert status == 503, body
    status, _, page = await down.get(down_origin + "/admin/apps")
    assert status == 200
    assert 'href="/admin/webhooks"' in page

    assert (await as_the_app_sees_it(api, caller, made))["status"] == "active"
    assert [
        r
        for r in await stream_actions(redis, settings, a.world.confidential.id)
        if r["action"].startswith("webhook.")
    ] == []


async def test_the_openapi_documents_list_the_new_paths(identity: Identity, api: Api) -> None:
    async with client_session() as http, http.get(identity.url + "/openapi.json") as r:
        paths = (await r.json())["paths"]
    assert "/admin/webhooks/{webhook_id}/deliveries/{delivery_id}/retry" in paths
    async with api.http.get(api.base + "/openapi.json") as r:
        paths = (await r.json())["paths"]
    assert "/internal/v1/schools/{school_id}/webhooks/{id}/disable" in paths
