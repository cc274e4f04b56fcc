"""The school API over real HTTP, PostgreSQL and Redis: identity headers, tenancy, pagination,
validation, scopes, every resource of contract section 7, uploads, OpenAPI, seeding, serving."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from libs.common.config import Settings
from services.school_api import resources, seed
from services.school_api.identity import (
    CLIENT_HEADER,
    INTERNAL_TOKEN_HEADER,
    SCHOOL_HEADER,
    SCOPES_HEADER,
    SUBJECT_HEADER,
)
from tests.support import free_port, wait_for_port

ALL = "read write"
ROOT = Path(__file__).resolve().parents[1]


def new_school() -> int:
    """A school id no other test (and no demo seed) uses: this service trusts the gateway's id
    and keeps no school table of its own, so any positive id is a school."""
    return secrets.randbelow(2**40) + 10**6


def who(settings: Settings, school_id: int, scopes: str = ALL, **overrides: str) -> dict[str, str]:
    headers = {
        INTERNAL_TOKEN_HEADER: settings.internal_token,
        SCHOOL_HEADER: str(school_id),
        SUBJECT_HEADER: "user-1",
        CLIENT_HEADER: "client-1",
        SCOPES_HEADER: scopes,
        "X-Request-Id": f"test-{secrets.token_hex(4)}",
    }
    headers.update(overrides)
    return headers


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: dict[str, str],
    body: Any = None,
) -> tuple[int, Any]:
    async with http.request(method, url, headers=headers, json=body) as resp:
        if resp.status == 204:
            return 204, None
        return resp.status, await resp.json(content_type=None)


async def make(
    http: aiohttp.ClientSession, base: str, headers: dict[str, str], name: str, body: Any
) -> dict[str, Any]:
    status, row = await call(http, "POST", f"{base}/api/v1/{name}", headers, body)
    assert status == 201, row
    return dict(row)


# --- identity headers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        "no headers",
        "wrong token",
        "no token",
        "no school",
        "school not a number",
        "school zero",
        "no subject",
        "no client",
    ],
)
async def test_a_call_without_the_gateways_identity_is_401(
    school_api_url: str, http: aiohttp.ClientSession, settings: Settings, change: str
) -> None:
    headers = who(settings, new_school())
    if change == "no headers":
        headers = {}
    elif change == "wrong token":
        headers[INTERNAL_TOKEN_HEADER] = settings.internal_token[:-1] + "x"
    elif change == "no token":
        del headers[INTERNAL_TOKEN_HEADER]
    elif change == "no school":
        del headers[SCHOOL_HEADER]
    elif change == "school not a number":
        headers[SCHOOL_HEADER] = "42abc"
    elif change == "school zero":
        headers[SCHOOL_HEADER] = "0"
    elif change == "no subject":
        del headers[SUBJECT_HEADER]
    elif change == "no client":
        del headers[CLIENT_HEADER]
    for method, path in (
        ("GET", "/api/v1/courses"),
        ("POST", "/api/v1/courses"),
        ("GET", "/api/v1/no-such-thing"),
    ):
        status, body = await call(http, method, school_api_url + path, headers, {"title": "x"})
        assert (status, body) == (401, {"error": "unauthenticated"}), (method, path)


async def test_probes_and_the_openapi_document_need_no_identity(
    school_api_url: str, http: aiohttp.ClientSession
) -> None:
    for path in ("/healthz", "/readyz", "/openapi.json"):
        status, _ = await call(http, "GET", school_api_url + path, {})
        assert status == 200, path
    _, ready = await call(http, "GET", school_api_url + "/readyz", {})
    assert ready["checks"] == {"postgresql": True, "redis": True, "background": True}
    async with http.get(school_api_url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    assert "school_api_events_published_total" in text
    assert "school_api_outbox_backlog" in text


async def test_the_request_id_comes_back(
    school_api_url: str, http: aiohttp.ClientSession, settings: Settings
) -> None:
    headers = who(settings, new_school())
    async with http.get(f"{school_api_url}/api/v1/courses", headers=headers) as resp:
        assert resp.headers["X-Request-Id"] == headers["X-Request-Id"]


# --- tenancy ----------------------------------------------------------------------------------


async def test_a_school_sees_only_its_own_rows(
    school_api_url: str, http: aiohttp.ClientSession, settings: Settings
) -> None:
    a, b = new_school(), new_school()
    ha, hb = who(settings, a), who(settings, b)
    mine = await make(
        http, school_api_url, ha, "courses", {"title": "A's course", "description": "of school A"}
    )
    theirs = await make(
        http, school_api_url, hb, "courses", {"title": "B's course", "description": "of school B"}
    )
    assert (mine["school_id"], theirs["school_id"]) == (a, b)

    status, page = await call(http, "GET", f"{school_api_url}/api/v1/courses?limit=100", ha)
    assert status == 200
    assert [c["title"] for c in page["data"]] == ["A's course"]
    assert all(c["school_id"] == a for c in page["data"])

    other = f"{school_api_url}/api/v1/courses/{theirs['id']}"
    assert await call(http, "GET", other, ha) == (404, {"error": "not_found"})
    assert await call(http, "PATCH", other, ha, {"title": "taken over"}) == (
        404,
        {"error": "not_found"},
    )
    assert await call(http, "DELETE", other, ha) == (404, {"error": "not_found"})
    # ...and B's row is exactly as B left it.
    assert await call(http, "GET", other, hb) == (200, theirs)
    # A row id that exists nowhere answers the same as another school's: nothing is revealed.
    assert await call(http, "GET", f"{school_api_url}/api/v1/courses/999999999999", ha) == (
        404,
        {"error": "not_found"},
    )


async def test_references_and_nested_lists_stay_within_the_school(
    school_api_url: str, http: aiohttp.ClientSession, settings: Settings, pool: Any
) -> None:
    a, b = new_school(), new_school()
    ha, hb = who(settings, a), who(settings, b)
    theirs = await make(http, school_api_url, hb, "courses", {"title": "B only"})
    # A lesson of A may not hang off B's course, and a course of A not name B's lecturer.
    status, body = await call(
        http,
        "POST",
        f"{school_api_url}/api/v1/lessons",
        ha,
        {"course_id": theirs["id"], "title": "Sneaky"},
    )
    assert (status, body) == (
        422,
        {"error": "validation_failed", "fields": {"course_id": "not_found"}},
    )
    lecturer = await make(http, school_api_url, hb, "lecturers", {"name": "B's lecturer"})
    status, body = await call(
        http,
        "POST",
        f"{school_api_url}/api/v1/courses",
        ha,
        {"title": "x", "lecturer_id": lecturer["id"]},
    )
    assert (status, body["fields"]) == (422, {"lecturer_id": "not_found"})
    # B's course's reviews and B's event's attendees are not A's to list.
    await seed.seed_school(pool, b, "Reviewed School")
    _, courses = await call(http, "GET", f"{school_api_url}/api/v1/courses?limit=100", hb)
    course_id = next(c["id"] for c in courses["data"] if c["title"].startswith("Reviewed"))
    _, reviews = await call(http, "GET", f"{school_api_url}/api/v1/courses/{course_id}/reviews", hb)
    assert reviews["data"]
    assert await call(http, "GET", f"{school_api_url}/api/v1/courses/{course_id}/reviews", ha) == (
        404,
        {"error": "not_found"},
    )
    _, events = await call(http, "GET", f"{school_api_url}/api/v1/events?limit=1", hb)
    event_path = f"{school_api_url}/api/v1/events/{events['data'][0]['id']}/attendees"
    assert (await call(http, "GET", event_path, hb))[0] == 200
    assert (await call(http, "GET", event_path, ha))[0] == 404


# --- pagination -------------------------------------------------------------------------------


async def test_the_cursor_walks_every_row_exactly_once(
    school_api_url: str, http: aiohttp.ClientSession, settings: Settings
) -> None:
    school = new_school()
    headers = who(settings, school)
    made = [
        (
            await make(
                http,
                school_api_url,
                headers,
                "members",
                {"name": f"Member {i}", "email": f"m{i}@example.com"},
            )
        )["id"]
        for i in range(7)
    ]
    # Another school's rows interleave with these ids and must not appear.
    other = who(settings, new_school())
    await make(http, school_api_url, other, "members", {"name": "Else", "email": "e@example.com"})

    seen: list[int] = []
    pages = []
    url = f"{school_api_url}/api/v1/members?limit=3"
    while True:
        status, page = await call(http, "GET", url, headers)
        assert status == 200
        pages.append(len(page["data"]))
        seen.extend(row["id"] for row in page["data"])
        if page["next_cursor"] is None:
            break
        url = f"{school_api_url}/api/v1/members?limit=3&cursor={page['next_cursor']}"
    assert seen == made
    assert pages == [3, 3, 1]

    # The default page is 20 rows; exactly `limit` rows leave no next page.
    _, page = await call(http, "GET", f"{school_api_url}/api/v1/members", headers)
    assert len(page["data"]) == 7 and page["next_cursor"] is None
    _, page = await call(http, "GET", f"{school_api_url}/api/v1/members?limit=7", headers)
    assert len(page["data"]) == 7 and page["next_cursor"] is None


@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ("limit=0", {"limit": "too_small"}),
        ("limit=101", {"limit": "too_large"}),
        ("limit=-1", {"limit": "must_be_integer"}),
        ("limit=ten", {"limit": "must_be_integer"}),
        ("limit=", {"limit": "must_be_integer"}),
        ("cursor=not-a-cursor!", {"cursor": "invalid"}),
        ("cursor=YWJj", {"cursor": "invalid"}),  # base64 of "abc"
        ("colour=blue", {"colour": "unknown_parameter"}),
    ],
)
async def test_bad_list_parameters_are_422(
    school_api_url: str,
    http: aiohttp.ClientSession,
    settings: Settings,
    query: str,
    problem: dict[str, str],
) -> None:
    status, body = await call(
        http, "GET", f"{school_api_url}/api/v1/courses?{query}", who(settings, new_school())
    )
    assert (status, body) == (422, {"error": "validation_failed", "fields": problem})


async def test_lists_filter_on_declared_fields(
    school_api_url: str, http: aiohttp.ClientSession, settings: Settings
) -> None:
    headers = who(settings, new_school())
    one = await make(http, school_api_url, headers, "courses", {"title": "One"})
    two = await make(http, school_api_url, headers, "courses", {"title": "Two"})
    for course, titles in ((one, ("a", "b")), (two, ("c",))):
        for position, title in enumerate(titles):
            await make(
                http,
                school_api_url,
                headers,
                "lessons",
                {"course_id": course["id"], "title": title, "position": position},
            )
    _, page = await call(
        http, "GET", f"{school_api_url}/api/v1/lessons?course_id={one['id']}", headers
    )
    assert [lesson["title"] for lesson in page["data"]] == ["a", "b"]
    status, body = await call(http, "GET", f"{school_api_url}/api/v1/lessons?course_id=x", headers)
    assert (status, body["fields"]) == (422, {"course_id": "must_be_integer"})


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({}, {"title": "required"}),
        ({"description": "no title"}, {"title": "required"}),
        ({"title": ""}, {"title": "required"}),
        ({"title": "x" * 201}, {"title": "too_long"}),
        ({"title": 7}, {"title": "must_be_string"}),
        ({"title": None}, {"title": "must_not_be_null"}),
        ({"title": "ok", "subtitle": "?"}, {"subtitle": "unknown_field"}),
        ({"title": "ok", "id": 5}, {"id": "read_only"}),
        ({"title": "ok", "school_id": 5}, {"school_id": "read_only"}),
        ({"title": "ok", "created_at": "2024-01-01T00:00:00Z"}, {"created_at": "read_only"}),
        ({"title": "ok", "status": "live"}, {"status": "invalid_choice"}),
        ({"title": "ok", "price_cents": -1}, {"price_cents": "too_small"}),
        ({"title": "ok", "price_cents": 1.5}, {"price_cents": "must_be_integer"}),
        ({"title": "ok", "price_cents": True}, {"price_cents": "must_be_integer"}),
        ({"title": "ok", "currency": "usd"}, {"currency": "invalid_format"}),
        ({"title": "bad\x00byte"}, {"title": "invalid_format"}),
        ({"title": "ok", "lecturer_id": "1"}, {"lecturer_id": "must_be_integer"}),
        ({"title": "ok", "lecturer_id": 0}, {"lecturer_id": "too_small"}),
        (
            {"title": 1, "status": 2, "extra": 3},
            {"title": "must_be_string", "status": "must_be_string", "extra": "unknown_field"},
        ),
    ],
)
async def test_invalid_input_is_422_with_field_errors(
    school_api_url: str,
    http: aiohttp.ClientSession,
    settings: Settings,
    body: dict[str, Any],
    fields: dict[str, str],
) -> None:
    headers = who(settings, new_school())
    status, answer = await call(http, "POST", f"{school_api_url}/api/v1/courses", headers, body)
    assert (status, answer) == (422, {"error": "validation_failed", "fields": fields})
    _, page = await call(http, "GET", f"{school_api_url}/api/v1/courses", headers)
    assert page["data"] == []


async def test_types_of_other_fields_are_checked(
    school_api_url: str, http: aiohttp.ClientSession, settings: Settings
) -> None:
    headers = who(settings, new_school())
    cases: list[tuple[str, dict[str, Any], dict[str, str]]] = [
        ("events", {"title": "x", "starts_at": "tomorrow"}, {"starts_at": "must_be_timestamp"}),
        (
            "events",
            {"title": "x", "starts_at": "2030-01-01T10:00:00"},
            {"starts_at": "must_be_timestamp"},
        ),  # no offset: which 10:00?
        ("members", {"name": "x", "email": "not-an-email"}, {"email": "invalid_format"}),
        ("coupons", {"code": "lower"}, {"code": "invalid_format"}),
        ("coupons", {"code": "OK10", "active": "yes"}, {"active": "must_be_boolean"}),
        ("coupons", {"code": "OK10", "discount_percent": 101}, {"discount_percent": "too_large"}),
        (
            "lecturers",
            {"name": "x", "avatar_url": "javascript:alert(1)"},
            {"avatar_url": "invalid_format"},
        ),
        (
            "uploads",
            {"filename": "a.exe", "content_type": "application/x-msdownload", "size_bytes": 10},
            {"content_type": "invalid_choice"},
        ),
        (
            "uploads",
            {"filename": "a.png", "content_type": "image/png", "size_bytes": 10**9},
            {"size_bytes": "too_large"},
        ),
    ]
    for name, body, fields in cases:
        status, answer = await call(http, "POST", f"{school_api_url}/api/v1/{name}", headers, body)
        assert (status, answer) == (422, {"error": "validation_failed", "fields": fields}), body
    status, event = await call(
        http,
        "POST",
        f"{school_api_url}/api/v1/events",
        headers,
        {"title": "Meetup", "starts_at": "2030-01-01T10:00:00+02:00"},
    )
    assert status == 201
    assert event["starts_at"] == "2030-01-01T08:00:00Z"


async def test_a_timestamp_postgresql_would_store_as_infinity_is_refused(
    school_api_url: str, http: aiohttp.ClientSession, settings: Settings
) -> None:
    # Found by fuzzing: asyncpg sends the first and last instants Python holds as -infinity
    # and infinity, and reads them back without a zone; the row no longer said what was sent.
    headers = who(settings, new_school())
    base = f"{school_api_url}/api/v1/events"
    starts = "2030-01-01T10:00:00Z"
    event = await make(http, school_api_url, headers, "events", {"title": "M", "starts_at": starts})
    for instant in ("0001-01-01T00:00:00Z", "9999-12-31T23:59:59.999999+00:00"):
        body = {"title": "x", "starts_at": starts, "ends_at": instant}
        status, answer = await call(http, "POST", base, headers, body)
        assert (status, answer) == (
            422,
            {"error": "validation_failed", "fields": {"ends_at": "must_be_timestamp"}},
        )
        status, _ = await call(
            http, "PATCH", f"{base}/{event['id']}", headers, {"ends_at": instant}
        )
        assert status == 422
    # One microsecond inside, the instant is kept as sent.
    status, kept = await call(
        http, "PATCH", f"{base}/{event['id']}", headers, {"ends_at": "0001-01-01T00:00:00.000001Z"}
    )
    assert status == 200, kept
    assert kept["ends_at"] == "0001-01-01T00:00:00.000001Z"


async def test_bodies_that_are_not_json_objects(
    school_api_url: str, http: aiohttp.ClientSession, settings: Settings
) -> None:
    headers = who(settings, new_school())
    url = f"{school_api_url}/api/v1/courses"
    async with http.post(
        url, headers=headers, data=b"title=x", skip_auto_headers=["Content-Type"]
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_request"
    async with http.post(
        url, headers={**headers, "Content-Type": "text/plain"}, data=b'{"title": "x"}'
    ) as resp:
        assert resp.status == 400
    async with http.post(
        url, headers={**headers, "Content-Type": "application/json"}, data=b'{"title": '
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_request"
    for raw in (b'[{"title": "x"}]', b'"x"', b"3", b"null"):
        async with http.post(
            url, headers={**headers, "Content-Type": "application/json"}, data=raw
        ) as resp:
            assert resp.status == 422, raw
            assert await resp.json() == {
                "error": "validation_failed",
                "fields": {"_": "must_be_object"},
            }


async def test_updates_are_partial_and_checked(
    school_api_url: str, http: aiohttp.ClientSession, settings: Settings
) -> None:
    headers = who(settings, new_school())
    course = await make(
        http,
        school_api_url,
        headers,
        "courses",
        {"title": "Draft", "description": "d", "price_cents": 100},
    )
    url = f"{school_api_url}/api/v1/courses/{course['id']}"
    status, changed = await call(http, "PATCH", url, headers, {"status": "published"})
    assert status == 200
    assert changed["status"] == "published"
    assert (changed["title"], changed["price_cents"]) == ("Draft", 100)
    assert changed["updated_at"] > course["updated_at"]
    assert changed["created_at"] == course["created_at"]
    assert await call(http, "GET", url, headers) == (200, changed)
    assert await call(http, "PATCH", url, headers, {}) == (
        422,
        {"error": "validation_failed", "fields": {"_": "no_fields"}},
    )
    assert (await call(http, "PATCH", url, headers, {"title": None}))[1]["fields"] == {
        "title": "must_not_be_null"
    }
    # Nullable fields may be cleared.
    lecturer = await make(http, school_api_url, headers, "lecturers", {"name": "L"})
    _, linked = await call(http, "PATCH", url, headers, {"lecturer_id": lecturer["id"]})
    assert linked["lecturer_id"] == lecturer["id"]
    _, unlinked = await call(http, "PATCH", url, headers, {"lecturer_id": None})
    assert unlinked["lecturer_id"] is None
    # A path id that cannot be an id is not found, like any other.
    status, _ = await call(
        http, "PATCH", f"{school_api_url}/api/v1/courses/abc", headers, {"title": "x"}
    )
    assert status == 404
    # A subscription's member is fixed once made; its plan may change.
    member = await make(http, school_api_url, headers, "members", {"name": "M", "email": "m@x.io"})
    plan = await make(http, school_api_url, headers, "membership-plans", {"name": "Monthly"})
    annual = await make(http, school_api_url, headers, "membership-plans", {"name": "Annual"})
    sub = await make(
        http,
        school_api_url,
        headers,
        "subscriptions",
        {"member_id": member["id"], "membership_plan_id": plan["id"]},
    )
    sub_url = f"{school_api_url}/api/v1/subscriptions/{sub['id']}"
    assert (await call(http, "PATCH", sub_url, headers, {"member_id": member["id"]}))[1][
        "fields"
    ] == {"member_id": "read_only"}
    status, moved = await call(
        http, "PATCH", sub_url, headers, {"membership_plan_id": annual["id"]}
    )
    assert (status, moved["membership_plan_id"]) == (200, annual["id"])


async def test_unique_fields_answer_409(
    school_api_url: str, http: aiohttp.ClientSession, settings: Settings
) -> None:
    headers = who(settings, new_school())
    await make(http, school_api_url, headers, "members", {"name": "A", "email": "a@example.com"})
    status, body = await call(
        http,
        "POST",
        f"{school_api_url}/api/v1/members",
        headers,
        {"name": "A again", "email": "A@Example.com"},
    )
    assert (status, body) == (409, {"error": "conflict", "fields": {"email": "already_exists"}})
    await make(http, school_api_url, headers, "coupons", {"code": "SAVE10", "discount_percent": 10})
    status, body = await call(
        http, "POST", f"{school_api_url}/api/v1/coupons", headers, {"code": "SAVE10"}
    )
    assert (status, body["fields"]) == (409, {"code": "already_exists"})
    # Unique within a school, not across schools.
    await make(http, school_api_url, who(settings, new_school()), "coupons", {"code": "SAVE10"})


async def test_unknown_paths_and_methods(
    school_api_url: str, http: aiohttp.ClientSession, settings: Settings
) -> None:
    headers = who(settings, new_school())
    assert await call(http, "GET", f"{school_api_url}/api/v1/nothing", headers) == (
        404,
        {"error": "not_found"},
    )
    # Orders are read-only (seed 002 has no orders:write).
    async with http.post(f"{school_api_url}/api/v1/orders", headers=headers, json={}) as resp:
        assert resp.status == 405
        assert (await resp.json())["error"] == "method_not_allowed"
        assert "GET" in resp.headers["Allow"]


# --- scopes -----------------------------------------------------------------------------------

# Seed 002's table, written out here rather than read from the catalogue under test.
READ_SCOPES = {
    "courses": "courses:read",
    "members": "students:read",
    "orders": "orders:read",
    # Seed 002: the curriculum and enrollments read with courses:read too (any-of, in order).
    "chapters": "curriculum:read courses:read",
    "lessons": "curriculum:read courses:read",
    "materials": "curriculum:read courses:read",
    "enrollments": "courses:read students:read",
    "settings": "school:read",
    "settings/appearance": "appearance:read school:read",
    "membership-plans": "membership_plans:read",
    "events": "events:read",
    "coupons": "coupons:read",
    "posts": "posts:read",
    "digital-downloads": "digital_products:read",
    "comments": "comments:read",
    "lecturers": "lecturers:read",
    "subscriptions": "subscriptions:read",
    "site-info": "school:read",
    "analytics": "analytics:read",
}
WRITE_SCOPES = {
    "courses": ("courses:write", {"title": "t"}),
    "members": ("students:write", {"name": "n", "email": "n@example.com"}),
    "membership-plans": ("membership_plans:write", {"name": "Plan"}),
    "events": ("events:write", {"title": "t", "starts_at": "2030-01-01T00:00:00Z"}),
    "coupons": ("coupons:write", {"code": "CODE1"}),
    "posts": ("posts:write", {"title": "t"}),
    "digital-downloads": ("digital_products:write", {"title": "t"}),
    "lecturers": ("lecturers:write", {"name": "n"}),
    "uploads": (
        "storage:write",
        {"filename": "a.png", "content_type": "image/png", "size_bytes": 3},
    ),
}


@pytest.mark.parametrize("name", sorted(READ_SCOPES))
async def test_each_read_needs_its_seed_scope(
    school_api_url: str, http: aiohttp.ClientSession, settings: Settings, name: str
) -> None:
    scope = READ_SCOPES[name]
    school = new_school()
    url = f"{school_api_url}/api/v1/{name}"
    assert (await call(http, "GET", url, who(settings, school, scope)))[0] == 200
    assert (await call(http, "GET", url, who(settings, school, "read")))[0] == 200
    wrong = "posts:read" if scope != "posts:read" else "courses:read"
    assert await call(http, "GET", url, who(settings, school, f"openid {wrong} write")) == (
        403,
        {"error": "insufficient_scope", "scope": scope},
    )


@pytest.mark.parametrize("name", sorted(WRITE_SCOPES))
async def test_each_write_needs_its_seed_scope(
    school_api_url: str, http: aiohttp.ClientSession, settings: Settings, name: str
) -> None:
    scope, body = WRITE_SCOPES[name]
    school = new_school()
    url = f"{school_api_url}/api/v1/{name}"
    read_only = f"read {scope.replace(':write', ':read')}"
    assert await call(http, "POST", url, who(settings, school, read_only), body) == (
        403,
        {"error": "insufficient_scope", "scope": scope},
    )
    assert (await call(http, "POST", url, who(settings, school, scope), body))[0] == 201


async def test_reading_courses_without_courses_read_is_403_naming_it(
    school_api_url: str, http: aiohttp.ClientSession, settings: Settings
) -> None:
    school = new_school()
    course = await make(http, school_api_url, who(settings, school), "courses", {"title": "c"})
    narrow = who(settings, school, "students:read")
    for path in (
        "/api/v1/courses",
        f"/api/v1/courses/{course['id']}",
        f"/api/v1/courses/{course['id']}/reviews",
    ):
        assert await call(http, "GET", school_api_url + path, narrow) == (
            403,
            {"error": "insufficient_scope", "scope": "courses:read"},
        )
    # Scope comes before existence: a 403 reveals nothing about which ids exist.
    assert (await call(http, "GET", f"{school_api_url}/api/v1/courses/1", narrow))[0] == 403
    # `read` is not `write`.
    status, body = await call(
        http,
        "PATCH",
        f"{school_api_url}/api/v1/courses/{course['id']}",
        who(settings, school, "read"),
        {"title": "x"},
    )
    assert (status, body["scope"]) == (403, "courses:write")
    status, _ = await call(
        http,
        "DELETE",
        f"{school_api_url}/api/v1/courses/{course['id']}",
        who(settings, school, "courses:read courses:write"),
    )
    assert status == 204


async def test_settings_take_school_or_appearance_scopes(
    school_api_url: str, http: aiohttp.ClientSession, settings: Settings
) -> None:
    school = new_school()
    url = f"{school_api_url}/api/v1/settings"
    for scope in ("school:read", "read"):
        status, body = await call(http, "GET", url, who(settings, school, scope))
        assert status == 200, scope
        assert (body["id"], body["school_id"]) == (school, school)
    # Seed 002: appearance:read reads the appearance and theme, not the whole settings.
    for scope in ("courses:read", "appearance:read"):
        assert await call(http, "GET", url, who(settings, school, scope)) == (
            403,
            {"error": "insufficient_scope", "scope": "school:read"},
        )
    status, look = await call(
        http, "GET", f"{url}/appearance", who(settings, school, "appearance:read")
    )
    assert status == 200
    assert set(look) == {
        "id",
        "school_id",
        "logo_url",
        "primary_color",
        "accent_color",
        "theme",
        "updated_at",
    }
    # appearance:write changes the look, not the school's name; school:write the reverse.
    # Its answer is the look too: the rest of the settings is not appearance:write's to read.
    status, body = await call(
        http,
        "PATCH",
        url,
        who(settings, school, "appearance:write"),
        {"theme": "dark", "primary_color": "#112233"},
    )
    assert (status, body["theme"], body["primary_color"]) == (200, "dark", "#112233")
    assert "contact_email" not in body and "timezone" not in body
    status, body = await call(
        http,
        "PATCH",
        f"{url}/appearance",
        who(settings, school, "appearance:write"),
        {"accent_color": "#445566"},
    )
    assert (status, body["accent_color"], body["theme"]) == (200, "#445566", "dark")
    assert "contact_email" not in body
    assert await call(
        http,
        "PATCH",
        f"{url}/appearance",
        who(settings, school, "school:write"),
        {"theme": "light"},
    ) == (403, {"error": "insufficient_scope", "scope": "appearance:write"})
    assert (
        await call(
            http,
            "PATCH",
            f"{url}/appearance",
            who(settings, school, "appearance:write"),
            {"name": "x"},
        )
    )[0] == 422
    assert await call(
        http, "PATCH", url, who(settings, school, "appearance:write"), {"name": "Renamed"}
    ) == (
        403,
        {"error": "insufficient_scope", "scope": "school:write"},
    )
    assert (
        await call(
            http,
            "PATCH",
            url,
            who(settings, school, "school:write"),
            {"logo_url": "https://cdn.example.com/l.png"},
        )
    )[1]["scope"] == ("appearance:write")
    status, body = await call(
        http,
        "PATCH",
        url,
        who(settings, school, "school:write"),
        {"name": "Renamed", "timezone": "Europe/Lisbon"},
    )
    assert (status, body["name"], body["timezone"], body["theme"]) == (
        200,
        "Renamed",
        "Europe/Lisbon",
        "dark",
    )
    status, body = await call(
        http, "PATCH", url, who(settings, school, "school:write"), {"timezone": "Mars/Olympus"}
    )
    assert (status, body["fields"]) == (422, {"timezone": "invalid_format"})
    # site-info is school:read only (seed 002: get_site_info).
    assert (
        await call(
            http,
            "GET",
            f"{school_api_url}/api/v1/site-info",
            who(settings, school, "appearance:read"),
        )
    )[1]["scope"] == "school:read"
    _, info = await call(
        http, "GET", f"{school_api_url}/api/v1/site-info", who(settings, school, "school:read")
    )
    assert info["name"] == "Renamed"


# --- the resources ----------------------------------------------------------------------------


async def test_every_resource_answers_for_a_seeded_school(
    school_api_url: str, http: aiohttp.ClientSession, settings: Settings, pool: Any
) -> None:
    a, b = new_school(), new_school()
    assert await seed.seed_school(pool, a, "Ridgeway Art School") is True
    assert await seed.seed_school(pool, a, "Ridgeway Art School") is False  # idempotent
    await seed.seed_school(pool, b, "Harbour Music")
    headers = who(settings, a)
    for resource in resources.COLLECTIONS:
        if resource.parent is not None or "list" not in resource.operations:
            continue
        status, page = await call(
            http, "GET", f"{school_api_url}/api/v1/{resource.name}?limit=100", headers
        )
        assert status == 200, resource.name
        assert page["data"], f"{resource.name} has no sample data"
        for row in page["data"]:
            assert row["school_id"] == a
            assert set(row) == set(resource.columns), resource.name
        first = page["data"][0]
        assert await call(
            http, "GET", f"{school_api_url}/api/v1/{resource.name}/{first['id']}", headers
        ) == (200, first)
    _, courses = await call(http, "GET", f"{school_api_url}/api/v1/courses", headers)
    assert all(c["title"].startswith("Ridgeway Art School") for c in courses["data"])
    assert all(c["title"] and "description" in c for c in courses["data"])
    course = courses["data"][0]
    _, reviews = await call(
        http, "GET", f"{school_api_url}/api/v1/courses/{course['id']}/reviews", headers
    )
    assert reviews["data"] and all(r["course_id"] == course["id"] for r in reviews["data"])
    _, events = await call(http, "GET", f"{school_api_url}/api/v1/events", headers)
    _, attendees = await call(
        http, "GET", f"{school_api_url}/api/v1/events/{events['data'][0]['id']}/attendees", headers
    )
    assert attendees["data"]
    _, members = await call(http, "GET", f"{school_api_url}/api/v1/members", headers)
    _, enrollments = await call(
        http,
        "GET",
        f"{school_api_url}/api/v1/members/{members['data'][0]['id']}/enrollments",
        headers,
    )
    assert enrollments["data"]
    _, info = await call(http, "GET", f"{school_api_url}/api/v1/site-info", headers)
    assert info["name"] == "Ridgeway Art School"
    assert info["published_courses"] == 3
    _, figures = await call(http, "GET", f"{school_api_url}/api/v1/analytics", headers)
    assert figures["school_id"] == a
    assert (figures["members"], figures["courses"], figures["orders"]) == (6, 4, 5)
    assert figures["paid_orders"] == 3
    assert figures["revenue_cents"] == {"USD": 4900 + 7900 + 2900}
    assert figures["average_rating"] == 4.0
    # The other school's figures are its own.
    _, theirs = await call(http, "GET", f"{school_api_url}/api/v1/site-info", who(settings, b))
    assert theirs["name"] == "Harbour Music"


async def test_a_fresh_school_reads_default_settings_and_empty_figures(
    school_api_url: str, http: aiohttp.ClientSession, settings: Settings
) -> None:
    school = new_school()
    headers = who(settings, school)
    status, body = await call(http, "GET", f"{school_api_url}/api/v1/settings", headers)
    assert status == 200
    assert (body["timezone"], body["currency"], body["theme"]) == ("UTC", "USD", "light")
    _, figures = await call(http, "GET", f"{school_api_url}/api/v1/analytics", headers)
    assert (figures["members"], figures["revenue_cents"], figures["average_rating"]) == (
        0,
        {},
        None,
    )


async def test_deleting_a_course_takes_its_lessons(
    school_api_url: str, http: aiohttp.ClientSession, settings: Settings
) -> None:
    headers = who(settings, new_school())
    course = await make(http, school_api_url, headers, "courses", {"title": "Short-lived"})
    lesson = await make(
        http, school_api_url, headers, "lessons", {"course_id": course["id"], "title": "L1"}
    )
    url = f"{school_api_url}/api/v1/courses/{course['id']}"
    assert await call(http, "DELETE", url, headers) == (204, None)
    assert (await call(http, "GET", url, headers))[0] == 404
    assert (await call(http, "DELETE", url, headers))[0] == 404
    assert (await call(http, "GET", f"{school_api_url}/api/v1/lessons/{lesson['id']}", headers))[
        0
    ] == 404


async def test_enrollments_are_made_under_their_member(
    school_api_url: str, http: aiohttp.ClientSession, settings: Settings
) -> None:
    headers = who(settings, new_school())
    member = await make(
        http, school_api_url, headers, "members", {"name": "Ana", "email": "ana@example.com"}
    )
    course = await make(http, school_api_url, headers, "courses", {"title": "C"})
    url = f"{school_api_url}/api/v1/members/{member['id']}/enrollments"
    status, enrollment = await call(http, "POST", url, headers, {"course_id": course["id"]})
    assert status == 201
    assert (enrollment["member_id"], enrollment["course_id"], enrollment["status"]) == (
        member["id"],
        course["id"],
        "active",
    )
    assert (await call(http, "POST", url, headers, {"course_id": course["id"]}))[0] == 409
    # The member comes from the path, never the body; an unknown member is an unknown URL.
    status, body = await call(
        http, "POST", url, headers, {"course_id": course["id"], "member_id": 1}
    )
    assert (status, body["fields"]) == (422, {"member_id": "read_only"})
    assert (
        await call(
            http,
            "POST",
            f"{school_api_url}/api/v1/members/999999999/enrollments",
            headers,
            {"course_id": course["id"]},
        )
    )[0] == 404
    _, page = await call(http, "GET", url, headers)
    assert page["data"] == [enrollment]


PNG_2048 = (b"\x89PNG\r\n\x1a\n" + bytes(2048))[:2048]


async def put_bytes(http: aiohttp.ClientSession, base: str, upload_url: str, data: bytes) -> None:
    """PUT the bytes to the storage edge of the school API at `base` (no gateway here)."""
    path = upload_url.split("/storage/", 1)[1]
    async with http.put(f"{base}/storage/{path}", data=data) as resp:
        assert resp.status == 201, await resp.text()


async def test_uploads_are_announced_then_confirmed(
    school_api_url: str, http: aiohttp.ClientSession, settings: Settings, pool: Any
) -> None:
    school = new_school()
    headers = who(settings, school, "storage:write")
    upload = await make(
        http,
        school_api_url,
        headers,
        "uploads",
        {"filename": "cover art.png", "content_type": "image/png", "size_bytes": 2048},
    )
    assert upload["status"] == "pending" and upload["confirmed_at"] is None
    assert f"/{school}/{upload['id']}/" in upload["upload_url"]
    assert "signature=" in upload["upload_url"] and upload["expires_at"]
    confirm = f"{school_api_url}/api/v1/uploads/{upload['id']}/confirm"
    assert (await call(http, "POST", confirm, who(settings, new_school(), "storage:write")))[
        0
    ] == 404
    assert (await call(http, "POST", confirm, who(settings, school, "read")))[0] == 403
    status, body = await call(http, "POST", confirm, headers)
    assert (status, body["error"]) == (409, "upload_incomplete")  # no bytes yet
    await put_bytes(http, school_api_url, upload["upload_url"], PNG_2048)
    status, done = await call(http, "POST", confirm, headers)
    assert (status, done["status"]) == (200, "confirmed")
    assert done["confirmed_at"] is not None
    assert await call(http, "POST", confirm, headers) == (200, done)  # a retry, not an error
    assert (await call(http, "POST", f"{school_api_url}/api/v1/uploads/nope/confirm", headers))[
        0
    ] == 404
    late = await make(
        http,
        school_api_url,
        headers,
        "uploads",
        {"filename": "late.png", "content_type": "image/png", "size_bytes": 1},
    )
    await pool.execute(
        "UPDATE school_api.uploads SET expires_at = now() - interval '1 minute' WHERE id = $1",
        late["id"],
    )
    status, body = await call(
        http, "POST", f"{school_api_url}/api/v1/uploads/{late['id']}/confirm", headers
    )
    assert (status, body["error"]) == (409, "upload_expired")


async def test_the_openapi_document_lists_every_resource(
    school_api_url: str, http: aiohttp.ClientSession, settings: Settings
) -> None:
    status, doc = await call(http, "GET", f"{school_api_url}/openapi.json", {})
    assert status == 200
    assert doc["openapi"].startswith("3.1")
    paths = doc["paths"]
    for path in (
        "/api/v1/courses",
        "/api/v1/courses/{id}",
        "/api/v1/courses/{id}/reviews",
        "/api/v1/members",
        "/api/v1/members/{id}",
        "/api/v1/members/{id}/enrollments",
        "/api/v1/orders",
        "/api/v1/orders/{id}",
        "/api/v1/lessons",
        "/api/v1/lessons/{id}",
        "/api/v1/membership-plans",
        "/api/v1/membership-plans/{id}",
        "/api/v1/events",
        "/api/v1/events/{id}",
        "/api/v1/events/{id}/attendees",
        "/api/v1/coupons",
        "/api/v1/coupons/{id}",
        "/api/v1/posts",
        "/api/v1/posts/{id}",
        "/api/v1/digital-downloads",
        "/api/v1/digital-downloads/{id}",
        "/api/v1/comments",
        "/api/v1/comments/{id}",
        "/api/v1/lecturers",
        "/api/v1/lecturers/{id}",
        "/api/v1/settings",
        "/api/v1/settings/appearance",
        "/api/v1/chapters",
        "/api/v1/chapters/{id}",
        "/api/v1/materials",
        "/api/v1/materials/{id}",
        "/api/v1/enrollments",
        "/api/v1/enrollments/{id}",
        "/api/v1/site-info",
        "/api/v1/subscriptions",
        "/api/v1/subscriptions/{id}",
        "/api/v1/analytics",
        "/api/v1/uploads",
        "/api/v1/uploads/{id}/confirm",
    ):
        assert path in paths, path
    assert set(paths["/api/v1/courses/{id}"]) >= {"get", "patch", "delete"}
    assert paths["/api/v1/posts"]["post"]["security"] == [{"oauth2": ["posts:write"]}]
    assert paths["/api/v1/settings"]["get"]["security"] == [{"oauth2": ["school:read"]}]
    assert paths["/api/v1/settings/appearance"]["get"]["security"] == [
        {"oauth2": ["appearance:read"]},
        {"oauth2": ["school:read"]},
    ]
    course = doc["components"]["schemas"]["Course"]
    assert {"id", "school_id", "title", "description"} <= set(course["required"])
    assert doc["x-event-types"]["member.enrolled"] == ["students:read"]
    # Every route the service serves is in the document.
    from services.school_api.app import create_app

    served = {r.resource.canonical for r in create_app(settings).router.routes() if r.resource}
    assert served <= set(paths) | {"/openapi.json"}


# --- seeding and serving ----------------------------------------------------------------------


async def test_seeding_is_all_or_nothing_and_once_per_school(pool: Any) -> None:
    school = new_school()
    results = await asyncio.gather(
        *(seed.seed_school(pool, school, "Busy School") for _ in range(4))
    )
    assert sorted(results) == [False, False, False, True]
    count = await pool.fetchval(
        "SELECT count(*) FROM school_api.courses WHERE school_id = $1", school
    )
    assert count == 4


async def test_serve_school_api_runs_and_stops_gracefully(
    base_env: dict[str, str], migrated: None
) -> None:
    port = free_port()
    env = {**os.environ, **base_env, "LOG_LEVEL": "info"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli",
        "serve",
        "school-api",
        "--port",
        str(port),
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_for_port(port)
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.05)
            assert resp.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout=20)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert b"outbox_relay_stopped" in stderr
