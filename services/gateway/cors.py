"""CORS for the protected API: only the partner origins registered on a client (seed 004).

A preflight carries no token, so it is answered for any origin registered on some live client
usable at the Host's school (the union is cached per school). The actual call then gets
`Access-Control-Allow-Origin` only when its origin is registered on the token's own client:
a partner's page cannot read answers to another client's tokens. The origin is echoed, never
`*`, and every answer that depends on the Origin says `Vary: Origin`.
"""

from __future__ import annotations

from collections.abc import MutableMapping

from aiohttp import web
from multidict import CIMultiDict

from libs.common.origins import normalise
from services.gateway.routetable import Route

ALLOWED_HEADERS = ("Authorization", "Content-Type", "X-Request-Id")
EXPOSED_HEADERS = (
    "RateLimit-Limit",
    "RateLimit-Remaining",
    "RateLimit-Reset",
    "RateLimit-Policy",
    "Retry-After",
    "WWW-Authenticate",
    "X-Request-Id",
)
_EXPOSED = ", ".join(EXPOSED_HEADERS)
_ALLOWED_HEADER_NAMES = frozenset(h.lower() for h in ALLOWED_HEADERS)


def origin_of(request: web.Request) -> str | None:
    origin = request.headers.get("Origin")
    return normalise(origin) if origin else None


def is_preflight(request: web.Request) -> bool:
    return request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers


def preflight(
    request: web.Request, route: Route, registered: frozenset[str], max_age: int
) -> web.Response:
    """204 with the grant when the origin is registered at the school; 204 without it else."""
    headers = CIMultiDict({"Vary": "Origin"})
    origin = origin_of(request)
    method = request.headers.get("Access-Control-Request-Method", "").strip().upper()
    asked = {
        h.strip().lower()
        for h in request.headers.get("Access-Control-Request-Headers", "").split(",")
        if h.strip()
    }
    if (
        origin is not None
        and origin in registered
        and method in route.scopes
        and asked <= _ALLOWED_HEADER_NAMES
    ):
        headers["Access-Control-Allow-Origin"] = origin
        headers["Access-Control-Allow-Methods"] = ", ".join(route.allowed_methods)
        headers["Access-Control-Allow-Headers"] = ", ".join(ALLOWED_HEADERS)
        headers["Access-Control-Max-Age"] = str(max_age)
    return web.Response(status=204, headers=headers)


def grant(headers: MutableMapping[str, str], origin: str | None, allowed: frozenset[str]) -> None:
    """Add the CORS grant for an actual call when `origin` is registered on the client."""
    if origin is None:
        return
    vary = headers.get("Vary")
    headers["Vary"] = f"{vary}, Origin" if vary else "Origin"
    if origin in allowed:
        headers["Access-Control-Allow-Origin"] = origin
        headers["Access-Control-Expose-Headers"] = _EXPOSED
