"""The MCP tools of seed 002's table, each a call of the school API on the caller's school.

A tool names its scopes (any-of, as the table gives them), the school API call it makes and
its arguments. Arguments are checked here only as far as building the call needs (types, ids
that go into a path); the school API validates values and answers 422 naming the fields, which
the tool returns as its error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

import orjson
from mcp import types

from services.gateway.mcp import schoolapi
from services.gateway.mcp.auth import Caller
from services.gateway.routetable import RouteTable

Kind = Literal["integer", "string", "boolean", "uuid"]
_PLACEHOLDER = re.compile(r"\{[a-z_]+\}")
Where = Literal["path", "query", "body"]

_JSON_TYPES: dict[Kind, str] = {
    "integer": "integer",
    "string": "string",
    "boolean": "boolean",
    "uuid": "string",
}


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    kind: Kind
    description: str
    where: Where = "body"
    required: bool = False
    nullable: bool = False
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    maximum: int | None = None

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": _JSON_TYPES[self.kind], "description": self.description}
        if self.nullable:
            out["type"] = [out["type"], "null"]
        if self.kind == "uuid":
            out["format"] = "uuid"
        if self.choices:
            out["enum"] = [*self.choices, *([None] if self.nullable else [])]
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        return out


class ArgumentError(ValueError):
    pass


def _check(param: Param, value: Any) -> Any:
    if value is None:
        if param.nullable:
            return None
        raise ArgumentError(f"{param.name} must not be null")
    if param.kind == "integer":
        # JSON has one number type: 3.0 is the integer 3, True is not.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ArgumentError(f"{param.name} must be an integer")
        if (param.minimum is not None and value < param.minimum) or (
            param.maximum is not None and value > param.maximum
        ):
            raise ArgumentError(f"{param.name} is out of range")
        return value
    if param.kind == "boolean":
        if not isinstance(value, bool):
            raise ArgumentError(f"{param.name} must be true or false")
        return value
    if not isinstance(value, str):
        raise ArgumentError(f"{param.name} must be a string")
    if param.kind == "uuid":
        try:
            return str(UUID(value))
        except ValueError:
            raise ArgumentError(f"{param.name} must be a UUID") from None
    if param.choices and value not in param.choices:
        raise ArgumentError(f"{param.name} must be one of: {', '.join(param.choices)}")
    return value


@dataclass(frozen=True, slots=True)
class Request:
    path: str
    query: dict[str, str]
    body: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    title: str
    description: str
    scopes: tuple[str, ...]  # any one of them suffices
    method: Literal["GET", "POST", "PATCH", "DELETE"]
    path: str  # `{name}` placeholders are filled from path parameters
    params: tuple[Param, ...] = ()
    # (scope, path): the first held scope's path is called instead of `path`, for a tool whose
    # scopes open different routes (get_settings: the whole settings, or their appearance).
    paths_by_scope: tuple[tuple[str, str], ...] = ()

    def paths(self) -> tuple[str, ...]:
        """Every path the tool may call."""
        return (self.path, *(p for _, p in self.paths_by_scope if p != self.path))

    def path_for(self, caller: Caller) -> str:
        for scope, path in self.paths_by_scope:
            if caller.holds((scope,))[0]:
                return path
        return self.path

    @property
    def read_only(self) -> bool:
        return self.method == "GET"

    def describe(self) -> types.Tool:
        return types.Tool(
            name=self.name,
            title=self.title,
            description=f"{self.description} Needs the scope {' or '.join(self.scopes)}.",
            input_schema={
                "type": "object",
                "properties": {p.name: p.schema() for p in self.params},
                "required": [p.name for p in self.params if p.required],
                "additionalProperties": False,
            },
            annotations=types.ToolAnnotations(
                title=self.title,
                read_only_hint=self.read_only,
                destructive_hint=self.method == "DELETE",
                idempotent_hint=self.method != "POST",
                open_world_hint=False,
            ),
        )

    def request(self, arguments: Mapping[str, Any], path: str | None = None) -> Request:
        known = {p.name: p for p in self.params}
        unknown = sorted(set(arguments) - set(known))
        if unknown:
            raise ArgumentError(f"unknown argument {unknown[0]}")
        path_values: dict[str, str] = {}
        query: dict[str, str] = {}
        body: dict[str, Any] = {}
        for param in self.params:
            if param.name not in arguments:
                if param.required:
                    raise ArgumentError(f"{param.name} is required")
                continue
            value = _check(param, arguments[param.name])
            if param.where == "path":
                # Only integers and UUIDs reach a path: nothing a caller sends can add a segment.
                path_values[param.name] = str(value)
            elif param.where == "query":
                query[param.name] = str(value).lower() if isinstance(value, bool) else str(value)
            else:
                body[param.name] = value
        if self.method == "PATCH" and not body and any(p.where == "body" for p in self.params):
            raise ArgumentError("name at least one field to change")
        send_body = body if self.method in ("POST", "PATCH") else None
        return Request((path or self.path).format(**path_values), query, send_body)


# Argument sets -------------------------------------------------------------------------------


def _id(name: str = "id", what: str = "The row's id") -> Param:
    return Param(name, "integer", what, where="path", required=True, minimum=1)


_PAGE = (
    Param("limit", "integer", "Rows per page (default 20)", where="query", minimum=1, maximum=100),
    Param("cursor", "string", "next_cursor of the previous page", where="query"),
)


def _filter(name: str, kind: Kind, what: str, choices: tuple[str, ...] = ()) -> Param:
    minimum = 1 if kind == "integer" else None
    return Param(name, kind, what, where="query", choices=choices, minimum=minimum)


def _lister(
    name: str, title: str, what: str, scopes: tuple[str, ...], path: str, *extra: Param
) -> Tool:
    return Tool(
        name,
        title,
        f"List the school's {what}, newest id last, a page at a time "
        "({data, next_cursor}; pass next_cursor back as cursor for the next page).",
        scopes,
        "GET",
        path,
        (*extra, *_PAGE),
    )


def _getter(name: str, title: str, what: str, scopes: tuple[str, ...], path: str) -> Tool:
    return Tool(name, title, f"Get one {what} of the school by id.", scopes, "GET", path, (_id(),))


_COURSE_FIELDS = (
    Param("title", "string", "Title (1-200 characters)"),
    Param("description", "string", "Description"),
    Param("status", "string", "Status", choices=("draft", "published", "archived")),
    Param("price_cents", "integer", "Price in the currency's minor unit", minimum=0),
    Param("currency", "string", "ISO 4217 code, e.g. USD"),
    Param("lecturer_id", "integer", "The lecturer teaching it", nullable=True, minimum=1),
)

_SETTINGS_FIELDS = (
    Param("name", "string", "School name (needs school:write)"),
    Param("tagline", "string", "One line under the name (needs school:write)"),
    Param("description", "string", "About the school (needs school:write)"),
    Param("contact_email", "string", "Where students write (needs school:write)", nullable=True),
    Param("timezone", "string", "IANA time zone (needs school:write)"),
    Param("locale", "string", "Language, e.g. en or pt-BR (needs school:write)"),
    Param("currency", "string", "Default ISO 4217 code (needs school:write)"),
    Param("logo_url", "string", "Logo image URL (needs appearance:write)", nullable=True),
    Param("primary_color", "string", "#rrggbb (needs appearance:write)"),
    Param("accent_color", "string", "#rrggbb (needs appearance:write)"),
    Param("theme", "string", "Colour scheme (needs appearance:write)", choices=("light", "dark")),
)


def _post_fields(title_required: bool) -> tuple[Param, ...]:
    return (
        Param("title", "string", "Title (1-200 characters)", required=title_required),
        Param("body", "string", "Content (Markdown)"),
        Param("status", "string", "Status (default draft)", choices=("draft", "published")),
        Param("lecturer_id", "integer", "The author", nullable=True, minimum=1),
        Param("published_at", "string", "ISO 8601 time it was published", nullable=True),
    )


def _lecturer_fields(name_required: bool) -> tuple[Param, ...]:
    return (
        Param("name", "string", "Full name", required=name_required),
        Param("email", "string", "Contact email", nullable=True),
        Param("bio", "string", "Biography"),
        Param("avatar_url", "string", "Portrait URL", nullable=True),
    )


# Raster images, as the school API's uploads take them (no SVG: it can carry script).
_IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")

# Seed 002's table, in its order ------------------------------------------------------------

_COURSES = ("courses:read",)
_POSTS_WRITE = ("posts:write",)
_LECTURERS_WRITE = ("lecturers:write",)

TOOLS: tuple[Tool, ...] = (
    _lister("list_courses", "List courses", "courses", _COURSES, "/api/v1/courses"),
    _getter("get_course", "Get a course", "course", _COURSES, "/api/v1/courses/{id}"),
    _lister(
        "list_reviews",
        "List a course's reviews",
        "reviews of one course",
        _COURSES,
        "/api/v1/courses/{course_id}/reviews",
        _id("course_id", "The course"),
    ),
    Tool(
        "update_course",
        "Update a course",
        "Change fields of one course; fields not given stay as they are.",
        ("courses:write",),
        "PATCH",
        "/api/v1/courses/{id}",
        (_id(), *_COURSE_FIELDS),
    ),
    _lister(
        "list_members", "List members", "members (students)", ("students:read",), "/api/v1/members"
    ),
    _getter(
        "get_member", "Get a member", "member (student)", ("students:read",), "/api/v1/members/{id}"
    ),
    Tool(
        "get_site_info",
        "Get site info",
        "What the school's public site shows about it: name, tagline, branding, counts.",
        ("school:read",),
        "GET",
        "/api/v1/site-info",
    ),
    Tool(
        "get_settings",
        "Get settings",
        "The school's configuration and appearance settings; with appearance:read alone, the "
        "appearance and theme settings only.",
        ("school:read", "appearance:read"),
        "GET",
        "/api/v1/settings",
        paths_by_scope=(
            ("school:read", "/api/v1/settings"),
            ("appearance:read", "/api/v1/settings/appearance"),
        ),
    ),
    Tool(
        "update_settings",
        "Update settings",
        "Change school settings; configuration fields need school:write, appearance fields "
        "appearance:write.",
        ("school:write", "appearance:write"),
        "PATCH",
        "/api/v1/settings",
        _SETTINGS_FIELDS,
    ),
    _lister(
        "list_orders",
        "List orders",
        "orders and payments",
        ("orders:read",),
        "/api/v1/orders",
        _filter("member_id", "integer", "Only this member's orders"),
        _filter(
            "status",
            "string",
            "Only orders in this status",
            ("pending", "paid", "refunded", "failed"),
        ),
    ),
    # Seed 002: a course's curriculum is courses:read's too (the route table says so).
    _lister(
        "list_lessons",
        "List lessons",
        "lessons (the curriculum)",
        ("curriculum:read", "courses:read"),
        "/api/v1/lessons",
        _filter("course_id", "integer", "Only this course's lessons"),
    ),
    _lister(
        "list_membership_plans",
        "List membership plans",
        "membership plans",
        ("membership_plans:read",),
        "/api/v1/membership-plans",
    ),
    _getter(
        "get_membership_plan",
        "Get a membership plan",
        "membership plan",
        ("membership_plans:read",),
        "/api/v1/membership-plans/{id}",
    ),
    _lister("list_events", "List events", "live events", ("events:read",), "/api/v1/events"),
    _getter("get_event", "Get an event", "live event", ("events:read",), "/api/v1/events/{id}"),
    _lister(
        "list_event_attendees",
        "List an event's attendees",
        "attendees of one event",
        ("events:read",),
        "/api/v1/events/{event_id}/attendees",
        _id("event_id", "The event"),
    ),
    _lister("list_coupons", "List coupons", "coupons", ("coupons:read",), "/api/v1/coupons"),
    _getter("get_coupon", "Get a coupon", "coupon", ("coupons:read",), "/api/v1/coupons/{id}"),
    _lister("list_posts", "List posts", "posts", ("posts:read",), "/api/v1/posts"),
    _getter("get_post", "Get a post", "post", ("posts:read",), "/api/v1/posts/{id}"),
    Tool(
        "create_post",
        "Create a post",
        "Create a post (a draft unless status is published).",
        _POSTS_WRITE,
        "POST",
        "/api/v1/posts",
        _post_fields(title_required=True),
    ),
    Tool(
        "update_post",
        "Update a post",
        "Change fields of one post.",
        _POSTS_WRITE,
        "PATCH",
        "/api/v1/posts/{id}",
        (_id(), *_post_fields(title_required=False)),
    ),
    Tool(
        "delete_post",
        "Delete a post",
        "Delete one post.",
        _POSTS_WRITE,
        "DELETE",
        "/api/v1/posts/{id}",
        (_id(),),
    ),
    _lister(
        "list_digital_downloads",
        "List digital downloads",
        "digital downloads",
        ("digital_products:read",),
        "/api/v1/digital-downloads",
    ),
    _getter(
        "get_digital_download",
        "Get a digital download",
        "digital download",
        ("digital_products:read",),
        "/api/v1/digital-downloads/{id}",
    ),
    _lister(
        "list_comments",
        "List comments",
        "comments on posts",
        ("comments:read",),
        "/api/v1/comments",
        _filter("post_id", "integer", "Only this post's comments"),
    ),
    _getter("get_comment", "Get a comment", "comment", ("comments:read",), "/api/v1/comments/{id}"),
    Tool(
        "upload_image",
        "Start an image upload",
        "Announce an image: answers an upload_url to PUT exactly size_bytes of content_type to "
        "(no Authorization header: the URL is signed) before expires_at, then call "
        "confirm_upload with the id.",
        ("storage:write",),
        "POST",
        "/api/v1/uploads",
        (
            Param("filename", "string", "The file's name", required=True),
            Param(
                "content_type",
                "string",
                "The image's media type",
                required=True,
                choices=_IMAGE_TYPES,
            ),
            Param("size_bytes", "integer", "The file's size in bytes", required=True, minimum=1),
        ),
    ),
    Tool(
        "confirm_upload",
        "Confirm an image upload",
        "Confirm an upload once its bytes are PUT (refused with upload_incomplete before); "
        "answers the image's url.",
        ("storage:write",),
        "POST",
        "/api/v1/uploads/{id}/confirm",
        (Param("id", "uuid", "The upload's id", where="path", required=True),),
    ),
    _lister(
        "list_lecturers", "List lecturers", "lecturers", ("lecturers:read",), "/api/v1/lecturers"
    ),
    _getter(
        "get_lecturer", "Get a lecturer", "lecturer", ("lecturers:read",), "/api/v1/lecturers/{id}"
    ),
    Tool(
        "create_lecturer",
        "Create a lecturer",
        "Create a lecturer profile.",
        _LECTURERS_WRITE,
        "POST",
        "/api/v1/lecturers",
        _lecturer_fields(name_required=True),
    ),
    Tool(
        "update_lecturer",
        "Update a lecturer",
        "Change fields of one lecturer profile.",
        _LECTURERS_WRITE,
        "PATCH",
        "/api/v1/lecturers/{id}",
        (_id(), *_lecturer_fields(name_required=False)),
    ),
)
BY_NAME: dict[str, Tool] = {t.name: t for t in TOOLS}


def disagreements(table: RouteTable) -> list[str]:
    """Where a tool's scopes differ from what the route table asks of the same call.

    The route table is the one place saying which scope opens which route; a tool reaches the
    school API directly, so the gateway checks at start that each tool asks the same (any-of,
    as sets; a tool with `paths_by_scope` needs each scope to open its own path). A route the
    table does not protect is not compared (a trimmed table of a test or a deployment).
    """
    problems: list[str] = []
    for tool in TOOLS:
        wanted: set[str] = set()
        for path in tool.paths():
            route = table.match(_PLACEHOLDER.sub("1", path))
            if route is None or not route.protected:
                continue
            required = route.required(tool.method)
            if required is None:
                problems.append(f"MCP tool {tool.name}: no {tool.method} {path} in the table")
                continue
            wanted |= set(required)
            opened_by = [s for s, p in tool.paths_by_scope if p == path and s not in required]
            if opened_by:
                problems.append(f"MCP tool {tool.name}: {opened_by[0]} does not open {path}")
        if tool.paths_by_scope:
            wanted &= {s for s, _ in tool.paths_by_scope}
        if wanted and wanted != set(tool.scopes):
            problems.append(
                f"MCP tool {tool.name} asks for {' or '.join(tool.scopes)}; the route table for "
                f"{tool.method} {tool.path} asks for {' or '.join(sorted(wanted))}"
            )
    return problems


# Running a tool ----------------------------------------------------------------------------


def _error(text: str, detail: Any = None) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(text=text)],
        structured_content=detail if isinstance(detail, dict) else None,
        is_error=True,
    )


# What a client is told to ask for first (the 401's `scope`): reading, every tool's first
# read scope. Writing comes later by step-up (a 403 naming the scope), so a user first
# consents to an app that only reads, and to each kind of change when the app needs it.
STARTING_SCOPE = " ".join(sorted({t.scopes[0] for t in TOOLS if t.read_only}))

# Every tool is offered, with the scope it needs in its description: a tool the grant lacks
# is how a client learns, by the 403 on calling it, which scope to authorize next.
LISTED: tuple[types.Tool, ...] = tuple(t.describe() for t in TOOLS)


def listed() -> list[types.Tool]:
    return list(LISTED)


def refused(caller: Caller, name: str) -> Tool | None:
    """The tool `name` when the caller's grant lacks every scope it accepts."""
    tool = BY_NAME.get(name)
    if tool is None or caller.holds(tool.scopes)[0]:
        return None
    return tool


async def run(caller: Caller, name: str, arguments: Mapping[str, Any]) -> types.CallToolResult:
    tool = BY_NAME.get(name)
    if tool is None:
        return _error(f"There is no tool named {name!r}.")
    allowed, scope_used = caller.holds(tool.scopes)
    if not allowed:
        needed = " or ".join(tool.scopes)
        # The /mcp call's own record is its answer's; this refusal within it has one more.
        slot = caller.reserve()
        if slot is None:
            return _error(schoolapi.UNRECORDABLE)
        caller.ctx.metrics.rejections.labels("insufficient_scope").inc()
        if not await slot.written(caller.record("POST", f"/mcp/tools/{tool.name}", 403, None)):
            return _error(schoolapi.UNRECORDABLE)
        return _error(
            f"insufficient_scope: {tool.name} needs the scope {needed}, which this token was "
            "not granted. Authorize again asking for it.",
            {"error": "insufficient_scope", "scope": " ".join(tool.scopes)},
        )
    try:
        req = tool.request(arguments, tool.path_for(caller))
    except ArgumentError as exc:
        return _error(f"invalid arguments: {exc}")
    try:
        answer = await schoolapi.call(
            caller, tool.method, req.path, query=req.query, body=req.body, scope=scope_used
        )
    except schoolapi.Unreachable as exc:
        return _error(str(exc))
    if answer.status == 204:
        return _success({"deleted": True, **{k: v for k, v in arguments.items() if k == "id"}})
    if 200 <= answer.status < 300:
        return _success(answer.body)
    return _upstream_error(tool, answer)


def _success(body: Any) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(text=orjson.dumps(body).decode())],
        structured_content=body if isinstance(body, dict) else {"result": body},
    )


def _upstream_error(tool: Tool, answer: schoolapi.Answer) -> types.CallToolResult:
    body = answer.body if isinstance(answer.body, dict) else {}
    error = body.get("error", f"http_{answer.status}")
    if answer.status == 404:
        text = f"not_found: no such row at this school ({tool.name})."
    elif answer.status == 403 and error == "insufficient_scope":
        # The school API's finer checks (a settings field needing the other :write scope).
        text = f"insufficient_scope: this change needs the scope {body.get('scope', '')}."
    elif answer.status in (400, 409, 422):
        detail = body.get("fields") or body.get("error_description") or error
        text = (
            f"{error}: {orjson.dumps(detail).decode() if not isinstance(detail, str) else detail}"
        )
    else:
        text = f"The school API answered {answer.status} ({error})."
    return _error(text, {"status": answer.status, **body})
