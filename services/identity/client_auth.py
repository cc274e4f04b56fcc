"""Client authentication at the token, revocation and introspection endpoints (RFC 6749 2.3).

Methods: `client_secret_basic` (RFC 6749 2.3.1: the id and secret are form-urlencoded, then
put in HTTP Basic), `client_secret_post` (both in the body), and `none` for public clients,
which name themselves with `client_id` and may not present a secret. A confidential client may
use either secret method whatever it registered: the same secret proves the same thing.

Every authentication failure is `invalid_client` (401); the error renderer adds the
`WWW-Authenticate: Basic` challenge RFC 6749 5.2 asks for.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote_plus

import asyncpg
import structlog
from aiohttp import web

from libs.common.config import Settings
from libs.common.errors import InvalidClient, InvalidRequest, InvalidTarget
from services.identity import clients, store
from services.identity.schools import Issuer

FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
# Parameters a request may carry several times (RFC 8707 allows several `resource` values;
# which we then refuse with the more precise invalid_target).
_REPEATABLE = frozenset({"resource"})


@dataclass(frozen=True, slots=True)
class AuthenticatedClient:
    client: store.Client
    method: str  # client_secret_basic | client_secret_post | none


def client_ip(request: web.Request, settings: Settings) -> str | None:
    """The caller's address for the audit trail: the edge's X-Forwarded-For when trusted."""
    if settings.trust_forwarded_host:
        forwarded = request.headers.get("X-Forwarded-For", "").split(",")[0].strip()
        try:
            return str(ipaddress.ip_address(forwarded))
        except ValueError:
            pass
    return request.remote


async def read_form(request: web.Request) -> dict[str, str]:
    """The urlencoded body as a dict; a repeated parameter is invalid_request (RFC 6749 3.1).

    A repeated `resource` is invalid_target instead: RFC 8707 allows several, but a token
    here has exactly one audience.
    """
    if request.content_type != FORM_CONTENT_TYPE:
        raise InvalidRequest(f"the body must be {FORM_CONTENT_TYPE}")
    data = await request.post()
    form: dict[str, str] = {}
    for name, value in data.items():
        if not isinstance(value, str):
            raise InvalidRequest("file uploads are not accepted")
        if name in form:
            if name in _REPEATABLE:
                raise InvalidTarget("only one resource may be requested")
            raise InvalidRequest(f"{name} is given more than once")
        form[name] = value
    return form


def basic_credentials(authorization: str | None) -> tuple[str, str] | None:
    """(client_id, secret) from `Authorization: Basic`; None when no Basic header was sent."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise InvalidClient("the Basic credentials are not valid base64") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise InvalidClient("the Basic credentials have no ':'")
    # RFC 6749 2.3.1: both were form-urlencoded before being joined.
    return unquote_plus(client_id), unquote_plus(secret)


async def authenticate(
    pool: asyncpg.Pool,
    settings: Settings,
    issuer: Issuer,
    *,
    authorization: str | None,
    form: Mapping[str, str],
    confidential_only: bool = False,
) -> AuthenticatedClient:
    """The client making the request, authenticated, and usable at this issuer."""
    basic = basic_credentials(authorization)
    body_id = form.get("client_id")
    body_secret = form.get("client_secret")
    secret: str | None
    if basic is not None:
        if body_secret is not None:
            raise InvalidRequest("use one client authentication method, not two")
        if body_id is not None and body_id != basic[0]:
            raise InvalidRequest("client_id differs from the Basic credentials")
        client_id, secret = basic
        method = "client_secret_basic"
    elif body_id:
        client_id, secret = body_id, body_secret
        method = "client_secret_post" if body_secret is not None else "none"
    else:
        raise InvalidClient("client authentication is required")

    # The row may be reused for a few seconds (store.cached_client_by_id), never past the
    # announcement of a change to it; the secret is still checked on every request.
    client = await store.cached_client_by_id(pool, client_id) if client_id else None
    if client is None or client.disabled_at is not None:
        raise InvalidClient("unknown or disabled client")
    if not clients.belongs_to(client, issuer.school_id):
        raise InvalidClient("the client is not registered with this authorization server")
    if client.is_public:
        if secret:
            raise InvalidClient("a public client has no secret")
        if confidential_only:
            raise InvalidClient("this endpoint is for confidential clients")
        method = "none"
    elif not secret or not await clients.check_secret(pool, settings, client, secret):
        raise InvalidClient("client authentication failed")
    structlog.contextvars.bind_contextvars(client_id=client.id)
    return AuthenticatedClient(client, method)
