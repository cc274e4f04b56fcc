"""The gateway's HTTP surface: every path not its own goes through :func:`dispatch`.

A path in normal form finds its route in the route table (routetable.py). Public routes pass
through to their upstream as they are. Protected routes are answered on a school's Host only:
CORS preflights here (cors.py), every other call by the contract's checks (checks.py), and
only a call that passed them all is forwarded, carrying the verified identity instead of the
token.
"""

from __future__ import annotations

import contextlib
import re

import asyncpg
import structlog
from aiohttp import web

from libs.common import tracing
from services.gateway import cors, proxy, refusals
from services.gateway.checks import checked_call
from services.gateway.context import GatewayContext, context
from services.gateway.forwarded import forwarding, host_of
from services.gateway.routetable import Route

# Paths must be in normal form: the route is chosen on the path the upstream will see, so no
# dot segments, empty segments, backslashes or encoded separators that an upstream might
# resolve differently (`/api/v1/courses/..%2Fmembers` must not reach members as courses).
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c|2e)", re.IGNORECASE)
_DOT_SEGMENT = re.compile(r"/\.\.?(/|$)")


def _normal_path(request: web.Request) -> bool:
    path = request.path
    if "//" in path or "\\" in path or ("/." in path and _DOT_SEGMENT.search(path)):
        return False
    raw = request.raw_path.split("?", 1)[0]
    return "%" not in raw or not _ENCODED_SEPARATOR.search(raw)


async def dispatch(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    if not _normal_path(request):
        response: web.StreamResponse = refusals.path_not_normal()
        ctx.metrics.call("unmatched", 400)
        return response
    route = ctx.routes.match(request.path)
    if route is None:
        ctx.metrics.call("unmatched", 404)
        return refusals.not_found()
    if tracing.ENABLED:
        # The catch-all route names nothing: the span takes the route table's prefix.
        tracing.rename_request_span(f"{request.method} {route.prefix}")
    if route.protected:
        response = await protected(request, ctx, route)
    else:
        response = await public(request, ctx, route)
    ctx.metrics.call(route.prefix, response.status)
    return response


async def public(request: web.Request, ctx: GatewayContext, route: Route) -> web.StreamResponse:
    """Pass through untouched; the upstream (identity) decides, including unknown schools."""
    host = host_of(request, ctx)
    if ctx.subdomain_of(host) is None:
        return refusals.not_found()
    headers = proxy.upstream_request_headers(request, forwarding(request, ctx, host), identity=None)
    return await proxy.forward(
        request,
        ctx.upstreams,
        route.upstream,
        headers,
        ctx.metrics,
        protected=False,
        max_body=route.max_body,
    )


async def protected(request: web.Request, ctx: GatewayContext, route: Route) -> web.StreamResponse:
    """A protected route, on a school's Host only: its CORS preflight, or its checked call."""
    host = host_of(request, ctx)
    subdomain = ctx.subdomain_of(host)
    if not subdomain:
        # A foreign Host, or the platform's own: the school API lives on school origins only.
        return refusals.not_found()
    try:
        school_id = await ctx.directory.school_id(subdomain)
    except (asyncpg.PostgresError, OSError):
        return refusals.unavailable()
    if school_id is None:
        return refusals.not_found()
    structlog.contextvars.bind_contextvars(school=subdomain)

    if cors.is_preflight(request):
        try:
            registered = await ctx.directory.school_origins(school_id)
        except (asyncpg.PostgresError, OSError):
            return refusals.unavailable()
        return cors.preflight(request, route, registered, ctx.settings.gateway.cors_max_age)

    response = await checked_call(request, ctx, route, school_id, subdomain, host)
    if response.status == 401 and "Origin" in request.headers:
        # A partner's page must be able to read a 401 to know to refresh its token; the answer
        # holds nothing of the school's, so any origin registered at the school may read it.
        with contextlib.suppress(asyncpg.PostgresError, OSError):
            registered = await ctx.directory.school_origins(school_id)
            cors.grant(response.headers, cors.origin_of(request), registered)
    return response
