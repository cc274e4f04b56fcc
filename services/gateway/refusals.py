"""The answers the gateway gives itself, one function per error: RFC 6750's for the bearer token
(401 `invalid_token`, the bare challenge, 400 `invalid_request`, 403 `insufficient_scope`), and
the JSON error shape of libs.common.errors for the rest (404, 405, 429, 503).

Only what the answer is lives here; counting a refusal in the metrics is the caller's
(checks.py). Failures of the upstream itself (502, 504) are proxy.py's.
"""

from __future__ import annotations

from aiohttp import web

from libs.common.errors import bearer_challenge, bearer_error, json_response

REVOKED = "The access token has been revoked"


def error(status: int, code: str, description: str, **headers: str) -> web.Response:
    return json_response(
        {"error": code, "error_description": description}, status=status, headers=headers or None
    )


def not_found() -> web.Response:
    return error(404, "not_found", "Nothing answers at this address.")


def path_not_normal() -> web.Response:
    return error(400, "invalid_request", "The path is not in normal form.")


def method_not_allowed(method: str, allowed: tuple[str, ...]) -> web.Response:
    return error(
        405, "method_not_allowed", f"{method} is not routed here.", Allow=", ".join(allowed)
    )


def unavailable() -> web.Response:
    return error(
        503,
        "temporarily_unavailable",
        "The gateway cannot check this call right now.",
        **{"Retry-After": "1"},
    )


def audit_unavailable() -> web.Response:
    """The answer to a protected call whose audit record the buffer cannot take: refused, never
    served unaudited (contract 13; the buffer counts it in gateway_audit_refused_total)."""
    return error(
        503,
        "temporarily_unavailable",
        "The gateway cannot record this call in the audit trail right now.",
        **{"Retry-After": "1"},
    )


def one_authorization_header() -> web.Response:
    return bearer_error(400, "invalid_request", "Send one Authorization header.")


def no_token() -> web.Response:
    # RFC 6750 3.1: a request without credentials gets the bare challenge, no error code.
    return json_response(
        {"error": "unauthorized", "error_description": "This API needs a bearer access token."},
        status=401,
        headers={"WWW-Authenticate": bearer_challenge()},
    )


def invalid_token(description: str) -> web.Response:
    return bearer_error(401, "invalid_token", description)


def insufficient_scope(needed: tuple[str, ...]) -> web.Response:
    return bearer_error(
        403,
        "insufficient_scope",
        "The access token does not hold the scope this call needs",
        scope=" ".join(needed),
    )


def rate_limited(retry_after: int) -> web.Response:
    return error(
        429,
        "rate_limited",
        "Too many calls; retry after the number of seconds in Retry-After.",
        **{"Retry-After": str(retry_after)},
    )
