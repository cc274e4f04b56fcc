"""The gateway's HTTP surface: every path not its own goes through :func:`dispatch`.

Public routes pass through to their upstream as they are. Protected routes run the contract's
checks (validation.py for the token, then revocation, scope and rate limit here) and only a
call that passed them all is forwarded, carrying the verified identity instead of the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
from collections.abc import Sequence
from typing import Any

import asyncpg
import structlog
from aiohttp import web

from libs.common.errors import bearer_challenge, bearer_error, json_response
from libs.common.logging import get_logger
from libs.common.web import REQUEST_ID_KEY
from services.gateway import audit, cors, proxy
from services.gateway.context import GatewayContext, context
from services.gateway.directory import ClientPolicy
from services.gateway.jwks import JwksUnavailable
from services.gateway.redis_pipeline import RedisReplyError
from services.gateway.routetable import Route
from services.gateway.validation import Rejection, TokenVerifier, VerifiedToken, bearer_token

log = get_logger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

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


def _error(status: int, error: str, description: str, **headers: str) -> web.Response:
    return json_response(
        {"error": error, "error_description": description}, status=status, headers=headers or None
    )


def not_found() -> web.Response:
    return _error(404, "not_found", "Nothing answers at this address.")


def unavailable() -> web.Response:
    return _error(
        503,
        "temporarily_unavailable",
        "The gateway cannot check this call right now.",
        **{"Retry-After": "1"},
    )


def audit_unavailable() -> web.Response:
    """The answer to a protected call whose audit record the buffer cannot take: refused, never
    served unaudited (contract 13; the buffer counts it in gateway_audit_refused_total)."""
    return _error(
        503,
        "temporarily_unavailable",
        "The gateway cannot record this call in the audit trail right now.",
        **{"Retry-After": "1"},
    )


def _host(request: web.Request, ctx: GatewayContext) -> str:
    if ctx.settings.gateway.trust_forwarded:
        forwarded = request.headers.get("X-Forwarded-Host")
        if forwarded:
            return forwarded.split(",")[0].strip().lower()
    return request.host.lower()


def _within(address: str | None, networks: Sequence[IPNetwork]) -> bool:
    if not address or not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def _caller(request: web.Request, trusted: Sequence[IPNetwork]) -> str | None:
    """The right-most X-Forwarded-For hop outside the trusted networks: proxies append, so
    everything left of what they added is the caller's word. The peer when there is none."""
    hops = ",".join(request.headers.getall("X-Forwarded-For", ())).split(",")
    for hop in reversed(hops):
        try:
            ip = ipaddress.ip_address(hop.strip())
        except ValueError:
            break
        if not any(ip in network for network in trusted):
            return str(ip)
    return request.remote


def forwarding(request: web.Request, ctx: GatewayContext, host: str) -> proxy.Forwarding:
    """Who called, as the gateway will tell upstreams (and the audit trail).

    The gateway is the edge: it SETS X-Forwarded-For to the one address it knows, never
    appends to what a caller wrote. Only from a trusted proxy (GATEWAY_TRUST_FORWARDED, or a
    peer in GATEWAY_TRUSTED_PROXIES) does it take the caller and scheme from X-Forwarded-*.
    """
    policy = ctx.settings.gateway
    if not (policy.trust_forwarded or _within(request.remote, policy.trusted_proxies)):
        # The peer address comes from the socket: already an IP, no parsing needed.
        return proxy.Forwarding(request.remote, request.scheme, host)
    proto = request.scheme
    # A proxy sets the scheme it was reached by (or appends it: the last is its own).
    forwarded_proto = request.headers.get("X-Forwarded-Proto", "").split(",")[-1].strip()
    if forwarded_proto in ("http", "https"):
        proto = forwarded_proto
    return proxy.Forwarding(_caller(request, policy.trusted_proxies), proto, host)


async def dispatch(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    if not _normal_path(request):
        response: web.StreamResponse = _error(
            400, "invalid_request", "The path is not in normal form."
        )
        ctx.metrics.call("unmatched", 400)
        return response
    route = ctx.routes.match(request.path)
    if route is None:
        ctx.metrics.call("unmatched", 404)
        return not_found()
    if route.protected:
        response = await protected(request, ctx, route)
    else:
        response = await public(request, ctx, route)
    ctx.metrics.call(route.prefix, response.status)
    return response


async def public(request: web.Request, ctx: GatewayContext, route: Route) -> web.StreamResponse:
    """Pass through untouched; the upstream (identity) decides, including unknown schools."""
    host = _host(request, ctx)
    if ctx.subdomain_of(host) is None:
        return not_found()
    headers = proxy.upstream_request_headers(request, forwarding(request, ctx, host), identity=None)
    return await proxy.forward(
        request, ctx.upstreams, route.upstream, headers, ctx.metrics, protected=False
    )


def _reject(ctx: GatewayContext, reason: str, description: str) -> web.Response:
    ctx.metrics.rejections.labels(reason).inc()
    log.debug("token_rejected", reason=reason)
    return bearer_error(401, "invalid_token", description)


def _no_token(ctx: GatewayContext) -> web.Response:
    # RFC 6750 3.1: a request without credentials gets the bare challenge, no error code.
    ctx.metrics.rejections.labels("no_token").inc()
    return json_response(
        {"error": "unauthorized", "error_description": "This API needs a bearer access token."},
        status=401,
        headers={"WWW-Authenticate": bearer_challenge()},
    )


async def protected(request: web.Request, ctx: GatewayContext, route: Route) -> web.StreamResponse:
    host = _host(request, ctx)
    subdomain = ctx.subdomain_of(host)
    if not subdomain:
        # A foreign Host, or the platform's own: the school API lives on school origins only.
        return not_found()
    try:
        school_id = await ctx.directory.school_id(subdomain)
    except (asyncpg.PostgresError, OSError):
        return unavailable()
    if school_id is None:
        return not_found()
    structlog.contextvars.bind_contextvars(school=subdomain)

    if cors.is_preflight(request):
        try:
            registered = await ctx.directory.school_origins(school_id)
        except (asyncpg.PostgresError, OSError):
            return unavailable()
        return cors.preflight(request, route, registered, ctx.settings.gateway.cors_max_age)

    response = await checked_call(request, ctx, route, school_id, subdomain, host)
    if response.status == 401 and "Origin" in request.headers:
        # A partner's page must be able to read a 401 to know to refresh its token; the answer
        # holds nothing of the school's, so any origin registered at the school may read it.
        with contextlib.suppress(asyncpg.PostgresError, OSError):
            registered = await ctx.directory.school_origins(school_id)
            cors.grant(response.headers, cors.origin_of(request), registered)
    return response


async def checked_call(
    request: web.Request,
    ctx: GatewayContext,
    route: Route,
    school_id: int,
    subdomain: str,
    host: str,
) -> web.StreamResponse:
    """The contract's checks in order, then the call upstream."""
    required = route.required(request.method)
    if required is None:
        return _error(
            405,
            "method_not_allowed",
            f"{request.method} is not routed here.",
            Allow=", ".join(route.allowed_methods),
        )
    authorizations = request.headers.getall("Authorization", ())
    if len(authorizations) > 1:
        return bearer_error(400, "invalid_request", "Send one Authorization header.")
    token = bearer_token(authorizations[0] if authorizations else None)
    if token is None:
        return _no_token(ctx)

    # 1-4: signature, times, issuer and audience, school.
    try:
        verified = await ctx.verifier.verify(token, school_id, subdomain)
        client = await ctx.directory.client(verified.client_id)
        TokenVerifier.check_client(client, verified.platform, school_id)
    except Rejection as exc:
        return _reject(ctx, exc.reason, exc.description)
    except (JwksUnavailable, asyncpg.PostgresError, OSError):
        return unavailable()
    assert client is not None
    structlog.contextvars.bind_contextvars(client_id=verified.client_id)

    # 5: revoked? The local set answers "yes" without Redis (and so before the audit trail is
    # asked: a revoked token's 401 is not audited).
    if verified.grant_id in ctx.revoked:
        return _reject(ctx, "revoked", "The access token has been revoked")
    # From here on the call may be refused with a record (403, 429) or served: its record's
    # place in the buffer is taken before it is charged or sent upstream, so no call is served
    # unaudited and one that cannot be recorded is refused (contract 13). An answer that writes
    # no record (revoked, Redis away) gives the place back.
    slot = ctx.audit.reserve()
    if slot is None:
        return audit_unavailable()
    try:
        return await _admitted_call(
            request, ctx, route, required, verified, client, school_id, host, slot
        )
    finally:
        slot.release()


async def _admitted_call(
    request: web.Request,
    ctx: GatewayContext,
    route: Route,
    required: tuple[str, ...],
    verified: VerifiedToken,
    client: ClientPolicy,
    school_id: int,
    host: str,
    slot: audit.Slot,
) -> web.StreamResponse:
    """Steps 5-7 and the call upstream, for a call whose audit record has its place."""
    # 5 again, and 7: a revoked grant is "no" under a revocation lease (revocation.py);
    # otherwise Redis answers, in the rate limiter's round trip. Every call that gets past
    # the revocation check is charged, a scope refusal too (contract 13): refusals spend the
    # client's own budget, so a token cannot make unlimited audited refusals.
    allowed_by_scope, scope_used = verified.satisfying(required)
    try:
        verdict = await ctx.guard.admit(
            ctx.revoked_prefix + verified.grant_id,
            f"{ctx.bucket_prefix}{school_id}:{verified.client_id}",
            consume=True,
            pace=ctx.pace(client.rate_limit_per_minute),
        )
    except (OSError, RedisReplyError):
        # Fail closed: without Redis a revoked token cannot be told from a live one.
        log.warning("revocation_check_unavailable")
        return unavailable()
    if verdict.revoked or verified.grant_id in ctx.revoked:
        # Asked again: the set may have heard of the revocation while the call waited.
        ctx.revoked.add(verified.grant_id)
        return _reject(ctx, "revoked", "The access token has been revoked")

    origin = cors.origin_of(request)
    fwd = forwarding(request, ctx, host)
    # 6: scope, answered before the rate limit (contract 6's order) though charged to it.
    if not allowed_by_scope:
        ctx.metrics.rejections.labels("insufficient_scope").inc()
        needed = " ".join(required)
        response: web.StreamResponse = bearer_error(
            403,
            "insufficient_scope",
            "The access token does not hold the scope this call needs",
            scope=needed,
        )
        # What the refusal left of the client's budget.
        response.headers.update(verdict.headers())
        cors.grant(response.headers, origin, client.allowed_origins)
        slot.fill(_record(request, verified, fwd, response.status, None))
        return response
    # 7: rate limit.
    if not verdict.allowed:
        ctx.metrics.rejections.labels("rate_limited").inc()
        response = _error(
            429,
            "rate_limited",
            "Too many calls; retry after the number of seconds in Retry-After.",
            **{"Retry-After": str(verdict.retry_after)},
        )
        response.headers.update(verdict.headers())
        cors.grant(response.headers, origin, client.allowed_origins)
        slot.fill(_record(request, verified, fwd, 429, scope_used))
        return response

    identity = identity_headers(ctx, request, verified, school_id)
    extra = verdict.headers()
    cors.grant(extra, origin, client.allowed_origins)
    headers = proxy.upstream_request_headers(request, fwd, identity=identity)
    # What aiohttp answers for a handler that raised; a call cancelled midway (the gateway
    # stopping) had no answer at all, which is what nginx calls 499. Either way the call may
    # have reached the upstream, so it is recorded.
    status = 500
    try:
        response = await proxy.forward(
            request,
            ctx.upstreams,
            route.upstream,
            headers,
            ctx.metrics,
            protected=True,
            extra=extra,
        )
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499
        raise
    finally:
        slot.fill(_record(request, verified, fwd, status, scope_used))


def identity_headers(
    ctx: GatewayContext, request: web.Request, verified: VerifiedToken, school_id: int
) -> dict[str, str]:
    """Who is calling, as the resource services read it (they trust these only with the
    internal token)."""
    return {
        "X-Connect-School-Id": str(school_id),
        "X-Connect-Subject": verified.subject,
        "X-Connect-Client-Id": verified.client_id,
        "X-Connect-Scopes": verified.scope,
        "X-Connect-Grant-Id": verified.grant_id,
        "X-Request-Id": request[REQUEST_ID_KEY],
        "X-Connect-Internal-Token": ctx.settings.internal_token,
    }


def _record(
    request: web.Request,
    verified: VerifiedToken,
    fwd: proxy.Forwarding,
    status: int,
    scope: str | None,
) -> dict[str, Any]:
    return audit.api_call(
        school_id=verified.school_id,
        client_id=verified.client_id,
        subject=verified.subject,
        grant_id=verified.grant_id,
        method=request.method,
        path=request.path,
        status=status,
        scope=scope,
        ip=fwd.client_ip,
        request_id=request[REQUEST_ID_KEY],
    )
