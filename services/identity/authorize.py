"""The authorization endpoint (RFC 6749 4.1, RFC 7636, RFC 9207, OIDC Core 3.1.2) and its flow.

`GET /v1/oauth/authorize` validates the request in two stages. Until the client and its
redirect URI are known, every problem is an error page and never a redirect: redirecting to
an unverified URI would make this server an open redirector. After that, a problem goes back
to the client with `error`, `error_description`, `state` and `iss` when a school admin, the
CLI or an operator registered the client, or once the user has acted in this flow (signed in,
picked a school, decided at consent). A client that registered itself chose its redirect URIs
alone, so until then its errors are our own page too (RFC 9700 4.11.2).

A signed-in user with remembered consent gets a code at once (one read query, one write
transaction). Anyone else goes through the flow's pages: sign in, pick a school (platform
clients), consent. Between pages the validated request lives in Redis under an unguessable
id with a short TTL; the pages' forms carry only that id and a CSRF token, never the request
itself, so nothing the browser sends back can widen what was asked.
"""

from __future__ import annotations

import dataclasses
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import orjson
from aiohttp import web
from multidict import MultiMapping

from libs.common import scopes as catalogue
from libs.common.config import Settings
from libs.common.logging import get_logger
from services.identity import (
    audit,
    clients,
    consent,
    credentials,
    grants,
    pages,
    resources,
    roles,
    sessions,
    store,
)
from services.identity.context import IdentityContext, context, issuer
from services.identity.schools import Issuer
from services.identity.store import authorize as flow_store
from services.identity.store.authorize import AuthorizeState, Session

log = get_logger(__name__)

AUTHORIZE_PATH = "/v1/oauth/authorize"
AUTHORIZE_ALIAS = "/oauth/authorize"
RESUME_PATH = "/v1/oauth/authorize/resume"
LOGIN_PATH = "/v1/oauth/login"
SELECT_SCHOOL_PATH = "/v1/oauth/select-school"
CONSENT_PATH = "/v1/oauth/consent"

# How long a user has for each step of the flow, and for the flow as a whole.
PENDING_TTL = 10 * 60
PENDING_MAX_AGE = 30 * 60
_PENDING_KEY = "connect:authz:"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{32,64}$")

_CODE_CHALLENGE = re.compile(r"^[A-Za-z0-9_-]{43}$")
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
_MAX_STATE = 2048
_MAX_NONCE = 512
_MAX_LOGIN_HINT = 320
_LOOPBACK_NETLOC = re.compile(r"^(127\.0\.0\.1|\[::1\])(?::([0-9]{1,5}))?$")
# error_description may carry only these characters (RFC 6749 4.1.2.1).
_DESCRIPTION_UNSAFE = re.compile(r"[^\x20\x21\x23-\x5B\x5D-\x7E]")


class UntrustedRequest(Exception):
    """The client or redirect URI cannot be trusted: answer with an error page, not a redirect."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class RedirectError(Exception):
    """An error the client hears about at its (trusted) redirect URI."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


# The pending request -----------------------------------------------------------------------


@dataclass(slots=True)
class AuthorizationRequest:
    """A validated authorization request, and how far its flow has come."""

    id: str
    issuer: str
    client_id: str
    client_name: str
    redirect_uri: str
    scopes: list[str]
    code_challenge: str
    state: str | None = None
    nonce: str | None = None
    resource: str | None = None
    prompt: list[str] = field(default_factory=list)
    max_age: int | None = None
    login_hint: str | None = None
    created_at: float = field(default_factory=time.time)
    # The session a sign-in during this flow created: it satisfies prompt=login and max_age.
    login_session: str | None = None
    # The school a platform client's user picked.
    school_id: int | None = None
    school_name: str | None = None
    # The scopes the consent page offered: the Allow grants no more, even if the user's role
    # was raised in between.
    offered: list[str] | None = None
    # The user has acted on one of this flow's pages (signed in, picked a school): from then on
    # an unreviewed client's errors may go back to it, as they no longer come unasked.
    interacted: bool = False
    # The browser the request was first shown in (sessions.browser_mark of its pre-session
    # cookie). Only that browser may go on with it: the request id travels in URLs, and a
    # stranger who learned it could otherwise sign in as themselves and have a code for their
    # own account issued to the client's state, nonce and PKCE challenge (code injection).
    browser: str | None = None

    def to_json(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> AuthorizationRequest:
        data = orjson.loads(raw)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _pending_key(settings: Settings, request_id: str) -> str:
    return settings.stream(_PENDING_KEY + request_id)


async def save_pending(ctx: IdentityContext, authz: AuthorizationRequest) -> None:
    await ctx.redis.set(_pending_key(ctx.settings, authz.id), authz.to_json(), ex=PENDING_TTL)


async def load_pending(request: web.Request, request_id: str) -> AuthorizationRequest | None:
    """The pending request, if it exists, is young enough, belongs to this issuer, and was
    started in this browser."""
    if not _REQUEST_ID.match(request_id):
        return None
    ctx, iss = context(request), issuer(request)
    raw = await ctx.redis.get(_pending_key(ctx.settings, request_id))
    if raw is None:
        return None
    authz = AuthorizationRequest.from_json(raw)
    if authz.issuer != iss.issuer or time.time() - authz.created_at > PENDING_MAX_AGE:
        return None
    if authz.browser is None or not sessions.is_browser(request, authz.browser):
        return None
    return authz


async def _save_shown(request: web.Request, authz: AuthorizationRequest) -> str:
    """Store the request a page is about to show, bound to this browser on its first showing.
    Returns the browser's pre-session value: the page sets its cookie anew, so that it
    outlives the request."""
    ctx = context(request)
    value, _ = sessions.presession(request)
    if authz.browser is None:
        authz.browser = sessions.browser_mark(ctx.settings, value)
    await save_pending(ctx, authz)
    return value


async def consume_pending(ctx: IdentityContext, request_id: str) -> bool:
    """Take the request out of Redis; only one of two racing submissions gets True."""
    return await ctx.redis.getdel(_pending_key(ctx.settings, request_id)) is not None


# Validation ------------------------------------------------------------------------------


def _single(params: MultiMapping[Any], name: str) -> str | None:
    """A parameter's value; empty counts as absent (RFC 6749 3.1)."""
    values = params.getall(name, [])
    if len(values) > 1:
        raise RedirectError("invalid_request", f"The {name} parameter was given more than once.")
    value = str(values[0]) if values else ""
    return value or None


def _loopback(uri: str) -> tuple[str, str, str, str] | None:
    """(host, path, query, port) of an `http://127.0.0.1` or `http://[::1]` URI, else None."""
    parts = urlsplit(uri)
    match = _LOOPBACK_NETLOC.match(parts.netloc)
    if parts.scheme != "http" or match is None or parts.fragment:
        return None
    return match.group(1), parts.path, parts.query, match.group(2) or ""


def redirect_uri_matches(requested: str, registered: str) -> bool:
    """Exact string match, except that a loopback IP redirect may differ in its port only
    (RFC 8252 7.3). `localhost` gets no such exception: it can resolve anywhere."""
    if requested == registered:
        return True
    asked, known = _loopback(requested), _loopback(registered)
    if asked is None or known is None:
        return False
    port = asked[3]
    if port and not 0 < int(port) < 65536:
        return False
    return asked[:3] == known[:3]


def trusted_redirect(params: MultiMapping[Any], iss: Issuer, client: store.Client | None) -> str:
    """The redirect URI to answer at, once client and URI are known good; else UntrustedRequest."""
    if client is None:
        raise UntrustedRequest("The application that sent you here is not known to Loopwise.")
    if client.disabled_at is not None:
        raise UntrustedRequest("The application that sent you here has been disabled.")
    if not clients.belongs_to(client, iss.school_id):
        raise UntrustedRequest("The application that sent you here is not registered here.")
    try:
        requested = _single(params, "redirect_uri")
    except RedirectError:
        raise UntrustedRequest("The request names more than one return address.") from None
    if requested is None:
        if len(client.redirect_uris) == 1:
            return client.redirect_uris[0]
        raise UntrustedRequest("The request does not say where to return you to.")
    if any(redirect_uri_matches(requested, known) for known in client.redirect_uris):
        return requested
    raise UntrustedRequest("The return address in the request is not registered for this app.")


def _check_scopes(requested: Sequence[str], client: store.Client) -> list[str]:
    asked = list(requested) or [catalogue.DEFAULT_SCOPE]
    if catalogue.unknown(asked):
        raise RedirectError("invalid_scope", "The request names a scope that does not exist.")
    if any(s in catalogue.ADMIN_SCOPES for s in asked):
        raise RedirectError("invalid_scope", "Admin scopes are not available to applications.")
    registered = catalogue.expand(client.scopes)
    refused = [s for s in asked if s not in catalogue.IDENTITY_SCOPES and s not in registered]
    if refused:
        raise RedirectError(
            "invalid_scope", f"The client is not registered for the scope {refused[0]}."
        )
    return asked


def school_problem(
    settings: Settings,
    authz: AuthorizationRequest,
    school: store.School,
    client: store.Client | None = None,
) -> RedirectError | None:
    """What keeps this request from being granted at `school`, if anything."""
    if school.allowed_scopes is not None:
        allowed = catalogue.expand(school.allowed_scopes)
        refused = [
            s for s in authz.scopes if s not in catalogue.IDENTITY_SCOPES and s not in allowed
        ]
        if refused:
            return RedirectError(
                "invalid_scope", f"The school does not allow the scope {refused[0]}."
            )
    if authz.resource and (
        resources.audience(settings, school, authz.resource, issuer=authz.issuer, client=client)
        is None
    ):
        return RedirectError("invalid_target", "The school's tokens cannot name this resource.")
    return None


def _check_resource(
    params: MultiMapping[Any], settings: Settings, iss: Issuer, client: store.Client
) -> str | None:
    values = [str(v) for v in params.getall("resource", []) if v]
    if not values:
        # Bound now, so the code, the grant and every refresh carry the MCP audience.
        return resources.default_resource(settings, client)
    if len(values) > 1:
        raise RedirectError("invalid_target", "Only one resource per request is supported.")
    resource = values[0]
    parts = urlsplit(resource)
    if not parts.scheme or not parts.netloc or parts.fragment or "#" in resource:
        raise RedirectError("invalid_target", "resource must be an absolute URI (RFC 8707).")
    if iss.school is None:
        # The school is picked later; here only what some school's tokens could name passes,
        # and the picked school is checked again.
        normalised = resource.rstrip("/")
        subdomain = settings.urls.subdomain_of(parts.netloc)
        school_api = bool(subdomain) and normalised == settings.urls.school_origin(subdomain or "")
        if normalised != resources.mcp_resource(settings) and not school_api:
            raise RedirectError("invalid_target", "Tokens cannot be issued for this resource.")
        if school_api and resources.mcp_only(client):
            raise RedirectError(
                "invalid_target",
                "A self-registered application may only get tokens for the MCP server.",
            )
    return resource


def _check_prompt(raw: str | None) -> list[str]:
    prompt = [p for p in (raw or "").split(" ") if p]
    unsupported = [p for p in prompt if p not in _PROMPTS]
    if unsupported:
        raise RedirectError("invalid_request", "The prompt value is not supported.")
    if "none" in prompt and len(prompt) > 1:
        raise RedirectError("invalid_request", "prompt=none cannot be combined with others.")
    return list(dict.fromkeys(prompt))


def _check_max_age(raw: str | None) -> int | None:
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9:
        raise RedirectError("invalid_request", "max_age must be a whole number of seconds.")
    return int(raw)


def build_request(
    params: MultiMapping[Any],
    settings: Settings,
    iss: Issuer,
    client: store.Client,
    redirect_uri: str,
) -> AuthorizationRequest:
    """Validate everything after the redirect URI; RedirectError names the first problem."""
    for name in _SINGLE:
        _single(params, name)
    if _single(params, "request"):
        raise RedirectError("request_not_supported", "Request objects are not supported.")
    if _single(params, "request_uri"):
        raise RedirectError("request_uri_not_supported", "request_uri is not supported.")
    response_type = _single(params, "response_type")
    if response_type is None:
        raise RedirectError("invalid_request", "response_type is required.")
    if response_type != "code":
        raise RedirectError("unsupported_response_type", "Only response_type=code is supported.")
    response_mode = _single(params, "response_mode")
    if response_mode not in (None, "query"):
        raise RedirectError("invalid_request", "Only response_mode=query is supported.")
    if "authorization_code" not in client.grant_types or "code" not in client.response_types:
        raise RedirectError(
            "unauthorized_client", "The client may not use the authorization code flow."
        )

    challenge = _single(params, "code_challenge")
    method = _single(params, "code_challenge_method")
    if challenge is None:
        raise RedirectError("invalid_request", "code_challenge is required (PKCE with S256).")
    if method is None:
        # RFC 7636 would default to plain, which this server never accepts.
        raise RedirectError(
            "invalid_request", "code_challenge_method is required and must be S256."
        )
    if method != "S256":
        raise RedirectError("invalid_request", "code_challenge_method must be S256.")
    if not _CODE_CHALLENGE.match(challenge):
        raise RedirectError("invalid_request", "code_challenge must be 43 base64url characters.")

    scopes = _check_scopes(catalogue.parse(_single(params, "scope")), client)
    resource = _check_resource(params, settings, iss, client)
    prompt = _check_prompt(_single(params, "prompt"))
    max_age = _check_max_age(_single(params, "max_age"))
    state = _single(params, "state")
    if state is not None and len(state) > _MAX_STATE:
        raise RedirectError("invalid_request", "state is too long.")
    nonce = _single(params, "nonce")
    if nonce is not None and len(nonce) > _MAX_NONCE:
        raise RedirectError("invalid_request", "nonce is too long.")
    login_hint = _single(params, "login_hint")

    authz = AuthorizationRequest(
        id=secrets.token_urlsafe(32),
        issuer=iss.issuer,
        client_id=client.id,
        client_name=client.name,
        redirect_uri=redirect_uri,
        scopes=scopes,
        code_challenge=challenge,
        state=state,
        nonce=nonce,
        resource=resource,
        prompt=prompt,
        max_age=max_age,
        login_hint=login_hint[:_MAX_LOGIN_HINT] if login_hint else None,
    )
    if iss.school is not None:
        problem = school_problem(settings, authz, iss.school, client)
        if problem is not None:
            raise problem
    return authz


# Responses -------------------------------------------------------------------------------


def _location(redirect_uri: str, params: Mapping[str, str | None]) -> str:
    """The redirect URI with `params` added to its query, keeping any query it already has."""
    parts = urlsplit(redirect_uri)
    added = urlencode({k: v for k, v in params.items() if v is not None})
    query = f"{parts.query}&{added}" if parts.query else added
    return urlunsplit(parts._replace(query=query))


def _redirect(location: str, status: int) -> web.Response:
    return web.Response(
        status=status,
        headers={
            "Location": location,
            "Cache-Control": "no-store",
            "Pragma": "no-cache",
            "Referrer-Policy": "no-referrer",
        },
    )


def error_redirect(
    iss: Issuer,
    redirect_uri: str,
    state: str | None,
    error: RedirectError,
    *,
    status: int = 302,
) -> web.Response:
    params: dict[str, str | None] = {
        "error": error.error,
        "error_description": _DESCRIPTION_UNSAFE.sub("", error.description),
        "state": state,
        "iss": iss.issuer,
    }
    return _redirect(_location(redirect_uri, params), status)


def code_redirect(
    iss: Issuer, authz: AuthorizationRequest, code: str, *, status: int = 302
) -> web.Response:
    params = {"code": code, "state": authz.state, "iss": iss.issuer}
    return _redirect(_location(authz.redirect_uri, params), status)


def error_page(
    request: web.Request,
    message: str,
    *,
    status: int = 400,
    title: str | None = None,
    error_code: str | None = None,
) -> web.Response:
    return pages.render(
        request,
        "error.html",
        status=status,
        title=title or "This sign-in request cannot continue",
        message=message,
        error_code=error_code,
    )


def request_error(
    request: web.Request,
    client: store.Client,
    redirect_uri: str,
    state: str | None,
    error: RedirectError,
    *,
    interacted: bool,
) -> web.Response:
    """An error of a request whose client and redirect URI are known: sent back to the client
    when someone answerable registered it or the user has acted in this flow, else shown
    here. Redirecting an unreviewed client's errors at once would let anyone who registers
    `https://evil.example/` bounce browsers there through our origin (RFC 9700 4.11.2)."""
    if interacted or clients.reviewed(client):
        return error_redirect(issuer(request), redirect_uri, state, error)
    return error_page(
        request,
        error.description,
        status=500 if error.error == "server_error" else 400,
        error_code=error.error,
    )


def _expired(request: web.Request) -> web.Response:
    return error_page(
        request,
        "This sign-in request has expired or was already completed. "
        "Go back to the application and start again.",
        title="This sign-in request has expired",
    )


def _csrf_refused(request: web.Request) -> web.Response:
    return error_page(
        request,
        "This form has expired or did not come from this page. "
        "Go back, reload the page and try again.",
        status=403,
        title="Request refused",
    )


def _resume_url(authz: AuthorizationRequest) -> str:
    return f"{RESUME_PATH}?{urlencode({'request_id': authz.id})}"


# Issuing the code ------------------------------------------------------------------------


async def issue_code(
    request: web.Request,
    authz: AuthorizationRequest,
    *,
    school_id: int,
    session: Session,
    remember_consent: bool,
) -> str | None:
    """Record consent (when the user just gave it), create the grant and the code; None when
    the remembered consent a code was to be issued on has been withdrawn meanwhile."""
    ctx = context(request)
    code = credentials.new_secret(credentials.AUTHORIZATION_CODE_PREFIX)
    async with ctx.pool.acquire() as conn, conn.transaction():
        if remember_consent:
            await consent.remember(
                conn,
                user_id=session.user_id,
                client_id=authz.client_id,
                school_id=school_id,
                scopes=authz.scopes,
            )
        else:
            # Read again, and held: the user may have disconnected the app (account page)
            # since the flow read it, and that Revoke must see this grant to end it.
            held = await flow_store.held_consent(
                conn, user_id=session.user_id, client_id=authz.client_id, school_id=school_id
            )
            if held is None or not consent.covers(held, authz.scopes):
                return None
        grant = await grants.create_grant(
            conn,
            school_id=school_id,
            client_id=authz.client_id,
            user_id=session.user_id,
            scopes=authz.scopes,
        )
        await flow_store.insert_authorization_code(
            conn,
            code_hash=credentials.token_hash(code),
            grant_id=grant.id,
            client_id=authz.client_id,
            school_id=school_id,
            user_id=session.user_id,
            # The URI the client sent, or its only registered one when it sent none: the
            # token endpoint compares against this.
            redirect_uri=authz.redirect_uri,
            scopes=authz.scopes,
            code_challenge=authz.code_challenge,
            nonce=authz.nonce,
            resource=authz.resource,
            auth_time=session.authenticated_at,
            ttl_seconds=ctx.settings.tokens.authorization_code_ttl,
        )
    scope = catalogue.format_scopes(authz.scopes)
    common: dict[str, Any] = {
        "school_id": school_id,
        "client_id": authz.client_id,
        "subject": str(session.user_id),
        "scope": scope,
        "ip": sessions.client_address(request),
    }
    if remember_consent:
        await audit.append(ctx.redis, ctx.settings, audit.record("consent.granted", **common))
    await audit.append(
        ctx.redis,
        ctx.settings,
        audit.record("grant.created", grant_id=str(grant.id), **common),
    )
    return code


# The flow --------------------------------------------------------------------------------

# When nothing of a request fits the user's role (roles.py). A request that keeps anything,
# if only `openid`, is granted narrowed instead (RFC 6749 3.3), as Keycloak and node-oidc do:
# the token response's `scope` tells the client what it got.
_NEEDS_ADMIN = (
    "The access this application asks for needs a school admin; the user's role at the "
    "school does not allow any of it."
)


def _needs_login(authz: AuthorizationRequest, session: Session | None) -> bool:
    if session is None:
        return True
    if authz.login_session == session.id_hash.hex():
        # Signed in during this very flow: prompt=login and max_age are satisfied.
        return False
    if "login" in authz.prompt:
        return True
    if authz.max_age is not None:
        age = (datetime.now(UTC) - session.authenticated_at).total_seconds()
        return age > authz.max_age
    return False


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


async def _school_choices(
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


# The most passes the flow makes before it has an answer: the school of someone signed in
# before is dropped, the user's only school is picked, a remembered consent is withdrawn
# while its code was being made, and then a page or a code.
_MAX_PASSES = 4


@dataclass(frozen=True, slots=True)
class _Again:
    """A pass changed what the flow stands on: look again. `pending` is whether the request
    is still stored (issuing a code takes it out)."""

    pending: bool


def _still_usable(client: store.Client | None, iss: Issuer) -> bool:
    """The client the flow began with still exists, is enabled, and belongs here."""
    return (
        client is not None
        and client.disabled_at is None
        and clients.belongs_to(client, iss.school_id)
    )


def _gone(request: web.Request) -> web.Response:
    return error_page(request, "The application that sent you here is no longer available.")


def _standing(school_id: int | None, loaded: AuthorizeState) -> tuple[object, ...]:
    """What a pass decides from: a pass that starts from the same as an earlier one would
    decide the same again, so the flow is stuck rather than making progress."""
    return (
        school_id,
        loaded.session.id_hash if loaded.session else None,
        loaded.session_may_use_school,
        loaded.consented,
        loaded.role,
        loaded.platform_admin,
    )


async def advance(
    request: web.Request,
    authz: AuthorizationRequest,
    loaded: AuthorizeState | None = None,
    *,
    pending: bool,
) -> web.StreamResponse:
    """Take the flow as far as it goes without the user: a code, an error, or the next page.

    `pending` says the request came out of Redis (and must be taken out before its code is
    issued); a fresh request is stored only when a page has to be shown. A loop of passes,
    each on the state as it now is: a pass that would start where an earlier one did, or
    one too many, ends the flow with server_error instead of going round.
    """
    ctx, iss = context(request), issuer(request)
    seen: set[tuple[object, ...]] = set()
    client: store.Client | None = None
    for _ in range(_MAX_PASSES):
        school_id = iss.school_id if iss.school is not None else authz.school_id
        if loaded is None:
            loaded = await flow_store.authorize_state(
                ctx.pool,
                client_id=authz.client_id,
                session_hash=sessions.session_hash(request),
                school_id=school_id,
            )
        client = loaded.client
        standing = _standing(school_id, loaded)
        if standing in seen:
            break
        seen.add(standing)
        outcome = await _advance_once(request, authz, loaded, school_id, pending=pending)
        if not isinstance(outcome, _Again):
            return outcome
        loaded, pending = None, outcome.pending
    log.error("authorize_flow_stuck", client_id=authz.client_id, passes=len(seen))
    if not _still_usable(client, iss):
        return _gone(request)
    assert client is not None
    stuck = RedirectError("server_error", "The authorization request could not be completed.")
    return request_error(
        request, client, authz.redirect_uri, authz.state, stuck, interacted=authz.interacted
    )


async def _advance_once(
    request: web.Request,
    authz: AuthorizationRequest,
    loaded: AuthorizeState,
    school_id: int | None,
    *,
    pending: bool,
) -> web.StreamResponse | _Again:
    """One pass of the flow: an answer, or _Again when it changed what the next pass stands on."""
    ctx, iss = context(request), issuer(request)
    client = loaded.client
    if not _still_usable(client, iss):
        return _gone(request)
    assert client is not None
    if client.created_via == "registration" and school_id is not None:
        # Read afresh, not from the Host cache: the school may have closed a moment ago. Shown
        # here, not redirected: the app is unreviewed (RFC 9700 4.11.2).
        school = await store.school_by_id(ctx.pool, school_id)
        if school is not None and closed_to(client, school):
            return error_page(
                request, f"{school.name} does not accept applications that registered themselves."
            )

    def fail(error: str, description: str) -> web.Response:
        assert client is not None
        return request_error(
            request,
            client,
            authz.redirect_uri,
            authz.state,
            RedirectError(error, description),
            interacted=authz.interacted,
        )

    session = loaded.session
    if session is not None and school_id is not None and not loaded.session_may_use_school:
        if iss.school is None:
            # The school was picked by whoever was signed in before: this user picks anew.
            authz.school_id = authz.school_name = None
            return _Again(pending)
        # Signed in, but as someone who may not act at this school: sign in again.
        session = None
    if _needs_login(authz, session):
        if "none" in authz.prompt:
            return fail("login_required", "The user is not signed in.")
        return await _show_login(request, authz)
    assert session is not None

    if school_id is None:
        everything = await _school_choices(ctx, authz, session.user_id, client)
        choices = [c for c in everything if not c.closed]
        if not everything:
            return fail(
                "access_denied",
                "The user does not belong to any school, so there is no school to grant.",
            )
        if not choices:
            return fail(
                "access_denied",
                "None of the user's schools accepts applications that registered themselves.",
            )
        usable = [c for c in choices if c.problem is None]
        if len(choices) == 1 and usable:
            # One school: nothing to choose, and the consent screen names it anyway.
            authz.school_id = usable[0].school_id
            authz.school_name = usable[0].name
            return _Again(pending)
        if "none" in authz.prompt:
            return fail("interaction_required", "The user has to choose a school.")
        return await _show_picker(request, authz, session, choices)

    # Checked on every pass, remembered consent included: a role lowered since then lowers
    # what the user can grant now.
    narrowed = roles.narrow(
        authz.scopes, roles.ceiling(loaded.role, platform_admin=loaded.platform_admin)
    )
    if not narrowed.granted:
        return fail("access_denied", _NEEDS_ADMIN)
    need = consent.assess(narrowed.granted, loaded.consented)
    if need.remembered and "consent" not in authz.prompt:
        if pending and not await consume_pending(ctx, authz.id):
            # Another tab finished this very request first: one code per request.
            return _expired(request)
        granted = dataclasses.replace(authz, scopes=list(narrowed.granted))
        code = await issue_code(
            request, granted, school_id=school_id, session=session, remember_consent=False
        )
        if code is None:
            # Withdrawn since it was read: ask again (or, with prompt=none, say so).
            return _Again(pending=False)
        return code_redirect(iss, authz, code)
    if "none" in authz.prompt:
        return fail("consent_required", "The user has not consented to these scopes.")
    authz.offered = list(narrowed.granted)
    return await _show_consent(request, authz, session, need, withheld=narrowed.withheld)


async def _show_login(
    request: web.Request,
    authz: AuthorizationRequest,
    *,
    status: int = 200,
    error: str | None = None,
    email: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    ctx, iss = context(request), issuer(request)
    value = await _save_shown(request, authz)
    response = pages.render(
        request,
        "login.html",
        status=status,
        form_action=[authz.redirect_uri],
        headers=headers,
        title="Sign in",
        client_name=authz.client_name,
        school_name=iss.school.name if iss.school else None,
        request_id=authz.id,
        csrf_token=sessions.login_csrf_token(ctx.settings, value, authz.id),
        email=email or authz.login_hint or "",
        error=error,
        action=LOGIN_PATH,
    )
    sessions.set_presession_cookie(response, request, value)
    return response


async def _show_picker(
    request: web.Request,
    authz: AuthorizationRequest,
    session: Session,
    choices: list[SchoolChoice],
    *,
    status: int = 200,
    error: str | None = None,
) -> web.Response:
    ctx = context(request)
    value = await _save_shown(request, authz)
    user = await store.user_by_id(ctx.pool, session.user_id)
    response = pages.render(
        request,
        "school_picker.html",
        status=status,
        form_action=[authz.redirect_uri],
        title="Choose a school",
        client_name=authz.client_name,
        user_email=user.email if user else "",
        choices=choices,
        default_school_id=next((c.school_id for c in choices if c.problem is None), None),
        request_id=authz.id,
        csrf_token=sessions.session_csrf_token(session, "select-school", authz.id),
        logout_csrf_token=sessions.logout_csrf_token(session),
        resume_url=_resume_url(authz),
        error=error,
        action=SELECT_SCHOOL_PATH,
    )
    sessions.set_presession_cookie(response, request, value)
    return response


def _redirect_host(uri: str) -> str:
    parts = urlsplit(uri)
    return parts.netloc or f"{parts.scheme}:"


async def _show_consent(
    request: web.Request,
    authz: AuthorizationRequest,
    session: Session,
    need: consent.ConsentNeed,
    *,
    withheld: Sequence[str] = (),
) -> web.Response:
    ctx, iss = context(request), issuer(request)
    value = await _save_shown(request, authz)
    user = await store.user_by_id(ctx.pool, session.user_id)
    client = await store.client_by_id(ctx.pool, authz.client_id)
    school_name = iss.school.name if iss.school else (authz.school_name or "")
    response = pages.render(
        request,
        "consent.html",
        form_action=[authz.redirect_uri],
        title=f"Allow {authz.client_name}?",
        client_name=authz.client_name,
        # Self-registered (RFC 7591) apps are not reviewed by anyone; say so.
        unreviewed=bool(client and not clients.reviewed(client)),
        redirect_host=_redirect_host(authz.redirect_uri),
        school_name=school_name,
        platform=iss.school is None,
        user_email=user.email if user else "",
        new_scopes=consent.lines(need.new),
        previous_scopes=consent.lines(need.previously),
        withheld_scopes=consent.lines(withheld),
        request_id=authz.id,
        csrf_token=sessions.session_csrf_token(session, "consent", authz.id),
        logout_csrf_token=sessions.logout_csrf_token(session),
        resume_url=_resume_url(authz),
        action=CONSENT_PATH,
    )
    sessions.set_presession_cookie(response, request, value)
    return response


# Handlers --------------------------------------------------------------------------------


async def authorize(request: web.Request) -> web.StreamResponse:
    params: MultiMapping[Any] = await request.post() if request.method == "POST" else request.query
    ctx, iss = context(request), issuer(request)
    try:
        client_id = _single(params, "client_id")
    except RedirectError:
        return error_page(request, "The request names more than one application.")
    if client_id is None:
        return error_page(request, "The request does not say which application sent you here.")
    loaded = await flow_store.authorize_state(
        ctx.pool,
        client_id=client_id,
        session_hash=sessions.session_hash(request),
        school_id=iss.school_id,
    )
    try:
        redirect_uri = trusted_redirect(params, iss, loaded.client)
    except UntrustedRequest as exc:
        return error_page(request, exc.message)
    assert loaded.client is not None
    try:
        authz = build_request(params, ctx.settings, iss, loaded.client, redirect_uri)
    except RedirectError as exc:
        state = params.get("state")
        state = str(state) if state and len(str(state)) <= _MAX_STATE else None
        return request_error(request, loaded.client, redirect_uri, state, exc, interacted=False)
    # Nothing is stored until a page is shown: the returning user's code costs no Redis write.
    return await advance(request, authz, loaded, pending=False)


async def resume(request: web.Request) -> web.StreamResponse:
    authz = await load_pending(request, request.query.get("request_id", ""))
    if authz is None:
        return _expired(request)
    return await advance(request, authz, pending=True)


async def login_submit(request: web.Request) -> web.StreamResponse:
    ctx, iss = context(request), issuer(request)
    form = await request.post()
    request_id = str(form.get("request_id", ""))
    if not sessions.check_login_csrf(request, str(form.get("csrf_token", "")), request_id):
        return _csrf_refused(request)
    authz = await load_pending(request, request_id)
    if authz is None:
        return _expired(request)
    email = str(form.get("email", ""))[:_MAX_LOGIN_HINT]
    result = await sessions.sign_in(
        ctx,
        email=email,
        password=str(form.get("password", "")),
        school=iss.school,
        address=sessions.client_address(request),
        user_agent=request.headers.get("User-Agent"),
        previous_session=sessions.session_hash(request),
        device_cookie=sessions.device_cookie(request),
    )
    if result.outcome == "throttled":
        return await _show_login(
            request,
            authz,
            status=429,
            email=email,
            error="Too many unsuccessful sign-in attempts. Please try again later.",
            headers={"Retry-After": str(result.retry_after or 60)},
        )
    if result.outcome == "invalid":
        return await _show_login(
            request, authz, status=400, email=email, error="Incorrect email or password."
        )
    if result.outcome == "not_member" or result.session is None or result.cookie_value is None:
        school = iss.school.name if iss.school else "this school"
        return await _show_login(
            request,
            authz,
            status=403,
            email=email,
            error=f"This account is not a member of {school}. Sign in with another account.",
        )
    authz.login_session = result.session.id_hash.hex()
    authz.interacted = True
    if iss.school is None:
        # A school picked before this sign-in was someone else's choice.
        authz.school_id = authz.school_name = None
    await save_pending(ctx, authz)
    response = sessions.see_other(_resume_url(authz))
    sessions.set_session_cookie(response, request, result.cookie_value)
    sessions.set_device_cookie(response, request, result.device_cookie)
    return response


async def select_school_submit(request: web.Request) -> web.StreamResponse:
    ctx, iss = context(request), issuer(request)
    form = await request.post()
    request_id = str(form.get("request_id", ""))
    session = await sessions.current_session(request)
    token = str(form.get("csrf_token", ""))
    if session is None or not sessions.check_session_csrf(
        session, "select-school", request_id, token
    ):
        return _csrf_refused(request)
    authz = await load_pending(request, request_id)
    if authz is None or iss.school is not None:
        return _expired(request)
    if form.get("decision") == "cancel":
        if not await consume_pending(ctx, authz.id):
            return _expired(request)
        denied = RedirectError("access_denied", "The user cancelled the request.")
        return error_redirect(iss, authz.redirect_uri, authz.state, denied, status=303)
    client = await store.client_by_id(ctx.pool, authz.client_id)
    if client is None or client.disabled_at is not None or not clients.belongs_to(client, None):
        return error_page(request, "The application that sent you here is no longer available.")
    everything = await _school_choices(ctx, authz, session.user_id, client)
    picked = next((c for c in everything if str(c.school_id) == form.get("school_id")), None)
    if picked is not None and picked.closed:
        # Never offered, so posted by hand: refuse the request rather than the form.
        if not await consume_pending(ctx, authz.id):
            return _expired(request)
        closed = RedirectError(
            "access_denied",
            f"{picked.name} does not accept applications that registered themselves.",
        )
        return error_redirect(iss, authz.redirect_uri, authz.state, closed, status=303)
    choices = [c for c in everything if not c.closed]
    if picked is None or picked.problem is not None:
        return await _show_picker(
            request, authz, session, choices, status=400, error="Choose one of your schools."
        )
    authz.school_id = picked.school_id
    authz.school_name = picked.name
    authz.interacted = True
    await save_pending(ctx, authz)
    return sessions.see_other(_resume_url(authz))


async def consent_submit(request: web.Request) -> web.StreamResponse:
    ctx, iss = context(request), issuer(request)
    form = await request.post()
    request_id = str(form.get("request_id", ""))
    session = await sessions.current_session(request)
    token = str(form.get("csrf_token", ""))
    if session is None or not sessions.check_session_csrf(session, "consent", request_id, token):
        return _csrf_refused(request)
    authz = await load_pending(request, request_id)
    if authz is None:
        return _expired(request)
    school_id = iss.school_id if iss.school is not None else authz.school_id
    if school_id is None:
        return _expired(request)
    loaded = await flow_store.authorize_state(
        ctx.pool, client_id=authz.client_id, session_hash=session.id_hash, school_id=school_id
    )
    client = loaded.client
    if (
        client is None
        or client.disabled_at is not None
        or not clients.belongs_to(client, iss.school_id)
    ):
        return error_page(request, "The application that sent you here is no longer available.")
    if not loaded.session_may_use_school:
        return _csrf_refused(request)
    # One decision per request: a double click or a replayed form finds nothing left.
    if not await consume_pending(ctx, authz.id):
        return _expired(request)
    if form.get("decision") != "allow":
        await audit.append(
            ctx.redis,
            ctx.settings,
            audit.record(
                "consent.denied",
                school_id=school_id,
                client_id=authz.client_id,
                subject=str(session.user_id),
                scope=catalogue.format_scopes(authz.scopes),
                ip=sessions.client_address(request),
            ),
        )
        denied = RedirectError("access_denied", "The user denied the request.")
        return error_redirect(iss, authz.redirect_uri, authz.state, denied, status=303)
    # The role now, not when the page was shown; and never more than the page offered.
    top = roles.ceiling(loaded.role, platform_admin=loaded.platform_admin)
    offered = authz.offered if authz.offered is not None else authz.scopes
    granted = [s for s in roles.narrow(authz.scopes, top).granted if s in offered]
    if not granted:
        denied = RedirectError("access_denied", _NEEDS_ADMIN)
        return error_redirect(iss, authz.redirect_uri, authz.state, denied, status=303)
    code = await issue_code(
        request,
        dataclasses.replace(authz, scopes=granted),
        school_id=school_id,
        session=session,
        remember_consent=True,
    )
    assert code is not None  # only a remembered consent can have been withdrawn
    return code_redirect(iss, authz, code, status=303)


def setup(app: web.Application) -> None:
    r = app.router
    for path in (AUTHORIZE_PATH, AUTHORIZE_ALIAS):
        # No HEAD: a HEAD that issued a code would be a side effect nobody sees.
        r.add_get(path, authorize, allow_head=False)
        r.add_post(path, authorize)
    r.add_get(RESUME_PATH, resume, allow_head=False)
    r.add_post(LOGIN_PATH, login_submit)
    r.add_post(SELECT_SCHOOL_PATH, select_school_submit)
    r.add_post(CONSENT_PATH, consent_submit)


_STRING = {"type": "string"}
_HTML = {"description": "An HTML page", "content": {"text/html": {}}}
_FOUND = {"description": "Redirect to the client with code, state and iss, or error"}


def _form(*names: str) -> dict[str, Any]:
    props = {n: {"type": "string"} for n in names}
    return {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {"schema": {"type": "object", "properties": props}}
        },
    }


_AUTHORIZE_PARAMS = [
    {"name": n, "in": "query", "required": n in req, "schema": {"type": "string"}}
    for req in [("response_type", "client_id", "code_challenge", "code_challenge_method")]
    for n in (
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
        "resource",
        "login_hint",
    )
]

_AUTHORIZE_OP = {
    "summary": "Authorization endpoint (RFC 6749 4.1, PKCE S256 required, RFC 9207 iss)",
    "parameters": _AUTHORIZE_PARAMS,
    "responses": {
        "200": {**_HTML, "description": "Sign-in, school picker or consent page"},
        "302": _FOUND,
        "400": {
            **_HTML,
            "description": "Unknown client or unregistered redirect URI; or, for a client that"
            " registered itself, any error before the user acted (RFC 9700 4.11.2)",
        },
    },
}

OPENAPI_PATHS: dict[str, Any] = {
    AUTHORIZE_PATH: {"get": _AUTHORIZE_OP},
    AUTHORIZE_ALIAS: {"get": {**_AUTHORIZE_OP, "summary": "Alias of /v1/oauth/authorize"}},
    RESUME_PATH: {
        "get": {
            "summary": "Continue a pending authorization request",
            "parameters": [
                {
                    "name": "request_id",
                    "in": "query",
                    "required": True,
                    "schema": {"type": "string"},
                }
            ],
            "responses": {"200": _HTML, "302": _FOUND, "400": _HTML},
        }
    },
    LOGIN_PATH: {
        "post": {
            "summary": "Sign in during an authorization request",
            "requestBody": _form("request_id", "csrf_token", "email", "password"),
            "responses": {
                "303": {"description": "Signed in; continue the request"},
                "400": {**_HTML, "description": "Incorrect email or password"},
                "403": {**_HTML, "description": "CSRF check failed, or not a member"},
                "429": {**_HTML, "description": "Too many failed attempts"},
            },
        }
    },
    SELECT_SCHOOL_PATH: {
        "post": {
            "summary": "Pick the school a platform-level client is granted",
            "requestBody": _form("request_id", "csrf_token", "school_id", "decision"),
            "responses": {"303": {"description": "Continue"}, "400": _HTML, "403": _HTML},
        }
    },
    CONSENT_PATH: {
        "post": {
            "summary": "Allow or deny the requested scopes",
            "requestBody": _form("request_id", "csrf_token", "decision"),
            "responses": {"303": _FOUND, "400": _HTML, "403": _HTML},
        }
    },
}
