"""The token endpoint (RFC 6749 3.2): `authorization_code` with PKCE, `refresh_token` with
rotation and reuse detection, and `client_credentials` on a standing grant.

Each grant is a plain async function over the identity context; the aiohttp handler only
reads the form, authenticates the client and renders. Every grant runs its database work in
one transaction and signs after it commits, with signers fetched before it began, so no
connection is held while anything slow happens.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from base64 import urlsafe_b64encode
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from libs.common import scopes as catalogue
from libs.common.db import Connection
from libs.common.errors import (
    InvalidGrant,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    UnauthorizedClient,
    UnsupportedGrantType,
    json_response,
)
from libs.common.logging import get_logger
from services.identity import (
    audit,
    client_auth,
    cors,
    credentials,
    grants,
    keys,
    minting,
    resources,
    roles,
    store,
    token_state,
)
from services.identity.context import IdentityContext, context, issuer
from services.identity.schools import Issuer
from services.identity.store import codes as code_store
from services.identity.store import refresh_tokens as token_store

log = get_logger(__name__)

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
GRANT_TYPES = ("authorization_code", "refresh_token", "client_credentials")
# RFC 7636 4.1: 43 to 128 characters of the unreserved set.
_CODE_VERIFIER = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")
_REFRESH_SUCCESSOR = "refresh-successor"


@dataclass(frozen=True, slots=True)
class GrantRequest:
    """Everything a grant handler needs about the request, already authenticated."""

    ctx: IdentityContext
    state: token_state.TokenState
    issuer: Issuer
    client: store.Client
    form: Mapping[str, str]
    ip: str | None


# Scopes -------------------------------------------------------------------------------------


def narrowed_scopes(requested: str | None, granted: Sequence[str]) -> list[str]:
    """RFC 6749 6: a refresh may ask for less than was granted, never more.

    Umbrella scopes count as what they stand for: `courses:read` is within a grant of `read`.
    """
    asked = catalogue.parse(requested)
    if not asked:
        return list(granted)
    effective = catalogue.expand(granted)
    beyond = [s for s in asked if s not in effective]
    if beyond:
        raise InvalidScope(f"{beyond[0]!r} was not granted")
    return asked


def client_credentials_scopes(
    requested: str | None, client: store.Client, school: store.School
) -> list[str]:
    """The scopes a client may hold on its own: its registered data scopes, as the school
    still allows them; identity scopes need a user and admin scopes are never third-party."""
    school_allows = (
        catalogue.expand(school.allowed_scopes) if school.allowed_scopes is not None else None
    )

    def permitted_by_school(scope: str) -> bool:
        return school_allows is None or scope in school_allows

    registered = [
        s
        for s in client.scopes
        if s not in catalogue.IDENTITY_SCOPES and s not in catalogue.ADMIN_SCOPES
    ]
    asked = catalogue.parse(requested)
    if not asked:
        default = [s for s in registered if permitted_by_school(s)]
        if not default:
            raise InvalidScope("the client has no data scopes to grant itself")
        return default
    effective = catalogue.expand(registered)
    for scope in asked:
        if scope not in catalogue.CATALOGUE:
            raise InvalidScope(f"unknown scope {scope!r}")
        if scope in catalogue.ADMIN_SCOPES:
            raise InvalidScope(f"{scope!r} is not available to applications")
        if scope in catalogue.IDENTITY_SCOPES:
            raise InvalidScope(f"{scope!r} needs a user, which client_credentials has not")
        if scope not in effective or not permitted_by_school(scope):
            raise InvalidScope(f"the client may not hold {scope!r}")
    return asked


# Shared steps -------------------------------------------------------------------------------


async def token_school(req: GrantRequest, school_id: int) -> store.School:
    """The school a token will be bound to, which must be the issuer's own.

    On the platform issuer the school is the one the user picked (platform clients).
    """
    if req.issuer.school is not None:
        if school_id != req.issuer.school.id:
            raise InvalidGrant("the grant belongs to another school")
        return req.issuer.school
    school = await req.state.school(req.ctx.pool, school_id)
    if school is None:
        raise InvalidGrant("the school of this grant no longer exists")
    return school


def audience_for(req: GrantRequest, school: store.School, bound: str | None) -> str:
    """`aud`: the grant's RFC 8707 resource; a `resource` sent now must name the same."""
    asked = req.form.get("resource")
    issuer = req.issuer.issuer
    client = req.client
    audience = resources.audience(req.ctx.settings, school, bound, issuer=issuer, client=client)
    if audience is None:
        raise InvalidTarget("the resource is not one this school serves")
    asked_audience = resources.audience(
        req.ctx.settings, school, asked, issuer=issuer, client=client
    )
    if asked is not None and asked_audience != audience:
        raise InvalidTarget("the resource differs from the one authorized")
    return audience


def pkce_matches(verifier: str | None, challenge: str) -> bool:
    if verifier is None or not _CODE_VERIFIER.match(verifier):
        return False
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    computed = urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
    return hmac.compare_digest(computed, challenge)


def replay_by_owner(req: GrantRequest, found: code_store.Redemption) -> bool:
    """Whether a second redemption comes from the code's own client at the code's school.

    The client must be the one the code was issued to, and prove it with the PKCE verifier:
    a public client authenticates with its client_id alone, which anyone can send, so only
    the verifier (RFC 7636) tells its own retry from a stranger holding a leaked code.
    """
    if found.client_id != req.client.id:
        return False
    if req.issuer.school is not None and found.school_id != req.issuer.school.id:
        return False
    return pkce_matches(req.form.get("code_verifier"), found.code_challenge)


def require(form: Mapping[str, str], name: str) -> str:
    value = form.get(name)
    if not value:
        raise InvalidRequest(f"{name} is required")
    return value


def token_response(
    access_token: str,
    expires_in: int,
    scopes: Sequence[str],
    school: store.School,
    *,
    refresh_token: str | None = None,
    id_token: str | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "access_token": access_token,
        "token_type": "Bearer",
        "expires_in": expires_in,
        "scope": catalogue.format_scopes(scopes),
        "school_id": school.id,
        "school_subdomain": school.subdomain,
    }
    if refresh_token is not None:
        body["refresh_token"] = refresh_token
    if id_token is not None:
        body["id_token"] = id_token
    return body


async def _audit(req: GrantRequest, action: str, **fields: Any) -> None:
    await audit.append(req.ctx.redis, req.ctx.settings, audit.record(action, ip=req.ip, **fields))


# authorization_code -------------------------------------------------------------------------


async def authorization_code_grant(req: GrantRequest) -> dict[str, Any]:
    """RFC 6749 4.1.3 with RFC 7636: redeem the code once, then mint."""
    ctx, client, form = req.ctx, req.client, req.form
    if "authorization_code" not in client.grant_types:
        raise UnauthorizedClient("the client may not use authorization_code")
    code = require(form, "code")
    redirect_uri = form.get("redirect_uri")
    settings = ctx.settings
    issue_refresh = "refresh_token" in client.grant_types
    access_signer = await ctx.keyring.signer(req.issuer.school_id, keys.ACCESS_TOKEN_ALG)

    replayed: code_store.Redemption | None = None
    outgrown: code_store.Redemption | None = None
    shut_out: code_store.Redemption | None = None
    refresh_token: str | None = None
    async with ctx.pool.acquire() as conn, conn.transaction():
        found = await code_store.redeem(conn, credentials.token_hash(code))
        if found is None:
            raise InvalidGrant("the code is invalid")
        if not found.fresh:
            if not replay_by_owner(req, found):
                # A used code is no key to someone else's grant: only the client the code was
                # issued to may end the grant by presenting it again. Anyone else learns no more
                # than from an unknown code.
                raise InvalidGrant("the code is invalid")
            replayed = found
        else:
            # A failed check raises and rolls back: the code stays for its rightful client.
            if found.client_id != client.id:
                raise InvalidGrant("the code was issued to another client")
            school = await token_school(req, found.school_id)
            if found.expired:
                raise InvalidGrant("the code has expired")
            if not redirect_uri:
                # RFC 6749 4.1.3: required only if the authorization request had one. The
                # authorize step defaults it only for a client with a single registered URI.
                if client.redirect_uris != (found.redirect_uri,):
                    raise InvalidRequest("redirect_uri is required")
            elif found.redirect_uri != redirect_uri:
                raise InvalidGrant("redirect_uri differs from the authorization")
            if not pkce_matches(form.get("code_verifier"), found.code_challenge):
                raise InvalidGrant("code_verifier is missing or does not match")
            if found.grant_revoked:
                raise InvalidGrant("the grant has been revoked")
            top = roles.ceiling(found.user_role, platform_admin=found.platform_admin)
            if found.shut_out:
                # The school closed registration after this grant was made, perhaps after
                # its closing listed the grants to end: it ends here instead.
                shut_out = found
            elif roles.exceeds(found.scopes, top):
                # The role was lowered between consent and now (and the role change's sweep
                # ran before this grant was committed): the grant ends, as at refresh.
                outgrown = found
            else:
                audience = audience_for(req, school, found.resource)
                if issue_refresh:
                    refresh_token = credentials.new_secret(credentials.REFRESH_TOKEN_PREFIX)
                await token_store.issue_code_tokens(
                    conn,
                    grant_id=found.grant_id,
                    refresh_token_hash=(
                        credentials.token_hash(refresh_token) if refresh_token else None
                    ),
                    client_id=client.id,
                    scopes=found.scopes,
                    resource=found.resource,
                    auth_time=found.auth_time,
                    ttl_seconds=settings.tokens.refresh_token_ttl,
                )

    if shut_out is not None:
        await grants.revoke_grant(
            ctx.pool,
            ctx.redis,
            settings,
            shut_out.grant_id,
            reason="registration_closed",
            ip=req.ip,
        )
        req.state.forget_grant(shut_out.grant_id)
        raise InvalidGrant("the school no longer accepts applications that registered themselves")

    if outgrown is not None:
        await grants.revoke_grant(
            ctx.pool, ctx.redis, settings, outgrown.grant_id, reason="role_lowered", ip=req.ip
        )
        req.state.forget_grant(outgrown.grant_id)
        raise InvalidGrant("the user's role no longer allows this grant")

    if replayed is not None:
        # RFC 6749 4.1.2 / 10.5: a second redemption ends what the first one issued.
        await grants.revoke_grant(
            ctx.pool, ctx.redis, settings, replayed.grant_id, reason="code_replay", ip=req.ip
        )
        req.state.forget_grant(replayed.grant_id)
        await _audit(
            req,
            "code.replayed",
            school_id=replayed.school_id,
            client_id=client.id,
            subject=str(replayed.user_id),
            grant_id=str(replayed.grant_id),
        )
        raise InvalidGrant("the code has already been used")

    subject = str(found.user_id)
    claims = minting.access_token_claims(
        settings,
        issuer=req.issuer,
        school=school,
        client_id=client.id,
        subject=subject,
        scopes=found.scopes,
        audience=audience,
        grant_id=found.grant_id,
        auth_time=found.auth_time,
    )
    access_token = minting.sign_access_token(access_signer, claims)
    id_token = None
    if "openid" in found.scopes:
        id_signer = await ctx.keyring.signer(req.issuer.school_id, keys.ID_TOKEN_ALG)
        id_claims = minting.id_token_claims(
            settings,
            issuer=req.issuer,
            school=school,
            client_id=client.id,
            subject=subject,
            auth_time=found.auth_time,
            nonce=found.nonce,
            access_token=access_token,
            now=claims["iat"],
        )
        id_token = minting.sign_id_token(id_signer, id_claims)
    await _audit(
        req,
        "token.issued",
        school_id=school.id,
        client_id=client.id,
        subject=subject,
        grant_id=str(found.grant_id),
        scope=claims["scope"],
        grant_type="authorization_code",
        jti=claims["jti"],
    )
    return token_response(
        access_token,
        settings.tokens.access_token_ttl,
        found.scopes,
        school,
        refresh_token=refresh_token,
        id_token=id_token,
    )


# refresh_token ------------------------------------------------------------------------------


def successor_of(pepper: bytes, presented: str) -> str:
    """The successor of a refresh token: derived, so a retry can be given it again."""
    return credentials.derive_secret(
        pepper, credentials.REFRESH_TOKEN_PREFIX, presented, _REFRESH_SUCCESSOR
    )


def beyond_role(st: token_store.RefreshTokenState) -> bool:
    """The grant holds more than its user's role now allows (lowered, or membership gone)."""
    return roles.exceeds(st.scopes, roles.ceiling(st.user_role, platform_admin=st.platform_admin))


# The token's state, its school, the scopes and audience of the new access token, and the
# outcome: "rotated", "retried" (the same rotation within the grace window), "reused" or
# "beyond_role" (the grant outgrew its user's role: nothing rotated, the grant is to end).
_Rotation = tuple[token_store.RefreshTokenState, store.School, list[str], str, str]


async def _rotate_locked(
    req: GrantRequest, conn: Connection, presented_hash: bytes, successor_hash: bytes
) -> _Rotation:
    """The token locked for the rest of a transaction: rotate it, or recognise a retry within
    the grace window ("retried") or reuse ("reused"); raises for anything not acceptable."""
    settings, client, form = req.ctx.settings, req.client, req.form
    grace = settings.tokens.refresh_reuse_grace
    async with conn.transaction():
        st = await token_store.lock_refresh_token(conn, presented_hash)
        if st is None or st.client_id != client.id:
            raise InvalidGrant("the refresh token is invalid")
        school = await token_school(req, st.school_id)
        if st.grant_revoked:
            raise InvalidGrant("the grant has been revoked")
        if st.expired:
            raise InvalidGrant("the refresh token has expired")
        if st.user_id is None:
            raise InvalidGrant("the refresh token has no user")
        if beyond_role(st):
            return st, school, list(st.scopes), "", "beyond_role"
        scopes = narrowed_scopes(form.get("scope"), st.scopes)
        audience = audience_for(req, school, st.resource)
        if st.rotated_at is None:
            await token_store.rotate_refresh_token(
                conn, st.token_hash, successor_hash, settings.tokens.refresh_token_ttl
            )
            outcome = "rotated"
        elif (
            grace > 0
            and st.seconds_since_rotation is not None
            and st.seconds_since_rotation <= grace
            and not st.successor_rotated
            and st.successor_hash == successor_hash
        ):
            # A concurrent retry of the same rotation: the same successor, nothing new stored.
            outcome = "retried"
        else:
            outcome = "reused"
    return st, school, scopes, audience, outcome


async def refresh_token_grant(req: GrantRequest) -> dict[str, Any]:
    """RFC 6749 6 with rotation: each token works once; reuse outside the grace window is
    taken as theft and ends the grant (OAuth 2.0 Security BCP 4.14.2)."""
    ctx, client, form = req.ctx, req.client, req.form
    settings = ctx.settings
    if "refresh_token" not in client.grant_types:
        raise UnauthorizedClient("the client may not use refresh_token")
    presented = require(form, "refresh_token")
    access_signer = await ctx.keyring.signer(req.issuer.school_id, keys.ACCESS_TOKEN_ALG)
    successor = successor_of(settings.secret_pepper, presented)
    successor_hash = credentials.token_hash(successor)
    presented_hash = credentials.token_hash(presented)

    async with ctx.pool.acquire() as conn:
        # Fast path, two round trips: a token that looks live is rotated by one conditional
        # statement; every check below runs on the same row before it, as on the locked path.
        peek = await token_store.refresh_token_state(conn, presented_hash)
        decided: _Rotation | None = None
        if (
            peek is not None
            and peek.client_id == client.id
            and peek.rotated_at is None
            and not peek.grant_revoked
            and not peek.expired
            and peek.user_id is not None
            and not beyond_role(peek)
        ):
            school = await token_school(req, peek.school_id)
            scopes = narrowed_scopes(form.get("scope"), peek.scopes)
            audience = audience_for(req, school, peek.resource)
            if await token_store.rotate_live_refresh_token(
                conn, presented_hash, successor_hash, settings.tokens.refresh_token_ttl
            ):
                decided = (peek, school, scopes, audience, "rotated")
        if decided is None:
            decided = await _rotate_locked(req, conn, presented_hash, successor_hash)
    st, school, scopes, audience, outcome = decided

    subject = str(st.user_id)
    if outcome == "beyond_role":
        # Consent given under a role the user no longer has is not consent the school would
        # give now; end the grant everywhere so its access tokens stop at the gateways too.
        await grants.revoke_grant(
            ctx.pool, ctx.redis, settings, st.grant_id, reason="role_lowered", ip=req.ip
        )
        raise InvalidGrant("the user's role at the school no longer allows this grant")
    if outcome == "reused":
        await grants.revoke_grant(
            ctx.pool, ctx.redis, settings, st.grant_id, reason="refresh_token_reuse", ip=req.ip
        )
        await _audit(
            req,
            "refresh.reuse_detected",
            school_id=st.school_id,
            client_id=client.id,
            subject=subject,
            grant_id=str(st.grant_id),
        )
        raise InvalidGrant("the refresh token has already been used")

    claims = minting.access_token_claims(
        settings,
        issuer=req.issuer,
        school=school,
        client_id=client.id,
        subject=subject,
        scopes=scopes,
        audience=audience,
        grant_id=st.grant_id,
        auth_time=st.auth_time,
    )
    access_token = minting.sign_access_token(access_signer, claims)
    await _audit(
        req,
        "token.refreshed",
        school_id=school.id,
        client_id=client.id,
        subject=subject,
        grant_id=str(st.grant_id),
        scope=claims["scope"],
        jti=claims["jti"],
        retry=outcome == "retried",
    )
    # No new ID token on refresh (OIDC Core 12.2 allows it): RS256 signing would cost more
    # than the rest of the refresh together, and the user did not sign in again.
    return token_response(
        access_token, settings.tokens.access_token_ttl, scopes, school, refresh_token=successor
    )


# client_credentials -------------------------------------------------------------------------


async def client_credentials_grant(req: GrantRequest) -> dict[str, Any]:
    """RFC 6749 4.4: a confidential client acting for itself at its own school."""
    ctx, client = req.ctx, req.client
    settings = ctx.settings
    if client.is_public:
        raise UnauthorizedClient("client_credentials needs a confidential client")
    if "client_credentials" not in client.grant_types:
        raise UnauthorizedClient("the client may not use client_credentials")
    school = req.issuer.school
    if school is None or client.school_id != school.id:
        # A token must be bound to one school; a platform client has none without a user.
        raise UnauthorizedClient("client_credentials needs a school's client")
    scopes = client_credentials_scopes(req.form.get("scope"), client, school)
    audience = resources.audience(
        settings, school, req.form.get("resource"), issuer=req.issuer.issuer, client=client
    )
    if audience is None:
        raise InvalidTarget("the resource is not one this school serves")
    access_signer = await ctx.keyring.signer(school.id, keys.ACCESS_TOKEN_ALG)

    cache_key = (client.id, school.id)
    grant_id = req.state.standing_grants.get(cache_key)
    if grant_id is None:
        grant_id, created = await token_store.standing_grant(
            ctx.pool, client_id=client.id, school_id=school.id, scopes=client.scopes
        )
        req.state.standing_grants.put(cache_key, grant_id)
        if created:
            await _audit(
                req,
                "grant.created",
                school_id=school.id,
                client_id=client.id,
                subject=client.id,
                grant_id=str(grant_id),
                scope=catalogue.format_scopes(client.scopes),
                grant_type="client_credentials",
            )

    claims = minting.access_token_claims(
        settings,
        issuer=req.issuer,
        school=school,
        client_id=client.id,
        subject=client.id,
        scopes=scopes,
        audience=audience,
        grant_id=grant_id,
        auth_time=None,
    )
    access_token = minting.sign_access_token(access_signer, claims)
    await _audit(
        req,
        "token.issued",
        school_id=school.id,
        client_id=client.id,
        subject=client.id,
        grant_id=str(grant_id),
        scope=claims["scope"],
        grant_type="client_credentials",
        jti=claims["jti"],
    )
    return token_response(access_token, settings.tokens.access_token_ttl, scopes, school)


_GRANTS = {
    "authorization_code": authorization_code_grant,
    "refresh_token": refresh_token_grant,
    "client_credentials": client_credentials_grant,
}


async def token_endpoint(request: web.Request) -> web.Response:
    ctx = context(request)
    form = await client_auth.read_form(request)
    iss = issuer(request)
    authenticated = await client_auth.authenticate(
        ctx.pool,
        ctx.settings,
        iss,
        authorization=request.headers.get("Authorization"),
        form=form,
    )
    if not cors.admit(request, authenticated.client):
        raise InvalidRequest(cors.REFUSED)
    grant_type = form.get("grant_type")
    if not grant_type:
        raise InvalidRequest("grant_type is required")
    handler = _GRANTS.get(grant_type)
    if handler is None:
        raise UnsupportedGrantType(f"{grant_type!r} is not supported")
    req = GrantRequest(
        ctx=ctx,
        state=token_state.state(request),
        issuer=iss,
        client=authenticated.client,
        form=form,
        ip=client_auth.client_ip(request, ctx.settings),
    )
    body = await handler(req)
    return json_response(body, headers=NO_STORE)


def setup(app: web.Application) -> None:
    token_state.install(app)
    app.router.add_post("/v1/oauth/token", token_endpoint)
    # The seed quickstart's path (contract section 2).
    app.router.add_post("/api/oauth/token", token_endpoint)


_ERROR = {
    "description": "RFC 6749 5.2 error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OAuthError"}}},
}
_TOKEN_REQUEST = {
    "type": "object",
    "required": ["grant_type"],
    "properties": {
        "grant_type": {"type": "string", "enum": list(GRANT_TYPES)},
        "code": {"type": "string"},
        "redirect_uri": {"type": "string", "format": "uri"},
        "code_verifier": {"type": "string", "minLength": 43, "maxLength": 128},
        "refresh_token": {"type": "string"},
        "scope": {"type": "string", "description": "space-separated scopes"},
        "resource": {"type": "string", "format": "uri", "description": "RFC 8707"},
        "client_id": {"type": "string"},
        "client_secret": {"type": "string"},
    },
}
_TOKEN_RESPONSE = {
    "type": "object",
    "required": [
        "access_token",
        "token_type",
        "expires_in",
        "scope",
        "school_id",
        "school_subdomain",
    ],
    "properties": {
        "access_token": {"type": "string", "description": "RFC 9068 JWT (typ at+jwt)"},
        "token_type": {"type": "string", "const": "Bearer"},
        "expires_in": {"type": "integer", "examples": [7200]},
        "refresh_token": {"type": "string"},
        "scope": {"type": "string"},
        "school_id": {"type": "integer"},
        "school_subdomain": {"type": "string"},
        "id_token": {"type": "string", "description": "when openid was granted"},
    },
}
_TOKEN_OPERATION = {
    "summary": "Token endpoint: authorization_code (PKCE S256), refresh_token, "
    "client_credentials (RFC 6749 3.2, RFC 7636)",
    "requestBody": {
        "required": True,
        "content": {"application/x-www-form-urlencoded": {"schema": _TOKEN_REQUEST}},
    },
    "responses": {
        "200": {
            "description": "Tokens",
            "headers": {"Cache-Control": {"schema": {"type": "string", "const": "no-store"}}},
            "content": {"application/json": {"schema": _TOKEN_RESPONSE}},
        },
        "400": _ERROR,
        "401": _ERROR,
    },
}
OPENAPI_PATHS: dict[str, Any] = {
    "/v1/oauth/token": {"post": _TOKEN_OPERATION},
    "/api/oauth/token": {"post": {**_TOKEN_OPERATION, "deprecated": True}},
}
