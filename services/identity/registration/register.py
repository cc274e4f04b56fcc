"""RFC 7591 section 3.1: registering a client, bound to the issuer the Host names.

A school's origin registers a client of that school, unless the school closed registration
(403 `access_denied`); the platform origin registers a platform client and is always open.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from libs.common import scopes as catalogue
from libs.common.errors import AccessDenied, NotFound
from libs.common.logging import get_logger
from services.identity import audit, clients, store
from services.identity.context import IdentityContext
from services.identity.registration.metadata import parse_metadata
from services.identity.schools import Issuer

log = get_logger(__name__)


def audit_ip(address: str) -> str | None:
    """The address as audit_log's inet column takes it; None for a peer with no IP (a unix
    socket), rather than a record the audit consumer cannot store."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return None


async def registering_school(ctx: IdentityContext, where: Issuer) -> store.School | None:
    """The school a registration binds to (None on the platform), read fresh from PostgreSQL:
    the Host cache may be seconds behind a school that just closed registration."""
    if where.school is None:
        return None
    school = await store.school_by_id(ctx.pool, where.school.id)
    if school is None:
        raise NotFound("No school answers at this address.")
    if not school.open_registration:
        raise AccessDenied(
            "This school does not accept dynamic client registration; "
            "ask a school admin to create the application."
        )
    return school


async def register(
    ctx: IdentityContext,
    where: Issuer,
    school: store.School | None,
    document: Mapping[str, Any],
    address: str,
) -> clients.NewClient:
    wanted = parse_metadata(document, school, ctx.settings)
    made = await clients.create_client(
        ctx.pool,
        ctx.settings,
        school=school,
        name=wanted.name,
        redirect_uris=wanted.redirect_uris,
        scopes=wanted.scopes,
        grant_types=wanted.grant_types,
        auth_method=wanted.auth_method,
        created_via="registration",
        with_registration_token=True,
        metadata=wanted.metadata,
    )
    client = made.client
    await audit.write(
        ctx.pool,
        audit.record(
            "client.registered",
            school_id=client.school_id,
            client_id=client.id,
            subject=client.id,
            scope=catalogue.format_scopes(client.scopes),
            ip=audit_ip(address),
            client_name=client.name,
            token_endpoint_auth_method=client.token_endpoint_auth_method,
            redirect_uris=list(client.redirect_uris),
            issuer=where.issuer,
        ),
    )
    log.info("client_registered", client_id=client.id, public=client.is_public)
    return made
