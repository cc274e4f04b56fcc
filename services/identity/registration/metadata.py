"""RFC 7591 section 2: client metadata, validated and completed with the server's defaults.

What a registration (or an RFC 7592 replacement) may ask for: redirect URIs checked as every
client's are (redirect_uris.validate_redirect_uri), `authorization_code` with an optional
`refresh_token`, `response_types` `["code"]`, a token endpoint auth method, scopes within
what the school allows, and a few informational members (URIs, contacts, software id).
Unknown members are ignored; anything else wrong is `invalid_client_metadata` (or
`invalid_redirect_uri`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from libs.common import scopes as catalogue
from libs.common.config import Settings
from libs.common.errors import InvalidClientMetadata, InvalidRedirectUri
from services.identity import clients, store
from services.identity.redirect_uris import is_loopback_host, validate_redirect_uri

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
MAX_REDIRECT_URIS = 20
MAX_URI_LENGTH = 2000
MAX_CONTACTS = 10
# Metadata kept in clients.metadata and echoed back; everything else unknown is ignored.
URI_MEMBERS = ("client_uri", "logo_uri", "policy_uri", "tos_uri")
TEXT_MEMBERS = ("software_id", "software_version")


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
