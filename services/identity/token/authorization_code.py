"""The authorization_code grant (RFC 6749 4.1.3, with PKCE, RFC 7636 4.5): redeem the code
once, then mint.

In order: the code is redeemed in one transaction (`redeem`), whose checks roll it back on
failure so the code stays for its rightful client (`check_redemption`); a code presented again
by its own client, or whose grant has since been shut out or outgrown, ends its grant instead
(`end_grant`); otherwise the access token's claims are minted in the redemption's transaction,
which stores its `token.issued` record with the refresh token, and the access token, and an ID
token for `openid`, are signed after the commit (`issue`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NoReturn

from libs.common.errors import InvalidGrant, InvalidRequest, UnauthorizedClient
from services.identity import credentials, keys, minting, pkce, roles, store
from services.identity.grants import within_registration
from services.identity.store import codes as code_store
from services.identity.store import refresh_tokens as refresh_store
from services.identity.token.request import GrantRequest, audience_for, require, token_school
from services.identity.token.response import (
    access_token_claims,
    issued_record,
    revoke_grant,
    token_response,
)


class Ending(enum.Enum):
    """A redemption that ends the code's grant rather than minting: (revocation reason,
    error_description, the audit action recording it if any)."""

    # RFC 6749 4.1.2 / 10.5: a second redemption ends what the first one issued.
    REPLAYED = ("code_replay", "the code has already been used", "code.replayed")
    # The school closed registration after this grant was made, perhaps after its closing
    # listed the grants to end: it ends here instead.
    REGISTRATION_CLOSED = (
        "registration_closed",
        "the school no longer accepts applications that registered themselves",
        None,
    )
    # The role was lowered between consent and now (and the role change's sweep ran before
    # this grant was committed): the grant ends, as at refresh.
    OUTGROWN = ("role_lowered", "the user's role no longer allows this grant", None)
    # The client's registration was narrowed (RFC 7592 PUT) after this grant was made from
    # the older one: the grant ends rather than yield tokens the client is no longer
    # registered for.
    NARROWED = (
        "client_updated",
        "the client is no longer registered for the scopes of this code",
        None,
    )

    def __init__(self, reason: str, description: str, detected: str | None) -> None:
        self.reason = reason
        self.description = description
        self.detected = detected


@dataclass(frozen=True, slots=True)
class Redeemed:
    """A code redeemed now: what its tokens are minted from."""

    code: code_store.Redemption
    school: store.School
    # The access token's claims, recorded (token.issued) with the redemption.
    claims: dict[str, Any]
    refresh_token: str | None


@dataclass(frozen=True, slots=True)
class Ended:
    """A code whose grant is to end, and why."""

    ending: Ending
    code: code_store.Redemption


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
    return pkce.verifier_matches(req.form.get("code_verifier"), found.code_challenge)


async def check_redemption(req: GrantRequest, found: code_store.Redemption) -> store.School:
    """RFC 6749 4.1.3's checks of a code redeemed now; the school its tokens are bound to."""
    client, form = req.client, req.form
    if found.client_id != client.id:
        raise InvalidGrant("the code was issued to another client")
    school = await token_school(req, found.school_id)
    if found.expired:
        raise InvalidGrant("the code has expired")
    redirect_uri = form.get("redirect_uri")
    if not redirect_uri:
        # RFC 6749 4.1.3: required only if the authorization request had one. The
        # authorize step defaults it only for a client with a single registered URI.
        if client.redirect_uris != (found.redirect_uri,):
            raise InvalidRequest("redirect_uri is required")
    elif found.redirect_uri != redirect_uri:
        raise InvalidGrant("redirect_uri differs from the authorization")
    if not pkce.verifier_matches(form.get("code_verifier"), found.code_challenge):
        raise InvalidGrant("code_verifier is missing or does not match")
    if found.grant_revoked:
        raise InvalidGrant("the grant has been revoked")
    return school


def ending_of(found: code_store.Redemption) -> Ending | None:
    """Whether the grant of a code that passed its checks is to end instead of growing."""
    if found.shut_out:
        return Ending.REGISTRATION_CLOSED
    if roles.exceeds(
        found.scopes, roles.ceiling(found.user_role, platform_admin=found.platform_admin)
    ):
        return Ending.OUTGROWN
    if found.client_scopes is not None and not within_registration(
        found.scopes, found.client_scopes
    ):
        return Ending.NARROWED
    return None


async def redeem(req: GrantRequest, code: str) -> Redeemed | Ended:
    """Redeem the code in one transaction, storing the grant's first refresh token and the
    record of the access token to be answered with it."""
    ctx, client = req.ctx, req.client
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
            return Ended(Ending.REPLAYED, found)
        # A failed check raises and rolls back: the code stays for its rightful client.
        school = await check_redemption(req, found)
        ending = ending_of(found)
        if ending is not None:
            return Ended(ending, found)
        audience = audience_for(req, school, found.resource)
        claims = access_token_claims(
            req,
            school,
            subject=str(found.user_id),
            scopes=found.scopes,
            audience=audience,
            grant_id=found.grant_id,
            auth_time=found.auth_time,
        )
        refresh_token = None
        if "refresh_token" in client.grant_types:
            refresh_token = credentials.new_secret(credentials.REFRESH_TOKEN_PREFIX)
        await refresh_store.issue_code_tokens(
            conn,
            grant_id=found.grant_id,
            refresh_token_hash=credentials.token_hash(refresh_token) if refresh_token else None,
            client_id=client.id,
            scopes=found.scopes,
            resource=found.resource,
            auth_time=found.auth_time,
            ttl_seconds=ctx.settings.tokens.refresh_token_idle_ttl,
            max_seconds=ctx.settings.tokens.refresh_token_max_ttl,
            record=issued_record(req, "token.issued", claims, grant_type="authorization_code"),
        )
    return Redeemed(found, school, claims, refresh_token)


async def end_grant(req: GrantRequest, ended: Ended) -> NoReturn:
    """End the code's grant at every gateway, then refuse the request."""
    found, ending = ended.code, ended.ending
    await revoke_grant(
        req,
        found.grant_id,
        reason=ending.reason,
        detected=ending.detected,
        school_id=found.school_id,
        user_id=found.user_id,
    )
    req.state.forget_grant(found.grant_id)
    raise InvalidGrant(ending.description)


async def issue(
    req: GrantRequest, redeemed: Redeemed, access_signer: keys.Signer
) -> dict[str, Any]:
    """The access token, the refresh token stored with the redemption, and for `openid` an
    ID token (OIDC Core 3.1.3.3) carrying the nonce and the access token's hash."""
    ctx, found, school, claims = req.ctx, redeemed.code, redeemed.school, redeemed.claims
    settings = ctx.settings
    token = minting.sign_access_token(access_signer, claims)
    id_token = None
    if "openid" in found.scopes:
        id_signer = await ctx.keyring.signer(req.issuer.school_id, keys.ID_TOKEN_ALG)
        id_claims = minting.id_token_claims(
            settings,
            issuer=req.issuer,
            school=school,
            client_id=req.client.id,
            subject=claims["sub"],
            auth_time=found.auth_time,
            nonce=found.nonce,
            access_token=token,
            now=claims["iat"],
        )
        id_token = minting.sign_id_token(id_signer, id_claims)
    return token_response(
        token,
        settings.tokens.access_token_ttl,
        found.scopes,
        school,
        refresh_token=redeemed.refresh_token,
        id_token=id_token,
    )


async def authorization_code_grant(req: GrantRequest) -> dict[str, Any]:
    """RFC 6749 4.1.3 with RFC 7636: redeem the code once, then mint."""
    if "authorization_code" not in req.client.grant_types:
        raise UnauthorizedClient("the client may not use authorization_code")
    code = require(req.form, "code")
    access_signer = await req.ctx.keyring.signer(req.issuer.school_id, keys.ACCESS_TOKEN_ALG)
    redeemed = await redeem(req, code)
    if isinstance(redeemed, Ended):
        await end_grant(req, redeemed)
    return await issue(req, redeemed, access_signer)
