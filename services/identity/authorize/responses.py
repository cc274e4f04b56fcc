"""How the authorization endpoint answers: the redirect back to the client with a code or an
error (RFC 6749 4.1.2, 4.1.2.1; `iss` of RFC 9207), or our own error page.

An error goes back to the client only once its redirect URI is trusted, and for a client that
registered itself only once the user has acted in this flow (`request_error`, RFC 9700
4.11.2); before that it is a page here, never a redirect.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlencode, urlsplit, urlunsplit

from aiohttp import web

from libs.common.errors import OAuthError, ServerError
from services.identity import clients, pages, store
from services.identity.authorize.paths import RESUME_PATH
from services.identity.authorize.request import AuthorizationRequest
from services.identity.context import issuer
from services.identity.schools import Issuer

# error_description may carry only these characters (RFC 6749 4.1.2.1).
_DESCRIPTION_UNSAFE = re.compile(r"[^\x20\x21\x23-\x5B\x5D-\x7E]")


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
    error: OAuthError,
    *,
    status: int = 302,
) -> web.Response:
    """RFC 6749 4.1.2.1's error response, with RFC 9207's `iss`."""
    description = error.description
    params: dict[str, str | None] = {
        "error": error.error,
        "error_description": _DESCRIPTION_UNSAFE.sub("", description) if description else None,
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
    error: OAuthError,
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
        str(error),
        # Not the code's own status: a page for access_denied is a 400 like the rest.
        status=500 if isinstance(error, ServerError) else 400,
        error_code=error.error,
    )


def expired(request: web.Request) -> web.Response:
    return error_page(
        request,
        "This sign-in request has expired or was already completed. "
        "Go back to the application and start again.",
        title="This sign-in request has expired",
    )


def csrf_refused(request: web.Request) -> web.Response:
    return error_page(
        request,
        "This form has expired or did not come from this page. "
        "Go back, reload the page and try again.",
        status=403,
        title="Request refused",
    )


def client_gone(request: web.Request) -> web.Response:
    return error_page(request, "The application that sent you here is no longer available.")


def resume_url(authz: AuthorizationRequest) -> str:
    return f"{RESUME_PATH}?{urlencode({'request_id': authz.id})}"
