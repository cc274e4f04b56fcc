"""Authorization server metadata: OIDC Discovery 1.0 and RFC 8414, one document per issuer."""

from __future__ import annotations

from typing import Any

from libs.common import scopes as catalogue
from services.identity import keys
from services.identity.schools import Issuer

CLAIMS_SUPPORTED = (
    "sub",
    "iss",
    "aud",
    "exp",
    "iat",
    "auth_time",
    "nonce",
    "at_hash",
    "name",
    "email",
    "email_verified",
    "school_id",
    "school_subdomain",
)


def metadata(issuer: Issuer) -> dict[str, Any]:
    """The issuer's metadata. A school that closed open registration does not advertise
    `registration_endpoint` (RFC 8414 2: present only where registration is offered); the
    platform always offers it, for MCP clients."""
    base = issuer.issuer
    scopes = (
        list(issuer.school.allowed_scopes)
        if issuer.school and issuer.school.allowed_scopes
        else list(catalogue.PUBLIC_SCOPES)
    )
    # Never advertise what no third party can hold (seed 002, "Admin scopes").
    scopes = [s for s in scopes if s not in catalogue.ADMIN_SCOPES]
    for identity_scope in ("openid", "profile", "email"):
        if identity_scope not in scopes:
            scopes.insert(0, identity_scope)
    document: dict[str, Any] = {
        "issuer": base,
        "authorization_endpoint": f"{base}/v1/oauth/authorize",
        "token_endpoint": f"{base}/v1/oauth/token",
        "userinfo_endpoint": f"{base}/v1/oauth/userinfo",
        "jwks_uri": f"{base}/v1/oauth/jwks",
        "registration_endpoint": f"{base}/v1/oauth/register",
        "revocation_endpoint": f"{base}/v1/oauth/revoke",
        "introspection_endpoint": f"{base}/v1/oauth/introspect",
        "scopes_supported": scopes,
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "client_secret_post",
            "none",
        ],
        "revocation_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "client_secret_post",
            "none",
        ],
        "introspection_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "client_secret_post",
        ],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": [keys.ID_TOKEN_ALG],
        "access_token_signing_alg_values_supported": [keys.ACCESS_TOKEN_ALG],
        "userinfo_signing_alg_values_supported": ["none"],
        "claims_supported": list(CLAIMS_SUPPORTED),
        "prompt_values_supported": ["none", "login", "consent"],
        "authorization_response_iss_parameter_supported": True,
        "request_parameter_supported": False,
        "request_uri_parameter_supported": False,
        "claims_parameter_supported": False,
        "ui_locales_supported": ["en"],
    }
    if issuer.school is not None and not issuer.school.open_registration:
        del document["registration_endpoint"]
    return document
