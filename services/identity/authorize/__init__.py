"""The authorization endpoint (RFC 6749 4.1, RFC 7636, RFC 9207, OIDC Core 3.1.2) and its flow.

`GET /v1/oauth/authorize`, on one screen (handlers.authorize):

1. checks.trusted_redirect: the client is known, enabled and registered here, and the
   `redirect_uri` is one of its own (redirect_uris.matches, RFC 8252 7.3). Until then every
   problem is our error page and never a redirect: redirecting to an unverified URI would make
   this server an open redirector.
2. checks.build_request runs checks.CHECKS in order (parameters once, request objects,
   response_type, response_mode, the client's flow, PKCE, scope, resource, prompt, max_age,
   state, nonce, login_hint, the school) into a request.AuthorizationRequest. A problem goes
   back to the client (responses.request_error: `error`, `error_description`, `state`, `iss`)
   when a school admin, the CLI or an operator registered it, or once the user has acted in
   this flow; a client that registered itself chose its redirect URIs alone, so until then its
   errors are our own page too (RFC 9700 4.11.2).
3. flow.advance: sign in, pick a school (platform clients, school_choice.py), consent
   (pages.py), and the code (issue.issue_code, one transaction) sent back with
   responses.code_redirect. A signed-in user with remembered consent gets a code at once.

Between pages the request waits in Redis (request.py) under an unguessable id, bound to the
browser it was shown in; the forms (handlers.py) carry only that id and a CSRF token. paths.py
says where each part answers, openapi.py describes them.
"""

from __future__ import annotations

from services.identity.authorize.handlers import setup
from services.identity.authorize.openapi import OPENAPI_PATHS

__all__ = ["OPENAPI_PATHS", "setup"]
