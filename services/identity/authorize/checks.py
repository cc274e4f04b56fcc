"""The authorization request's checks (RFC 6749 4.1.1, RFC 7636 4.3, RFC 8707, OIDC Core
3.1.2.1), one function each, run in the order of `CHECKS`.

Two stages. `trusted_redirect` comes first: until the client and its redirect URI are known
good every problem is a page, never a redirect (RFC 6749 4.1.2.1; redirecting to an unverified
URI would make this server an open redirector). Then `build_request` runs `CHECKS` in order;
each reads the request's parameters and fills its part of the AuthorizationRequest, and the
first error raised (an OAuthError of libs/common/errors.py) is the answer, at the client's
redirect URI or on our page (responses.request_error).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from multidict import MultiMapping

from libs.common import scopes as catalogue
from libs.common.config import Settings
from libs.common.errors import (
    InvalidClient,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    OAuthError,
    RequestNotSupported,
    RequestUriNotSupported,
    UnauthorizedClient,
    UnsupportedResponseType,
)
from services.identity import clients, pkce, redirect_uris, resources, store
from services.identity.authorize.request import AuthorizationRequest
from services.identity.schools import Issuer

_PROMPTS = frozenset({"none", "login", "consent"})
# Parameters that may appear at most once (RFC 6749 3.1); `resource` may repeat (RFC 8707)
# and is handled on its own.
_SINGLE = (
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
    "nonce",
    "prompt",
    "max_age",
    "response_mode",
    "login_hint",
    "request",
    "request_uri",
)
MAX_STATE = 2048
_MAX_NONCE = 512
MAX_LOGIN_HINT = 320


def single(params: MultiMapping[Any], name: str) -> str | None:
    """A parameter's value; empty counts as absent (RFC 6749 3.1)."""
    values = params.getall(name, [])
    if len(values) > 1:
        raise InvalidRequest(f"The {name} parameter was given more than once.")
    value = str(values[0]) if values else ""
    return value or None


# Stage one: the client and where to answer it ------------------------------------------------


def trusted_redirect(params: MultiMapping[Any], iss: Issuer, client: store.Client | None) -> str:
    """The redirect URI to answer at, once client and URI are known good. What it raises is
    never sent to any redirect URI: the handler shows it on our page.

    RFC 6749 3.1.2.3: with several registered URIs the request must name one, and it must match
    one of them (redirect_uris.matches, RFC 8252 7.3 for loopback IPs)."""
    if client is None:
        raise InvalidClient("The application that sent you here is not known to Loopwise.")
    if client.disabled_at is not None:
        raise InvalidClient("The application that sent you here has been disabled.")
    if not clients.belongs_to(client, iss.school_id):
        raise InvalidClient("The application that sent you here is not registered here.")
    try:
        requested = single(params, "redirect_uri")
    except InvalidRequest:
        raise InvalidRequest("The request names more than one return address.") from None
    if requested is None:
        if len(client.redirect_uris) == 1:
            return client.redirect_uris[0]
        raise InvalidRequest("The request does not say where to return you to.")
    if any(redirect_uris.matches(requested, known) for known in client.redirect_uris):
        return requested
    raise InvalidRequest("The return address in the request is not registered for this app.")


# Stage two: everything after the redirect URI -----------------------------------------------


@dataclass(frozen=True, slots=True)
class Asked:
    """What the checks read: the request's parameters and who it is for."""

    params: MultiMapping[Any]
    settings: Settings
    iss: Issuer
    client: store.Client


def check_single_parameters(asked: Asked, authz: AuthorizationRequest) -> None:
    """RFC 6749 3.1: "Request and response parameters MUST NOT be included more than once"."""
    for name in _SINGLE:
        single(asked.params, name)


def check_request_objects(asked: Asked, authz: AuthorizationRequest) -> None:
    """OIDC Core 6: request objects are not supported, by value or by reference."""
    if single(asked.params, "request"):
        raise RequestNotSupported("Request objects are not supported.")
    if single(asked.params, "request_uri"):
        raise RequestUriNotSupported("request_uri is not supported.")


def check_response_type(asked: Asked, authz: AuthorizationRequest) -> None:
    """RFC 6749 4.1.1: response_type is required, and only `code` is offered."""
    response_type = single(asked.params, "response_type")
    if response_type is None:
        raise InvalidRequest("response_type is required.")
    if response_type != "code":
        raise UnsupportedResponseType("Only response_type=code is supported.")


def check_response_mode(asked: Asked, authz: AuthorizationRequest) -> None:
    """OAuth 2.0 Multiple Response Types 2.1: only the default, `query`, is offered."""
    if single(asked.params, "response_mode") not in (None, "query"):
        raise InvalidRequest("Only response_mode=query is supported.")


def check_client_flow(asked: Asked, authz: AuthorizationRequest) -> None:
    """RFC 6749 4.1.2.1 unauthorized_client: the client registered for the code flow."""
    client = asked.client
    if "authorization_code" not in client.grant_types or "code" not in client.response_types:
        raise UnauthorizedClient("The client may not use the authorization code flow.")


def check_pkce(asked: Asked, authz: AuthorizationRequest) -> None:
    """RFC 7636 4.3, S256 only: every code flow here carries a challenge (pkce.py)."""
    challenge = single(asked.params, "code_challenge")
    method = single(asked.params, "code_challenge_method")
    authz.code_challenge = pkce.check_challenge(challenge, method)


def scopes_of(requested: Sequence[str], client: store.Client) -> list[str]:
    """RFC 6749 3.3: known scopes, none of them admin, each one the client registered for
    (identity scopes always); none asked is the default scope."""
    asked = list(requested) or [catalogue.DEFAULT_SCOPE]
    if catalogue.unknown(asked):
        raise InvalidScope("The request names a scope that does not exist.")
    if any(s in catalogue.ADMIN_SCOPES for s in asked):
        raise InvalidScope("Admin scopes are not available to applications.")
    registered = catalogue.expand(client.scopes)
    refused = [s for s in asked if s not in catalogue.IDENTITY_SCOPES and s not in registered]
    if refused:
        raise InvalidScope(f"The client is not registered for the scope {refused[0]}.")
    return asked


def check_scope(asked: Asked, authz: AuthorizationRequest) -> None:
    authz.scopes = scopes_of(catalogue.parse(single(asked.params, "scope")), asked.client)


def check_resource(asked: Asked, authz: AuthorizationRequest) -> None:
    """RFC 8707 2: one absolute `resource` without a fragment that some school's tokens (or
    the MCP server's) may name; none asked is the client's default audience."""
    settings, iss, client = asked.settings, asked.iss, asked.client
    values = [str(v) for v in asked.params.getall("resource", []) if v]
    if not values:
        # Bound now, so the code, the grant and every refresh carry the MCP audience.
        authz.resource = resources.default_resource(settings, client)
        return
    if len(values) > 1:
        raise InvalidTarget("Only one resource per request is supported.")
    resource = values[0]
    parts = urlsplit(resource)
    if not parts.scheme or not parts.netloc or parts.fragment or "#" in resource:
        raise InvalidTarget("resource must be an absolute URI (RFC 8707).")
    if iss.school is None:
        # The school is picked later; here only what some school's tokens could name passes,
        # and the picked school is checked again.
        normalised = resource.rstrip("/")
        subdomain = settings.urls.subdomain_of(parts.netloc)
        school_api = bool(subdomain) and normalised == settings.urls.school_origin(subdomain or "")
        if normalised != resources.mcp_resource(settings) and not school_api:
            raise InvalidTarget("Tokens cannot be issued for this resource.")
        if school_api and resources.mcp_only(client):
            raise InvalidTarget(
                "A self-registered application may only get tokens for the MCP server.",
            )
    authz.resource = resource


def check_prompt(asked: Asked, authz: AuthorizationRequest) -> None:
    """OIDC Core 3.1.2.1: none, login, consent; `none` alone."""
    prompt = [p for p in (single(asked.params, "prompt") or "").split(" ") if p]
    unsupported = [p for p in prompt if p not in _PROMPTS]
    if unsupported:
        raise InvalidRequest("The prompt value is not supported.")
    if "none" in prompt and len(prompt) > 1:
        raise InvalidRequest("prompt=none cannot be combined with others.")
    authz.prompt = list(dict.fromkeys(prompt))


def check_max_age(asked: Asked, authz: AuthorizationRequest) -> None:
    """OIDC Core 3.1.2.1: max_age is a whole number of seconds."""
    raw = single(asked.params, "max_age")
    if raw is None:
        return
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9:
        raise InvalidRequest("max_age must be a whole number of seconds.")
    authz.max_age = int(raw)


def check_state(asked: Asked, authz: AuthorizationRequest) -> None:
    """RFC 6749 4.1.1 state, bounded: it is echoed in a URL."""
    state = single(asked.params, "state")
    if state is not None and len(state) > MAX_STATE:
        raise InvalidRequest("state is too long.")
    authz.state = state


def check_nonce(asked: Asked, authz: AuthorizationRequest) -> None:
    """OIDC Core 3.1.2.1 nonce, bounded: it is stored and echoed in the ID token."""
    nonce = single(asked.params, "nonce")
    if nonce is not None and len(nonce) > _MAX_NONCE:
        raise InvalidRequest("nonce is too long.")
    authz.nonce = nonce


def take_login_hint(asked: Asked, authz: AuthorizationRequest) -> None:
    """OIDC Core 3.1.2.1 login_hint: only prefills the sign-in form, cut to an address's length."""
    login_hint = single(asked.params, "login_hint")
    authz.login_hint = login_hint[:MAX_LOGIN_HINT] if login_hint else None


def school_problem(
    settings: Settings,
    authz: AuthorizationRequest,
    school: store.School,
    client: store.Client | None = None,
) -> OAuthError | None:
    """What keeps this request from being granted at `school`, if anything."""
    if school.allowed_scopes is not None:
        allowed = catalogue.expand(school.allowed_scopes)
        refused = [
            s for s in authz.scopes if s not in catalogue.IDENTITY_SCOPES and s not in allowed
        ]
        if refused:
            return InvalidScope(f"The school does not allow the scope {refused[0]}.")
    if authz.resource and (
        resources.audience(settings, school, authz.resource, issuer=authz.issuer, client=client)
        is None
    ):
        return InvalidTarget("The school's tokens cannot name this resource.")
    return None


def check_school(asked: Asked, authz: AuthorizationRequest) -> None:
    """At a school's issuer, the school allows the scopes and the resource (a platform
    client's picked school is checked when picked)."""
    if asked.iss.school is not None:
        problem = school_problem(asked.settings, authz, asked.iss.school, asked.client)
        if problem is not None:
            raise problem


Check = Callable[[Asked, AuthorizationRequest], None]

# The order is the answer's: the first check that fails names the error.
CHECKS: tuple[Check, ...] = (
    check_single_parameters,
    check_request_objects,
    check_response_type,
    check_response_mode,
    check_client_flow,
    check_pkce,
    check_scope,
    check_resource,
    check_prompt,
    check_max_age,
    check_state,
    check_nonce,
    take_login_hint,
    check_school,
)


def build_request(
    params: MultiMapping[Any],
    settings: Settings,
    iss: Issuer,
    client: store.Client,
    redirect_uri: str,
) -> AuthorizationRequest:
    """Validate everything after the redirect URI; the OAuthError raised names the first
    problem."""
    authz = AuthorizationRequest(
        id=secrets.token_urlsafe(32),
        issuer=iss.issuer,
        client_id=client.id,
        client_name=client.name,
        redirect_uri=redirect_uri,
        scopes=[],
        code_challenge="",
    )
    asked = Asked(params, settings, iss, client)
    for check in CHECKS:
        check(asked, authz)
    return authz
