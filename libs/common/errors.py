"""Error shapes of RFC 6749 (OAuth endpoints) and RFC 6750 (protected resources)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

# RFC 6749 5.2 and the codes later RFCs added, with their HTTP status.
OAUTH_STATUS: dict[str, int] = {
    "invalid_request": 400,
    "invalid_client": 401,
    "invalid_grant": 400,
    "unauthorized_client": 400,
    "unsupported_grant_type": 400,
    "unsupported_response_type": 400,
    "invalid_scope": 400,
    "access_denied": 403,
    "server_error": 500,
    "temporarily_unavailable": 503,
    "invalid_redirect_uri": 400,  # RFC 7591
    "invalid_client_metadata": 400,  # RFC 7591
    "invalid_token": 401,  # RFC 6750 / RFC 7592
    "unsupported_token_type": 400,  # RFC 7009
    "slow_down": 429,
    "invalid_target": 400,  # RFC 8707
    "login_required": 400,  # OIDC Core 3.1.2.6
    "consent_required": 400,
    "interaction_required": 400,
    "not_found": 404,
}

_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


class OAuthError(Exception):
    """An RFC 6749 error; `status` defaults to the RFC's for `error`."""

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
        self.status = status or OAUTH_STATUS.get(error, 400)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.error}
        if self.description:
            body["error_description"] = self.description
        return body

    def response(self) -> web.Response:
        headers = {**_NO_STORE, **self.headers}
        if self.status == 401 and self.error == "invalid_client":
            # RFC 6749 5.2: a 401 for client authentication names the scheme the client used.
            headers.setdefault("WWW-Authenticate", 'Basic realm="loopwise-connect"')
        return json_response(self.body(), status=self.status, headers=headers)


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
