"""RFC 7592 section 3: the registration access token, the one credential of management.

It is minted at registration (clients.create_client, stored as a peppered hash) and shown
once. A missing or wrong token, a client that does not exist, belongs to another issuer, or
was not made by registration all answer the same 401 `invalid_token`, in the same time, so
the endpoint reveals nothing about which clients exist.
"""

from __future__ import annotations

from libs.common.errors import InvalidToken, bearer_challenge
from services.identity import clients, credentials, store
from services.identity.context import IdentityContext
from services.identity.schools import Issuer

# Compared against when no stored hash applies, so a miss costs what a hit costs.
_NO_HASH = bytes(32)


def invalid_token() -> InvalidToken:
    description = "The registration access token is missing, invalid, or not for this client."
    return InvalidToken(
        description,
        headers={"WWW-Authenticate": bearer_challenge("invalid_token", description)},
    )


async def managed_client(
    ctx: IdentityContext, where: Issuer, client_id: str, authorization: str | None
) -> store.Client:
    """The client an RFC 7592 request may manage, or 401 without saying why."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise invalid_token()
    client = await store.client_by_id(ctx.pool, client_id)
    manageable = (
        client is not None
        and client.created_via == "registration"
        and clients.belongs_to(client, where.school_id)
    )
    stored = client.registration_token_hash if client is not None and manageable else None
    if client is None or stored is None:
        # The same work as a check, so a missing client answers no faster than a wrong token.
        credentials.matches(ctx.settings.secret_pepper, token, _NO_HASH)
        raise invalid_token()
    if not await clients.check_secret(
        ctx.pool, ctx.settings, client, token, "registration_token_hash"
    ):
        raise invalid_token()
    return client
