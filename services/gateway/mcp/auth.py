"""Who may call /mcp: the protected routes' checks, in the contract's order, for the MCP
resource.

Steps 1-4 are validation.py's TokenVerifier, demanding the MCP resource as `aud` and the
platform as `iss`; the token's own `school_id` is the school (contract 6: platform-level MCP
calls use the token's school). Steps 5 and 7 are the same Redis round trip as every protected
call (revocation mark and the client's rate limit at that school). Step 6, the scope, is per
tool (tools.py), not per HTTP call. As for every protected call, the /mcp call's audit record
has its place in the buffer before the call is charged or served (audit.py: a call that cannot
be recorded is refused, 503), and each school API call a tool makes takes one of its own.

A token a school issued is refused even when its `aud` names this resource: the metadata
names the platform as the one authorization server of this resource, and a resource that
accepted issuers it does not advertise would undo the client's issuer/audience binding
(RFC 9728 7.3). Platform tokens carry the school the user picked, which is all a school token
would add.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog
from aiohttp import web
from multidict import CIMultiDict

from libs.common import jwt
from libs.common.config import PublicUrls
from libs.common.errors import bearer_error, json_response
from libs.common.logging import get_logger
from libs.common.web import REQUEST_ID_KEY
from services.gateway import audit, checks, proxy, refusals
from services.gateway.audit import Slot
from services.gateway.context import GatewayContext
from services.gateway.directory import ClientPolicy
from services.gateway.forwarded import forwarding
from services.gateway.jwks import JwksUnavailable
from services.gateway.mcp import metadata
from services.gateway.redis_pipeline import RedisReplyError
from services.gateway.validation import (
    Rejection,
    TokenVerifier,
    VerifiedToken,
    bearer_token,
    describe,
)

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Caller:
    """The verified caller of one /mcp request, and what its school API calls carry."""

    ctx: GatewayContext
    token: VerifiedToken
    # The identity headers (X-Connect-*, internal token, request id, forwarding) exactly as
    # proxy.upstream_request_headers makes them for a protected call.
    upstream_headers: CIMultiDict[str]
    client_ip: str | None
    request_id: str
    # The place of the /mcp call's own record, taken before it was charged (audit.py).
    slot: Slot

    def holds(self, any_of: tuple[str, ...]) -> tuple[bool, str | None]:
        return self.token.satisfying(any_of)

    def record(self, method: str, path: str, status: int, scope: str | None) -> dict[str, Any]:
        return audit.api_call(
            school_id=self.token.school_id,
            client_id=self.token.client_id,
            subject=self.token.subject,
            grant_id=self.token.grant_id,
            method=method,
            path=path,
            status=status,
            scope=scope,
            ip=self.client_ip,
            request_id=self.request_id,
        )

    def audit(self, method: str, path: str, status: int, scope: str | None) -> None:
        """The /mcp call's own record, in its place (once per call)."""
        self.slot.fill(self.record(method, path, status, scope))

    async def audited(self, method: str, path: str, status: int, scope: str | None) -> bool:
        """audit(), then in durable mode wait until the record is written (False: it could
        not be now, and the call is answered 503)."""
        return await self.slot.written(self.record(method, path, status, scope))

    def reserve(self) -> Slot | None:
        """A place for the record of one more call on this caller's behalf (a tool's school API
        call, a tool refused for scope); None when the buffer cannot take it."""
        return self.ctx.audit.reserve()


class McpTokenVerifier:
    """validation.TokenVerifier with the MCP resource where a school's API origin would be.

    TokenVerifier demands `aud` = `urls.school_origin(...)`; given URLs whose school template
    is the MCP resource, it runs every one of its checks against that audience instead. Its
    cache is off: MCP calls are few and each costs a school API call anyway, and without a
    cache a key withdrawn by rotation is refused at once without following the keys stream.
    """

    def __init__(self, ctx: GatewayContext) -> None:
        settings = ctx.settings
        self._platform = settings.urls.platform_url
        urls = PublicUrls(school_template=metadata.resource(settings), platform_url=self._platform)
        self._verifier = TokenVerifier(
            dataclasses.replace(settings, urls=urls), ctx.jwks, ctx.directory, cache_ttl=0
        )

    async def verify(self, token: str) -> VerifiedToken:
        try:
            # Only to refuse early and to learn the school; the signature is checked next.
            claims = jwt.unverified_claims(token)
        except jwt.TokenError as exc:
            raise Rejection(exc.reason, describe(exc.reason)) from None
        if claims.get("iss") != self._platform:
            raise Rejection(
                "issuer",
                "This resource accepts tokens of the platform's authorization server only",
            )
        school_id = claims.get("school_id")
        if isinstance(school_id, bool) or not isinstance(school_id, int):
            raise Rejection("missing_claim", describe("missing_claim"))
        verified = await self._verifier.verify(token, school_id, "")
        if not verified.platform:
            raise Rejection("issuer", describe("issuer"))
        return verified


def unauthorized(
    ctx: GatewayContext, reason: str | None, description: str, *, scope: str | None = None
) -> web.Response:
    """401 pointing at the resource metadata (RFC 9728 5.1); bare when no token was sent.
    `scope` is what a client should ask for first (the MCP spec's scope selection)."""
    ctx.metrics.rejections.labels(reason or "no_token").inc()
    where = metadata.metadata_url(ctx.settings)
    if reason is None:
        return bearer_error(401, None, description, scope=scope, resource_metadata=where)
    log.debug("token_rejected", reason=reason)
    return bearer_error(401, "invalid_token", description, scope=scope, resource_metadata=where)


async def authenticate(
    request: web.Request,
    ctx: GatewayContext,
    verifier: McpTokenVerifier,
    host: str,
    *,
    challenge_scope: str | None = None,
) -> Caller | web.Response:
    """The checks of a protected call; the Caller, or the answer refusing the call."""
    authorizations = request.headers.getall("Authorization", ())
    if len(authorizations) > 1:
        return refusals.one_authorization_header()
    token = bearer_token(authorizations[0] if authorizations else None)
    if token is None:
        return unauthorized(
            ctx, None, "The MCP server needs a bearer access token.", scope=challenge_scope
        )
    try:
        verified = await verifier.verify(token)
        client = await ctx.directory.client(verified.client_id)
        TokenVerifier.check_client(client, verified.platform, verified.school_id)
    except Rejection as exc:
        return unauthorized(ctx, exc.reason, exc.description, scope=challenge_scope)
    except (JwksUnavailable, asyncpg.PostgresError, OSError):
        return refusals.unavailable()
    assert client is not None
    structlog.contextvars.bind_contextvars(school=verified.school_id, client_id=verified.client_id)
    if verified.grant_id in ctx.revoked:
        return unauthorized(ctx, "revoked", refusals.REVOKED)
    # Before the call is charged or served, its record has a place (a call that cannot be
    # recorded is refused); an answer with no record to write gives it back.
    slot = ctx.audit.reserve()
    if slot is None:
        return refusals.audit_unavailable()
    admitted: Caller | web.Response | None = None
    try:
        admitted = await _admitted(request, ctx, verified, client, host, slot)
        return admitted
    finally:
        if not isinstance(admitted, Caller):
            slot.release()  # nothing once a 429 filled it


async def _admitted(
    request: web.Request,
    ctx: GatewayContext,
    verified: VerifiedToken,
    client: ClientPolicy,
    host: str,
    slot: Slot,
) -> Caller | web.Response:
    """Steps 5 and 7 of a call whose record has its place: the Caller, or the refusal."""
    try:
        verdict = await ctx.guard.admit(
            f"{ctx.revoked_prefix}{{s{verified.school_id}}}:{verified.grant_id}",
            f"{ctx.bucket_prefix}{{s{verified.school_id}}}:{verified.client_id}",
            consume=True,
            pace=ctx.pace(client.rate_limit_per_minute),
        )
    except (OSError, RedisReplyError):
        # Fail closed, as every protected call does.
        log.warning("revocation_check_unavailable")
        return refusals.unavailable()
    if verdict.revoked or verified.grant_id in ctx.revoked:
        # Asked again: the set may have heard of the revocation while the call waited.
        ctx.revoked.add(verified.grant_id)
        return unauthorized(ctx, "revoked", refusals.REVOKED)

    fwd = forwarding(request, ctx, host)
    caller = Caller(
        ctx=ctx,
        token=verified,
        upstream_headers=_upstream_headers(request, ctx, verified, fwd),
        client_ip=fwd.client_ip,
        request_id=request[REQUEST_ID_KEY],
        slot=slot,
    )
    if not verdict.allowed:
        ctx.metrics.rejections.labels("rate_limited").inc()
        if not await caller.audited(request.method, request.path, 429, None):
            return refusals.audit_unavailable()
        return json_response(
            {
                "error": "rate_limited",
                "error_description": "Too many calls; retry after Retry-After seconds.",
            },
            status=429,
            headers={"Retry-After": str(verdict.retry_after), **verdict.headers()},
        )
    return caller


def _upstream_headers(
    request: web.Request, ctx: GatewayContext, verified: VerifiedToken, fwd: proxy.Forwarding
) -> CIMultiDict[str]:
    identity = checks.identity_headers(ctx, request, verified, verified.school_id)
    # The caller's own headers describe the JSON-RPC POST (its length, its session), not the
    # school API calls its tools make: the upstream request starts from Accept alone.
    bare = request.clone(headers=CIMultiDict({"Accept": "application/json"}))
    return proxy.upstream_request_headers(bare, fwd, identity=identity)
