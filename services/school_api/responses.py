"""How the school API answers: one JSON encoding, and the error shapes of every endpoint.

The same `dumps` renders an HTTP answer and an event's `data`, which is how an event carries a
row exactly as the API shows it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from uuid import UUID

import orjson
from aiohttp import web

# Timestamps as ISO 8601 UTC with a `Z`, the way every answer and event spells them.
_OPTIONS = orjson.OPT_UTC_Z


def _default(value: Any) -> Any:
    # asyncpg answers uuid columns with its own UUID type, a subclass orjson does not know.
    if isinstance(value, UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=_default, option=_OPTIONS)


def json(value: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=dumps(value), status=status, headers=headers, content_type="application/json"
    )


class ApiError(Exception):
    """An answer other than success; the `api_errors` middleware renders it."""

    def __init__(self, status: int, error: str, **extra: Any) -> None:
        super().__init__(error)
        self.status = status
        self.body: dict[str, Any] = {"error": error, **extra}

    def response(self) -> web.Response:
        return json(self.body, status=self.status)


def unauthenticated() -> ApiError:
    return ApiError(401, "unauthenticated")


def insufficient_scope(any_of: Iterable[str]) -> ApiError:
    # Space-separated like RFC 6750's `scope` attribute: any one of them would do.
    return ApiError(403, "insufficient_scope", scope=" ".join(any_of))


def not_found() -> ApiError:
    return ApiError(404, "not_found")


def bad_request(description: str) -> ApiError:
    return ApiError(400, "invalid_request", error_description=description)


def validation_failed(fields: dict[str, str]) -> ApiError:
    return ApiError(422, "validation_failed", fields=fields)


def conflict(fields: dict[str, str]) -> ApiError:
    return ApiError(409, "conflict", fields=fields)
