"""Identity: the authorization server of every school and of the platform.

From an RFC to its module: the authorization endpoint (RFC 6749 4.1) `authorize/` (its checks
in order in `authorize/checks.py`); redirect URIs (RFC 6749 3.1.2, RFC 8252 7.3/8.3)
`redirect_uris.py`; PKCE (RFC 7636) `pkce.py`; the token endpoint (RFC 6749 3.2) `token/`, one
module per grant; client authentication (2.3) `client_auth.py`; revocation (RFC 7009)
`revocation.py`; introspection (RFC 7662) `introspection.py`; UserInfo (OIDC Core 5.3)
`userinfo.py`; registration (RFC 7591/7592) `registration/`, one module per section (metadata
2, register 3.1, client_information 3.2.1, access_token 7592 3, manage 7592 2.2-2.3); discovery
(RFC 8414) `discovery.py`; resource indicators (RFC 8707) `resources.py`; the error codes are
libs/common/errors.py, one class each.
The JWTs: `minting.py` makes them (RFC 9068, OIDC ID tokens) with the keys of `keys.py` (which
also serves the JWKS); `token_state.py` verifies ours and keeps the per-process caches. The
model's rules: `clients`, `grants`, `consent`, `roles`, `schools`, `users`; `store/` holds every
SQL statement, a module per aggregate (schools, users, clients, grants, signing_keys) and per
flow table. The server-rendered pages: `pages/` renders (templates, CSP), `account/` the user's
pages (sign-in, Connected Apps, activity), `admin/` the school admin's (applications, audit
log and CSV, webhooks). `routes.py` wires the endpoints.
"""
