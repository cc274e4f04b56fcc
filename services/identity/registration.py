"""Dynamic client registration (RFC 7591) and its management protocol (RFC 7592).

`POST /v1/oauth/register` (alias `/api/oauth/register`, the seed quickstart's path) creates a
client bound to the issuer the Host names: a school's client on a school origin, a
platform-level client (MCP clients) on the platform origin. The answer carries the client's
metadata in seed 001's shape, the secret once for confidential clients, and a
`registration_access_token` that alone lets the client read, replace or delete its
registration at `registration_client_uri`.

Policies where the RFCs leave the server a choice:
- Scopes: `scope` omitted gives seed 001's default list (less what the school does not allow);
  `admin:*` is removed silently, as RFC 7591 2 lets a server replace requested values; an
  unknown scope, or one the school does not allow, is `invalid_client_metadata`. On the
  platform origin a client naming scopes is registered for every application scope (MCP
  clients start with reading and step up; the user consents to each scope).
- Grants: only `authorization_code` (required) and `refresh_token`. `client_credentials` is
  refused: anyone may register, and a self-registered client must never reach school data
  without a user's consent.
- `response_types` is `["code"]` only; `token_endpoint_auth_method` defaults to
  `client_secret_basic` (RFC 7591 2); a client cannot switch between public and confidential
  afterwards (register a new one instead).
- A request that is not a JSON object is `invalid_client_metadata`, so callers only ever see
  RFC 7591's codes.
- Schools may close registration (`open_registration`, `loopwise-connect schools update`):
  403 `access_denied`. The platform origin is always open: MCP clients depend on it.
- Every registration attempt counts against a per-issuer, per-address window
  (REGISTRATIONS_PER_WINDOW per REGISTRATION_WINDOW_SECONDS; IPv6 per /64); past it, 429
  `slow_down` with `Retry-After`. If Redis cannot count, registration stays open (fail open):
  PostgreSQL, not Redis, is what a registration needs.
- Management answers 401 `invalid_token` alike for a missing or wrong token, a client that
  does not exist, belongs to another issuer, or was not created by registration, so the
  endpoint reveals nothing about which clients exist.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web
from redis.exceptions import RedisError

from libs.common import scopes as catalogue
from libs.common.config import Settings
from libs.common.errors import (
    InvalidClientMetadata,
    InvalidRedirectUri,
    OAuthError,
    bearer_challenge,
    json_response,
)
from libs.common.logging import get_logger
from services.identity import audit, clients, credentials, grants, ratelimit, store
from services.identity.context import IdentityContext, context, issuer
from services.identity.redirect_uris import is_loopback_host, validate_redirect_uri
from services.identity.schools import Issuer
from services.identity.store import registration as registration_store

log = get_logger(__name__)

# Read at request time, so a test (or an operator's patch) can change them in-process.
REGISTRATIONS_PER_WINDOW = 10
REGISTRATION_WINDOW_SECONDS = 60

# Seed 001: what a registration that names no scope answers with, in this order.
DEFAULT_SCOPES = (
    "read",
    "write",
    "courses:read",
    "courses:write",
    "students:read",
    "students:write",
    "analytics:read",
    "curriculum:read",
    "curriculum:write",
    "orders:read",
    "school:read",
)
DEFAULT_CLIENT_NAME = "Unnamed app"
REGISTRABLE_GRANT_TYPES = ("authorization_code", "refresh_token")
DEFAULT_AUTH_METHOD = "client_secret_basic"  # RFC 7591 2

MAX_BODY_BYTES = 64 * 1024
MAX_REDIRECT_URIS = 20
MAX_URI_LENGTH = 2000
MAX_CONTACTS = 10
# Metadata kept in clients.metadata and echoed back; everything else unknown is ignored.
URI_MEMBERS = ("client_uri", "logo_uri", "policy_uri", "tos_uri")
TEXT_MEMBERS = ("software_id", "software_version")

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# Compared against when no stored hash applies, so a miss costs what a hit costs.
_NO_HASH = bytes(32)


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """Registration metadata after validation and the server's defaults."""

    name: str
    redirect_uris: list[str]
    grant_types: list[str]
    response_types: list[str]
    auth_method: str
    scopes: list[str]
    metadata: dict[str, Any]


# Validation ------------------------------------------------------------------------------


def _bad(description: str) -> InvalidClientMetadata:
    return InvalidClientMetadata(description)


def _text(doc: Mapping[str, Any], name: str, max_length: int) -> str | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _bad(f"{name} must be a string")
    if len(value) > max_length:
        raise _bad(f"{name} must be at most {max_length} characters")
    return value


def _text_list(doc: Mapping[str, Any], name: str, max_items: int, max_length: int) -> list[str]:
    value = doc.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(f"{name} must be an array of strings")
    if len(value) > max_items:
        raise _bad(f"{name} may hold at most {max_items} values")
    if any(len(v) > max_length for v in value):
        raise _bad(f"each of {name} must be at most {max_length} characters")
    return list(dict.fromkeys(value))


def _web_uri(name: str, uri: str, settings: Settings) -> str:
    """A page or image the consent screen may link or show: https, loopback http in dev."""
    parts = urlsplit(uri)
    plain_ok = (
        parts.scheme == "http"
        and settings.is_development
        and is_loopback_host(parts.hostname or "")
    )
    if (parts.scheme != "https" and not plain_ok) or not parts.hostname:
        raise _bad(f"{name} must be an https URL")
    if any(c.isspace() for c in uri) or parts.username or parts.password:
        raise _bad(f"{name} is not a valid URL")
    return uri


def _scopes(doc: Mapping[str, Any], school: store.School | None) -> list[str]:
    raw = doc.get("scope")
    if raw is not None and not isinstance(raw, str):
        raise _bad("scope must be a space-separated string")
    if not raw:
        allowed = school.allowed_scopes if school else None
        return [s for s in DEFAULT_SCOPES if allowed is None or s in allowed]
    asked = catalogue.parse(raw)
    # Reserved for platform administrators: dropped, never echoed, never an error, so an
    # over-asking client still registers with what it may have.
    wanted = [s for s in asked if s not in catalogue.ADMIN_SCOPES]
    if not wanted:
        raise _bad("none of the requested scopes is available to applications")
    wanted = clients.validate_scopes(wanted, school)
    if school is None:
        # A platform client (an MCP client) is registered for every application scope: the
        # scope it names now is only where it starts (the MCP server's 401 asks for reading),
        # and it must be able to ask for more later (the 403 step-up). A self-registered
        # client's list bounds nothing anyway (anyone may register another); the user's
        # consent, scope by scope, is the bound.
        return [s for s in catalogue.PUBLIC_SCOPES if s not in catalogue.IDENTITY_SCOPES]
    return wanted


def parse_metadata(
    doc: Mapping[str, Any],
    school: store.School | None,
    settings: Settings,
    *,
    current_auth_method: str | None = None,
) -> ClientRequest:
    """Validate RFC 7591 client metadata and apply the defaults; unknown members are ignored.

    `current_auth_method` is the client's method on an RFC 7592 update: an omitted method
    keeps it, and a switch between public and confidential is refused.
    """
    name = (_text(doc, "client_name", 200) or "").strip() or DEFAULT_CLIENT_NAME

    redirect_uris = [
        validate_redirect_uri(u)
        for u in _text_list(doc, "redirect_uris", MAX_REDIRECT_URIS, MAX_URI_LENGTH)
    ]
    if not redirect_uris:
        raise InvalidRedirectUri("at least one redirect URI is required")

    grant_types = _text_list(doc, "grant_types", 5, 100) or list(REGISTRABLE_GRANT_TYPES)
    if "client_credentials" in grant_types:
        raise _bad("client_credentials is available only to clients a school admin creates")
    if any(g not in REGISTRABLE_GRANT_TYPES for g in grant_types):
        raise _bad("grant_types may be authorization_code and refresh_token")
    if "authorization_code" not in grant_types:
        raise _bad("grant_types must include authorization_code")

    response_types = _text_list(doc, "response_types", 5, 100) or ["code"]
    if response_types != ["code"]:
        raise _bad('response_types must be ["code"]')

    method = _text(doc, "token_endpoint_auth_method", 100) or (
        current_auth_method or DEFAULT_AUTH_METHOD
    )
    if method not in clients.AUTH_METHODS:
        raise _bad(f"token_endpoint_auth_method must be one of {', '.join(clients.AUTH_METHODS)}")
    if current_auth_method is not None and (method == "none") != (current_auth_method == "none"):
        raise _bad("a client cannot switch between public and confidential; register anew")

    metadata: dict[str, Any] = {}
    for member in URI_MEMBERS:
        uri = _text(doc, member, MAX_URI_LENGTH)
        if uri:
            metadata[member] = _web_uri(member, uri, settings)
    for member in TEXT_MEMBERS:
        text = _text(doc, member, 200)
        if text:
            metadata[member] = text
    contacts = _text_list(doc, "contacts", MAX_CONTACTS, 320)
    if any("@" not in c or any(ch.isspace() for ch in c) for c in contacts):
        raise _bad("contacts must be e-mail addresses")
    if contacts:
        metadata["contacts"] = contacts

    return ClientRequest(
        name=name,
        redirect_uris=redirect_uris,
        grant_types=grant_types,
        response_types=response_types,
        auth_method=method,
        scopes=_scopes(doc, school),
        metadata=metadata,
    )


# Answers ---------------------------------------------------------------------------------


def registration_client_uri(issuer_url: str, client_id: str) -> str:
    return f"{issuer_url}/v1/oauth/register/{client_id}"


def client_information(client: store.Client, issuer_url: str) -> dict[str, Any]:
    """The client's registered metadata (RFC 7591 3.2.1) in seed 001's order, no secrets."""
    document: dict[str, Any] = {
        "client_id": client.id,
        "client_name": client.name,
        "redirect_uris": list(client.redirect_uris),
        "grant_types": list(client.grant_types),
        "response_types": list(client.response_types),
        "token_endpoint_auth_method": client.token_endpoint_auth_method,
        "scope": catalogue.format_scopes(client.scopes),
        "client_id_issued_at": int(client.created_at.timestamp()),
    }
    for member in (*URI_MEMBERS, "contacts", *TEXT_MEMBERS):
        if member in client.metadata:
            document[member] = client.metadata[member]
    document["registration_client_uri"] = registration_client_uri(issuer_url, client.id)
    return document


def registration_response(made: clients.NewClient, issuer_url: str) -> dict[str, Any]:
    document = client_information(made.client, issuer_url)
    if made.client_secret is not None:
        document["client_secret"] = made.client_secret
        document["client_secret_expires_at"] = 0  # RFC 7591 3.2.1: does not expire
    document["registration_access_token"] = made.registration_access_token
    return document


def _audit_ip(address: str) -> str | None:
    """The address as audit_log's inet column takes it; None for a peer with no IP (a unix
    socket), rather than a record the audit consumer cannot store."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return None


def _invalid_token() -> OAuthError:
    description = "The registration access token is missing, invalid, or not for this client."
    return OAuthError(
        "invalid_token",
        description,
        status=401,
        headers={"WWW-Authenticate": bearer_challenge("invalid_token", description)},
    )


# Operations ------------------------------------------------------------------------------


async def registering_school(ctx: IdentityContext, where: Issuer) -> store.School | None:
    """The school a registration binds to (None on the platform), read fresh from PostgreSQL:
    the Host cache may be seconds behind a school that just closed registration."""
    if where.school is None:
        return None
    school = await store.school_by_id(ctx.pool, where.school.id)
    if school is None:
        raise OAuthError("not_found", "No school answers at this address.", status=404)
    if not school.open_registration:
        raise OAuthError(
            "access_denied",
            "This school does not accept dynamic client registration; "
            "ask a school admin to create the application.",
            status=403,
        )
    return school


async def check_rate(ctx: IdentityContext, where: Issuer, address: str) -> None:
    bucket = ratelimit.key(
        ctx.settings,
        "register",
        str(where.school_id) if where.school_id is not None else "platform",
        ratelimit.address_bucket(address),
    )
    try:
        allowed, retry_after = await ratelimit.hit(
            ctx.redis, bucket, REGISTRATIONS_PER_WINDOW, REGISTRATION_WINDOW_SECONDS
        )
    except RedisError:
        log.warning("registration_rate_limit_unavailable")
        return
    if not allowed:
        raise OAuthError(
            "slow_down",
            "Too many registrations from this address; try again later.",
            status=429,
            headers={"Retry-After": str(retry_after)},
        )


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
    await audit.append(
        ctx.redis,
        ctx.settings,
        audit.record(
            "client.registered",
            school_id=client.school_id,
            client_id=client.id,
            subject=client.id,
            scope=catalogue.format_scopes(client.scopes),
            ip=_audit_ip(address),
            client_name=client.name,
            token_endpoint_auth_method=client.token_endpoint_auth_method,
            redirect_uris=list(client.redirect_uris),
            issuer=where.issuer,
        ),
    )
    log.info("client_registered", client_id=client.id, public=client.is_public)
    return made


async def managed_client(
    ctx: IdentityContext, where: Issuer, client_id: str, authorization: str | None
) -> store.Client:
    """The client an RFC 7592 request may manage, or 401 without saying why."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise _invalid_token()
    client = await store.client_by_id(ctx.pool, client_id)
    manageable = (
        client is not None
        and client.created_via == "registration"
        and clients.belongs_to(client, where.school_id)
    )
    stored = client.registration_token_hash if client is not None and manageable else None
    if not credentials.matches(ctx.settings.secret_pepper, token, stored or _NO_HASH):
        raise _invalid_token()
    assert client is not None
    return client


async def _current_school(ctx: IdentityContext, client: store.Client) -> store.School | None:
    if client.school_id is None:
        return None
    return await store.school_by_id(ctx.pool, client.school_id)


def within_registration(granted: Iterable[str], registered: Iterable[str]) -> bool:
    """True when a client registered for `registered` may still hold every granted scope."""
    effective = catalogue.expand(registered)
    return all(s in catalogue.IDENTITY_SCOPES or s in effective for s in granted)


async def update(
    ctx: IdentityContext, client: store.Client, document: Mapping[str, Any], address: str
) -> store.Client:
    """RFC 7592 2.2: the request replaces the registration; omitted members get defaults."""
    if document.get("client_id") != client.id:
        raise _bad("client_id must be present and name this client")
    secret = document.get("client_secret")
    if secret is not None and not (
        isinstance(secret, str)
        and credentials.matches(ctx.settings.secret_pepper, secret, client.secret_hash)
    ):
        raise _bad("client_secret does not match the client's current secret")
    wanted = parse_metadata(
        document,
        await _current_school(ctx, client),
        ctx.settings,
        current_auth_method=client.token_endpoint_auth_method,
    )
    updated = await store.update_client(
        ctx.pool,
        client.id,
        name=wanted.name,
        redirect_uris=wanted.redirect_uris,
        grant_types=wanted.grant_types,
        response_types=wanted.response_types,
        token_endpoint_auth_method=wanted.auth_method,
        scopes=wanted.scopes,
        metadata=wanted.metadata,
    )
    if updated is None:  # deleted by a concurrent DELETE
        raise _invalid_token()
    await clients.announce_change(ctx.redis, ctx.settings, client.id)
    # A client holds no scope it is not registered for: grants wider than the new
    # registration end now rather than live on. "Wider" as authorize judges a request:
    # identity scopes need no registration, and a registered umbrella covers what it stands
    # for (a grant of `courses:read` is within a registration of `read`).
    revoked = 0
    for grant in await registration_store.active_grants_of_client(ctx.pool, client.id):
        if not within_registration(grant.scopes, updated.scopes):
            revoked += await grants.revoke_grant(
                ctx.pool,
                ctx.redis,
                ctx.settings,
                grant.id,
                reason="client_updated",
                ip=_audit_ip(address),
            )
    await audit.append(
        ctx.redis,
        ctx.settings,
        audit.record(
            "client.updated",
            school_id=updated.school_id,
            client_id=updated.id,
            subject=updated.id,
            scope=catalogue.format_scopes(updated.scopes),
            ip=_audit_ip(address),
            client_name=updated.name,
            redirect_uris=list(updated.redirect_uris),
            revoked_grants=revoked,
        ),
    )
    return updated


async def delete(ctx: IdentityContext, client: store.Client, address: str) -> None:
    """RFC 7592 2.3: revoke every grant (so gateways stop accepting its tokens), then delete.

    The client row stays locked throughout, so no grant can be created between the revokes
    and the delete and escape revocation.
    """
    revoked = 0
    async with ctx.pool.acquire() as conn, conn.transaction():
        if not await registration_store.lock_client(conn, client.id):
            return
        for grant in await registration_store.active_grants_of_client(conn, client.id):
            revoked += await grants.revoke_grant(
                conn,
                ctx.redis,
                ctx.settings,
                grant.id,
                reason="client_deleted",
                ip=_audit_ip(address),
            )
        await store.delete_client(conn, client.id)
    await clients.announce_change(ctx.redis, ctx.settings, client.id)
    await audit.append(
        ctx.redis,
        ctx.settings,
        audit.record(
            "client.deleted",
            school_id=client.school_id,
            client_id=client.id,
            subject=client.id,
            ip=_audit_ip(address),
            client_name=client.name,
            revoked_grants=revoked,
        ),
    )
    log.info("client_deleted", client_id=client.id, revoked_grants=revoked)


# Handlers --------------------------------------------------------------------------------


async def _json_object(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise _bad("the request body must be application/json")
    if (request.content_length or 0) > MAX_BODY_BYTES:
        raise _bad("the request body is too large")
    body = await request.read()
    if len(body) > MAX_BODY_BYTES:
        raise _bad("the request body is too large")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _bad("the request body is not valid JSON") from None
    if not isinstance(document, dict):
        raise _bad("the request body must be a JSON object")
    return document


async def register_endpoint(request: web.Request) -> web.Response:
    ctx, where = context(request), issuer(request)
    address = ratelimit.client_address(request, ctx.settings)
    school = await registering_school(ctx, where)
    await check_rate(ctx, where, address)
    document = await _json_object(request)
    made = await register(ctx, where, school, document, address)
    return json_response(
        registration_response(made, where.issuer), status=201, headers=dict(_NO_STORE)
    )


async def read_endpoint(request: web.Request) -> web.Response:
    ctx, where = context(request), issuer(request)
    client = await managed_client(
        ctx, where, request.match_info["client_id"], request.headers.get("Authorization")
    )
    return json_response(client_information(client, where.issuer), headers=dict(_NO_STORE))


async def update_endpoint(request: web.Request) -> web.Response:
    ctx, where = context(request), issuer(request)
    client = await managed_client(
        ctx, where, request.match_info["client_id"], request.headers.get("Authorization")
    )
    document = await _json_object(request)
    address = ratelimit.client_address(request, ctx.settings)
    updated = await update(ctx, client, document, address)
    return json_response(client_information(updated, where.issuer), headers=dict(_NO_STORE))


async def delete_endpoint(request: web.Request) -> web.Response:
    ctx, where = context(request), issuer(request)
    client = await managed_client(
        ctx, where, request.match_info["client_id"], request.headers.get("Authorization")
    )
    await delete(ctx, client, ratelimit.client_address(request, ctx.settings))
    return web.Response(status=204, headers=dict(_NO_STORE))


def setup(app: web.Application) -> None:
    r = app.router
    for base in ("/v1/oauth/register", "/api/oauth/register"):
        r.add_post(base, register_endpoint)
        r.add_get(base + "/{client_id}", read_endpoint, allow_head=False)
        r.add_put(base + "/{client_id}", update_endpoint)
        r.add_delete(base + "/{client_id}", delete_endpoint)


# OpenAPI ---------------------------------------------------------------------------------

_ERROR = {
    "description": "RFC 7591 / RFC 6749 error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OAuthError"}}},
}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_METADATA_PROPERTIES: dict[str, Any] = {
    "client_name": {"type": "string", "maxLength": 200},
    "redirect_uris": {**_STRINGS, "maxItems": MAX_REDIRECT_URIS},
    "grant_types": {
        "type": "array",
        "items": {"enum": list(REGISTRABLE_GRANT_TYPES)},
        "default": list(REGISTRABLE_GRANT_TYPES),
    },
    "response_types": {"type": "array", "items": {"enum": ["code"]}, "default": ["code"]},
    "token_endpoint_auth_method": {
        "enum": list(clients.AUTH_METHODS),
        "default": DEFAULT_AUTH_METHOD,
    },
    "scope": {
        "type": "string",
        "description": "Space-separated. Omitted: " + " ".join(DEFAULT_SCOPES) + ". admin:* "
        "scopes are removed; unknown scopes are refused.",
    },
    **{m: {"type": "string", "format": "uri"} for m in URI_MEMBERS},
    "contacts": {**_STRINGS, "maxItems": MAX_CONTACTS},
    **{m: {"type": "string"} for m in TEXT_MEMBERS},
}
_REQUIRED = [
    "client_id",
    "client_name",
    "redirect_uris",
    "grant_types",
    "response_types",
    "token_endpoint_auth_method",
    "scope",
    "registration_client_uri",
]
_INFORMATION_PROPERTIES: dict[str, Any] = {
    "client_id": {"type": "string"},
    **_METADATA_PROPERTIES,
    "client_id_issued_at": {"type": "integer"},
    "registration_client_uri": {"type": "string", "format": "uri"},
}
_INFORMATION = {"type": "object", "required": _REQUIRED, "properties": _INFORMATION_PROPERTIES}
_REGISTERED = {
    "type": "object",
    "required": [*_REQUIRED, "registration_access_token"],
    "properties": {
        **_INFORMATION_PROPERTIES,
        "client_secret": {"type": "string", "description": "Confidential clients; shown once"},
        "client_secret_expires_at": {"type": "integer", "const": 0},
        "registration_access_token": {"type": "string", "description": "Shown once"},
    },
}
_REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {"type": "object", "properties": _METADATA_PROPERTIES}}
    },
}
_BEARER = "Needs `Authorization: Bearer <registration_access_token>`; else 401 invalid_token."
_CLIENT_ID = [{"name": "client_id", "in": "path", "required": True, "schema": {"type": "string"}}]


def _information(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _INFORMATION}}}


_REGISTER_PATH: dict[str, Any] = {
    "post": {
        "summary": "Register a client (RFC 7591); bound to this origin's school or the platform",
        "requestBody": _REQUEST_BODY,
        "responses": {
            "201": {
                "description": "Registered",
                "content": {"application/json": {"schema": _REGISTERED}},
            },
            "400": _ERROR,
            "403": _ERROR,
            "429": _ERROR,
        },
    }
}
_MANAGE_PATH: dict[str, Any] = {
    "parameters": _CLIENT_ID,
    "get": {
        "summary": "Read a registration (RFC 7592)",
        "description": _BEARER,
        "responses": {"200": _information("The client's metadata"), "401": _ERROR},
    },
    "put": {
        "summary": "Replace a registration (RFC 7592); omitted members revert to defaults",
        "description": _BEARER,
        "requestBody": _REQUEST_BODY,
        "responses": {"200": _information("Updated"), "400": _ERROR, "401": _ERROR},
    },
    "delete": {
        "summary": "Delete a registration (RFC 7592); its grants are revoked",
        "description": _BEARER,
        "responses": {"204": {"description": "Deleted"}, "401": _ERROR},
    },
}
OPENAPI_PATHS: dict[str, Any] = {
    "/v1/oauth/register": _REGISTER_PATH,
    "/v1/oauth/register/{client_id}": _MANAGE_PATH,
    "/api/oauth/register": _REGISTER_PATH,
    "/api/oauth/register/{client_id}": _MANAGE_PATH,
}
