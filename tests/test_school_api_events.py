"""The school API's events: one per change, written in the change's transaction, relayed to
the run's `connect:events` stream; nothing for a rollback, nothing lost while Redis is down,
nothing published twice by relays racing."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import aiohttp
import asyncpg
import orjson
import pytest
import redis.asyncio as redis_asyncio
from pytest_aiohttp import AiohttpServer

from libs.common import db, streams
from libs.common.config import Settings
from services.school_api import resources, store
from services.school_api.app import RELAY, create_app
from services.school_api.identity import (
    CLIENT_HEADER,
    INTERNAL_TOKEN_HEADER,
    SCHOOL_HEADER,
    SCOPES_HEADER,
    SUBJECT_HEADER,
)
from services.school_api.outbox import OutboxRelay
from tests.support import base_url, without_handler_cancellation
from tests.test_school_api import PNG_2048, put_bytes

EVENT_KEYS = {"id", "type", "school_id", "occurred_at", "data"}


def new_school() -> int:
    return secrets.randbelow(2**40) + 10**6


def who(settings: Settings, school_id: int, scopes: str = "read write") -> dict[str, str]:
    return {
        INTERNAL_TOKEN_HEADER: settings.internal_token,
        SCHOOL_HEADER: str(school_id),
        SUBJECT_HEADER: "user-1",
        CLIENT_HEADER: "client-1",
        SCOPES_HEADER: scopes,
    }


async def call(
    http: aiohttp.ClientSession, method: str, url: str, headers: dict[str, str], body: Any = None
) -> tuple[int, Any]:
    async with http.request(method, url, headers=headers, json=body) as resp:
        return resp.status, (None if resp.status == 204 else await resp.json())


async def stream_events(redis: redis_asyncio.Redis, stream: str) -> list[dict[str, Any]]:
    """Every event on the stream, decoded by hand rather than by the code under test."""
    return [orjson.loads(fields[b"data"]) for _, fields in await redis.xrange(stream)]


async def events_of(
    redis: redis_asyncio.Redis,
    stream: str,
    school_id: int,
    count: int,
    *,
    timeout: float = 10.0,
) -> list[dict[str, Any]]:
    """The school's events once `count` of them are on the stream (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in await stream_events(redis, stream) if e.get("school_id") == school_id]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> bool:
    """Whether `check` comes true within `timeout` seconds."""
    for _ in range(int(timeout / 0.05)):
        if await check():
            return True
        await asyncio.sleep(0.05)
    return await check()


def check_shape(event: dict[str, Any], school_id: int) -> None:
    # The webhook body's members, and the resource and sequence it is ordered by (the
    # dispatcher keeps those out of the body).
    assert set(event) == EVENT_KEYS | {"ordering_key", "sequence"}
    resource = event["type"].rpartition(".")[0]
    assert event["ordering_key"] == f"{resource}:{event['data']['id']}"
    assert isinstance(event["sequence"], int)
    assert event["school_id"] == school_id
    UUID(event["id"])
    assert event["occurred_at"].endswith("Z")
    datetime.fromisoformat(event["occurred_at"])


# --- through the running service --------------------------------------------------------------


async def test_create_update_delete_publish_exactly_one_event_each(
    school_api_url: str,
    http: aiohttp.ClientSession,
    settings: Settings,
    redis: redis_asyncio.Redis,
    pool: asyncpg.Pool,
) -> None:
    school = new_school()
    headers = who(settings, school)
    base = f"{school_api_url}/api/v1/courses"
    status, created = await call(
        http, "POST", base, headers, {"title": "Event course", "description": "watched"}
    )
    assert status == 201
    status, updated = await call(
        http, "PATCH", f"{base}/{created['id']}", headers, {"status": "published"}
    )
    assert status == 200
    assert (await call(http, "DELETE", f"{base}/{created['id']}", headers))[0] == 204

    stream = settings.stream(streams.EVENTS)
    events = await events_of(redis, stream, school, 4)
    # Draft to published: course.updated, then course.published, in the same transaction.
    assert [e["type"] for e in events] == [
        "course.created",
        "course.updated",
        "course.published",
        "course.deleted",
    ]
    for event in events:
        check_shape(event, school)
    assert events[0]["data"] == created
    assert events[1]["data"] == updated
    assert events[2]["data"] == updated
    assert events[3]["data"] == updated  # the row as it was when it went
    assert len({e["id"] for e in events}) == 4
    # Each event id is the outbox row's, now published; no other event exists for the school.
    # The relay appends to the stream first and commits `published_at` just after.
    for _ in range(100):
        rows = await store.outbox_events_for(pool, school)
        if all(r["published_at"] is not None for r in rows):
            break
        await asyncio.sleep(0.02)
    assert [str(r["event_id"]) for r in rows] == [e["id"] for e in events]
    assert all(r["published_at"] is not None for r in rows)
    await asyncio.sleep(0.3)
    assert len(await events_of(redis, stream, school, 5, timeout=0)) == 4


async def test_a_transition_event_comes_only_when_the_status_moves_to_it(
    school_api_url: str,
    http: aiohttp.ClientSession,
    settings: Settings,
    redis: redis_asyncio.Redis,
) -> None:
    """Publishing what is already published, or changing anything else, is course.updated
    alone; an event cancelled is event.updated then event.cancelled."""
    school = new_school()
    headers = who(settings, school, "courses:write events:write")
    base = f"{school_api_url}/api/v1"
    status, course = await call(
        http, "POST", f"{base}/courses", headers, {"title": "Live", "status": "published"}
    )
    assert status == 201
    for body in ({"status": "published"}, {"title": "Live, again"}):
        status, _ = await call(http, "PATCH", f"{base}/courses/{course['id']}", headers, body)
        assert status == 200
    status, event = await call(
        http,
        "POST",
        f"{base}/events",
        headers,
        {"title": "Meetup", "starts_at": "2031-01-01T18:00:00Z"},
    )
    assert status == 201
    status, cancelled = await call(
        http, "PATCH", f"{base}/events/{event['id']}", headers, {"status": "cancelled"}
    )
    assert status == 200
    events = await events_of(redis, settings.stream(streams.EVENTS), school, 6)
    assert [e["type"] for e in events] == [
        "course.created",
        "course.updated",
        "course.updated",
        "event.created",
        "event.updated",
        "event.cancelled",
    ]
    assert events[-1]["data"] == cancelled
    await asyncio.sleep(0.3)
    assert len(await events_of(redis, settings.stream(streams.EVENTS), school, 7, timeout=0)) == 6


CHANGES: list[tuple[str, str, str, dict[str, Any], str]] = [
    # (what, method, path under /api/v1 ("{id}" is the row made first), body, event type)
    ("member", "POST", "members", {"name": "Ana", "email": "ana@example.com"}, "member.enrolled"),
    ("member", "PATCH", "members/{id}", {"status": "suspended"}, "member.updated"),
    ("post", "POST", "posts", {"title": "Hello"}, "post.created"),
    ("post", "PATCH", "posts/{id}", {"body": "Edited."}, "post.updated"),
    ("post", "DELETE", "posts/{id}", {}, "post.deleted"),
    ("event", "PATCH", "events/{id}", {"capacity": 12}, "event.updated"),
    ("lecturer", "POST", "lecturers", {"name": "Maya"}, "lecturer.created"),
    ("lecturer", "PATCH", "lecturers/{id}", {"bio": "Paints."}, "lecturer.updated"),
    ("coupon", "POST", "coupons", {"code": "TEN", "discount_percent": 10}, "coupon.created"),
    ("plan", "POST", "membership-plans", {"name": "Monthly"}, "membership_plan.created"),
    ("download", "POST", "digital-downloads", {"title": "PDF"}, "digital_download.created"),
    ("settings", "PATCH", "settings", {"tagline": "New line"}, "settings.updated"),
]
FIRST: dict[str, tuple[str, dict[str, Any]]] = {
    "member": ("members", {"name": "Ben", "email": "ben@example.com"}),
    "post": ("posts", {"title": "First"}),
    "event": ("events", {"title": "Open Studio", "starts_at": "2030-05-01T18:00:00Z"}),
    "lecturer": ("lecturers", {"name": "Tomás"}),
}


@pytest.mark.parametrize(
    ("what", "method", "path", "body", "event_type"), CHANGES, ids=[c[4] for c in CHANGES]
)
async def test_each_change_publishes_its_named_event_with_the_row_as_answered(
    school_api_url: str,
    http: aiohttp.ClientSession,
    settings: Settings,
    redis: redis_asyncio.Redis,
    what: str,
    method: str,
    path: str,
    body: dict[str, Any],
    event_type: str,
) -> None:
    school = new_school()
    headers = who(settings, school)
    expected = 1
    if "{id}" in path:
        first_path, first_body = FIRST[what]
        status, first = await call(
            http, "POST", f"{school_api_url}/api/v1/{first_path}", headers, first_body
        )
        assert status == 201
        path = path.replace("{id}", str(first["id"]))
        expected = 2
    status, answer = await call(
        http, method, f"{school_api_url}/api/v1/{path}", headers, body or None
    )
    assert status in (200, 201, 204)
    events = await events_of(redis, settings.stream(streams.EVENTS), school, expected)
    assert len(events) == expected
    event = events[-1]
    check_shape(event, school)
    assert event["type"] == event_type
    if method == "DELETE":
        assert {"id", "school_id"} <= set(event["data"])
        assert event["data"]["id"] == int(path.rsplit("/", 1)[1])
    else:
        assert event["data"] == answer


async def test_upload_events_leave_the_presigned_url_out(
    school_api_url: str,
    http: aiohttp.ClientSession,
    settings: Settings,
    redis: redis_asyncio.Redis,
) -> None:
    school = new_school()
    headers = who(settings, school, "storage:write")
    status, upload = await call(
        http,
        "POST",
        f"{school_api_url}/api/v1/uploads",
        headers,
        {"filename": "logo.png", "content_type": "image/png", "size_bytes": 100},
    )
    assert status == 201
    await put_bytes(http, school_api_url, upload["upload_url"], PNG_2048[:100])
    status, confirmed = await call(
        http, "POST", f"{school_api_url}/api/v1/uploads/{upload['id']}/confirm", headers
    )
    assert status == 200
    events = await events_of(redis, settings.stream(streams.EVENTS), school, 2)
    assert [e["type"] for e in events] == ["upload.created", "upload.confirmed"]
    for event, answer in zip(events, (upload, confirmed), strict=True):
        assert event["data"] == {k: v for k, v in answer.items() if k != "upload_url"}


async def test_a_change_that_rolls_back_publishes_nothing(
    school_api_url: str,
    http: aiohttp.ClientSession,
    settings: Settings,
    redis: redis_asyncio.Redis,
    pool: asyncpg.Pool,
) -> None:
    school = new_school()
    headers = who(settings, school)

    # A write and its event, then a failure before commit: both go.
    class Abort(Exception):
        pass

    async def write_then_fail() -> None:
        async with store.transaction(pool) as conn:
            row = await store.insert_row(conn, resources.COURSES, school, {"title": "Rolled back"})
            await store.enqueue(conn, "course.created", school, row)
            raise Abort

    with pytest.raises(Abort):
        await write_then_fail()
    # A create that fails inside its transaction (a reference to another school's course).
    foreign = await store.create_row(pool, resources.COURSES, new_school(), {"title": "Foreign"})
    status, body = await call(
        http,
        "POST",
        f"{school_api_url}/api/v1/lessons",
        headers,
        {"course_id": foreign["id"], "title": "Never"},
    )
    assert (status, body["fields"]) == (422, {"course_id": "not_found"})
    with pytest.raises(store.ReferenceNotFound):
        await store.create_row(
            pool, resources.LESSONS, school, {"course_id": foreign["id"], "title": "Never"}
        )
    # Validation failures never reach the store at all.
    assert (await call(http, "POST", f"{school_api_url}/api/v1/courses", headers, {}))[0] == 422

    # A committed change after them is published, and is the school's only event.
    status, kept = await call(
        http, "POST", f"{school_api_url}/api/v1/courses", headers, {"title": "Kept"}
    )
    assert status == 201
    events = await events_of(redis, settings.stream(streams.EVENTS), school, 1)
    await asyncio.sleep(0.3)
    events = await events_of(redis, settings.stream(streams.EVENTS), school, 2, timeout=0)
    assert [e["data"]["title"] for e in events] == ["Kept"]
    assert [r["data"]["title"] for r in await store.outbox_events_for(pool, school)] == ["Kept"]
    _, page = await call(http, "GET", f"{school_api_url}/api/v1/courses", headers)
    assert [c["id"] for c in page["data"]] == [kept["id"]]


# --- the relay on a database of its own ------------------------------------------------------
# These tests start and stop relays of their own, so they use a database the session's
# running service does not relay from.


def _other_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@pytest.fixture(scope="module")
async def side(settings: Settings, run_id: str) -> AsyncIterator[Settings]:
    # The same server(s) as the run's, so through PgBouncer its session DSN (where the relays
    # LISTEN) names the side database too.
    name = f"{run_id}_relay"
    own = dataclasses.replace(
        settings,
        database_url=_other_database(settings.database_url, name),
        database_session_url=(
            _other_database(settings.database_session_url, name)
            if settings.database_session_url
            else ""
        ),
    )
    await db.migrate(own.database_url)
    yield own
    await db.drop_database(own.database_url)


@pytest.fixture
async def side_pool(side: Settings) -> AsyncIterator[asyncpg.Pool]:
    p = await db.create_pool(settings=side, min_size=1, max_size=8)
    await p.execute("TRUNCATE school_api.outbox")
    yield p
    await p.close()


async def test_with_redis_down_writes_succeed_and_events_wait_until_it_is_back(
    side: Settings,
    side_pool: asyncpg.Pool,
    redis: redis_asyncio.Redis,
    http: aiohttp.ClientSession,
    aiohttp_server: AiohttpServer,
) -> None:
    dead = dataclasses.replace(side, redis_url="redis://127.0.0.1:1/0")
    school = new_school()
    app = create_app(dead)
    server = await aiohttp_server(app, access_log=None, shutdown_timeout=2)
    url = base_url(without_handler_cancellation(server))
    async with server:  # stops it here, not at the test's end: the test goes on without it
        status, created = await call(
            http, "POST", f"{url}/api/v1/courses", who(dead, school), {"title": "Offline"}
        )
        assert status == 201
        status, ready = await call(http, "GET", f"{url}/readyz", {})
        assert (status, ready["checks"]) == (
            503,
            {"postgresql": True, "redis": False, "background": True},
        )
        relay = app[RELAY]

        async def retried() -> bool:
            return relay.failures >= 2

        assert await until(retried)  # it tried, failed, and is backing off
        # What is owed shows on /metrics while Redis is away, not only once it is back.
        async with http.get(f"{url}/metrics") as response:
            text = await response.text()
        assert "school_api_outbox_backlog 1.0" in text.splitlines()
        assert "school_api_outbox_unsettled 0.0" in text.splitlines()
        [row] = await store.outbox_events_for(side_pool, school)
        assert row["published_at"] is None
        assert row["data"] == created
    # The service went away with the event still owed; a relay with a working Redis pays it.
    stream = side.stream(f"test:relay:{secrets.token_hex(4)}")
    assert await OutboxRelay(side_pool, redis, stream).drain() == 1
    [event] = await stream_events(redis, stream)
    check_shape(event, school)
    assert (event["id"], event["type"], event["data"]) == (
        str(row["event_id"]),
        "course.created",
        created,
    )
    [row] = await store.outbox_events_for(side_pool, school)
    assert row["published_at"] is not None


async def test_a_redis_that_hangs_cannot_hold_events_hostage(
    side: Settings, side_pool: asyncpg.Pool, redis: redis_asyncio.Redis
) -> None:
    # A server that accepts connections and never answers: worse than one that is down.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    hung = redis_asyncio.Redis.from_url(f"redis://127.0.0.1:{port}/0")
    school = new_school()
    await store.create_row(side_pool, resources.COURSES, school, {"title": "Held"})
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await OutboxRelay(side_pool, hung, "unused", batch_timeout=0.5).drain()
        assert time.monotonic() - started < 3
    finally:
        await hung.aclose()
        server.close()
    # The batch rolled back and let go of its rows: a healthy relay publishes the event.
    stream = side.stream(f"test:relay:{secrets.token_hex(4)}")
    assert await OutboxRelay(side_pool, redis, stream).drain() == 1
    assert [e["data"]["title"] for e in await stream_events(redis, stream)] == ["Held"]


async def test_two_relays_publish_every_event_exactly_once(
    side: Settings, side_pool: asyncpg.Pool, redis: redis_asyncio.Redis
) -> None:
    school = new_school()
    stream = side.stream(f"test:relay:{secrets.token_hex(4)}")

    async def write(n: int) -> None:
        await store.create_row(side_pool, resources.COURSES, school, {"title": f"Course {n}"})

    # A backlog both relays drain at once, contending for the same rows.
    await asyncio.gather(*(write(n) for n in range(300)))
    one = OutboxRelay(side_pool, redis, stream, batch_size=7)
    two = OutboxRelay(side_pool, redis, stream, batch_size=7)
    counts = await asyncio.gather(one.drain(), two.drain())
    assert sum(counts) == 300
    assert all(c > 0 for c in counts), counts  # both took a share

    # And the running loops, woken by NOTIFY, while writes keep arriving.
    loops = [
        OutboxRelay(
            side_pool,
            redis,
            stream,
            dsn=side.session_database_url,
            batch_size=5,
            poll_interval=0.2,
        )
        for _ in range(2)
    ]
    tasks = [asyncio.create_task(r.run()) for r in loops]
    try:
        for chunk in range(10):
            await asyncio.gather(*(write(300 + chunk * 20 + n) for n in range(20)))

        async def drained() -> bool:
            return await store.outbox_backlog(side_pool) == 0

        assert await until(drained)
    finally:
        for r in loops:
            r.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)

    events = await stream_events(redis, stream)
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids)) == 500
    expected = {str(r["event_id"]) for r in await store.outbox_events_for(side_pool, school)}
    assert set(ids) == expected
    assert sorted(e["data"]["title"] for e in events) == sorted(f"Course {n}" for n in range(500))


async def test_notify_wakes_the_relay_long_before_its_poll(
    side: Settings, side_pool: asyncpg.Pool, redis: redis_asyncio.Redis
) -> None:
    stream = side.stream(f"test:relay:{secrets.token_hex(4)}")
    relay = OutboxRelay(side_pool, redis, stream, dsn=side.session_database_url, poll_interval=60)
    task = asyncio.create_task(relay.run())
    try:
        await asyncio.sleep(0.3)  # its first (empty) round is done; now it waits 60 s or NOTIFY
        school = new_school()
        started = time.monotonic()
        await store.create_row(side_pool, resources.COURSES, school, {"title": "Quick"})
        events = await events_of(redis, stream, school, 1, timeout=5)
        assert len(events) == 1
        assert time.monotonic() - started < 2
    finally:
        relay.stop()
        await asyncio.wait_for(task, timeout=5)  # a stop ends the 60 s wait at once


async def test_published_events_are_purged_after_retention_unpublished_never(
    side_pool: asyncpg.Pool, redis: redis_asyncio.Redis, side: Settings
) -> None:
    school = new_school()
    old = await store.create_row(side_pool, resources.COURSES, school, {"title": "Old"})
    stream = side.stream(f"test:relay:{secrets.token_hex(4)}")
    assert await OutboxRelay(side_pool, redis, stream).drain() == 1
    await store.create_row(side_pool, resources.COURSES, school, {"title": "Pending"})
    await side_pool.execute(
        "UPDATE school_api.outbox SET occurred_at = now() - interval '3 days',"
        " published_at = CASE WHEN published_at IS NULL THEN NULL"
        " ELSE now() - interval '2 days' END"
    )
    assert await store.purge_published(side_pool, 24 * 3600) == 1
    left = await store.outbox_events_for(side_pool, school)
    assert [r["data"]["title"] for r in left] == ["Pending"]
    assert old["title"] == "Old"


async def test_the_service_metrics_count_published_events(
    school_api_url: str, http: aiohttp.ClientSession, settings: Settings
) -> None:
    school = new_school()
    status, _ = await call(
        http, "POST", f"{school_api_url}/api/v1/posts", who(settings, school), {"title": "m"}
    )
    assert status == 201
    deadline = time.monotonic() + 5
    while True:
        async with http.get(f"{school_api_url}/metrics") as resp:
            text = await resp.text()
        line = next(
            x for x in text.splitlines() if x.startswith("school_api_events_published_total ")
        )
        if float(line.split()[1]) >= 1 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert float(line.split()[1]) >= 1


async def test_the_curriculum_enrollments_and_appearance_publish_their_events(
    school_api_url: str,
    http: aiohttp.ClientSession,
    settings: Settings,
    redis: redis_asyncio.Redis,
) -> None:
    """Seed 002's chapters and materials, enrollments managed on their own, and the appearance
    split from the settings: each change publishes its event with the row as answered."""
    school = new_school()
    headers = who(settings, school)
    api = f"{school_api_url}/api/v1"
    answers: list[tuple[str, Any]] = []

    async def change(method: str, path: str, body: Any, event_type: str) -> Any:
        status, answer = await call(http, method, f"{api}/{path}", headers, body)
        assert status in (200, 201, 204), (path, status, answer)
        answers.append((event_type, answer))
        return answer

    _, course = await call(http, "POST", f"{api}/courses", headers, {"title": "Watercolour"})
    _, other = await call(http, "POST", f"{api}/courses", headers, {"title": "Ink"})
    _, member = await call(
        http, "POST", f"{api}/members", headers, {"name": "A", "email": "a@x.io"}
    )
    chapter = await change(
        "POST", "chapters", {"course_id": course["id"], "title": "Basics"}, "chapter.created"
    )
    await change("PATCH", f"chapters/{chapter['id']}", {"position": 2}, "chapter.updated")
    _, lesson = await call(
        http,
        "POST",
        f"{api}/lessons",
        headers,
        {"course_id": course["id"], "chapter_id": chapter["id"], "title": "Washes"},
    )
    assert lesson["chapter_id"] == chapter["id"]
    # A lesson's chapter is one of its own course's.
    assert await call(
        http,
        "POST",
        f"{api}/lessons",
        headers,
        {"course_id": other["id"], "chapter_id": chapter["id"], "title": "Misplaced"},
    ) == (422, {"error": "validation_failed", "fields": {"chapter_id": "not_found"}})
    material = await change(
        "POST",
        "materials",
        {"lesson_id": lesson["id"], "title": "Sheet", "kind": "link", "url": "https://x.io/a"},
        "material.created",
    )
    await change("PATCH", f"materials/{material['id']}", {"title": "Sheet 2"}, "material.updated")
    await change("DELETE", f"materials/{material['id']}", None, "material.deleted")
    enrollment = await change(
        "POST",
        "enrollments",
        {"member_id": member["id"], "course_id": course["id"]},
        "enrollment.created",
    )
    await change(
        "PATCH",
        f"enrollments/{enrollment['id']}",
        {"progress_percent": 40, "status": "cancelled"},
        "enrollment.updated",
    )
    await change("DELETE", f"enrollments/{enrollment['id']}", None, "enrollment.deleted")
    await change("DELETE", f"chapters/{chapter['id']}", None, "chapter.deleted")
    look = await change("PATCH", "settings/appearance", {"theme": "dark"}, "appearance.updated")
    # The lesson stays, out of any chapter.
    _, kept = await call(http, "GET", f"{api}/lessons/{lesson['id']}", headers)
    assert kept["chapter_id"] is None

    events = await events_of(redis, settings.stream(streams.EVENTS), school, 15)
    mine = [e for e in events if e["type"].split(".")[0] in ("chapter", "material", "enrollment")]
    assert [e["type"] for e in mine] == [t for t, _ in answers[:-1]]
    for event, (_, answer) in zip(mine, answers, strict=False):
        check_shape(event, school)
        if answer is not None:
            assert event["data"] == answer
    # An appearance change is a settings change too; appearance:read's event holds the look only.
    assert [e["type"] for e in events[-2:]] == ["settings.updated", "appearance.updated"]
    assert events[-1]["data"] == look
    assert "contact_email" in events[-2]["data"] and "contact_email" not in look
