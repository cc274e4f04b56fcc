"""Reading what callers send: JSON bodies checked against the catalogue, list parameters,
cursors and path ids.

Every problem with a body is collected, not just the first, and answered as
`422 {"error": "validation_failed", "fields": {"title": "required", ...}}` with short, stable
codes a program can act on: required, unknown_field, read_only, must_not_be_null,
must_be_<type>, too_short, too_long, too_small, too_large, invalid_choice, invalid_format
(and, from the store, not_found for a reference to a row the school does not have).
"""

from __future__ import annotations

import base64
import binascii
import re
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web

from services.school_api.resources.model import MAX_BIGINT, MAX_INT, Field, Resource
from services.school_api.responses import bad_request, not_found, validation_failed

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
# The key of problems with the body as a whole rather than one field.
BODY = "_"

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
_LOCALE = re.compile(r"^[a-z]{2,3}(-[A-Z]{2})?$")
_COUPON_CODE = re.compile(r"^[A-Z0-9_-]+$")
_DIGITS = re.compile(r"^[0-9]{1,19}$")


class Invalid(Exception):
    """One field's problem, as its code."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@cache
def _timezones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _check_format(f: Field, value: str) -> None:
    ok = True
    if f.fmt == "email":
        ok = bool(_EMAIL.match(value))
    elif f.fmt == "url":
        parts = urlsplit(value)
        ok = parts.scheme in ("http", "https") and bool(parts.netloc) and " " not in value
    elif f.fmt == "color":
        ok = bool(_COLOR.match(value))
    elif f.fmt == "currency":
        ok = bool(_CURRENCY.match(value))
    elif f.fmt == "locale":
        ok = bool(_LOCALE.match(value))
    elif f.fmt == "timezone":
        ok = value in _timezones()
    elif f.fmt == "coupon_code":
        ok = bool(_COUPON_CODE.match(value))
    if not ok:
        raise Invalid("invalid_format")


def _string(f: Field, value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid("must_be_string")
    # PostgreSQL text cannot hold NUL; other control characters have no place in these fields.
    if "\x00" in value:
        raise Invalid("invalid_format")
    if len(value) < f.min_length:
        raise Invalid("required" if not value else "too_short")
    if f.max_length is not None and len(value) > f.max_length:
        raise Invalid("too_long")
    if f.fmt is not None:
        _check_format(f, value)
    return value


def _integer(f: Field, value: Any, *, default_min: int, default_max: int) -> int:
    # JSON true/false arrive as Python bools, which are ints; they are not numbers here.
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid("must_be_integer")
    low = f.minimum if f.minimum is not None else default_min
    high = f.maximum if f.maximum is not None else default_max
    if value < low:
        raise Invalid("too_small")
    if value > high:
        raise Invalid("too_large")
    return value


_INFINITIES = (datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC))


def _timestamp(value: Any) -> datetime:
    if not isinstance(value, str):
        raise Invalid("must_be_timestamp")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise Invalid("must_be_timestamp") from None
    # A time without an offset means different instants to different readers.
    if parsed.tzinfo is None:
        raise Invalid("must_be_timestamp")
    try:
        # Year 1 at +14:00 is in year 0 in UTC, which Python (and so asyncpg) cannot hold.
        instant = parsed.astimezone(UTC)
    except OverflowError:
        raise Invalid("must_be_timestamp") from None
    # asyncpg writes the first and last instants Python holds as PostgreSQL's -infinity and
    # infinity, and reads those back without a zone: the value would not survive the trip.
    if instant in _INFINITIES:
        raise Invalid("must_be_timestamp")
    return instant


def check_value(f: Field, value: Any) -> Any:
    """The value to store for `f`, or Invalid with the problem's code."""
    if value is None:
        if not f.nullable:
            raise Invalid("must_not_be_null")
        return None
    if f.kind in ("string", "text"):
        return _string(f, value)
    if f.kind == "integer":
        return _integer(f, value, default_min=-MAX_INT - 1, default_max=MAX_INT)
    if f.kind == "reference":
        return _integer(f, value, default_min=1, default_max=MAX_BIGINT)
    if f.kind == "boolean":
        if not isinstance(value, bool):
            raise Invalid("must_be_boolean")
        return value
    if f.kind == "timestamp":
        return _timestamp(value)
    if f.kind == "enum":
        if not isinstance(value, str):
            raise Invalid("must_be_string")
        if value not in f.choices:
            raise Invalid("invalid_choice")
        return value
    raise Invalid("read_only")  # computed kinds (number, object) are never input


async def read_object(request: web.Request) -> dict[str, Any]:
    """The request's JSON object; 400 for another media type or broken JSON."""
    if request.content_type != "application/json":
        raise bad_request("Send the body as application/json.")
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise validation_failed({BODY: "must_be_object"})
    return body


def _writable(resource: Resource, *, creating: bool) -> dict[str, Field]:
    parent_field = resource.parent.field if resource.parent else None
    return {
        f.name: f
        for f in resource.fields
        if f.writable and f.name != parent_field and (creating or f.updatable)
    }


def _collect(
    resource: Resource, body: Mapping[str, Any], *, creating: bool
) -> tuple[dict[str, Any], dict[str, str]]:
    allowed = _writable(resource, creating=creating)
    values: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for name, value in body.items():
        f = allowed.get(name)
        if f is None:
            known = name in resource.field_map or name in ("id", "school_id")
            problems[name] = "read_only" if known else "unknown_field"
            continue
        try:
            values[name] = check_value(f, value)
        except Invalid as exc:
            problems[name] = exc.code
    if creating:
        for f in allowed.values():
            if f.required and f.name not in body:
                problems[f.name] = "required"
    # Store columns in catalogue order, so equal field sets share one prepared statement.
    ordered = {f.name: values[f.name] for f in resource.fields if f.name in values}
    return ordered, problems


def for_create(resource: Resource, body: Mapping[str, Any]) -> dict[str, Any]:
    values, problems = _collect(resource, body, creating=True)
    if problems:
        raise validation_failed(problems)
    return values


def for_update(resource: Resource, body: Mapping[str, Any]) -> dict[str, Any]:
    values, problems = _collect(resource, body, creating=False)
    if problems:
        raise validation_failed(problems)
    if not values:
        raise validation_failed({BODY: "no_fields"})
    return values


def field_scopes(resource: Resource, values: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """The narrower write scopes the given fields need on top of the resource's."""
    needed: list[tuple[str, ...]] = []
    for name in values:
        scopes = resource.field_map[name].write_scopes
        if scopes is not None and scopes not in needed:
            needed.append(scopes)
    return needed


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(str(last_id).encode()).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise Invalid("invalid") from None
    if not _DIGITS.match(raw) or not 0 < int(raw) <= MAX_BIGINT:
        raise Invalid("invalid")
    return int(raw)


@dataclass(frozen=True, slots=True)
class Page:
    after: int  # the last id already seen; 0 before the first page
    limit: int
    filters: dict[str, Any]


def _limit(raw: str) -> int:
    if not _DIGITS.match(raw):
        raise Invalid("must_be_integer")
    value = int(raw)
    if value < 1:
        raise Invalid("too_small")
    if value > MAX_LIMIT:
        raise Invalid("too_large")
    return value


def _filter_value(f: Field, raw: str) -> Any:
    if f.kind == "reference":
        if not _DIGITS.match(raw):
            raise Invalid("must_be_integer")
        return check_value(f, int(raw))
    return check_value(f, raw)


def page(resource: Resource, query: Mapping[str, str]) -> Page:
    """`limit`, `cursor` and the resource's filters from a list's query string; 422 if bad.

    Unknown parameters are refused rather than ignored: a mistyped filter would otherwise
    answer every row and look like it worked.
    """
    limit, after = DEFAULT_LIMIT, 0
    filters: dict[str, Any] = {}
    problems: dict[str, str] = {}
    for name, raw in query.items():
        try:
            if name == "limit":
                limit = _limit(raw)
            elif name == "cursor":
                after = decode_cursor(raw)
            else:
                f = resource.field_map.get(name)
                if f is None or not f.filterable or name in filters:
                    problems[name] = "unknown_parameter" if name not in filters else "repeated"
                    continue
                filters[name] = _filter_value(f, raw)
        except Invalid as exc:
            problems[name] = exc.code
    if problems:
        raise validation_failed(problems)
    return Page(after=after, limit=limit, filters=filters)


def next_cursor(rows: list[dict[str, Any]], limit: int) -> str | None:
    """The cursor after a page fetched with `limit + 1` rows; None on the last page."""
    if len(rows) <= limit:
        return None
    return encode_cursor(int(rows[limit - 1]["id"]))


def path_id(request: web.Request, name: str = "id") -> int:
    """A row id from the path; anything that cannot be one is simply not found."""
    raw = request.match_info.get(name, "")
    if not _DIGITS.match(raw) or not 0 < int(raw) <= MAX_BIGINT:
        raise not_found()
    return int(raw)
