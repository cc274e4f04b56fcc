"""A protected call's checks, in contract section 6's order, then the call upstream.

:func:`checked_call` (and :func:`_admitted_call` once the audit record has its place) reads
top to bottom as that order, each step a block numbered as below whose refusal is a function of
refusals.py named for its error:

0. the route has the method (405), and one bearer token came (400; RFC 6750's bare 401 when
   none did),
1-4. signature and `kid`, `exp`/`nbf`, `iss` and `aud`, the token's school is the Host's:
   ``TokenVerifier.verify`` (validation.py), then its client still enabled and of that issuer,
5. not revoked: the gateway's own set first (revocation.py), before anything is spent on the
   call; then the call's audit record takes its place (contract 13: none is served unaudited),
5 and 7 asked together: ``Guard.admit`` (ratelimit.py) answers the revocation mark unless a
   revocation lease answers it, and charges the call to the client's bucket,
6. the route's scope (403 `insufficient_scope`), answered before the rate limit though charged,
7. the client's rate limit (429 with `Retry-After`),

and only then :func:`proxy.forward` with the verified identity in place of the token. This is
the benchmarked hot path: the steps are inline tests and plain calls, so a served call makes
no call and no allocation beyond what the checks themselves need.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import structlog
from aiohttp import web

from libs.common.logging import get_logger
from libs.common.web import REQUEST_ID_KEY
from services.gateway import audit, cors, proxy, refusals
from services.gateway.context import GatewayContext
from services.gateway.directory import ClientPolicy
from services.gateway.forwarded import forwarding
from services.gateway.jwks import JwksUnavailable
from services.gateway.ratelimit import Verdict
from services.gateway.redis_pipeline import RedisReplyError
from services.gateway.routetable import Route
from services.gateway.validation import Rejection, TokenVerifier, VerifiedToken, bearer_token

log = get_logger(__name__)


async def checked_call(
    request: web.Request,
    ctx: GatewayContext,
    route: Route,
    school_id: int,
    subdomain: str,
    host: str,
) -> web.StreamResponse:
    """The contract's checks in order, then the call upstream."""
    # 0: a routed method, one bearer token.
    required = route.required(request.method)
    if required is None:
        return refusals.method_not_allowed(request.method, route.allowed_methods)
    authorizations = request.headers.getall("Authorization", ())
    if len(authorizations) > 1:
        return refusals.one_authorization_header()
    token = bearer_token(authorizations[0] if authorizations else None)
    if token is None:
        ctx.metrics.rejections.labels("no_token").inc()
        return refusals.no_token()

    # 1-4: signature, times, issuer and audience, school; and the token's client.
    try:
        verified = await ctx.verifier.verify(token, school_id, subdomain)
        client = await ctx.directory.client(verified.client_id)
        TokenVerifier.check_client(client, verified.platform, school_id)
    except Rejection as exc:
        return _rejected(ctx, exc.reason, exc.description)
    except (JwksUnavailable, asyncpg.PostgresError, OSError):
        return refusals.unavailable()
    assert client is not None
    structlog.contextvars.bind_contextvars(client_id=verified.client_id)

    # 5: revoked? The local set answers "yes" without Redis (and so before the audit trail is
    # asked: a revoked token's 401 is not audited).
    if verified.grant_id in ctx.revoked:
        return _rejected(ctx, "revoked", refusals.REVOKED)
    # From here on the call may be refused with a record (403, 429) or served: its record's
    # place in the buffer is taken before it is charged or sent upstream, so no call is served
    # unaudited and one that cannot be recorded is refused (contract 13). An answer that writes
    # no record (revoked, Redis away) gives the place back.
    slot = ctx.audit.reserve()
    if slot is None:
        return refusals.audit_unavailable()
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
            f"{ctx.revoked_prefix}{{s{school_id}}}:{verified.grant_id}",
            f"{ctx.bucket_prefix}{{s{school_id}}}:{verified.client_id}",
            consume=True,
            pace=ctx.pace(client.rate_limit_per_minute),
        )
    except (OSError, RedisReplyError):
        # Fail closed: without Redis a revoked token cannot be told from a live one.
        log.warning("revocation_check_unavailable")
        return refusals.unavailable()
    if verdict.revoked or verified.grant_id in ctx.revoked:
        # Asked again: the set may have heard of the revocation while the call waited.
        ctx.revoked.add(verified.grant_id)
        return _rejected(ctx, "revoked", refusals.REVOKED)

    origin = cors.origin_of(request)
    fwd = forwarding(request, ctx, host)
    # 6: scope, answered before the rate limit (contract 6's order) though charged to it.
    if not allowed_by_scope:
        refusal = refusals.insufficient_scope(required)
        _charged(ctx, "insufficient_scope", refusal, verdict, origin, client)
        if not await slot.written(_record(request, verified, fwd, refusal.status, None)):
            return refusals.audit_unavailable()
        return refusal
    # 7: rate limit.
    if not verdict.allowed:
        refusal = refusals.rate_limited(verdict.retry_after)
        _charged(ctx, "rate_limited", refusal, verdict, origin, client)
        if not await slot.written(_record(request, verified, fwd, refusal.status, scope_used)):
            return refusals.audit_unavailable()
        return refusal

    identity = identity_headers(ctx, request, verified, school_id)
    extra = verdict.headers()
    cors.grant(extra, origin, client.allowed_origins)
    headers = proxy.upstream_request_headers(request, fwd, identity=identity)

    async def before_send(answered: int) -> web.StreamResponse | None:
        # Durable mode, an answer streamed as it comes: its record is written before the
        # status goes out, as for any other answer below.
        if await slot.written(_record(request, verified, fwd, answered, scope_used)):
            return None
        return refusals.audit_unavailable()

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
            before_send=before_send if ctx.audit.durable else None,
        )
        status = response.status
        # Answered only once the record is written (durable mode: a gateway killed right
        # after answering has lost no record); buffered, this queues it and goes on.
        if slot.open and not await slot.written(
            _record(request, verified, fwd, status, scope_used)
        ):
            return refusals.audit_unavailable()
        return response
    except asyncio.CancelledError:
        status = 499
        raise
    finally:
        if slot.open:
            slot.fill(_record(request, verified, fwd, status, scope_used))


def _rejected(ctx: GatewayContext, reason: str, description: str) -> web.Response:
    """401 `invalid_token`, counted by `reason` (the token itself is never logged)."""
    ctx.metrics.rejections.labels(reason).inc()
    log.debug("token_rejected", reason=reason)
    return refusals.invalid_token(description)


def _charged(
    ctx: GatewayContext,
    reason: str,
    refusal: web.Response,
    verdict: Verdict,
    origin: str | None,
    client: ClientPolicy,
) -> None:
    """A refusal of a call already charged (steps 6 and 7), counted by `reason`: it tells what
    the call left of the client's budget, and the client's own origins may read it."""
    ctx.metrics.rejections.labels(reason).inc()
    refusal.headers.update(verdict.headers())
    cors.grant(refusal.headers, origin, client.allowed_origins)


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
