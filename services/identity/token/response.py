"""What every grant answers with: the access token's claims (RFC 9068), the successful
response's JSON (RFC 6749 5.1), the audit records of what the request did, and the ending of a
grant the request showed to be compromised or outgrown.

The record of a token issued (`issued_record`) is made from the token's claims before the
transaction granting it commits (a code redeemed, a refresh token rotated) and stored in that
transaction, by the same statement where it can be: a crash after the commit cannot leave a
token answerable without its record, and a rollback leaves neither. The token is signed after
the commit, with no connection held."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from libs.common import scopes as catalogue
from services.identity import audit, grants, minting, store
from services.identity.store import audit as audit_store
from services.identity.token.request import GrantRequest

# RFC 6749 5.1: "The authorization server MUST include the HTTP "Cache-Control" response
# header field with a value of "no-store" in any response containing tokens".
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def access_token_claims(
    req: GrantRequest,
    school: store.School,
    *,
    subject: str,
    scopes: Sequence[str],
    audience: str,
    grant_id: UUID,
    auth_time: datetime | None,
) -> dict[str, Any]:
    """The claims of the access token for the request's client: minted before the transaction
    that grants it commits, so its record (`issued_record`) commits with it; signed after."""
    return minting.access_token_claims(
        req.ctx.settings,
        issuer=req.issuer,
        school=school,
        client_id=req.client.id,
        subject=subject,
        scopes=scopes,
        audience=audience,
        grant_id=grant_id,
        auth_time=auth_time,
    )


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


async def revoke_grant(
    req: GrantRequest,
    grant_id: UUID,
    *,
    reason: str,
    detected: str | None = None,
    school_id: int,
    user_id: UUID | None,
) -> None:
    """End the grant at every gateway (`grants.revoke_grant`) on this request's account, and
    record what gave it away as the audit action `detected`, if it is one to record, in the
    revocation's transaction."""
    ctx = req.ctx
    records = []
    if detected is not None:
        records.append(
            audit.record(
                detected,
                ip=req.ip,
                school_id=school_id,
                client_id=req.client.id,
                subject=str(user_id),
                grant_id=str(grant_id),
            )
        )
    await grants.revoke_grant(
        ctx.pool, ctx.redis, ctx.settings, grant_id, reason=reason, ip=req.ip, records=records
    )


def issued_record(
    req: GrantRequest, action: str, claims: dict[str, Any], **detail: Any
) -> audit_store.AuditRow:
    """The audit record of an access token issued (to whom, of which grant, for what), as the
    row the grant's own statement stores with what it does.

    Made as the row directly, not through `audit.record` and `audit.row`, which clean values
    a caller may control: every value here is one this server minted (ids, scopes, the jti)
    or parsed (the address), and this is once per token, on the token endpoint's hot path."""
    return audit_store.AuditRow(
        record_id=audit.new_id(),
        occurred_at=datetime.now(UTC),
        school_id=claims["school_id"],
        client_id=claims["client_id"],
        subject=claims["sub"],
        grant_id=audit.parse_uuid(claims["grant_id"]),
        action=action,
        method=None,
        path=None,
        status=None,
        scope=claims["scope"],
        ip=audit.parse_ip(req.ip) if req.ip else None,
        detail={"jti": claims["jti"], **detail},
    )
