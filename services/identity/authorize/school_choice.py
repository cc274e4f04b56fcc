"""Which of the user's schools a platform client's request may go to (the school picker).

A platform client is registered on the platform origin, not at a school: its user picks the
school the grant is for, and the request is checked against that school then. A school that
closed registration is closed to clients that registered themselves (`closed_to`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.identity import store
from services.identity.authorize.checks import school_problem
from services.identity.authorize.request import AuthorizationRequest
from services.identity.context import IdentityContext


@dataclass(frozen=True, slots=True)
class SchoolChoice:
    school_id: int
    name: str
    subdomain: str
    role: str
    problem: str | None
    # Closed to this client: the school closed registration and the client registered itself.
    closed: bool = False


def closed_to(client: store.Client, school: store.School) -> bool:
    """A school that closed registration has said no app may enrol itself there: neither one
    that registered at the school before it closed, nor a platform client that registered
    itself on the (always open) platform origin and would get in by the school picker.
    Operator-made platform clients are system-default apps."""
    return client.created_via == "registration" and not school.open_registration


async def school_choices(
    ctx: IdentityContext, authz: AuthorizationRequest, user_id: Any, client: store.Client
) -> list[SchoolChoice]:
    """Every school of the user, closed ones marked: the picker shows only those not closed."""
    choices = []
    for m in await store.memberships_of(ctx.pool, user_id):
        school = await ctx.schools.school(m.subdomain)
        problem = school_problem(ctx.settings, authz, school, client) if school else None
        choices.append(
            SchoolChoice(
                m.school_id,
                m.school_name,
                m.subdomain,
                m.role,
                "This school does not allow the access this app asks for." if problem else None,
                closed=school is not None and closed_to(client, school),
            )
        )
    return choices
