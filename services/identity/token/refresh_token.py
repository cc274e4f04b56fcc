"""The refresh_token grant (RFC 6749 6) with rotation and reuse detection (OAuth 2.0 Security
BCP 4.14.2): each refresh token works once; presented again outside the grace window it is
taken as stolen, and its whole grant ends.

`refusal` is the one rule saying whether a presented token is refused and why (revoked grant,
expired, no user, a grant beyond its user's role, reuse). Two paths apply it: the fast path
(in `refresh_token_grant`, two round trips) rotates a never-rotated token it finds nothing
against with one conditional statement; whatever that does not settle goes to the locked path
(`rotate_locked`), which holds the row while it decides, and also recognises a concurrent retry
of the same rotation (`Rotation.RETRIED`), answered with the same successor: successors are
derived from the presented token (`successor_of`), so a retry can be given it again.

Either way the new access token's claims are minted before the rotation commits, and its
`token.refreshed` record is stored by the rotation's own statement (a retry's, which rotates
nothing, in its transaction): a token is answered only once its record has committed.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from libs.common import scopes as catalogue
from libs.common.config import Settings
from libs.common.db import Connection
from libs.common.errors import InvalidGrant, InvalidScope, UnauthorizedClient
from services.identity import credentials, keys, minting, roles, store
from services.identity.grants import within_registration
from services.identity.store import audit as audit_store
from services.identity.store import refresh_tokens as refresh_store
from services.identity.store.refresh_tokens import RefreshTokenState
from services.identity.token.request import GrantRequest, audience_for, require, token_school
from services.identity.token.response import (
    access_token_claims,
    issued_record,
    revoke_grant,
    token_response,
)

_REFRESH_SUCCESSOR = "refresh-successor"


class Refusal(enum.Enum):
    """Why a presented refresh token is refused; the value is the error_description."""

    GRANT_REVOKED = "the grant has been revoked"
    EXPIRED = "the refresh token has expired"
    NO_USER = "the refresh token has no user"
    # Consent given under a role the user no longer has is not consent the school would give
    # now: the grant ends, everywhere, so its access tokens stop at the gateways too.
    OUTGROWN = "the user's role at the school no longer allows this grant"
    # The client's registration was narrowed (RFC 7592 PUT) below what the grant holds.
    NARROWED = "the client is no longer registered for this grant's scopes"
    # Presented again after its rotation, and not as a retry within the grace window.
    REUSED = "the refresh token has already been used"


# The refusals that end the grant: the revocation's reason, and the audit action recording
# what gave it away (if any).
_ENDS_GRANT = {
    Refusal.OUTGROWN: ("role_lowered", None),
    Refusal.NARROWED: ("client_updated", None),
    Refusal.REUSED: ("refresh_token_reuse", "refresh.reuse_detected"),
}


class Rotation(enum.Enum):
    """How a refresh succeeded."""

    ROTATED = "rotated"  # this request rotated the token: its successor is stored now
    RETRIED = "retried"  # the same rotation again within the grace window: the same successor


@dataclass(frozen=True, slots=True)
class Rotated:
    """A refresh that mints: the token's state, its school, the new access token's scopes and
    its claims (recorded with the rotation)."""

    rotation: Rotation
    token: RefreshTokenState
    school: store.School
    scopes: list[str]
    claims: dict[str, Any]


def refreshed_claims(
    req: GrantRequest, st: RefreshTokenState, school: store.School, scopes: list[str], aud: str
) -> dict[str, Any]:
    """The claims of the access token a refresh of `st` answers with."""
    return access_token_claims(
        req,
        school,
        subject=str(st.user_id),
        scopes=scopes,
        audience=aud,
        grant_id=st.grant_id,
        auth_time=st.auth_time,
    )


@dataclass(frozen=True, slots=True)
class Refused:
    """A refresh refused in a way that ends the token's grant (OUTGROWN or REUSED)."""

    refusal: Refusal
    token: RefreshTokenState


def successor_of(pepper: bytes, presented: str) -> str:
    """The successor of a refresh token: derived, so a retry can be given it again."""
    return credentials.derive_secret(
        pepper, credentials.REFRESH_TOKEN_PREFIX, presented, _REFRESH_SUCCESSOR
    )


def beyond_role(st: RefreshTokenState) -> bool:
    """The grant holds more than its user's role now allows (lowered, or membership gone)."""
    return roles.exceeds(st.scopes, roles.ceiling(st.user_role, platform_admin=st.platform_admin))


def is_retry(st: RefreshTokenState, successor_hash: bytes, grace: float) -> bool:
    """A rotated token presented again within the grace window, for the same successor, which
    has not itself been rotated since: a concurrent retry of one rotation, not theft."""
    return (
        grace > 0
        and st.seconds_since_rotation is not None
        and st.seconds_since_rotation <= grace
        and not st.successor_rotated
        and st.successor_hash == successor_hash
    )


def refusal(st: RefreshTokenState, successor_hash: bytes, grace: float) -> Refusal | None:
    """Whether the presented refresh token, as it stands, is refused, and why; None when it
    may be rotated (never rotated) or answered again (a retry within the grace window)."""
    if st.grant_revoked:
        return Refusal.GRANT_REVOKED
    if st.expired:
        return Refusal.EXPIRED
    if st.user_id is None:
        return Refusal.NO_USER
    if beyond_role(st):
        return Refusal.OUTGROWN
    if st.client_scopes is not None and not within_registration(st.scopes, st.client_scopes):
        return Refusal.NARROWED
    if st.rotated_at is not None and not is_retry(st, successor_hash, grace):
        return Refusal.REUSED
    return None


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


async def rotate_locked(
    req: GrantRequest, conn: Connection, presented_hash: bytes, successor_hash: bytes
) -> Rotated | Refused:
    """The token locked for the rest of a transaction: rotate it, recognise a retry, or
    refuse it; raises for a refusal that does not end the grant."""
    settings = req.ctx.settings
    async with conn.transaction():
        st = await refresh_store.lock_refresh_token(conn, presented_hash)
        if st is None or st.client_id != req.client.id:
            raise InvalidGrant("the refresh token is invalid")
        school = await token_school(req, st.school_id)
        refused = refusal(st, successor_hash, settings.tokens.refresh_reuse_grace)
        if refused in (Refusal.OUTGROWN, Refusal.NARROWED):
            return Refused(refused, st)
        if refused is not None and refused is not Refusal.REUSED:
            raise InvalidGrant(refused.value)
        # The requested scope and resource are judged before reuse is acted on, as they always
        # were: a reused token asking for more than its grant is refused for that alone.
        scopes = narrowed_scopes(req.form.get("scope"), st.scopes)
        audience = audience_for(req, school, st.resource)
        if refused is Refusal.REUSED:
            return Refused(refused, st)
        claims = refreshed_claims(req, st, school, scopes, audience)
        if st.rotated_at is not None:
            # Nothing to rotate, but a token answered all the same: its record commits first.
            record = issued_record(req, "token.refreshed", claims, retry=True)
            await audit_store.insert_many(conn, [record])
            return Rotated(Rotation.RETRIED, st, school, scopes, claims)
        record = issued_record(req, "token.refreshed", claims, retry=False)
        await refresh_store.rotate_refresh_token(
            conn, st.token_hash, successor_hash, settings.tokens.refresh_token_idle_ttl, record
        )
    return Rotated(Rotation.ROTATED, st, school, scopes, claims)


async def end_grant(req: GrantRequest, refused: Refused) -> NoReturn:
    """End the grant of a token refused for reuse or for its user's role, then refuse."""
    st = refused.token
    reason, detected = _ENDS_GRANT[refused.refusal]
    if refused.refusal is Refusal.REUSED:
        req.ctx.metrics.refresh_reuse.inc()
    await revoke_grant(
        req,
        st.grant_id,
        reason=reason,
        detected=detected,
        school_id=st.school_id,
        user_id=st.user_id,
    )
    raise InvalidGrant(refused.refusal.value)


def _successor_before_pepper_rotation(
    settings: Settings, presented: str, decided: Rotated | Refused
) -> str | None:
    """The successor a retry was first answered with under the previous pepper, when the
    refusal of `presented` for reuse is a retry under that pepper; None otherwise."""
    previous = settings.previous_secret_pepper
    if previous is None or not isinstance(decided, Refused):
        return None
    if decided.refusal is not Refusal.REUSED:
        return None
    earlier = successor_of(previous, presented)
    grace = settings.tokens.refresh_reuse_grace
    return earlier if is_retry(decided.token, credentials.token_hash(earlier), grace) else None


async def refresh_token_grant(req: GrantRequest) -> dict[str, Any]:
    """RFC 6749 6 with rotation: each token works once; reuse outside the grace window is
    taken as theft and ends the grant (OAuth 2.0 Security BCP 4.14.2)."""
    ctx, client = req.ctx, req.client
    settings = ctx.settings
    if "refresh_token" not in client.grant_types:
        raise UnauthorizedClient("the client may not use refresh_token")
    presented = require(req.form, "refresh_token")
    access_signer = await ctx.keyring.signer(req.issuer.school_id, keys.ACCESS_TOKEN_ALG)
    successor = successor_of(settings.secret_pepper, presented)
    successor_hash = credentials.token_hash(successor)
    presented_hash = credentials.token_hash(presented)

    async with ctx.pool.acquire() as conn:
        # The fast path, two round trips: a token that looks live is rotated by one conditional
        # statement, after the same checks as on the locked path, which decides the rest.
        peek = await refresh_store.refresh_token_state(conn, presented_hash)
        decided: Rotated | Refused | None = None
        if (
            peek is not None
            and peek.client_id == client.id
            and peek.rotated_at is None
            and refusal(peek, successor_hash, settings.tokens.refresh_reuse_grace) is None
        ):
            school = await token_school(req, peek.school_id)
            scopes = narrowed_scopes(req.form.get("scope"), peek.scopes)
            claims = refreshed_claims(
                req, peek, school, scopes, audience_for(req, school, peek.resource)
            )
            record = issued_record(req, "token.refreshed", claims, retry=False)
            if await refresh_store.rotate_live_refresh_token(
                conn, presented_hash, successor_hash, settings.tokens.refresh_token_idle_ttl, record
            ):
                decided = Rotated(Rotation.ROTATED, peek, school, scopes, claims)
        if decided is None:
            decided = await rotate_locked(req, conn, presented_hash, successor_hash)
        earlier = _successor_before_pepper_rotation(settings, presented, decided)
        if earlier is not None:
            # A retry of a rotation answered under SECRET_PEPPER_PREVIOUS: its successor was
            # derived under that pepper, and a retry is given the same one, not taken for theft.
            again = await rotate_locked(req, conn, presented_hash, credentials.token_hash(earlier))
            if isinstance(again, Rotated):
                decided, successor = again, earlier
    if isinstance(decided, Refused):
        await end_grant(req, decided)

    token = minting.sign_access_token(access_signer, decided.claims)
    # No new ID token on refresh (OIDC Core 12.2 allows it): RS256 signing would cost more
    # than the rest of the refresh together, and the user did not sign in again.
    return token_response(
        token,
        settings.tokens.access_token_ttl,
        decided.scopes,
        decided.school,
        refresh_token=successor,
    )
