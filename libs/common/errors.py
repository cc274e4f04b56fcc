"""Error shapes of RFC 6749 (OAuth endpoints) and RFC 6750 (protected resources).

One class per OAuth error code, each naming the RFC section that defines it and carrying its
code and HTTP status, so `grep InvalidGrant` finds every place that error is raised (the style
of Authlib's `rfc6749/errors.py`). All are `OAuthError`s: the identity service's middleware
renders any of them as an RFC 6749 5.2 answer, and `bearer_response()` as an RFC 6750 one.

    raise InvalidGrant("the code has expired")
    raise InvalidRequest("use the Bearer scheme", status=401)
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class OAuthError(Exception):
    """An OAuth error response: the `error` code, its HTTP `status`, an optional description.

    Raise the subclass that names the code; every module does. `OAuthError(code, description)`
    still builds one from a code known only at run time, with the status its class has.
    """

    error: str
    status: int
    # RFC 6750 3.1: a request with no credentials at all is challenged without an error code.
    challenge_names_error = True

    def __init__(
        self,
        error: str,
        description: str | None = None,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(description or error)
        self.error = error
        self.description = description
        coded = ERROR_CLASSES.get(error)
        self.status = status or (coded.status if coded is not None else 400)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.error}
        if self.description:
            body["error_description"] = self.description
        return body

    def response(self) -> web.Response:
        """The RFC 6749 5.2 answer: JSON, never cached."""
        headers = {**_NO_STORE, **self.headers}
        if self.status == 401 and self.error == "invalid_client":
            # RFC 6749 5.2: a 401 for client authentication names the scheme the client used.
            headers.setdefault("WWW-Authenticate", 'Basic realm="loopwise-connect"')
        return json_response(self.body(), status=self.status, headers=headers)

    def bearer_response(self, *, scope: str | None = None) -> web.Response:
        """The RFC 6750 3 answer of a protected resource: the Bearer challenge naming the error
        (and the `scope` wanted, for insufficient_scope) and a JSON body."""
        error = self.error if self.challenge_names_error else None
        return bearer_error(self.status, error, self.description, scope=scope)


class OAuthErrorCode(OAuthError):
    """The base of the one-class-per-code errors below: the class holds the code and the
    status, so a raise says only what went wrong; `status=` overrides the RFC's status where an
    endpoint answers otherwise (a 401 `invalid_request` at UserInfo)."""

    def __init__(
        self,
        description: str | None = None,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(self.error, description, status=status or self.status, headers=headers)


# RFC 6749 4.1.2.1, 4.2.2.1 and 5.2 ----------------------------------------------------------


class InvalidRequest(OAuthErrorCode):
    """RFC 6749 5.2 invalid_request: a parameter missing, repeated, malformed or not
    supported (also RFC 6750 3.1 at a protected resource)."""

    error = "invalid_request"
    status = 400


class InvalidClient(OAuthErrorCode):
    """RFC 6749 5.2 invalid_client: client authentication failed (unknown client, no or a
    wrong secret, an unsupported method). 401 with a `WWW-Authenticate: Basic` challenge."""

    error = "invalid_client"
    status = 401


class InvalidGrant(OAuthErrorCode):
    """RFC 6749 5.2 invalid_grant: the code or refresh token is invalid, expired, revoked,
    used already, or issued to another client or for another redirect URI."""

    error = "invalid_grant"
    status = 400


class UnauthorizedClient(OAuthErrorCode):
    """RFC 6749 5.2 unauthorized_client: the client may not use this grant type (or, at the
    authorization endpoint, 4.1.2.1, this flow)."""

    error = "unauthorized_client"
    status = 400


class UnsupportedGrantType(OAuthErrorCode):
    """RFC 6749 5.2 unsupported_grant_type: a grant_type this server does not offer."""

    error = "unsupported_grant_type"
    status = 400


class UnsupportedResponseType(OAuthErrorCode):
    """RFC 6749 4.1.2.1 unsupported_response_type: only `code` is offered."""

    error = "unsupported_response_type"
    status = 400


class InvalidScope(OAuthErrorCode):
    """RFC 6749 5.2 (and 4.1.2.1) invalid_scope: unknown, malformed, or beyond what was
    granted or what the client may hold."""

    error = "invalid_scope"
    status = 400


class AccessDenied(OAuthErrorCode):
    """RFC 6749 4.1.2.1 access_denied: the user or the server refused the request."""

    error = "access_denied"
    status = 403


class ServerError(OAuthErrorCode):
    """RFC 6749 4.1.2.1 server_error: something unexpected stopped the request."""

    error = "server_error"
    status = 500


class TemporarilyUnavailable(OAuthErrorCode):
    """RFC 6749 4.1.2.1 temporarily_unavailable: overloaded or down for a moment; try later."""

    error = "temporarily_unavailable"
    status = 503


# Codes later specifications added -----------------------------------------------------------


class InvalidRedirectUri(OAuthErrorCode):
    """RFC 7591 3.2.2 invalid_redirect_uri: a registered redirect URI is not acceptable."""

    error = "invalid_redirect_uri"
    status = 400


class InvalidClientMetadata(OAuthErrorCode):
    """RFC 7591 3.2.2 invalid_client_metadata: a registration field is not acceptable."""

    error = "invalid_client_metadata"
    status = 400


class InvalidToken(OAuthErrorCode):
    """RFC 6750 3.1 invalid_token: the access token is expired, revoked, malformed or not
    meant for this resource (also RFC 7592 3 for a registration access token)."""

    error = "invalid_token"
    status = 401


class InsufficientScope(OAuthErrorCode):
    """RFC 6750 3.1 insufficient_scope: the token lacks a scope the resource requires."""

    error = "insufficient_scope"
    status = 403


class AuthenticationRequired(OAuthErrorCode):
    """RFC 6750 3.1: a protected resource asked without any credentials. 401 with a bare
    challenge, no error code in it (the JSON body still says invalid_request)."""

    error = "invalid_request"
    status = 401
    challenge_names_error = False


class UnsupportedTokenType(OAuthErrorCode):
    """RFC 7009 2.2.1 unsupported_token_type: revocation of this kind of token is refused."""

    error = "unsupported_token_type"
    status = 400


class SlowDown(OAuthErrorCode):
    """slow_down (RFC 8628 3.5's code, used here by the registration throttle): too many
    requests; the answer says when to come back with `Retry-After`."""

    error = "slow_down"
    status = 429


class InvalidTarget(OAuthErrorCode):
    """RFC 8707 2 invalid_target: the `resource` is unknown, not allowed, or not the one the
    grant was made for."""

    error = "invalid_target"
    status = 400


class LoginRequired(OAuthErrorCode):
    """OIDC Core 3.1.2.6 login_required: prompt=none, and the user is not signed in."""

    error = "login_required"
    status = 400


class ConsentRequired(OAuthErrorCode):
    """OIDC Core 3.1.2.6 consent_required: prompt=none, and consent would be needed."""

    error = "consent_required"
    status = 400


class InteractionRequired(OAuthErrorCode):
    """OIDC Core 3.1.2.6 interaction_required: prompt=none, and the user must choose or act."""

    error = "interaction_required"
    status = 400


class RequestNotSupported(OAuthErrorCode):
    """OIDC Core 3.1.2.6 request_not_supported: request objects are not offered."""

    error = "request_not_supported"
    status = 400


class RequestUriNotSupported(OAuthErrorCode):
    """OIDC Core 3.1.2.6 request_uri_not_supported: `request_uri` is not offered."""

    error = "request_uri_not_supported"
    status = 400


class NotFound(OAuthErrorCode):
    """not_found (ours, in the RFC 6749 5.2 shape): no school, client or registration here."""

    error = "not_found"
    status = 404


# Each code's class, by the code: what `OAuthError(code, ...)` takes its status from.
ERROR_CLASSES: dict[str, type[OAuthErrorCode]] = {
    cls.error: cls
    for cls in (
        InvalidRequest,
        InvalidClient,
        InvalidGrant,
        UnauthorizedClient,
        UnsupportedGrantType,
        UnsupportedResponseType,
        InvalidScope,
        AccessDenied,
        ServerError,
        TemporarilyUnavailable,
        InvalidRedirectUri,
        InvalidClientMetadata,
        InvalidToken,
        InsufficientScope,
        UnsupportedTokenType,
        SlowDown,
        InvalidTarget,
        LoginRequired,
        ConsentRequired,
        InteractionRequired,
        RequestNotSupported,
        RequestUriNotSupported,
        NotFound,
    )
}


def bearer_challenge(
    error: str | None = None,
    description: str | None = None,
    *,
    scope: str | None = None,
    resource_metadata: str | None = None,
    realm: str = "loopwise-connect",
) -> str:
    """A `WWW-Authenticate: Bearer ...` value (RFC 6750 3, RFC 9728 5.1)."""
    parts = [f'realm="{realm}"']
    if error:
        parts.append(f'error="{error}"')
    if description:
        parts.append(f'error_description="{description.replace(chr(34), chr(39))}"')
    if scope:
        parts.append(f'scope="{scope}"')
    if resource_metadata:
        parts.append(f'resource_metadata="{resource_metadata}"')
    return "Bearer " + ", ".join(parts)


def bearer_error(
    status: int,
    error: str | None,
    description: str | None = None,
    *,
    scope: str | None = None,
    resource_metadata: str | None = None,
) -> web.Response:
    """An RFC 6750 answer: the challenge header and a JSON body naming the error."""
    body: dict[str, Any] = {"error": error or "invalid_request"}
    if description:
        body["error_description"] = description
    if scope:
        body["scope"] = scope
    challenge = bearer_challenge(
        error, description, scope=scope, resource_metadata=resource_metadata
    )
    return json_response(body, status=status, headers={"WWW-Authenticate": challenge})


def json_response(
    body: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        headers=headers,
        content_type="application/json",
    )
