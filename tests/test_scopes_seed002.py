"""Every scope of seed 002 opens what its words say, and nothing else (issue 17 section 3).

Through a real gateway in front of the real school API, with tokens from identity's token
endpoint: for each scope, a token holding only it (and `openid`) calls every probe below; a
probe the scope opens gets past the scope checks (any answer but 403), any other is 403
`insufficient_scope` in RFC 6750's shape. The same for the MCP tools, with MCP tokens.

The expectations are written here in the seed's words, not read from the route table, so a
route table that drifts from the seed fails this test. No probe changes data: writes send an
empty body (422 after the scope check) or name a row that does not exist (404).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from libs.common.config import Settings
from libs.common.scopes import DATA_SCOPES, IDENTITY_SCOPES
from services.gateway import routetable
from services.gateway.app import create_app
from services.gateway.mcp import tools as mcp_tools
from services.school_api.resources import CATALOGUE as RESOURCES
from tests.test_mcp import (  # noqa: F401 (fixtures)
    System,
    Tenant,
    _call_raw,
    _token_request,
    consented_code,
    http,
    mcp_token,
    system,
    tenant,
)

pytestmark = pytest.mark.timeout(240)

NOWHERE = 999_999_999  # an id no school has: a write that passes its scope check answers 404

# Seed 002, scope by scope, as (method, path, body) probes a scope opens. `{course}` and the
# like are ids of the tenant's seeded rows.
_CURRICULUM = ("chapters", "lessons", "materials")
OPENS: dict[str, list[tuple[str, str, Any]]] = {
    # "Read course details, curriculum, and enrollment data"
    "courses:read": [
        ("GET", "/api/v1/courses", None),
        ("GET", "/api/v1/courses/{course}", None),
        ("GET", "/api/v1/courses/{course}/reviews", None),
        *(("GET", f"/api/v1/{name}", None) for name in _CURRICULUM),
        ("GET", "/api/v1/chapters/{chapter}", None),
        ("GET", "/api/v1/lessons/{lesson}", None),
        ("GET", "/api/v1/materials/{material}", None),
        ("GET", "/api/v1/lessons?course_id={course}", None),
        ("GET", "/api/v1/enrollments", None),
        ("GET", "/api/v1/enrollments/{enrollment}", None),
        ("GET", "/api/v1/enrollments?course_id={course}", None),
    ],
    # "Create, update, and delete courses"
    "courses:write": [
        ("POST", "/api/v1/courses", {}),
        ("PATCH", "/api/v1/courses/{course}", {}),
        ("DELETE", f"/api/v1/courses/{NOWHERE}", None),
    ],
    # "Read student profiles and progress data"
    "students:read": [
        ("GET", "/api/v1/members", None),
        ("GET", "/api/v1/members/{member}", None),
        ("GET", "/api/v1/members/{member}/enrollments", None),
        ("GET", "/api/v1/enrollments", None),
        ("GET", "/api/v1/enrollments/{enrollment}", None),
        ("GET", "/api/v1/enrollments?course_id={course}", None),
    ],
    # "Create and update student records, manage enrollments"
    "students:write": [
        ("POST", "/api/v1/members", {}),
        ("PATCH", "/api/v1/members/{member}", {}),
        ("POST", "/api/v1/members/{member}/enrollments", {}),
        ("POST", "/api/v1/enrollments", {}),
        ("PATCH", "/api/v1/enrollments/{enrollment}", {}),
        ("DELETE", f"/api/v1/enrollments/{NOWHERE}", None),
    ],
    "analytics:read": [("GET", "/api/v1/analytics", None)],
    # "Read curriculum structure (lessons, chapters, materials)"
    "curriculum:read": [
        *(("GET", f"/api/v1/{name}", None) for name in _CURRICULUM),
        ("GET", "/api/v1/chapters/{chapter}", None),
        ("GET", "/api/v1/lessons/{lesson}", None),
        ("GET", "/api/v1/materials/{material}", None),
        ("GET", "/api/v1/lessons?course_id={course}", None),
    ],
    # "Create and update curriculum content"
    "curriculum:write": [
        *(("POST", f"/api/v1/{name}", {}) for name in _CURRICULUM),
        ("PATCH", "/api/v1/chapters/{chapter}", {}),
        ("PATCH", "/api/v1/lessons/{lesson}", {}),
        ("PATCH", "/api/v1/materials/{material}", {}),
        ("DELETE", f"/api/v1/chapters/{NOWHERE}", None),
        ("DELETE", f"/api/v1/materials/{NOWHERE}", None),
    ],
    "orders:read": [("GET", "/api/v1/orders", None)],
    # "Read school configuration and settings"
    "school:read": [
        ("GET", "/api/v1/settings", None),
        ("GET", "/api/v1/settings/appearance", None),
        ("GET", "/api/v1/site-info", None),
    ],
    "school:write": [("PATCH", "/api/v1/settings", {})],
    # "Read school appearance and theme settings"
    "appearance:read": [("GET", "/api/v1/settings/appearance", None)],
    "appearance:write": [
        ("PATCH", "/api/v1/settings", {}),
        ("PATCH", "/api/v1/settings/appearance", {}),
    ],
    "events:read": [
        ("GET", "/api/v1/events", None),
        ("GET", "/api/v1/events/{event}/attendees", None),
    ],
    "events:write": [("POST", "/api/v1/events", {})],
    "membership_plans:read": [("GET", "/api/v1/membership-plans", None)],
    "membership_plans:write": [("POST", "/api/v1/membership-plans", {})],
    "coupons:read": [("GET", "/api/v1/coupons", None)],
    "coupons:write": [("POST", "/api/v1/coupons", {})],
    "posts:read": [("GET", "/api/v1/posts", None)],
    "posts:write": [("POST", "/api/v1/posts", {})],
    "digital_products:read": [("GET", "/api/v1/digital-downloads", None)],
    "digital_products:write": [("POST", "/api/v1/digital-downloads", {})],
    "comments:read": [("GET", "/api/v1/comments", None)],
    "lecturers:read": [("GET", "/api/v1/lecturers", None)],
    "lecturers:write": [("POST", "/api/v1/lecturers", {})],
    "storage:write": [("POST", "/api/v1/uploads", {})],
    "subscriptions:read": [("GET", "/api/v1/subscriptions", None)],
    "subscriptions:write": [("POST", "/api/v1/subscriptions", {})],
}
PROBES = sorted({probe[:2]: probe for probes in OPENS.values() for probe in probes}.values())

# Seed 002's MCP table, with the scopes' words applied: list_lessons reads a course's
# curriculum, so courses:read opens it too.
TOOL_SCOPES: dict[str, set[str]] = {
    "list_courses": {"courses:read"},
    "get_course": {"courses:read"},
    "list_reviews": {"courses:read"},
    "update_course": {"courses:write"},
    "list_members": {"students:read"},
    "get_member": {"students:read"},
    "get_site_info": {"school:read"},
    "get_settings": {"school:read", "appearance:read"},
    "update_settings": {"school:write", "appearance:write"},
    "list_orders": {"orders:read"},
    "list_lessons": {"curriculum:read", "courses:read"},
    "list_membership_plans": {"membership_plans:read"},
    "get_membership_plan": {"membership_plans:read"},
    "list_events": {"events:read"},
    "get_event": {"events:read"},
    "list_event_attendees": {"events:read"},
    "list_coupons": {"coupons:read"},
    "get_coupon": {"coupons:read"},
    "list_posts": {"posts:read"},
    "get_post": {"posts:read"},
    "create_post": {"posts:write"},
    "update_post": {"posts:write"},
    "delete_post": {"posts:write"},
    "list_digital_downloads": {"digital_products:read"},
    "get_digital_download": {"digital_products:read"},
    "list_comments": {"comments:read"},
    "get_comment": {"comments:read"},
    "upload_image": {"storage:write"},
    "confirm_upload": {"storage:write"},
    "list_lecturers": {"lecturers:read"},
    "get_lecturer": {"lecturers:read"},
    "create_lecturer": {"lecturers:write"},
    "update_lecturer": {"lecturers:write"},
}
# Arguments that pass the tool's own checks and change nothing: ids of no row, or no fields.
TOOL_ARGUMENTS: dict[str, dict[str, Any]] = {
    "get_course": {"id": NOWHERE},
    "list_reviews": {"course_id": NOWHERE},
    "update_course": {"id": NOWHERE, "title": "x"},
    "get_member": {"id": NOWHERE},
    "update_settings": {"theme": "purple"},  # not a theme: 422 after the scope checks
    "get_membership_plan": {"id": NOWHERE},
    "get_event": {"id": NOWHERE},
    "list_event_attendees": {"event_id": NOWHERE},
    "get_coupon": {"id": NOWHERE},
    "get_post": {"id": NOWHERE},
    "create_post": {"title": ""},  # too short: 422
    "update_post": {"id": NOWHERE, "title": "x"},
    "delete_post": {"id": NOWHERE},
    "get_digital_download": {"id": NOWHERE},
    "get_comment": {"id": NOWHERE},
    "upload_image": {"filename": "a.png", "content_type": "image/png", "size_bytes": 10**12},
    "confirm_upload": {"id": "00000000-0000-4000-8000-000000000000"},
    "get_lecturer": {"id": NOWHERE},
    "create_lecturer": {"name": ""},
    "update_lecturer": {"id": NOWHERE, "name": "x"},
}

_SCOPE_PARAM = re.compile(r'scope="([^"]*)"')


async def _ids(pool: asyncpg.Pool, school_id: int) -> dict[str, int]:
    ids: dict[str, int] = {}
    for key, table in (
        ("course", "courses"),
        ("member", "members"),
        ("enrollment", "enrollments"),
        ("chapter", "chapters"),
        ("lesson", "lessons"),
        ("material", "materials"),
        ("event", "events"),
    ):
        found = await pool.fetchval(
            f"SELECT min(id) FROM school_api.{table} WHERE school_id = $1",
            school_id,
        )
        assert found is not None, table
        ids[key] = found
    return ids


async def _school_token(
    session: aiohttp.ClientSession,
    pool: asyncpg.Pool,
    settings: Settings,
    where: System,
    who: Tenant,
    scopes: tuple[str, ...],
) -> str:
    """A school client's access token for the tenant's admin, from the token endpoint."""
    code = await consented_code(
        pool, settings, who, school=who.school, name="Scope App", scopes=scopes, resource=None
    )
    host = where.school_host(who.school.subdomain)
    return str((await _token_request(session, where, host, code.form))["access_token"])


def test_the_expectations_cover_every_data_scope_and_tool() -> None:
    # A scope or tool added without saying what it opens fails here, not silently.
    assert set(OPENS) == set(DATA_SCOPES)
    assert set(TOOL_SCOPES) == set(mcp_tools.BY_NAME)


def test_the_school_api_and_the_mcp_tools_ask_what_the_route_table_asks(
    settings: Settings,
) -> None:
    """The route table is the one place: the school API's own checks (a second line behind the
    gateway, and the only one MCP calls meet) and the tool map agree with it."""
    table = routetable.load(settings.gateway.routes_file, settings)
    assert mcp_tools.disagreements(table) == []
    for resource in RESOURCES:
        path = resource.path.replace("{id}", "1")
        route = table.match(path)
        assert route is not None and route.protected, resource.name
        if "list" in resource.operations or "get" in resource.operations:
            assert set(route.required("GET") or ()) == set(resource.read_scopes), resource.name
        for op, method in (("create", "POST"), ("update", "PATCH"), ("delete", "DELETE")):
            if op in resource.operations:
                required = set(route.required(method) or ())
                assert required == set(resource.write_scopes), (resource.name, method)


def test_a_tool_map_that_drifts_from_the_route_table_stops_the_gateway(
    settings: Settings, tmp_path: Path
) -> None:
    text = Path(settings.gateway.routes_file).read_text(encoding="utf-8")
    narrowed = text.replace(
        'prefix = "/api/v1/lessons"\nupstream = "school_api"\nread = ["curriculum:read", '
        '"courses:read"]',
        'prefix = "/api/v1/lessons"\nupstream = "school_api"\nread = ["curriculum:read"]',
    )
    assert narrowed != text
    table = routetable.parse(narrowed, "routes.toml", routetable.configured_upstreams(settings))
    assert mcp_tools.disagreements(table) == [
        "MCP tool list_lessons asks for curriculum:read or courses:read; the route table for "
        "GET /api/v1/lessons asks for curriculum:read"
    ]
    bad = tmp_path / "routes.toml"
    bad.write_text(narrowed, encoding="utf-8")
    with pytest.raises(routetable.RouteTableError, match="list_lessons"):
        create_app(settings, routes_file=str(bad))


async def test_each_scope_opens_what_seed_002_says_through_the_gateway(
    http: aiohttp.ClientSession,  # noqa: F811
    pool: asyncpg.Pool,
    gateway_settings: Settings,
    system: System,  # noqa: F811
    tenant: Tenant,  # noqa: F811
) -> None:
    ids = await _ids(pool, tenant.school.id)
    host = system.school_host(tenant.school.subdomain)
    wrong: list[str] = []
    for scope in sorted(DATA_SCOPES | IDENTITY_SCOPES):
        token = await _school_token(
            http, pool, gateway_settings, system, tenant, tuple(dict.fromkeys(("openid", scope)))
        )
        opened = {probe[:2] for probe in OPENS.get(scope, [])}
        for method, path, body in PROBES:
            url = system.gateway + path.format(**ids)
            headers = {"Host": host, "Authorization": f"Bearer {token}"}
            data = orjson.dumps(body) if body is not None else None
            if data is not None:
                headers["Content-Type"] = "application/json"
            async with http.request(method, url, data=data, headers=headers) as resp:
                status = resp.status
                answer = await resp.read()
                challenge = resp.headers.get("WWW-Authenticate", "")
            if (method, path) in opened:
                if status == 403 or status >= 500:
                    wrong.append(f"{scope} should open {method} {path}: {status} {answer!r}")
                continue
            if status != 403:
                wrong.append(f"{scope} should not open {method} {path}: {status}")
                continue
            # RFC 6750 3.1: the challenge names the error and the scopes that would do.
            needed = _SCOPE_PARAM.search(challenge)
            if (
                not challenge.startswith("Bearer ")
                or 'error="insufficient_scope"' not in challenge
                or needed is None
                or scope in needed.group(1).split()
                or orjson.loads(answer).get("error") != "insufficient_scope"
            ):
                wrong.append(f"{scope} {method} {path}: not RFC 6750's shape: {challenge!r}")
    assert wrong == []


async def test_each_scope_opens_the_mcp_tools_seed_002_gives_it(
    http: aiohttp.ClientSession,  # noqa: F811
    pool: asyncpg.Pool,
    gateway_settings: Settings,
    system: System,  # noqa: F811
    tenant: Tenant,  # noqa: F811
) -> None:
    wrong: list[str] = []
    for scope in sorted(DATA_SCOPES):
        issued = await mcp_token(
            http, pool, gateway_settings, system, tenant, scopes=("openid", scope)
        )
        for name, scopes in sorted(TOOL_SCOPES.items()):
            status, body, headers = await _call_raw(
                http, system, issued.access_token, name, TOOL_ARGUMENTS.get(name, {})
            )
            if scope in scopes:
                # Past the scope check: a result, a tool error from the school API (404, 422)
                # but never insufficient_scope.
                if status != 200 or "insufficient_scope" in orjson.dumps(body).decode():
                    wrong.append(f"{scope} should open {name}: {status} {body}")
                continue
            challenge = headers.get("WWW-Authenticate", "")
            if status != 403 or 'error="insufficient_scope"' not in challenge:
                wrong.append(f"{scope} should not open {name}: {status} {body}")
    assert wrong == []


async def test_appearance_read_sees_the_theme_and_nothing_else(
    http: aiohttp.ClientSession,  # noqa: F811
    pool: asyncpg.Pool,
    gateway_settings: Settings,
    system: System,  # noqa: F811
    tenant: Tenant,  # noqa: F811
) -> None:
    host = system.school_host(tenant.school.subdomain)
    token = await _school_token(
        http, pool, gateway_settings, system, tenant, ("openid", "appearance:read")
    )
    headers = {"Host": host, "Authorization": f"Bearer {token}"}
    async with http.get(system.gateway + "/api/v1/settings/appearance", headers=headers) as resp:
        assert resp.status == 200
        look = await resp.json()
    assert set(look) == {
        "id",
        "school_id",
        "logo_url",
        "primary_color",
        "accent_color",
        "theme",
        "updated_at",
    }
    issued = await mcp_token(
        http, pool, gateway_settings, system, tenant, scopes=("openid", "appearance:read")
    )
    status, body, _ = await _call_raw(http, system, issued.access_token, "get_settings", {})
    assert status == 200
    content = body["result"]["structuredContent"]
    assert set(content) == set(look)
