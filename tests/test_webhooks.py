"""Webhooks end to end: real PostgreSQL, Redis, sockets and receivers; no mocks.

The service runs once for the session (conftest `webhooks_url`), delivering from 127.0.0.2
with a 0.2/0.4/0.8 s retry schedule. Each test works in a school of its own, so the shared
dispatcher and sender never mix their deliveries up.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as redis_asyncio
from aiohttp import web
from cryptography.exceptions import InvalidTag
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry
from pytest_aiohttp import AiohttpClient, AiohttpServer
from standardwebhooks import Webhook

from libs.common import db, keys, streams, tasks
from libs.common.config import ConfigError, Settings, load_settings
from services.webhooks import dispatcher, signing, ssrf
from services.webhooks.context import WebhooksContext
from services.webhooks.delivery import attempt, egress
from services.webhooks.metrics import WebhookMetrics
from tests.support import (
    ExampleResolver,
    base_url,
    connect,
    database_env,
    free_port,
    wait_for_port,
    without_handler_cancellation,
)

pytestmark = pytest.mark.timeout(60)

CLI = str(Path(sys.executable).with_name("loopwise-connect"))

# -------------------------------------------------------------------------------------------------
# Helpers: receivers, callers, events


@dataclass
class Received:
    body: bytes
    headers: CIMultiDict[str]
    remote: str | None
    at: float


Behaviour = Callable[[int, web.Request], Awaitable[web.StreamResponse]]


async def _ok(_n: int, _request: web.Request) -> web.StreamResponse:
    return web.Response(text="thanks")


@dataclass
class Receiver:
    """A tiny real webhook receiver on 127.0.0.1 that records every request."""

    behaviour: Behaviour = _ok
    received: list[Received] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    url: str = ""
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            body = await request.read()
            self.received.append(
                Received(body, CIMultiDict(request.headers), request.remote, time.monotonic())
            )
            self._arrived.set()
            return await self.behaviour(len(self.received), request)
        finally:
            self.in_flight -= 1

    async def wait_for(self, count: int, timeout: float = 3.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"expected {count} deliveries within {timeout}s, got {len(self.received)}"
                )
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        return self.received


@pytest.fixture
def receivers(aiohttp_server: AiohttpServer) -> Callable[..., Awaitable[Receiver]]:
    """Start as many receivers as a test wants; all stop at its end."""

    async def start(behaviour: Behaviour = _ok) -> Receiver:
        receiver = Receiver(behaviour)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", receiver.handle)
        server = await aiohttp_server(app, access_log=None, shutdown_timeout=0.5)
        receiver.url = str(without_handler_cancellation(server).make_url("/hooks"))
        return receiver

    return start


def new_school() -> int:
    return 1_000_000 + secrets.randbelow(1_000_000_000)


@dataclass(frozen=True)
class Caller:
    school_id: int
    client_id: str = "client-a"
    grant_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    scopes: str = "courses:read"

    def headers(self, settings: Settings) -> dict[str, str]:
        return {
            "X-Connect-Internal-Token": settings.internal_token,
            "X-Connect-School-Id": str(self.school_id),
            "X-Connect-Client-Id": self.client_id,
            "X-Connect-Subject": "user-1",
            "X-Connect-Scopes": self.scopes,
            "X-Connect-Grant-Id": self.grant_id,
            "X-Request-Id": "test-" + secrets.token_hex(4),
        }


@dataclass
class Api:
    http: aiohttp.ClientSession
    base: str
    settings: Settings

    async def call(
        self, method: str, path: str, caller: Caller | None, body: Any = None
    ) -> tuple[int, Any]:
        headers = caller.headers(self.settings) if caller else {}
        async with self.http.request(
            method, self.base + path, headers=headers, json=body
        ) as response:
            payload = await response.json() if response.content_type == "application/json" else None
            return response.status, payload

    async def subscribe(
        self, caller: Caller, url: str, types: list[str] | None = None, **extra: Any
    ) -> dict[str, Any]:
        status, body = await self.call(
            "POST",
            "/api/v1/webhooks",
            caller,
            {"url": url, "event_types": types or ["course.*"], **extra},
        )
        assert status == 201, body
        return dict(body)

    async def deliveries(
        self, caller: Caller, webhook_id: str, query: str = ""
    ) -> list[dict[str, Any]]:
        status, body = await self.call(
            "GET", f"/api/v1/webhooks/{webhook_id}/deliveries{query}", caller
        )
        assert status == 200, body
        return list(body["data"])


@pytest.fixture
async def api(webhooks_url: str, webhooks_settings: Settings) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as http:
        yield Api(http, webhooks_url, webhooks_settings)


async def publish(
    redis: redis_asyncio.Redis,
    settings: Settings,
    school_id: int,
    kind: str = "course.updated",
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What the school API appends to connect:events for every change."""
    event = {
        "id": str(uuid.uuid4()),
        "type": kind,
        "school_id": school_id,
        "occurred_at": "2025-01-02T03:04:05Z",
        "data": data or {"id": 7, "school_id": school_id, "title": "Intro", "description": ""},
    }
    await streams.append(redis, settings.stream(streams.EVENTS), event)
    return event


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 4.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


# -------------------------------------------------------------------------------------------------
# Subscriptions API


async def test_subscribe_shows_the_secret_once_and_stores_it_sealed(
    api: Api, pool: asyncpg.Pool, webhooks_settings: Settings
) -> None:
    caller = Caller(new_school())
    made = await api.subscribe(
        caller, "https://hooks.example.com/in", ["course.updated"], description="CRM sync"
    )
    secret = made["secret"]
    assert secret.startswith("whsec_")
    key = base64.b64decode(secret.removeprefix("whsec_"))
    assert 24 <= len(key) <= 32
    assert made["event_types"] == ["course.updated"]
    assert made["description"] == "CRM sync"
    assert made["status"] == "active"

    status, shown = await api.call("GET", f"/api/v1/webhooks/{made['id']}", caller)
    assert status == 200
    assert "secret" not in shown
    assert shown["url"] == "https://hooks.example.com/in"
    status, listed = await api.call("GET", "/api/v1/webhooks", caller)
    assert [w["id"] for w in listed["data"]] == [made["id"]]
    assert "secret" not in listed["data"][0]
    assert listed["next_cursor"] is None

    row = await pool.fetchrow(
        "SELECT secret_enc, kek_id FROM webhooks.subscriptions WHERE id = $1",
        uuid.UUID(made["id"]),
    )
    sealed = bytes(row["secret_enc"])
    assert key not in sealed
    assert secret.encode() not in sealed
    kek = webhooks_settings.key_encryption_key
    assert signing.unseal(kek, uuid.UUID(made["id"]), sealed) == key
    # The subscription id is the associated data: the sealed secret opens nowhere else.
    with pytest.raises(InvalidTag):
        signing.unseal(kek, uuid.uuid4(), sealed)


async def test_an_event_type_needs_the_scope_that_gates_it(api: Api) -> None:
    school = new_school()
    courses_only = Caller(school, scopes="openid courses:read")
    status, body = await api.call(
        "POST",
        "/api/v1/webhooks",
        courses_only,
        {"url": "https://hooks.example.com/", "event_types": ["member.enrolled"]},
    )
    assert status == 403
    assert body["error"] == "insufficient_scope"
    assert body["scope"] == "students:read"

    status, body = await api.call(
        "POST",
        "/api/v1/webhooks",
        courses_only,
        {"url": "https://hooks.example.com/", "event_types": ["course.*", "order.paid"]},
    )
    assert (status, body["scope"]) == (403, "orders:read")

    status, body = await api.call(
        "POST",
        "/api/v1/webhooks",
        courses_only,
        {"url": "https://hooks.example.com/", "event_types": ["order.created"]},
    )
    assert (status, body["error"], body["scope"]) == (403, "insufficient_scope", "orders:read")

    status, body = await api.call(
        "POST",
        "/api/v1/webhooks",
        courses_only,
        {"url": "https://hooks.example.com/", "event_types": ["course.exploded"]},
    )
    assert (status, body["field"]) == (422, "event_types")

    # The legacy `read` umbrella holds every :read scope; appearance.* takes either of two,
    # settings.* (the whole settings) school:read only; endpoint.disabled is our own and
    # needs none.
    await api.subscribe(Caller(school, scopes="read"), "https://h.example.com/", ["member.*"])
    look_only = Caller(school, scopes="appearance:read")
    await api.subscribe(look_only, "https://h.example.com/", ["appearance.updated"])
    status, body = await api.call(
        "POST",
        "/api/v1/webhooks",
        look_only,
        {"url": "https://h.example.com/", "event_types": ["settings.updated"]},
    )
    assert (status, body["scope"]) == (403, "school:read")
    await api.subscribe(Caller(school, scopes="openid"), "https://h.example.com/",
                        ["endpoint.disabled"])  # fmt: skip

    # A PATCH is checked against the caller's scopes too.
    made = await api.subscribe(courses_only, "https://h.example.com/", ["course.*"])
    status, body = await api.call(
        "PATCH", f"/api/v1/webhooks/{made['id']}", courses_only, {"event_types": ["post.*"]}
    )
    assert (status, body["scope"]) == (403, "posts:read")


async def test_only_the_owning_client_at_the_owning_school_sees_a_subscription(api: Api) -> None:
    school = new_school()
    owner = Caller(school, client_id="client-a")
    made = await api.subscribe(owner, "https://hooks.example.com/")
    wid = made["id"]
    for stranger in (Caller(school, client_id="client-b"), Caller(new_school(), "client-a")):
        for method, path, body in (
            ("GET", f"/api/v1/webhooks/{wid}", None),
            ("PATCH", f"/api/v1/webhooks/{wid}", {"description": "mine now"}),
            ("DELETE", f"/api/v1/webhooks/{wid}", None),
            ("POST", f"/api/v1/webhooks/{wid}/rotate-secret", None),
            ("GET", f"/api/v1/webhooks/{wid}/deliveries", None),
        ):
            status, _ = await api.call(method, path, stranger, body)
            assert status == 404, (method, path)
        status, listed = await api.call("GET", "/api/v1/webhooks", stranger)
        assert listed["data"] == []
    status, _ = await api.call("PATCH", f"/api/v1/webhooks/{wid}", owner, {"description": "x"})
    assert status == 200
    status, _ = await api.call("DELETE", f"/api/v1/webhooks/{wid}", owner)
    assert status == 204
    status, _ = await api.call("GET", f"/api/v1/webhooks/{wid}", owner)
    assert status == 404


async def test_calls_must_come_through_the_gateway(api: Api) -> None:
    caller = Caller(new_school())
    headers = caller.headers(api.settings)
    for token in (None, "x" * 64):
        sent = {k: v for k, v in headers.items() if k != "X-Connect-Internal-Token"}
        if token:
            sent["X-Connect-Internal-Token"] = token
        async with api.http.get(api.base + "/api/v1/webhooks", headers=sent) as response:
            assert response.status == 401


async def test_list_pages_with_a_cursor(api: Api) -> None:
    caller = Caller(new_school())
    made = [await api.subscribe(caller, f"https://h{i}.example.com/") for i in range(3)]
    status, first = await api.call("GET", "/api/v1/webhooks?limit=2", caller)
    assert status == 200
    assert len(first["data"]) == 2
    status, second = await api.call(
        "GET", f"/api/v1/webhooks?limit=2&cursor={first['next_cursor']}", caller
    )
    assert second["next_cursor"] is None
    assert [w["id"] for w in first["data"] + second["data"]] == [m["id"] for m in made]


# -------------------------------------------------------------------------------------------------
# Delivery


async def test_an_event_arrives_signed_from_the_egress_address(
    api: Api, receivers: Any, redis: redis_asyncio.Redis, webhooks_settings: Settings
) -> None:
    receiver = await receivers()
    school = new_school()
    caller = Caller(school)
    made = await api.subscribe(caller, receiver.url, ["course.*"])
    # Another school's event, and a type not subscribed, never arrive.
    await publish(redis, webhooks_settings, new_school(), "course.updated")
    await publish(redis, webhooks_settings, school, "member.enrolled")
    started = time.monotonic()
    event = await publish(redis, webhooks_settings, school, "course.updated")
    (got,) = await receiver.wait_for(1, timeout=1.0)
    assert got.at - started < 1.0

    payload = Webhook(made["secret"]).verify(got.body, got.headers)
    assert payload == event
    assert got.headers["webhook-id"] == event["id"]
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["User-Agent"] == "Loopwise-Connect-Webhooks/1"
    assert got.remote == "127.0.0.2"
    await asyncio.sleep(0.4)
    assert len(receiver.received) == 1

    async def delivered() -> bool:
        found = await api.deliveries(caller, made["id"])
        return bool(found) and found[0]["status"] == "delivered"

    await eventually(delivered)
    (logged,) = await api.deliveries(caller, made["id"])
    assert logged["event_id"] == event["id"]
    (attempt,) = logged["attempts"]
    assert attempt["response_status"] == 200
    assert attempt["response_excerpt"] == "thanks"
    assert attempt["latency_ms"] >= 0
    assert attempt["next_attempt_at"] is None


async def test_malformed_entries_are_set_aside_without_holding_up_the_stream(
    api: Api, receivers: Any, redis: redis_asyncio.Redis, webhooks_settings: Settings
) -> None:
    receiver = await receivers()
    caller = Caller(new_school())
    await api.subscribe(caller, receiver.url)
    stream = webhooks_settings.stream(streams.EVENTS)
    for bad in (
        {"type": "course.updated"},  # no school
        {"type": "Course Updated!", "school_id": caller.school_id},
        {"type": "course.updated", "school_id": caller.school_id, "id": "has space"},
        {"type": "course.updated", "school_id": True},
    ):
        await streams.append(redis, stream, bad)
    event = await publish(redis, webhooks_settings, caller.school_id)
    (got,) = await receiver.wait_for(1)
    assert got.headers["webhook-id"] == event["id"]

    async def nothing_pending() -> bool:
        return int((await redis.xpending(stream, dispatcher.GROUP))["pending"]) == 0

    await eventually(nothing_pending)


async def test_a_failure_is_retried_with_the_same_id_and_a_fresh_signature(
    api: Api, receivers: Any, redis: redis_asyncio.Redis, webhooks_settings: Settings
) -> None:
    async def fail_first(n: int, _request: web.Request) -> web.Response:
        return web.Response(status=500, text="x" * 500) if n == 1 else web.Response(text="ok")

    receiver = await receivers(fail_first)
    caller = Caller(new_school())
    made = await api.subscribe(caller, receiver.url)
    event = await publish(redis, webhooks_settings, caller.school_id)
    first, second = await receiver.wait_for(2)
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == event["id"]
    assert first.body == second.body
    assert second.at - first.at >= 0.18
    for got in (first, second):
        Webhook(made["secret"]).verify(got.body, got.headers)

    async def delivered() -> bool:
        found = await api.deliveries(caller, made["id"])
        return found[0]["status"] == "delivered"

    await eventually(delivered)
    (logged,) = await api.deliveries(caller, made["id"])
    statuses = [a["response_status"] for a in logged["attempts"]]
    assert statuses == [500, 200]
    # Only a short excerpt of an answer is kept.
    assert logged["attempts"][0]["response_excerpt"] == "x" * 200
    assert logged["attempts"][0]["next_attempt_at"] is not None
    assert logged["attempt_count"] == 2


async def test_retry_after_is_honoured_and_the_timestamp_is_the_attempts(
    api: Api, receivers: Any, redis: redis_asyncio.Redis, webhooks_settings: Settings
) -> None:
    async def busy_first(n: int, _request: web.Request) -> web.Response:
        if n == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(text="ok")

    receiver = await receivers(busy_first)
    caller = Caller(new_school())
    made = await api.subscribe(caller, receiver.url)
    await publish(redis, webhooks_settings, caller.school_id)
    first, second = await receiver.wait_for(2, timeout=4)
    # The schedule says 0.2 s; the receiver asked for 1 s.
    assert second.at - first.at >= 0.95
    assert int(second.headers["webhook-timestamp"]) > int(first.headers["webhook-timestamp"])
    Webhook(made["secret"]).verify(second.body, second.headers)


async def test_exhausted_retries_go_dead_and_a_retry_delivers_again(
    api: Api, receivers: Any, redis: redis_asyncio.Redis, webhooks_settings: Settings
) -> None:
    healthy = False

    async def down(_n: int, _request: web.Request) -> web.Response:
        return web.Response(text="ok") if healthy else web.Response(status=503, text="down")

    receiver = await receivers(down)
    caller = Caller(new_school())
    made = await api.subscribe(caller, receiver.url)
    await publish(redis, webhooks_settings, caller.school_id)
    # One attempt plus one per entry of the 0.2,0.4,0.8 schedule.
    await receiver.wait_for(4, timeout=5)

    async def dead() -> bool:
        return bool(await api.deliveries(caller, made["id"], "?status=dead"))

    await eventually(dead)
    (letter,) = await api.deliveries(caller, made["id"], "?status=dead")
    assert letter["attempt_count"] == 4
    assert letter["next_attempt_at"] is None
    assert [a["outcome"] for a in letter["attempts"]] == ["retry", "retry", "retry", "dead"]
    await asyncio.sleep(0.5)
    assert len(receiver.received) == 4

    healthy = True
    status, body = await api.call(
        "POST", f"/api/v1/webhooks/{made['id']}/deliveries/{letter['id']}/retry", caller
    )
    assert status == 202, body
    fifth = (await receiver.wait_for(5, timeout=2))[4]
    assert fifth.headers["webhook-id"] == receiver.received[0].headers["webhook-id"]

    async def delivered() -> bool:
        found = await api.deliveries(caller, made["id"])
        return found[0]["status"] == "delivered"

    await eventually(delivered)
    assert await api.deliveries(caller, made["id"], "?status=dead") == []
    status, sub = await api.call("GET", f"/api/v1/webhooks/{made['id']}", caller)
    assert sub["status"] == "active"


async def test_gone_disables_the_subscription_and_tells_the_owners_other_endpoints(
    api: Api, receivers: Any, redis: redis_asyncio.Redis, webhooks_settings: Settings
) -> None:
    async def gone(_n: int, _request: web.Request) -> web.Response:
        return web.Response(status=410)

    school = new_school()
    owner = Caller(school, client_id="client-a")
    stranger = Caller(school, client_id="client-b")
    gone_receiver = await receivers(gone)
    owner_ears = await receivers()
    stranger_ears = await receivers()
    made = await api.subscribe(owner, gone_receiver.url, ["course.*"])
    listener = await api.subscribe(owner, owner_ears.url, ["endpoint.disabled"])
    await api.subscribe(stranger, stranger_ears.url, ["endpoint.*"])

    await publish(redis, webhooks_settings, school)
    await gone_receiver.wait_for(1)
    (notice,) = await owner_ears.wait_for(1)
    announced = Webhook(listener["secret"]).verify(notice.body, notice.headers)
    assert announced["type"] == "endpoint.disabled"
    assert announced["school_id"] == school
    assert announced["data"]["id"] == made["id"]
    assert announced["data"]["reason"] == "gone"

    status, sub = await api.call("GET", f"/api/v1/webhooks/{made['id']}", owner)
    assert (sub["status"], sub["disabled_reason"]) == ("disabled", "gone")
    await publish(redis, webhooks_settings, school)
    await asyncio.sleep(0.5)
    assert len(gone_receiver.received) == 1
    assert stranger_ears.received == []
    # A disabled webhook's deliveries are not retried until it is enabled again.
    (dead,) = await api.deliveries(owner, made["id"])
    status, _ = await api.call(
        "POST", f"/api/v1/webhooks/{made['id']}/deliveries/{dead['id']}/retry", owner
    )
    assert status == 409
    status, sub = await api.call(
        "PATCH", f"/api/v1/webhooks/{made['id']}", owner, {"disabled": False}
    )
    assert (status, sub["status"], sub["disabled_reason"]) == (200, "active", None)


async def test_days_of_failures_disable_the_subscription(
    api: Api,
    receivers: Any,
    redis: redis_asyncio.Redis,
    webhooks_settings: Settings,
    pool: asyncpg.Pool,
) -> None:
    async def broken(_n: int, _request: web.Request) -> web.Response:
        return web.Response(status=500)

    receiver = await receivers(broken)
    caller = Caller(new_school())
    made = await api.subscribe(caller, receiver.url)
    # As if it had been failing since six days ago (the period is five).
    await pool.execute(
        "UPDATE webhooks.subscriptions SET failing_since = now() - interval '6 days' WHERE id = $1",
        uuid.UUID(made["id"]),
    )
    await publish(redis, webhooks_settings, caller.school_id)
    await receiver.wait_for(1)

    async def disabled() -> bool:
        _, sub = await api.call("GET", f"/api/v1/webhooks/{made['id']}", caller)
        return bool(sub["status"] == "disabled")

    await eventually(disabled)
    _, sub = await api.call("GET", f"/api/v1/webhooks/{made['id']}", caller)
    assert sub["disabled_reason"] == "failing"
    await asyncio.sleep(0.5)
    assert len(receiver.received) == 1
    # Its pending retry went with it.
    (cancelled,) = await api.deliveries(caller, made["id"])
    assert cancelled["status"] == "cancelled"


async def test_a_revoked_grant_mark_stops_delivery_at_once(
    api: Api, receivers: Any, redis: redis_asyncio.Redis, webhooks_settings: Settings
) -> None:
    receiver = await receivers()
    caller = Caller(new_school())
    made = await api.subscribe(caller, receiver.url)
    # What identity's revoke sets before it answers.
    await redis.set(
        keys.revoked_mark(webhooks_settings, caller.school_id, caller.grant_id), "user", ex=60
    )
    await publish(redis, webhooks_settings, caller.school_id)

    async def cancelled() -> bool:
        found = await api.deliveries(caller, made["id"])
        return bool(found) and found[0]["status"] == "cancelled"

    await eventually(cancelled)
    await asyncio.sleep(0.3)
    assert receiver.received == []
    _, sub = await api.call("GET", f"/api/v1/webhooks/{made['id']}", caller)
    assert (sub["status"], sub["disabled_reason"]) == ("disabled", "grant_revoked")


async def test_a_revocation_stops_deliveries_waiting_their_turn(
    api: Api, receivers: Any, redis: redis_asyncio.Redis, webhooks_settings: Settings
) -> None:
    """Deliveries leased ahead for a busy endpoint are checked again right before sending."""

    async def slow(_n: int, _request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return web.Response(text="ok")

    receiver = await receivers(slow)
    caller = Caller(new_school())
    made = await api.subscribe(caller, receiver.url)
    for _ in range(6):
        await publish(redis, webhooks_settings, caller.school_id)
    # WEBHOOK_ENDPOINT_CONCURRENCY is 4: four go out, two wait for a turn.
    await eventually(lambda: _true(receiver.in_flight == 4))
    await redis.set(
        keys.revoked_mark(webhooks_settings, caller.school_id, caller.grant_id), "u", ex=60
    )

    async def settled() -> bool:
        found = await api.deliveries(caller, made["id"])
        return sorted(d["status"] for d in found) == ["cancelled"] * 2 + ["delivered"] * 4

    await eventually(settled, timeout=5)
    assert len(receiver.received) == 4


async def test_a_revocation_on_the_stream_disables_the_grants_subscriptions(
    api: Api, receivers: Any, redis: redis_asyncio.Redis, webhooks_settings: Settings
) -> None:
    async def failing(_n: int, _request: web.Request) -> web.Response:
        return web.Response(status=500)

    receiver = await receivers(failing)
    school = new_school()
    caller = Caller(school)
    other_grant = Caller(school)
    made = await api.subscribe(caller, receiver.url)
    kept = await api.subscribe(other_grant, "https://hooks.example.com/")
    await publish(redis, webhooks_settings, school)
    await receiver.wait_for(1)
    # As identity announces a revoke (no Redis mark: only the stream tells us here).
    await streams.append(
        redis,
        webhooks_settings.stream(streams.REVOCATIONS),
        {"grant_id": caller.grant_id, "reason": "user", "at": time.time(), "ttl": 60},
    )

    async def disabled() -> bool:
        _, sub = await api.call("GET", f"/api/v1/webhooks/{made['id']}", caller)
        return bool(sub["status"] == "disabled")

    await eventually(disabled)
    seen = len(receiver.received)
    await publish(redis, webhooks_settings, school)
    await asyncio.sleep(1.0)
    # Neither the pending retries nor the new event go out.
    assert len(receiver.received) == seen
    assert {d["status"] for d in await api.deliveries(caller, made["id"])} == {"cancelled"}
    _, other = await api.call("GET", f"/api/v1/webhooks/{kept['id']}", other_grant)
    assert other["status"] == "active"
    # The revoked grant cannot subscribe again.
    status, _ = await api.call(
        "POST",
        "/api/v1/webhooks",
        caller,
        {"url": "https://hooks.example.com/", "event_types": ["course.*"]},
    )
    assert status == 401


async def test_entries_a_dead_dispatcher_read_are_claimed_and_delivered(
    api: Api,
    receivers: Any,
    redis: redis_asyncio.Redis,
    webhooks_env: dict[str, str],
    pool: asyncpg.Pool,
) -> None:
    """A stream of its own (another key prefix), so the session's dispatcher is not racing:
    a consumer reads two entries and dies; a second dispatcher claims and records them, and
    the session's sender (woken by NOTIFY, another "process") delivers them."""
    prefix = f"{webhooks_env['REDIS_KEY_PREFIX']}claim{secrets.token_hex(3)}:"
    settings = load_settings({**webhooks_env, "REDIS_KEY_PREFIX": prefix})
    stream = settings.stream(streams.EVENTS)
    receiver = await receivers()
    caller = Caller(new_school())
    made = await api.subscribe(caller, receiver.url)
    await streams.ensure_group(redis, stream, dispatcher.GROUP)
    events = [await publish(redis, settings, caller.school_id) for _ in range(2)]
    taken = await streams.read_group(redis, stream, dispatcher.GROUP, "dead-one", count=10)
    assert len(taken) == 2  # ...and it never acknowledges them.

    ctx = WebhooksContext(
        settings=settings,
        pool=pool,
        redis=redis,
        metrics=WebhookMetrics(CollectorRegistry()),
        policy=ssrf.AddressPolicy(allow_loopback=True),
    )
    survivor = asyncio.create_task(dispatcher.run(ctx, "survivor"))
    try:
        got = await receiver.wait_for(2, timeout=5)
        assert {g.headers["webhook-id"] for g in got} == {e["id"] for e in events}
        pending = await redis.xpending(stream, dispatcher.GROUP)
        assert pending["pending"] == 0
    finally:
        # As the service stops it: a cancel landing in redis-py's blocking read can be lost.
        await tasks.stop_all([survivor], grace=0)
    assert survivor.done()
    # Dispatching the same entries again (a dispatcher that recorded but died before its
    # acknowledgement) makes no second delivery.
    assert await dispatcher.handle(ctx, taken) == 0
    await asyncio.sleep(0.3)
    assert len(receiver.received) == 2
    assert len(await api.deliveries(caller, made["id"])) == 2
    await redis.delete(stream)


async def test_a_dead_senders_lease_runs_out_and_the_delivery_is_sent(
    api: Api,
    receivers: Any,
    redis: redis_asyncio.Redis,
    webhooks_settings: Settings,
    pool: asyncpg.Pool,
) -> None:
    async def fail_first(n: int, _request: web.Request) -> web.Response:
        return web.Response(status=500) if n == 1 else web.Response(text="ok")

    receiver = await receivers(fail_first)
    caller = Caller(new_school())
    made = await api.subscribe(caller, receiver.url)
    await publish(redis, webhooks_settings, caller.school_id)
    await receiver.wait_for(1)

    async def retry_recorded() -> bool:
        found = await api.deliveries(caller, made["id"])
        return bool(found) and found[0]["attempt_count"] == 1

    await eventually(retry_recorded)
    # A sender claimed the retry and died: its lease holds the row for 1.5 s more.
    await pool.execute(
        "UPDATE webhooks.deliveries SET next_attempt_at = now(),"
        " locked_until = now() + interval '1.5 seconds', locked_by = 'dead-sender'"
        " WHERE subscription_id = $1",
        uuid.UUID(made["id"]),
    )
    leased_at = time.monotonic()
    second = (await receiver.wait_for(2, timeout=4))[1]
    assert second.at - leased_at >= 1.2


async def test_rotated_secrets_both_verify_during_the_overlap(
    api: Api, receivers: Any, redis: redis_asyncio.Redis, webhooks_settings: Settings
) -> None:
    receiver = await receivers()
    caller = Caller(new_school())
    made = await api.subscribe(caller, receiver.url)
    status, rotated = await api.call("POST", f"/api/v1/webhooks/{made['id']}/rotate-secret", caller)
    assert status == 200
    assert rotated["secret"].startswith("whsec_")
    assert rotated["secret"] != made["secret"]
    assert rotated["previous_secret_expires_at"]
    await publish(redis, webhooks_settings, caller.school_id)
    (got,) = await receiver.wait_for(1)
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    Webhook(made["secret"]).verify(got.body, got.headers)
    Webhook(rotated["secret"]).verify(got.body, got.headers)


async def test_redirects_are_not_followed(
    api: Api, receivers: Any, redis: redis_asyncio.Redis, webhooks_settings: Settings
) -> None:
    elsewhere = await receivers()

    async def redirect(_n: int, _request: web.Request) -> web.Response:
        return web.Response(status=307, headers={"Location": elsewhere.url})

    receiver = await receivers(redirect)
    caller = Caller(new_school())
    made = await api.subscribe(caller, receiver.url)
    await publish(redis, webhooks_settings, caller.school_id)
    await receiver.wait_for(2)
    assert elsewhere.received == []
    found = await api.deliveries(caller, made["id"])
    first = found[0]["attempts"][0]
    assert first["response_status"] == 307
    assert first["error"] == "redirects are not followed"
    assert first["outcome"] == "retry"


async def test_a_slow_receiver_does_not_hold_up_a_fast_one(
    api: Api, receivers: Any, redis: redis_asyncio.Redis, webhooks_settings: Settings
) -> None:
    async def slow(_n: int, _request: web.Request) -> web.Response:
        await asyncio.sleep(1.5)
        return web.Response(text="ok")

    slow_receiver = await receivers(slow)
    fast_receiver = await receivers()
    school = new_school()
    await api.subscribe(Caller(school, client_id="slow-app"), slow_receiver.url)
    await api.subscribe(Caller(school, client_id="fast-app"), fast_receiver.url)
    started = time.monotonic()
    for _ in range(12):
        await publish(redis, webhooks_settings, school)
    await fast_receiver.wait_for(12, timeout=1.5)
    assert time.monotonic() - started < 1.5
    # WEBHOOK_ENDPOINT_CONCURRENCY is 4 in this run.
    assert slow_receiver.max_in_flight <= 4
    assert len(slow_receiver.received) <= 4


async def test_serve_webhooks_finishes_an_in_flight_delivery_on_sigterm(
    webhooks_env: dict[str, str], receivers: Any, redis: redis_asyncio.Redis
) -> None:
    """`loopwise-connect serve webhooks` as a real process, with a database of its own (so
    the session's sender cannot take the delivery): stopped mid-request, it lets the request
    finish and records it before exiting."""

    async def slow(_n: int, _request: web.Request) -> web.Response:
        await asyncio.sleep(1.0)
        return web.Response(text="ok")

    receiver = await receivers(slow)
    port = free_port()
    env = {
        **webhooks_env,
        **database_env(webhooks_env, webhooks_env["DATABASE_URL"] + "_stop"),
        # Under the run's prefix, so the session's cleanup removes its keys too.
        "REDIS_KEY_PREFIX": f"{webhooks_env['REDIS_KEY_PREFIX']}stop{secrets.token_hex(3)}:",
        "WEBHOOKS_PORT": str(port),
    }
    settings = load_settings(env)
    await db.migrate(settings.database_url)
    proc = await asyncio.create_subprocess_exec(
        CLI, "serve", "webhooks", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        await wait_for_port(port)
        async with aiohttp.ClientSession() as http:
            api = Api(http, f"http://127.0.0.1:{port}", settings)
            caller = Caller(new_school())
            made = await api.subscribe(caller, receiver.url)
            await publish(redis, settings, caller.school_id)
            await eventually(lambda: _true(receiver.in_flight == 1))
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 15)
        assert proc.returncode == 0
        assert receiver.in_flight == 0
        conn = await connect(settings.database_url)
        try:
            status = await conn.fetchval(
                "SELECT status FROM webhooks.deliveries WHERE subscription_id = $1",
                uuid.UUID(made["id"]),
            )
        finally:
            await conn.close()
        assert status == "delivered"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await db.drop_database(settings.database_url)
        await redis.delete(settings.stream(streams.EVENTS))


async def _true(value: bool) -> bool:
    return value


# -------------------------------------------------------------------------------------------------
# SSRF


async def api_without_workers(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, settings: Settings
) -> Api:
    """The webhooks API on `settings` with no workers running, served until the test's end,
    and a client to it."""
    from services.webhooks.app import create_app

    app = create_app(settings, workers=False, resolver=ExampleResolver())
    server = await aiohttp_server(app, access_log=None, shutdown_timeout=2)
    client = await aiohttp_client(without_handler_cancellation(server))
    return Api(client.session, base_url(server), settings)


@pytest.fixture
async def strict_api(
    webhooks_env: dict[str, str],
    migrated: None,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
) -> Api:
    """The API as production would check URLs: loopback refused (no workers running)."""
    settings = load_settings({**webhooks_env, "WEBHOOK_ALLOW_LOOPBACK": "false"})
    return await api_without_workers(aiohttp_server, aiohttp_client, settings)


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://[::ffff:127.0.0.1]/",
        "http://127.0.0.1:8080/",
        "http://[::1]/",
        "http://localhost/",
        "http://100.64.0.1/",
        "http://192.168.1.10/",
        "http://[fd00:ec2::254]/",
        "http://[fe80::1]/",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "http://2130706433/",
        "http://0x7f.1/",
        "http://user:pass@hooks.example.com/",
        "ftp://hooks.example.com/",
        "not a url",
    ],
)
async def test_unsafe_urls_are_refused_at_subscribe_time(strict_api: Api, url: str) -> None:
    status, body = await strict_api.call(
        "POST",
        "/api/v1/webhooks",
        Caller(new_school()),
        {"url": url, "event_types": ["course.*"]},
    )
    assert status == 422, body
    assert body["field"] == "url"


async def test_urls_are_checked_again_when_changed(strict_api: Api) -> None:
    caller = Caller(new_school())
    made = await strict_api.subscribe(caller, "https://hooks.example.com/")
    status, body = await strict_api.call(
        "PATCH", f"/api/v1/webhooks/{made['id']}", caller, {"url": "http://10.1.2.3/"}
    )
    assert (status, body["field"]) == (422, "url")


def test_https_is_required_outside_development() -> None:
    policy = ssrf.AddressPolicy()
    with pytest.raises(ssrf.UnsafeUrl):
        ssrf.check_url("http://hooks.example.com/", policy, require_https=True)
    assert ssrf.check_url("https://hooks.example.com/x?y=1", policy, require_https=True)


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("::1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.0.1", False),
        ("100.64.0.1", False),
        ("169.254.169.254", False),
        ("169.254.1.1", False),
        ("fd00:ec2::254", False),
        ("fc00::1", False),
        ("fe80::1", False),
        ("fec0::1", False),  # site-local, deprecated
        ("feff:ffff::1", False),
        ("ff02::1", False),
        ("224.0.0.1", False),
        ("0.0.0.0", False),
        ("::", False),
        ("::ffff:10.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("2002:a00:1::", False),  # 6to4 of 10.0.0.1
        ("192.0.2.1", False),  # documentation
    ],
)
def test_address_policy(address: str, allowed: bool) -> None:
    assert (ssrf.AddressPolicy().problem(address) is None) is allowed


def _local() -> dict[str, str]:
    """Settings for a sender built by hand (no stores needed)."""
    return {"CONNECT_ENV": "test", "KEY_ENCRYPTION_KEY": "A" * 43, "SECRET_PEPPER": "B" * 43}


async def test_delivery_refuses_a_name_that_resolves_to_a_forbidden_address(
    receivers: Any,
) -> None:
    """DNS is checked on the address actually connected to: `localhost` resolves to
    loopback, which this policy forbids, so the connection is never made."""
    receiver = await receivers()
    port = int(receiver.url.split(":")[2].split("/")[0])
    strict = ssrf.AddressPolicy(allow_loopback=False)
    resolver = ssrf.GuardedResolver(strict)
    with pytest.raises(ssrf.BlockedAddress, match="loopback"):
        await resolver.resolve("localhost", port)

    settings = load_settings(_local())
    async with egress.make_session(settings, resolver) as session:
        result = await attempt.post(
            session,
            f"http://localhost:{port}/hooks",
            b"{}",
            {},
            timeout=2,
            policy=strict,
            resolver=resolver,
        )
        assert result.status is None
        assert "loopback" in (result.error or "")
        literal = await attempt.post(
            session,
            f"http://127.0.0.1:{port}/hooks",
            b"{}",
            {},
            timeout=2,
            policy=strict,
            resolver=resolver,
        )
        assert "loopback" in (literal.error or "")
    assert receiver.received == []

    # The same name passes where loopback is allowed (development).
    relaxed = ssrf.GuardedResolver(ssrf.AddressPolicy(allow_loopback=True))
    assert any(r["host"] == "127.0.0.1" for r in await relaxed.resolve("localhost", port))


async def test_through_the_egress_proxy_the_checked_address_is_pinned(receivers: Any) -> None:
    """With WEBHOOK_EGRESS_PROXY, the proxy is handed the address we checked (so it cannot
    resolve the name to something else), while Host still names the receiver."""
    receiver = await receivers()
    port = int(receiver.url.split(":")[2].split("/")[0])
    seen: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body = await reader.readexactly(length)
        request_line, *header_lines = head.decode().rstrip("\r\n").split("\r\n")
        target = request_line.split(" ")[1]  # absolute-form: http://127.0.0.1:port/hooks
        host, _, rest = target.removeprefix("http://").partition("/")
        up_reader, up_writer = await asyncio.open_connection(*host.split(":"))
        kept = [h for h in header_lines if not h.lower().startswith(("connection", "proxy-"))]
        forwarded = "\r\n".join([f"POST /{rest} HTTP/1.1", *kept, "Connection: close", "", ""])
        up_writer.write(forwarded.encode() + body)
        await up_writer.drain()
        writer.write(await up_reader.read())
        await writer.drain()
        up_writer.close()
        writer.close()

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    proxy_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    policy = ssrf.AddressPolicy(allow_loopback=True)
    settings = load_settings({**_local(), "WEBHOOK_EGRESS_PROXY": proxy_url})
    resolver = egress.make_resolver(settings, policy)
    try:
        async with egress.make_session(settings, resolver) as session:
            result = await attempt.post(
                session,
                f"http://localhost:{port}/hooks",
                b'{"a":1}',
                {"content-type": "application/json"},
                timeout=3,
                policy=policy,
                resolver=resolver,
                proxy=proxy_url,
            )
    finally:
        server.close()
    assert result.status == 200, result
    (head,) = seen
    assert head.startswith(f"POST http://127.0.0.1:{port}/hooks HTTP/1.1".encode())
    assert f"Host: localhost:{port}".encode() in head
    (got,) = receiver.received
    assert got.body == b'{"a":1}'


# -------------------------------------------------------------------------------------------------
# Public documents, operations, configuration


async def test_egress_ips_and_event_types_are_published(api: Api) -> None:
    async with api.http.get(api.base + "/v1/webhooks/egress-ips") as response:
        assert response.status == 200
        assert await response.json() == {"egress_ips": ["127.0.0.2"]}
    async with api.http.get(api.base + "/v1/webhooks/event-types") as response:
        table = await response.json()
    types = {t["type"]: t["scopes"] for t in table["data"]}
    assert types["member.enrolled"] == ["students:read"]
    assert types["course.updated"] == ["courses:read"]
    assert types["endpoint.disabled"] == []
    wildcards = {w["pattern"]: w["scopes"] for w in table["wildcards"]}
    assert wildcards["settings.*"] == ["school:read"]
    assert wildcards["appearance.*"] == ["appearance:read", "school:read"]


def test_every_type_the_school_api_publishes_is_subscribable_with_its_scopes() -> None:
    """The published table and the producer agree (a drift here would make an event
    unsubscribable, or gated by the wrong scope)."""
    from services.school_api.resources import event_scopes
    from services.webhooks.event_types import EVENT_TYPES

    for event_type, scopes in event_scopes().items():
        assert event_type in EVENT_TYPES, event_type
        assert EVENT_TYPES[event_type].scopes == tuple(scopes), event_type


async def test_probes_metrics_and_openapi(api: Api) -> None:
    async with api.http.get(api.base + "/healthz") as response:
        assert response.status == 200
    async with api.http.get(api.base + "/readyz") as response:
        assert response.status == 200
        checks = (await response.json())["checks"]
        assert checks == {"postgresql": True, "redis": True, "background": True}
    async with api.http.get(api.base + "/metrics") as response:
        text = await response.text()
    assert "webhook_delivery_attempts_total" in text
    assert "webhook_delivery_duration_seconds_bucket" in text
    assert "webhook_queue_due" in text
    assert 'webhook_stream_lag{stream="connect:events"}' in text
    async with api.http.get(api.base + "/openapi.json") as response:
        doc = await response.json()
    assert "/api/v1/webhooks/{id}/deliveries/{delivery_id}/retry" in doc["paths"]
    assert "/v1/webhooks/egress-ips" in doc["paths"]


async def test_no_such_route_or_method_is_a_json_error(api: Api) -> None:
    # Found by fuzzing: aiohttp's own 404/405 went out as text/plain, not the JSON error shape.
    caller = Caller(new_school())
    for method, path, status, error in (
        ("PUT", "/api/v1/webhooks", 405, "method_not_allowed"),
        ("POST", f"/api/v1/webhooks/{uuid.uuid4()}", 405, "method_not_allowed"),
        ("GET", "/api/v1/webhooks/a/b/c/d/e", 404, "not_found"),
        ("GET", "/v1/webhooks/no-such-document", 404, "not_found"),
    ):
        async with api.http.request(
            method, api.base + path, headers=caller.headers(api.settings)
        ) as response:
            assert response.status == status, (method, path)
            assert response.content_type == "application/json", (method, path)
            assert (await response.json())["error"] == error, (method, path)
            if status == 405:
                assert "GET" in response.headers["Allow"]


def _production() -> dict[str, str]:
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    return {
        "CONNECT_ENV": "production",
        "KEY_ENCRYPTION_KEY": key,
        "SECRET_PEPPER": key,
        "INTERNAL_TOKEN": secrets.token_urlsafe(32),
        "PUBLIC_URL_TEMPLATE": "https://{school}.loopwise.com",
        "PLATFORM_URL": "https://loopwise.com",
    }


def test_webhook_configuration_defaults() -> None:
    policy = load_settings(_production()).webhooks
    assert policy.retry_schedule == (5, 300, 1800, 7200, 18000, 36000, 36000)
    assert policy.allow_loopback is False
    assert policy.timeout == 15
    assert policy.disable_after == 5 * 24 * 3600
    assert policy.secret_overlap == 24 * 3600
    assert policy.egress_ip is None
    assert policy.published_egress_ips == ()
    env = {**_production(), "WEBHOOK_EGRESS_IP": "10.0.0.5",
           "WEBHOOK_PUBLISHED_EGRESS_IPS": "52.194.91.27"}  # fmt: skip
    policy = load_settings(env).webhooks
    assert (policy.egress_ip, policy.published_egress_ips) == ("10.0.0.5", ("52.194.91.27",))


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("WEBHOOK_EGRESS_IP", "not-an-ip"),
        ("WEBHOOK_EGRESS_IP", "0.0.0.0"),
        ("WEBHOOK_EGRESS_PROXY", "socks5://proxy:1080"),
        ("WEBHOOK_PUBLISHED_EGRESS_IPS", "52.194.91.27,nope"),
        ("WEBHOOK_RETRY_SCHEDULE", "5,soon"),
        ("WEBHOOK_RETRY_SCHEDULE", "5,-1"),
        ("WEBHOOK_ALLOW_LOOPBACK", "true"),
        ("WEBHOOK_TIMEOUT_SECONDS", "0"),
        ("WEBHOOK_DISABLE_AFTER_SECONDS", "forever"),
        ("WEBHOOK_SECRET_OVERLAP_SECONDS", "-5"),
        ("WEBHOOK_RETRY_AFTER_MAX_SECONDS", "inf"),
        ("WEBHOOK_ENDPOINT_CONCURRENCY", "0"),
        ("WEBHOOK_MAX_IN_FLIGHT", "many"),
        ("WEBHOOK_CLAIM_IDLE_SECONDS", "0"),
    ],
)
def test_bad_webhook_configuration_names_its_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**_production(), variable: value})
    assert caught.value.variable == variable


def test_an_egress_address_that_is_not_ours_stops_the_start() -> None:
    env = {**_production(), "WEBHOOK_EGRESS_IP": "192.0.2.77"}
    with pytest.raises(ConfigError) as caught:
        egress.check_egress(load_settings(env))
    assert caught.value.variable == "WEBHOOK_EGRESS_IP"
