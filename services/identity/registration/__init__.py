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

Where each rule lives:
- metadata.py: RFC 7591 2, the client metadata a request may name, its checks and defaults.
- client_information.py: RFC 7591 3.2.1, the document answered (and registration_client_uri).
- register.py: RFC 7591 3.1, registering at this issuer (closed schools, the audit event).
- throttle.py: the per-issuer, per-address window.
- access_token.py: RFC 7592 3, the registration access token and the 401 that hides clients.
- manage.py: RFC 7592 2.2 and 2.3, replacing (grants beyond it end) and deleting.
- handlers.py: the routes, JSON bodies in, no-store answers out; openapi.py: their paths.
"""

from __future__ import annotations

from services.identity.grants import within_registration
from services.identity.registration.handlers import MAX_BODY_BYTES, setup
from services.identity.registration.metadata import (
    DEFAULT_CLIENT_NAME,
    MAX_REDIRECT_URIS,
    MAX_URI_LENGTH,
)
from services.identity.registration.openapi import OPENAPI_PATHS
from services.identity.registration.throttle import (
    REGISTRATION_WINDOW_SECONDS,
    REGISTRATIONS_PER_WINDOW,
)

__all__ = [
    "DEFAULT_CLIENT_NAME",
    "MAX_BODY_BYTES",
    "MAX_REDIRECT_URIS",
    "MAX_URI_LENGTH",
    "OPENAPI_PATHS",
    "REGISTRATIONS_PER_WINDOW",
    "REGISTRATION_WINDOW_SECONDS",
    "setup",
    "within_registration",
]
