"""Minting JWTs: access tokens (RFC 9068) and ID tokens (OIDC Core 2, 3.1.3.6).

Claims are built by plain functions and signed separately, so the token endpoint can fetch the
signer before its transaction and sign after it without holding a connection. Verifying the
access tokens minted here is `token_state.verify_own_access_token`.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from libs.common.config import Settings
from services.identity import keys, store
from services.identity.schools import Issuer


def _epoch(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def new_jti() -> str:
    return secrets.token_urlsafe(16)


def access_token_claims(
    settings: Settings,
    *,
    issuer: Issuer,
    school: store.School,
    client_id: str,
    subject: str,
    scopes: Sequence[str],
    audience: str,
    grant_id: UUID,
    auth_time: datetime | None,
    now: int | None = None,
) -> dict[str, Any]:
    """RFC 9068 2.2 claims plus ours: the school the token is bound to and its grant."""
    iat = int(time.time()) if now is None else now
    claims: dict[str, Any] = {
        "iss": issuer.issuer,
        "sub": subject,
        "aud": audience,
        "client_id": client_id,
        "scope": " ".join(scopes),
        "school_id": school.id,
        "school_subdomain": school.subdomain,
        "jti": new_jti(),
        "iat": iat,
        "exp": iat + settings.tokens.access_token_ttl,
        "grant_id": str(grant_id),
    }
    if auth_time is not None:
        claims["auth_time"] = _epoch(auth_time)
    return claims


def at_hash(access_token: str) -> str:
    """OIDC Core 3.1.3.6: the left half of the SHA-256 of the token (our ID tokens are RS256)."""
    digest = hashlib.sha256(access_token.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest[: len(digest) // 2]).rstrip(b"=").decode()


def id_token_claims(
    settings: Settings,
    *,
    issuer: Issuer,
    school: store.School,
    client_id: str,
    subject: str,
    auth_time: datetime | None,
    nonce: str | None,
    access_token: str,
    now: int | None = None,
) -> dict[str, Any]:
    iat = int(time.time()) if now is None else now
    claims: dict[str, Any] = {
        "iss": issuer.issuer,
        "sub": subject,
        "aud": client_id,
        "azp": client_id,
        "iat": iat,
        "exp": iat + settings.tokens.id_token_ttl,
        "at_hash": at_hash(access_token),
        "school_id": school.id,
    }
    if auth_time is not None:
        claims["auth_time"] = _epoch(auth_time)
    if nonce:
        claims["nonce"] = nonce
    return claims


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# A signer's header is the same for every token it signs; encode it once per (kid, alg, typ).
_HEADERS: dict[tuple[str, str, str], str] = {}
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


def _encoded_header(signer: keys.Signer, typ: str) -> str:
    cache_key = (signer.kid, signer.alg, typ)
    encoded = _HEADERS.get(cache_key)
    if encoded is None:
        if len(_HEADERS) > 1024:
            _HEADERS.clear()
        header = {"alg": signer.alg, "kid": signer.kid, "typ": typ}
        encoded = _HEADERS[cache_key] = _b64url(orjson.dumps(header))
    return encoded


def sign(signer: keys.Signer, claims: dict[str, Any], *, typ: str) -> str:
    """A compact JWS, signed with `cryptography` directly: joserfc's registry and key
    wrappers cost more than the ECDSA signature itself on the token endpoint's hot path."""
    signing_input = f"{_encoded_header(signer, typ)}.{_b64url(orjson.dumps(claims))}"
    private = signer.key.raw_value
    if signer.alg == "ES256":
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            raise ValueError("an ES256 signer needs a P-256 private key")
        r, s = decode_dss_signature(private.sign(signing_input.encode("ascii"), _ECDSA_SHA256))
        # RFC 7518 3.4: JWS carries ECDSA as fixed-width r||s, not DER.
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    elif signer.alg == "RS256":
        if not isinstance(private, rsa.RSAPrivateKey):
            raise ValueError("an RS256 signer needs an RSA private key")
        signature = private.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    else:
        raise ValueError(f"unsupported algorithm {signer.alg}")
    return f"{signing_input}.{_b64url(signature)}"


def sign_access_token(signer: keys.Signer, claims: dict[str, Any]) -> str:
    return sign(signer, claims, typ="at+jwt")


def sign_id_token(signer: keys.Signer, claims: dict[str, Any]) -> str:
    return sign(signer, claims, typ="JWT")
