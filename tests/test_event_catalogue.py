"""Every event type the catalogue lists is emitted, through the source it names, and reaches
a subscriber holding the gating scope and no one else (issue 17 §2, contract section 13).

The test enumerates `services.webhooks.event_types.CATALOGUE` itself. `TRIGGERS` says, for
each type, the source it uses (which must be the catalogue's) and how to make it happen: an
API write through the gateway with a partner's token, or a storefront action
(services/school_api/storefront/). A type added to the catalogue without an entry here fails
`test_every_listed_type_has_a_trigger`; an entry for a type the catalogue does not list fails
it too.

One school, one writer app holding the write scopes, and one subscriber app per gating scope
(each with its own receiver, subscribed to every type its grant allows plus endpoint.disabled).
Then every trigger runs, and each receiver must get every type its scope gates, signed
(verified with `standardwebhooks`), and nothing else; an app without the scope is refused the
subscription (403). Also here: the storefront CLI as a real process.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer
from standardwebhooks import Webhook

from libs.common.config import Settings
from libs.common.scopes import satisfies
from services.identity import clients
from services.school_api import store as api_store
from services.school_api.storefront import actions, demo
from services.webhooks.event_types import CATALOGUE, ENDPOINT_DISABLED, EVENT_TYPES
from tests import test_system
from tests.support import without_handler_cancellation
from tests.test_system import (
    REDIRECT_URI,
    App,
    PartnerBrowser,
    Receiver,
    System,
    Tenant,
    call,
    connect_app,
    new_tenant,
)
from tests.test_uploads import png

# The whole system of tests/test_system.py, with its partner's HTTP client, browser and
# webhook receivers (fixtures, named as the tests below ask for them).
system = test_system.system
http = test_system.http
browser = test_system.browser
receivers = test_system.receivers

pytestmark = pytest.mark.timeout(240)

CLI = str(Path(sys.executable).with_name("loopwise-connect"))

WRITE_SCOPES = (
    "courses:write students:write posts:write events:write curriculum:write coupons:write"
    " membership_plans:write digital_products:write lecturers:write subscriptions:write"
    " school:write appearance:write storage:write"
)


# The triggers ------------------------------------------------------------------------------------


@dataclass
class Ctx:
    http: aiohttp.ClientSession
    tenant: Tenant
    writer: App
    pool: asyncpg.Pool
    # Types each storefront action said it emitted, to check against the catalogue's source.
    emitted: list[str] = field(default_factory=list)

    @property
    def school_id(self) -> int:
        return self.tenant.school.id

    async def api(self, method: str, path: str, body: Any = None) -> Any:
        status, _, payload = await call(
            self.http, method, f"{self.tenant.origin}{path}", self.writer.bearer(), body
        )
        assert 200 <= status < 300, (method, path, status, payload)
        return payload

    async def made(self, path: str, body: dict[str, Any]) -> int:
        return int((await self.api("POST", path, body))["id"])

    async def storefront(self, action: str, **options: Any) -> actions.Outcome:
        outcome = await actions.run(self.pool, action, self.school_id, options)
        self.emitted += outcome.events
        return outcome

    async def course(self, status: str = "draft") -> int:
        return await self.made("/api/v1/courses", {"title": "Ink Wash", "status": status})

    async def member(self) -> int:
        email = f"m{secrets.token_hex(4)}@example.com"
        return await self.made("/api/v1/members", {"name": "Noor Ali", "email": email})

    async def subscription(self) -> int:
        plan = await self.made("/api/v1/membership-plans", {"name": "Weekly"})
        member = await self.member()
        return await self.made(
            "/api/v1/subscriptions", {"member_id": member, "membership_plan_id": plan}
        )


Trigger = Callable[[Ctx], Awaitable[Any]]


@dataclass(frozen=True)
class Source:
    source: str  # as the catalogue names it
    run: Trigger


def _in(days: int) -> str:
    return (datetime.now(UTC) + timedelta(days=days)).isoformat()


async def _event(c: Ctx) -> int:
    return await c.made("/api/v1/events", {"title": "Sketch Walk", "starts_at": _in(9)})


async def _lesson(c: Ctx) -> int:
    return await c.made("/api/v1/lessons", {"course_id": await c.course(), "title": "Brushes"})


async def _enrolled(c: Ctx) -> dict[str, int]:
    """A new member enrolled (through the API) in a new published course."""
    member, course = await c.member(), await c.course("published")
    await c.made(f"/api/v1/members/{member}/enrollments", {"course_id": course})
    return {"member": member, "course": course}


def _on_enrollment(action: str, **options: Any) -> Trigger:
    """A storefront action on an enrollment of its own, so no trigger uses up another's."""

    async def run(c: Ctx) -> None:
        await c.storefront(action, **await _enrolled(c), **options)

    return run


async def _refund(c: Ctx) -> None:
    order = (await c.storefront("checkout", paid=True)).rows["order"]
    await c.storefront("refund", order=order["id"])


async def _remove_member(c: Ctx) -> None:
    member = (await c.storefront("signup")).rows["member"]
    await c.storefront("remove-member", member=member["id"])


async def _renew(c: Ctx) -> None:
    await c.storefront("renew", subscription=await c.subscription())


async def _cancel_subscription(c: Ctx) -> None:
    await c.storefront("cancel-subscription", subscription=await c.subscription())


async def _endpoint_disabled(c: Ctx) -> None:
    """Set up by the test (a subscription whose endpoint answers 410): a course change
    reaches it and disables it."""
    await c.course()


def _patch(path: Callable[[Ctx], Awaitable[str]], body: dict[str, Any]) -> Trigger:
    async def run(c: Ctx) -> None:
        await c.api("PATCH", await path(c), body)

    return run


def _delete(path: Callable[[Ctx], Awaitable[str]]) -> Trigger:
    async def run(c: Ctx) -> None:
        await c.api("DELETE", await path(c))

    return run


def _sf(action: str, **options: Any) -> Trigger:
    async def run(c: Ctx) -> None:
        await c.storefront(action, **options)

    return run


async def _course_path(c: Ctx) -> str:
    return f"/api/v1/courses/{await c.course()}"


async def _member_path(c: Ctx) -> str:
    return f"/api/v1/members/{await c.member()}"


async def _post_path(c: Ctx) -> str:
    return f"/api/v1/posts/{await c.made('/api/v1/posts', {'title': 'Studio news'})}"


async def _event_path(c: Ctx) -> str:
    return f"/api/v1/events/{await _event(c)}"


async def _lesson_path(c: Ctx) -> str:
    return f"/api/v1/lessons/{await _lesson(c)}"


async def _chapter_path(c: Ctx) -> str:
    made = await c.made("/api/v1/chapters", {"course_id": await c.course(), "title": "Basics"})
    return f"/api/v1/chapters/{made}"


async def _material_path(c: Ctx) -> str:
    made = await c.made(
        "/api/v1/materials", {"lesson_id": await _lesson(c), "title": "Notes", "kind": "text"}
    )
    return f"/api/v1/materials/{made}"


async def _coupon_path(c: Ctx) -> str:
    code = f"C{secrets.token_hex(3).upper()}"
    return f"/api/v1/coupons/{await c.made('/api/v1/coupons', {'code': code})}"


async def _plan_path(c: Ctx) -> str:
    return f"/api/v1/membership-plans/{await c.made('/api/v1/membership-plans', {'name': 'P'})}"


async def _download_path(c: Ctx) -> str:
    made = await c.made("/api/v1/digital-downloads", {"title": "Brush chart"})
    return f"/api/v1/digital-downloads/{made}"


async def _lecturer_path(c: Ctx) -> str:
    return f"/api/v1/lecturers/{await c.made('/api/v1/lecturers', {'name': 'Ines Duarte'})}"


async def _subscription_path(c: Ctx) -> str:
    return f"/api/v1/subscriptions/{await c.subscription()}"


async def _enroll(c: Ctx) -> None:
    course = await c.course("published")
    await c.made(f"/api/v1/members/{await c.member()}/enrollments", {"course_id": course})


async def _announce(c: Ctx) -> dict[str, Any]:
    made: dict[str, Any] = await c.api(
        "POST",
        "/api/v1/uploads",
        {"filename": "logo.png", "content_type": "image/png", "size_bytes": 68},
    )
    return made


async def _upload(c: Ctx) -> None:
    await _announce(c)


async def _confirm(c: Ctx) -> None:
    """Confirmed once its bytes are stored: the signed PUT (no token), then the confirm."""
    upload = await _announce(c)
    # On the platform origin, whose port the school API's settings name: sent to this
    # module's public port (its gateway), as the partner's client would reach it.
    url = urlsplit(upload["upload_url"])
    public = urlsplit(c.tenant.origin).port
    async with c.http.put(f"http://localhost:{public}{url.path}?{url.query}", data=png(68)) as resp:
        assert resp.status == 201, (resp.status, await resp.text())
    await c.api("POST", f"/api/v1/uploads/{upload['id']}/confirm")


S = Source
TRIGGERS: dict[str, Source] = {
    "course.created": S("POST /api/v1/courses", lambda c: c.course()),
    "course.updated": S("PATCH /api/v1/courses/{id}", _patch(_course_path, {"title": "Ink"})),
    "course.deleted": S("DELETE /api/v1/courses/{id}", _delete(_course_path)),
    "course.published": S(
        "PATCH /api/v1/courses/{id} with status published",
        _patch(_course_path, {"status": "published"}),
    ),
    "review.created": S("storefront review", _sf("review", rating=4)),
    "review.updated": S("storefront edit-review", _sf("edit-review", rating=3)),
    "review.deleted": S("storefront delete-review", _sf("delete-review")),
    "member.created": S("storefront signup", _sf("signup")),
    "member.enrolled": S("POST /api/v1/members", lambda c: c.member()),
    "member.updated": S("PATCH /api/v1/members/{id}", _patch(_member_path, {"name": "Noor A."})),
    "member.deleted": S("storefront remove-member", _remove_member),
    "member.unenrolled": S("storefront unenroll", _on_enrollment("unenroll")),
    "member.progressed": S("storefront progress", _on_enrollment("progress")),
    "enrollment.created": S("POST /api/v1/members/{id}/enrollments", _enroll),
    "enrollment.updated": S("storefront progress", _on_enrollment("progress")),
    "enrollment.deleted": S("storefront unenroll", _on_enrollment("unenroll")),
    "enrollment.completed": S(
        "storefront progress --percent 100", _on_enrollment("progress", percent=100)
    ),
    "order.created": S("storefront checkout", _sf("checkout")),
    "order.paid": S("storefront checkout --paid", _sf("checkout", paid=True)),
    "order.failed": S("storefront checkout --declined", _sf("checkout", declined=True)),
    "order.refunded": S("storefront refund", _refund),
    "post.created": S("POST /api/v1/posts", _post_path),
    "post.updated": S("PATCH /api/v1/posts/{id}", _patch(_post_path, {"title": "News"})),
    "post.deleted": S("DELETE /api/v1/posts/{id}", _delete(_post_path)),
    "post.published": S(
        "PATCH /api/v1/posts/{id} with status published",
        _patch(_post_path, {"status": "published"}),
    ),
    "event.created": S("POST /api/v1/events", _event),
    "event.updated": S("PATCH /api/v1/events/{id}", _patch(_event_path, {"location": "Park"})),
    "event.deleted": S("DELETE /api/v1/events/{id}", _delete(_event_path)),
    "event.cancelled": S(
        "PATCH /api/v1/events/{id} with status cancelled",
        _patch(_event_path, {"status": "cancelled"}),
    ),
    "event.attendee_registered": S("storefront register", _sf("register")),
    "event.attendee_cancelled": S("storefront cancel-registration", _sf("cancel-registration")),
    "chapter.created": S("POST /api/v1/chapters", _chapter_path),
    "chapter.updated": S("PATCH /api/v1/chapters/{id}", _patch(_chapter_path, {"title": "Ink"})),
    "chapter.deleted": S("DELETE /api/v1/chapters/{id}", _delete(_chapter_path)),
    "material.created": S("POST /api/v1/materials", _material_path),
    "material.updated": S(
        "PATCH /api/v1/materials/{id}", _patch(_material_path, {"title": "More notes"})
    ),
    "material.deleted": S("DELETE /api/v1/materials/{id}", _delete(_material_path)),
    "lesson.created": S("POST /api/v1/lessons", _lesson),
    "lesson.updated": S("PATCH /api/v1/lessons/{id}", _patch(_lesson_path, {"title": "Inks"})),
    "lesson.published": S(
        "PATCH /api/v1/lessons/{id} with status published",
        _patch(_lesson_path, {"status": "published"}),
    ),
    "coupon.created": S("POST /api/v1/coupons", _coupon_path),
    "coupon.updated": S("PATCH /api/v1/coupons/{id}", _patch(_coupon_path, {"active": False})),
    "coupon.redeemed": S(
        "storefront checkout --coupon CODE", _sf("checkout", paid=True, coupon="WELCOME10")
    ),
    "membership_plan.created": S("POST /api/v1/membership-plans", _plan_path),
    "membership_plan.updated": S(
        "PATCH /api/v1/membership-plans/{id}", _patch(_plan_path, {"name": "Plan"})
    ),
    "digital_download.created": S("POST /api/v1/digital-downloads", _download_path),
    "digital_download.updated": S(
        "PATCH /api/v1/digital-downloads/{id}", _patch(_download_path, {"title": "Chart"})
    ),
    "digital_download.published": S(
        "PATCH /api/v1/digital-downloads/{id} with status published",
        _patch(_download_path, {"status": "published"}),
    ),
    "comment.created": S("storefront comment", _sf("comment")),
    "comment.updated": S("storefront hide-comment", _sf("hide-comment")),
    "comment.deleted": S("storefront delete-comment", _sf("delete-comment")),
    "lecturer.created": S("POST /api/v1/lecturers", _lecturer_path),
    "lecturer.updated": S(
        "PATCH /api/v1/lecturers/{id}", _patch(_lecturer_path, {"bio": "Paints."})
    ),
    "subscription.created": S("POST /api/v1/subscriptions", lambda c: c.subscription()),
    "subscription.updated": S(
        "PATCH /api/v1/subscriptions/{id}", _patch(_subscription_path, {"status": "past_due"})
    ),
    "subscription.renewed": S("storefront renew", _renew),
    "subscription.cancelled": S("storefront cancel-subscription", _cancel_subscription),
    "settings.updated": S(
        "PATCH /api/v1/settings", lambda c: c.api("PATCH", "/api/v1/settings", {"tagline": "Hi"})
    ),
    "appearance.updated": S(
        "PATCH /api/v1/settings/appearance",
        lambda c: c.api("PATCH", "/api/v1/settings/appearance", {"theme": "dark"}),
    ),
    "upload.created": S("POST /api/v1/uploads", _upload),
    "upload.confirmed": S("POST /api/v1/uploads/{id}/confirm", _confirm),
    ENDPOINT_DISABLED: S(EVENT_TYPES[ENDPOINT_DISABLED].source, _endpoint_disabled),
}


def test_every_listed_type_has_a_trigger() -> None:
    """No listed type without a source the test drives, and each trigger uses the source the
    catalogue names for its type."""
    listed = [e.type for e in CATALOGUE]
    assert len(listed) == len(set(listed))
    assert set(listed) - set(TRIGGERS) == set(), "types without a trigger in TRIGGERS"
    assert set(TRIGGERS) - set(listed) == set(), "triggers for types the catalogue lacks"
    for entry in CATALOGUE:
        assert TRIGGERS[entry.type].source == entry.source, entry.type
        if entry.source.startswith("storefront "):
            assert entry.source.split()[1] in actions.ACTIONS, entry.source


# The end-to-end run ------------------------------------------------------------------------------


@dataclass
class Subscriber:
    scope: str
    app: App
    receiver: Receiver
    secret: str = ""


async def _gone_endpoint(aiohttp_server: AiohttpServer) -> str:
    """A webhook endpoint that says its URL is gone for good: the subscription is disabled."""

    async def gone(_request: web.Request) -> web.Response:
        return web.Response(status=410)

    app = web.Application()
    app.router.add_post("/gone", gone)
    server = await aiohttp_server(app, access_log=None, shutdown_timeout=0.5)
    return str(without_handler_cancellation(server).make_url("/gone"))


async def _connect(
    http: aiohttp.ClientSession,
    browser: PartnerBrowser,
    pool: asyncpg.Pool,
    settings: Settings,
    tenant: Tenant,
    scope: str,
    name: str,
) -> App:
    """An app the school admin made (dynamic registration is throttled per address, and this
    test needs fifteen), connected through the gateway by the quickstart's flow."""
    made = await clients.create_client(
        pool,
        settings,
        school=tenant.school,
        name=name,
        redirect_uris=[REDIRECT_URI],
        public=True,
        scopes=scope.split(),
    )
    return await connect_app(http, browser, tenant, scope, name, client_id=made.client.id)


def _allowed(scope: str) -> list[str]:
    return [e.type for e in CATALOGUE if e.scopes and satisfies((scope,), e.scopes)]


async def test_every_listed_type_is_delivered_to_its_scope_and_no_other(
    system: System,
    http: aiohttp.ClientSession,
    browser: PartnerBrowser,
    pool: asyncpg.Pool,
    gateway_settings: Settings,
    receivers: Callable[[], Awaitable[Receiver]],
    aiohttp_server: AiohttpServer,
) -> None:
    # What a partner reads, through the gateway, is this very table.
    async with http.get(f"{system.platform}/v1/webhooks/event-types") as resp:
        assert resp.status == 200
        served = (await resp.json())["data"]
    assert [t["type"] for t in served] == [e.type for e in CATALOGUE]
    for shown, entry in zip(served, CATALOGUE, strict=True):
        assert shown["scope"] == (entry.scopes[0] if entry.scopes else None)
        assert (shown["source"], shown["description"]) == (entry.source, entry.description)

    tenant = await new_tenant(pool, gateway_settings, system, "Catalogue Art School")
    connect = (http, browser, pool, gateway_settings, tenant)
    writer = await _connect(*connect, WRITE_SCOPES, "Writer")
    gating = list(dict.fromkeys(e.scopes[0] for e in CATALOGUE if e.scopes))
    subscribers = [
        Subscriber(scope, await _connect(*connect, scope, scope), await receivers())
        for scope in gating
    ]
    for sub in subscribers:
        status, _, made = await call(
            http,
            "POST",
            f"{tenant.origin}/api/v1/webhooks",
            sub.app.bearer(),
            {"url": sub.receiver.url, "event_types": [*_allowed(sub.scope), ENDPOINT_DISABLED]},
        )
        assert status == 201, made
        sub.secret = str(made["secret"])

    # Not to one without the scope: the subscription itself is refused.
    for entry in CATALOGUE:
        if not entry.scopes:
            continue
        outsider = next(s for s in subscribers if not satisfies((s.scope,), entry.scopes))
        status, _, body = await call(
            http,
            "POST",
            f"{tenant.origin}/api/v1/webhooks",
            outsider.app.bearer(),
            {"url": outsider.receiver.url, "event_types": [entry.type]},
        )
        assert (status, body["error"]) == (403, "insufficient_scope"), (entry.type, body)

    # endpoint.disabled: the courses:read app's second endpoint is gone; only its owner hears.
    owner = subscribers[0]
    status, _, made = await call(
        http,
        "POST",
        f"{tenant.origin}/api/v1/webhooks",
        owner.app.bearer(),
        {"url": await _gone_endpoint(aiohttp_server), "event_types": ["course.created"]},
    )
    assert status == 201, made

    ctx = Ctx(http, tenant, writer, pool)
    for entry in CATALOGUE:
        before = len(ctx.emitted)
        await TRIGGERS[entry.type].run(ctx)
        if entry.source.startswith("storefront "):
            # The action itself says it emitted the type (not a side effect of another).
            assert entry.type in ctx.emitted[before:], (entry.type, ctx.emitted[before:])

    expected = {
        sub.scope: set(_allowed(sub.scope)) | ({ENDPOINT_DISABLED} if sub is owner else set())
        for sub in subscribers
    }
    deadline = time.monotonic() + 30
    while True:
        seen = {s.scope: {r.event["type"] for r in s.receiver.received} for s in subscribers}
        if all(expected[s] <= seen[s] for s in expected) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)  # anything that should not come has had its chance to
    for sub in subscribers:
        got = sub.receiver.received
        types = {r.event["type"] for r in got}
        assert expected[sub.scope] - types == set(), (sub.scope, "missing")
        assert types - expected[sub.scope] == set(), (sub.scope, "not gated by its scope")
        for delivery in got:
            event = Webhook(sub.secret).verify(delivery.body, delivery.headers)
            assert event["school_id"] == tenant.school.id
            assert delivery.headers["webhook-id"] == event["id"]
    print(f"\n{len(CATALOGUE)} types, each delivered to its scope's subscriber and no other")


# The CLI -----------------------------------------------------------------------------------------


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        CLI,
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_storefront_cli_checks_out_a_paid_order_with_its_events(
    base_env: dict[str, str], pool: asyncpg.Pool, settings: Settings
) -> None:
    from services.identity import schools
    from services.school_api import seed

    school = await schools.create_school(
        pool, settings, f"sf{secrets.token_hex(4)}", "Storefront School", None
    )
    assert await seed.seed_school(pool, school.id, school.name)

    code, out, err = await _cli(
        base_env, "storefront", "checkout", "--school", school.subdomain, "--paid", "--json"
    )
    assert code == 0, err
    result = orjson.loads(out)
    assert result["events"][:2] == ["order.created", "order.paid"]
    assert result["order"]["status"] == "paid"
    outbox = await api_store.outbox_events_for(pool, school.id)
    assert [e["type"] for e in outbox] == result["events"]
    assert outbox[1]["data"]["id"] == result["order"]["id"]

    # Nothing to refund by that id: exit 1, a clear message, nothing written.
    code, out, err = await _cli(
        base_env, "storefront", "refund", "--school", str(school.id), "--order", "999999999"
    )
    assert code == 1
    assert "no paid order with id 999999999" in err
    assert len(await api_store.outbox_events_for(pool, school.id)) == len(outbox)

    code, out, _ = await _cli(base_env, "storefront", "signup", "--help")
    assert code == 0 and "member.created" in out


# The demo activity -------------------------------------------------------------------------------


async def test_demo_activity_acts_in_the_school_and_emits_only_listed_types(
    pool: asyncpg.Pool, settings: Settings
) -> None:
    """The `make dev` loop, run here over one school of its own (the run's other schools are
    other tests'): it keeps acting, every action's events are catalogue types, each action's
    rows and events commit together, and it stops when asked."""
    from services.identity import schools
    from services.school_api import seed

    school = await schools.create_school(
        pool, settings, f"demo{secrets.token_hex(4)}", "Demo Activity School", None
    )
    assert await seed.seed_school(pool, school.id, school.name)
    stop = asyncio.Event()
    rounds = 0

    def progressed() -> None:
        nonlocal rounds
        rounds += 1
        if rounds >= 25:
            stop.set()

    run = demo.loop(
        pool, 0.2, stop, on_progress=progressed, rng=random.Random(17), schools=[school.id]
    )
    await asyncio.wait_for(run(), 60)
    outbox = await api_store.outbox_events_for(pool, school.id)
    types = [e["type"] for e in outbox]
    assert len(set(types)) >= 5, types  # a varied stream, not one action over and over
    assert set(types) <= set(EVENT_TYPES), set(types) - set(EVENT_TYPES)
    paid = [e["data"] for e in outbox if e["type"] == "order.paid"]
    for order in paid:
        status = await pool.fetchval(
            "SELECT status FROM school_api.orders WHERE school_id = $1 AND id = $2",
            school.id,
            order["id"],
        )
        assert status in ("paid", "refunded")


@pytest.mark.parametrize(
    ("value", "problem"),
    [("often", "seconds"), ("0.01", "between"), ("5", "production")],
)
def test_demo_activity_setting_is_checked_at_start(value: str, problem: str) -> None:
    from libs.common.config import ConfigError, load_settings
    from tests.test_config import _production_env

    env = {"CONNECT_DEMO_ACTIVITY": value}
    if problem == "production":
        env = {**_production_env(), **env}
    with pytest.raises(ConfigError) as caught:
        load_settings(env, needs=frozenset())
    assert caught.value.variable == "CONNECT_DEMO_ACTIVITY"
    assert problem in caught.value.problem
    assert load_settings({"CONNECT_DEMO_ACTIVITY": "off"}, needs=frozenset()).demo_activity == 0
    assert load_settings({"CONNECT_DEMO_ACTIVITY": "2.5"}, needs=frozenset()).demo_activity == 2.5
