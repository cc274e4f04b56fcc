"""Server-rendered pages: jinja2 templates, the stylesheet, and the headers every page sends.

Pages work without JavaScript and load nothing from elsewhere. Every page answers with a
strict Content-Security-Policy: no scripts at all, styles and images only from this origin,
forms only to this origin and to the OAuth client a flow will end at (browsers check
`form-action` on the redirects a form submission follows, too), and no framing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jinja2
from aiohttp import web

PACKAGE_DIR = Path(__file__).resolve().parent
TEMPLATES_DIR = PACKAGE_DIR / "templates"
STATIC_DIR = PACKAGE_DIR / "static"
STATIC_PREFIX = "/static/"

_environment = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
    autoescape=jinja2.select_autoescape(("html", "xml"), default_for_string=True),
    undefined=jinja2.StrictUndefined,
    # Templates ship with the code; checking their mtime on every render buys nothing.
    auto_reload=False,
    trim_blocks=True,
    lstrip_blocks=True,
)

# What may appear in a CSP source expression built from a client's redirect URI; anything
# else (a `;` in a host, say) would let a client inject directives into our policy.
_ORIGIN_SOURCE = re.compile(
    r"^(https?)://[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^http://\[[0-9a-fA-F:.]+\](:[0-9]{1,5})?$"
)
_SCHEME_SOURCE = re.compile(r"^[a-z][a-z0-9+.\-]*:$")


def form_action_source(uri: str) -> str | None:
    """The CSP source that lets a form's redirect chain end at `uri`, or None."""
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https"):
        source = f"{parts.scheme}://{parts.netloc}"
        return source if _ORIGIN_SOURCE.match(source) else None
    # A native app's private-use scheme (RFC 8252 7.1): allow the scheme.
    source = f"{parts.scheme}:"
    return source if _SCHEME_SOURCE.match(source) else None


def content_security_policy(form_action: Iterable[str] = ()) -> str:
    targets = ["'self'"]
    for uri in form_action:
        source = form_action_source(uri)
        if source and source not in targets:
            targets.append(source)
    return (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; "
        f"form-action {' '.join(targets)}; frame-ancestors 'none'; base-uri 'none'"
    )


def security_headers(form_action: Iterable[str] = ()) -> dict[str, str]:
    return {
        "Content-Security-Policy": content_security_policy(form_action),
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
        "Pragma": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Cross-Origin-Opener-Policy": "same-origin",
    }


def render(
    request: web.Request,
    template: str,
    status: int = 200,
    *,
    form_action: Iterable[str] = (),
    headers: dict[str, str] | None = None,
    **context: Any,
) -> web.Response:
    """Render a page with the security headers; `form_action` adds redirect URIs a form's
    submission may end at (only their origin, or scheme, is allowed)."""
    html = _environment.get_template(template).render(**context)
    response = web.Response(text=html, status=status, content_type="text/html", charset="utf-8")
    response.headers.update(security_headers(form_action))
    if headers:
        response.headers.update(headers)
    return response


def setup(app: web.Application) -> None:
    app.router.add_static(STATIC_PREFIX, STATIC_DIR, follow_symlinks=False, name="static")


OPENAPI_PATHS: dict[str, Any] = {
    "/static/connect.css": {
        "get": {
            "summary": "The pages' stylesheet",
            "responses": {"200": {"description": "text/css"}},
        }
    }
}
