"""CORS on identity's browser-facing endpoints, decided as node-oidc-provider decides it.

- Discovery and the JWKS are public documents: `Access-Control-Allow-Origin: *` for anyone.
- The token, revocation, introspection and UserInfo endpoints are client-based: an actual
  request gets the grant only when its `Origin` is registered on the client it authenticated
  as (or, for UserInfo, the client of its access token): the client's `allowed_origins`, the
  same partner allowlist the gateway's CORS uses (seed 004). A cross-origin request from any
  other origin is refused with `invalid_request` before it has any effect (no code redeemed,
  no token rotated or revoked), and carries no grant.
- A preflight names no client, so it cannot be judged: it is answered for any origin, and the
  decision falls on the actual request (a form POST without an `Authorization` header needs
  no preflight anyway, so refusing preflights would protect nothing).
- Never `Access-Control-Allow-Credentials`: these endpoints take no cookies; every
  credential travels in the request itself.
"""

from __future__ import annotations

from aiohttp import web

from libs.common.origins import normalise
from libs.common.web import Handler
from services.identity import store
from services.identity.context import issuer
from services.identity.schools import Issuer

# Public documents, and the methods they answer.
OPEN_PATHS = {
    "/.well-known/openid-configuration": "GET",
    "/.well-known/oauth-authorization-server": "GET",
    "/v1/oauth/jwks": "GET",
}
# Endpoints a browser app calls with its own client's credentials or tokens.
CLIENT_PATHS = {
    "/v1/oauth/token": "POST",
    "/api/oauth/token": "POST",
    "/v1/oauth/revoke": "POST",
    "/v1/oauth/introspect": "POST",
    "/v1/oauth/userinfo": "GET, POST",
}
ALLOWED_HEADERS = "Authorization, Content-Type"
# Bearer and Basic challenges, so an app can tell an expired token from a refused one.
EXPOSED_HEADERS = "WWW-Authenticate"
MAX_AGE = 600
REFUSED = "this origin is not registered for the client"
_MAX_REQUEST_HEADERS = 1000

# The origins registered on the request's client, once a handler has identified it.
_CLIENT_ORIGINS = web.RequestKey("cors_client_origins", frozenset)


def _origin(request: web.Request) -> str | None:
    value = request.headers.get("Origin")
    return normalise(value) if value else None


def _is_same_origin(origin: str, iss: Issuer) -> bool:
    return origin == normalise(iss.issuer)


def cross_origin(request: web.Request) -> bool:
    """Whether the request came from a page of another origin (a browser's `Origin` says so)."""
    origin = _origin(request)
    return origin is not None and not _is_same_origin(origin, issuer(request))


def admit(request: web.Request, client: store.Client) -> bool:
    """Note the client for the response's CORS grant; False when a cross-origin request comes
    from an origin the client has not registered (the caller refuses it then)."""
    origin = _origin(request)
    if origin is None:
        # A server's call (no browser, no Origin): nothing to grant, nothing to note.
        return True
    registered = frozenset(normalise(o) for o in client.allowed_origins)
    request[_CLIENT_ORIGINS] = registered
    if _is_same_origin(origin, issuer(request)):
        return True
    return origin in registered


def _vary(response: web.StreamResponse) -> None:
    vary = response.headers.get("Vary")
    if vary is None:
        response.headers["Vary"] = "Origin"
    elif "origin" not in vary.lower():
        response.headers["Vary"] = f"{vary}, Origin"


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    if request.method == "OPTIONS" or (path not in OPEN_PATHS and path not in CLIENT_PATHS):
        return await handler(request)
    response = await handler(request)
    if response.prepared:
        return response
    if path in OPEN_PATHS:
        response.headers["Access-Control-Allow-Origin"] = "*"
        return response
    origin = _origin(request)
    if origin is None:
        return response
    _vary(response)
    if origin in request.get(_CLIENT_ORIGINS, frozenset()):
        # Echoed as sent: the browser compares it with its own serialisation byte for byte.
        response.headers["Access-Control-Allow-Origin"] = request.headers["Origin"].strip()
        response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
    return response


async def preflight(request: web.Request) -> web.Response:
    """OPTIONS on a CORS-enabled endpoint: granted for any origin (see the module's note)."""
    path = request.path
    methods = OPEN_PATHS.get(path) or CLIENT_PATHS[path]
    headers = {"Allow": f"OPTIONS, {methods}"}
    origin = request.headers.get("Origin")
    if origin is None or "Access-Control-Request-Method" not in request.headers:
        return web.Response(status=204, headers=headers)
    headers["Access-Control-Allow-Methods"] = methods
    headers["Access-Control-Max-Age"] = str(MAX_AGE)
    if path in OPEN_PATHS:
        headers["Access-Control-Allow-Origin"] = "*"
        asked = request.headers.get("Access-Control-Request-Headers", "")
        # Public documents: whatever harmless headers a library likes to send are fine.
        if asked and len(asked) <= _MAX_REQUEST_HEADERS:
            headers["Access-Control-Allow-Headers"] = asked
    else:
        headers["Access-Control-Allow-Origin"] = origin.strip()
        headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
        headers["Vary"] = "Origin"
    return web.Response(status=204, headers=headers)


def setup(app: web.Application) -> None:
    for path in (*OPEN_PATHS, *CLIENT_PATHS):
        app.router.add_route("OPTIONS", path, preflight)
