"""Who is calling: the identity the gateway verified, read from its headers.

The school API never sees a token. The gateway validates it and forwards the result as
`X-Connect-*` headers, stripping any a caller sent; this service believes those headers only
when the call also carries the shared internal token, so a request that bypassed the gateway
is refused whatever headers it invents.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware
from multidict import CIMultiDictProxy

from libs.common.scopes import parse, satisfies
from libs.common.web import Handler
from services.school_api.responses import ApiError, insufficient_scope, unauthenticated

INTERNAL_TOKEN_HEADER = "X-Connect-Internal-Token"
SCHOOL_HEADER = "X-Connect-School-Id"
SUBJECT_HEADER = "X-Connect-Subject"
CLIENT_HEADER = "X-Connect-Client-Id"
SCOPES_HEADER = "X-Connect-Scopes"

# Paths under this prefix need an identity; probes and the OpenAPI document do not.
PROTECTED_PREFIX = "/api/"
_MAX_SCHOOL_ID = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Caller:
    school_id: int
    subject: str
    client_id: str
    scopes: frozenset[str]

    def require(self, any_of: Iterable[str]) -> None:
        """Raise 403 naming the scopes unless one of `any_of` was granted (umbrellas count)."""
        wanted = tuple(any_of)
        if not satisfies(self.scopes, wanted):
            raise insufficient_scope(wanted)


CALLER = web.RequestKey("caller", Caller)


def read_caller(headers: CIMultiDictProxy[str], internal_token: str) -> Caller | None:
    """The verified identity, or None when the headers do not prove the gateway sent them."""
    presented = headers.get(INTERNAL_TOKEN_HEADER, "")
    # An unset token must never match an absent header.
    if not internal_token or not hmac.compare_digest(presented.encode(), internal_token.encode()):
        return None
    raw_school = headers.get(SCHOOL_HEADER, "")
    subject = headers.get(SUBJECT_HEADER, "")
    client_id = headers.get(CLIENT_HEADER, "")
    if not (raw_school.isascii() and raw_school.isdigit()) or not subject or not client_id:
        return None
    school_id = int(raw_school)
    if not 0 < school_id <= _MAX_SCHOOL_ID:
        return None
    return Caller(
        school_id=school_id,
        subject=subject,
        client_id=client_id,
        scopes=frozenset(parse(headers.get(SCOPES_HEADER, ""))),
    )


def caller(request: web.Request) -> Caller:
    return request[CALLER]


def authenticate(internal_token: str) -> Middleware:
    """Middleware: every `/api/` call needs a gateway-vouched identity, else 401."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(PROTECTED_PREFIX):
            return await handler(request)
        found = read_caller(request.headers, internal_token)
        if found is None:
            raise unauthenticated()
        request[CALLER] = found
        # request_context (libs.common.web) unbinds these when the request ends.
        structlog.contextvars.bind_contextvars(school=found.school_id, client_id=found.client_id)
        return await handler(request)

    return middleware


__all__ = ["CALLER", "ApiError", "Caller", "authenticate", "caller", "read_caller"]
