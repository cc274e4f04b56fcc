"""What every grant reads from a token request (RFC 6749 3.2): the request itself, its client
already authenticated (`GrantRequest`), its required parameters, and the school and audience
the token it asks for will be bound to."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from libs.common.errors import InvalidGrant, InvalidRequest, InvalidTarget
from services.identity import resources, store
from services.identity.context import IdentityContext
from services.identity.schools import Issuer
from services.identity.token_state import TokenState


@dataclass(frozen=True, slots=True)
class GrantRequest:
    """Everything a grant handler needs about the request, already authenticated."""

    ctx: IdentityContext
    state: TokenState
    issuer: Issuer
    client: store.Client
    form: Mapping[str, str]
    ip: str | None


def require(form: Mapping[str, str], name: str) -> str:
    value = form.get(name)
    if not value:
        raise InvalidRequest(f"{name} is required")
    return value


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
