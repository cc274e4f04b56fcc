"""Verifying Loopwise Connect access tokens (RFC 9068 JWTs): identity and the gateway share it.

The checks run in an order that never trusts an unverified byte: the header's `alg` must be in
a fixed allowlist of asymmetric algorithms (never `none`, never an HMAC a public key could be
abused as the secret of), `typ` must be `at+jwt` so an ID token cannot pass as an access token,
the key comes from the caller's lookup by `kid` and must be of the header's algorithm, and only
after the signature holds are the claims read: `exp`/`nbf`/`iat` with a small leeway, then
`iss` and `aud`.

Every failure raises a subclass of :class:`TokenError`; `reason` is a short stable code for
logs and metrics, never shown with the token.
"""

from __future__ import annotations

import binascii
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, Key, RSAKey

# Only what our issuers sign with. RS256 is allowed so an issuer may move access tokens to RSA
# without the gateway changing; anything symmetric or unsigned is refused before key lookup.
ALLOWED_ALGORITHMS: frozenset[str] = frozenset({"ES256", "RS256"})
ACCESS_TOKEN_TYPES: frozenset[str] = frozenset({"at+jwt", "application/at+jwt"})  # RFC 9068 4
DEFAULT_LEEWAY = 30
# Far above any token we mint (about 1 KB); refuses absurd inputs before decoding them.
MAX_TOKEN_LENGTH = 8192

_KTY_OF_ALG = {"ES256": "EC", "RS256": "RSA"}
# RFC 7515 2: base64url without padding. The stdlib's lenient decoder silently skips stray
# characters, and two spellings of one token must not both verify: so the standard alphabet's
# own `+`, `/` and `=` are refused, the rest is mapped to it, and the strict decoder refuses
# anything else (whitespace, non-alphabet characters, a lone trailing character).
_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_PADDING = ("", "", "==", "=")
# The members that make a public JWK what it is; anything else (use, key_ops, x5c) is ignored
# for the import cache so an equal key republished with other metadata is still a hit.
_PUBLIC_MEMBERS = ("kty", "kid", "alg", "crv", "x", "y", "n", "e")
_IMPORTED_MAX = 4096
# These objects are stateless and immutable; building them per verify is measurable.
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_SHA256 = hashes.SHA256()
_PKCS1V15 = padding.PKCS1v15()


class TokenError(Exception):
    """The token is not acceptable; `reason` names the check that refused it."""

    reason = "invalid_token"


class MalformedToken(TokenError):
    reason = "malformed"


class DisallowedAlgorithm(TokenError):
    reason = "algorithm"


class WrongTokenType(TokenError):
    reason = "typ"


class UnknownKey(TokenError):
    reason = "unknown_kid"


class InvalidSignature(TokenError):
    reason = "signature"


class MissingClaim(TokenError):
    reason = "missing_claim"


class TokenExpired(TokenError):
    reason = "expired"


class TokenNotYetValid(TokenError):
    reason = "not_yet_valid"


class InvalidIssuer(TokenError):
    reason = "issuer"


class InvalidAudience(TokenError):
    reason = "audience"


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key and the one algorithm it may verify."""

    kid: str
    alg: str
    key: Key
    # The `cryptography` public key behind `key`, resolved once: every verify is then a single
    # call into OpenSSL, without joserfc's per-call algorithm and key registry lookups.
    public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        public = self.key.public_key
        if self.alg == "ES256":
            if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(
                public.curve, ec.SECP256R1
            ):
                raise ValueError("an ES256 key must be a P-256 public key")
        elif not isinstance(public, rsa.RSAPublicKey):
            raise ValueError("an RS256 key must be an RSA public key")
        object.__setattr__(self, "public", public)

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any]) -> VerificationKey:
        """Import a public JWK as published in a JWKS; it must name its `kid` and `alg`."""
        kid, alg, kty = jwk.get("kid"), jwk.get("alg"), jwk.get("kty")
        if not isinstance(kid, str) or alg not in ALLOWED_ALGORITHMS or kty != _KTY_OF_ALG[alg]:
            raise ValueError("a verification JWK needs a kid and an allowed alg matching its kty")
        # A JWKS is reloaded every few seconds to minutes; re-importing (and for RSA,
        # re-validating) the same key each time is wasted work, so imports are shared by value.
        cache_key = tuple(str(jwk.get(name)) for name in _PUBLIC_MEMBERS)
        hit = _IMPORTED.get(cache_key)
        if hit is not None:
            return hit
        public = {k: v for k, v in jwk.items() if k not in ("d", "p", "q", "dp", "dq", "qi")}
        key: Key = ECKey.import_key(public) if kty == "EC" else RSAKey.import_key(public)
        imported = cls(kid, alg, key)
        if len(_IMPORTED) >= _IMPORTED_MAX:
            _IMPORTED.clear()
        _IMPORTED[cache_key] = imported
        return imported


_IMPORTED: dict[tuple[str, ...], VerificationKey] = {}


# Finds the key a `kid` names, or None. Async so a caller may refresh its JWKS on a miss.
KeyLookup = Callable[[str], Awaitable[VerificationKey | None]]


class KeySet:
    """Imported keys of one JWKS by kid: import once, look up on every token."""

    def __init__(self, keys: Collection[VerificationKey] = ()) -> None:
        self._by_kid = {k.kid: k for k in keys}

    @classmethod
    def from_jwks(cls, document: Mapping[str, Any]) -> KeySet:
        keys = []
        for jwk in document.get("keys", []):
            try:
                keys.append(VerificationKey.from_jwk(jwk))
            except (ValueError, KeyError, JoseError):
                # One key we cannot use must not make the issuer's others unusable.
                continue
        return cls(keys)

    def get(self, kid: str) -> VerificationKey | None:
        return self._by_kid.get(kid)

    def __contains__(self, kid: object) -> bool:
        return kid in self._by_kid

    def __len__(self) -> int:
        return len(self._by_kid)


def _b64decode(segment: str) -> bytes:
    if "+" in segment or "/" in segment or "=" in segment or len(segment) % 4 == 1:
        raise MalformedToken("a segment is not base64url")
    try:
        standard = (segment + _PADDING[len(segment) % 4]).encode("ascii").translate(_TO_STANDARD)
        return binascii.a2b_base64(standard, strict_mode=True)
    except (binascii.Error, ValueError):  # UnicodeEncodeError is a ValueError
        raise MalformedToken("a segment is not base64url") from None


def _parts(token: str) -> list[str]:
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        raise MalformedToken("not a JWS in compact serialization")
    parts = token.split(".")
    if len(parts) != 3:
        raise MalformedToken("not a JWS in compact serialization")
    return parts


def _json_object(segment: str, what: str) -> dict[str, Any]:
    try:
        value = orjson.loads(_b64decode(segment))
    except orjson.JSONDecodeError:
        raise MalformedToken(f"the {what} is not JSON") from None
    if not isinstance(value, dict):
        raise MalformedToken(f"the {what} is not a JSON object")
    return value


def unverified_header(token: str) -> dict[str, Any]:
    """The protected header, for routing only (which issuer, which kid): not trusted."""
    return _json_object(_parts(token)[0], "header")


def unverified_claims(token: str) -> dict[str, Any]:
    """The payload without any check: for choosing an issuer's keys, never for a decision."""
    parts = _parts(token)
    _json_object(parts[0], "header")
    return _json_object(parts[1], "payload")


def _numeric(claims: Mapping[str, Any], name: str, *, required: bool) -> int | float | None:
    value = claims.get(name)
    if value is None:
        if required:
            raise MissingClaim(f"{name} is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedToken(f"{name} is not a number")
    return value


def check_signature(
    token: str, key: VerificationKey, *, typ: Collection[str] | None
) -> dict[str, Any]:
    """Verify header rules and signature with a known key; return the (unchecked) claims."""
    parts = _parts(token)
    header = _json_object(parts[0], "header")
    return _check_signature(parts, header, key, typ=typ)


def _check_signature(
    parts: list[str],
    header: Mapping[str, Any],
    key: VerificationKey,
    *,
    typ: Collection[str] | None,
) -> dict[str, Any]:
    _check_header(header, key, typ=typ)
    # Decoding the payload first only catches malformed base64url early; nothing in it is
    # looked at until the signature below holds.
    payload = _b64decode(parts[1])
    signature = _b64decode(parts[2])
    _verify_signature(key, f"{parts[0]}.{parts[1]}".encode("ascii"), signature)
    try:
        claims = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise MalformedToken("the payload is not JSON") from None
    if not isinstance(claims, dict):
        raise MalformedToken("the payload is not a JSON object")
    return claims


def _check_header(
    header: Mapping[str, Any], key: VerificationKey, *, typ: Collection[str] | None
) -> None:
    alg = header.get("alg")
    if alg not in ALLOWED_ALGORITHMS:
        raise DisallowedAlgorithm(f"alg {alg!r} is not accepted")
    if typ is not None and str(header.get("typ", "")).lower() not in typ:
        raise WrongTokenType("typ is not an access token's")
    if header.get("crit") is not None:
        # No extension is understood here, so a critical one must refuse the token (RFC 7515).
        raise MalformedToken("crit headers are not supported")
    if key.alg != alg:
        raise DisallowedAlgorithm("the key does not sign with the header's alg")


def _verify_signature(key: VerificationKey, signing_input: bytes, signature: bytes) -> None:
    """The signature over `signing_input` with `key`, in the key's one algorithm."""
    public = key.public
    try:
        if key.alg == "ES256":
            # JWS carries ECDSA as raw r||s (RFC 7518 3.4); OpenSSL wants DER.
            if len(signature) != 64 or not isinstance(public, ec.EllipticCurvePublicKey):
                raise InvalidSignature("the signature does not verify")
            der = encode_dss_signature(
                int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            )
            public.verify(der, signing_input, _ECDSA_SHA256)
        else:
            if not isinstance(public, rsa.RSAPublicKey):
                raise InvalidSignature("the signature does not verify")
            public.verify(signature, signing_input, _PKCS1V15, _SHA256)
    except _CryptoInvalidSignature:
        raise InvalidSignature("the signature does not verify") from None


class Compact:
    """A compact JWS decoded once: its header, its claims, and what its signature covers.

    For a verifier that must read the unverified `iss` to choose whose keys to use and then
    verify the same token: each segment is decoded once. Nothing here is to be trusted until
    :func:`verify_compact` has accepted it; `claims` are then exactly the signed bytes' JSON.
    """

    __slots__ = ("claims", "header", "signature", "signing_input")

    def __init__(self, token: str) -> None:
        parts = _parts(token)
        self.header = _json_object(parts[0], "header")
        self.claims = _json_object(parts[1], "payload")
        self.signature = _b64decode(parts[2])
        # ASCII: both segments passed the base64url alphabet check above.
        self.signing_input = token[: len(parts[0]) + 1 + len(parts[1])].encode("ascii")

    @property
    def kid(self) -> str:
        """The header's `kid` once its `alg` is allowed; refuses a forged `none` or HS256 token
        before any key lookup (which could make a verifier refresh its keys)."""
        header = self.header
        if header.get("alg") not in ALLOWED_ALGORITHMS:
            raise DisallowedAlgorithm(f"alg {header.get('alg')!r} is not accepted")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise UnknownKey("the token names no kid")
        return kid


def verify_compact(
    compact: Compact, key: VerificationKey | None, *, typ: Collection[str] | None
) -> dict[str, Any]:
    """Header rules and signature of a decoded token with the key its `kid` named (None when
    there was none); its claims once both hold, still to be checked by :func:`check_claims`."""
    if key is None:
        raise UnknownKey("no key of this issuer has that kid")
    _check_header(compact.header, key, typ=typ)
    _verify_signature(key, compact.signing_input, compact.signature)
    return compact.claims


def check_claims(
    claims: Mapping[str, Any],
    *,
    issuer: str | Collection[str] | None,
    audience: str | Collection[str] | None,
    leeway: int = DEFAULT_LEEWAY,
    now: float | None = None,
) -> None:
    """Time, issuer and audience checks; `None` for issuer or audience skips that check."""
    now = time.time() if now is None else now
    exp = _numeric(claims, "exp", required=True)
    iat = _numeric(claims, "iat", required=True)
    nbf = _numeric(claims, "nbf", required=False)
    assert exp is not None
    assert iat is not None
    if exp + leeway <= now:
        raise TokenExpired("the token has expired")
    if nbf is not None and nbf - leeway > now:
        raise TokenNotYetValid("the token is not valid yet")
    if iat - leeway > now:
        raise TokenNotYetValid("the token was issued in the future")
    if issuer is not None:
        iss = claims.get("iss")
        if not isinstance(iss, str) or not (
            iss == issuer if isinstance(issuer, str) else iss in set(issuer)
        ):
            raise InvalidIssuer("the token was not issued here")
    if audience is not None:
        aud = claims.get("aud")
        if isinstance(aud, str) and isinstance(audience, str):
            # The common case, without building sets.
            meant = aud == audience
        else:
            wanted = {audience} if isinstance(audience, str) else set(audience)
            listed = aud if isinstance(aud, list) else [aud]
            held = {a for a in listed if isinstance(a, str)}
            meant = bool(held & wanted)
        if not meant:
            raise InvalidAudience("the token is not meant for this audience")


async def verify_access_token(
    token: str,
    keys: KeyLookup,
    *,
    issuer: str | Collection[str] | None,
    audience: str | Collection[str] | None,
    leeway: int = DEFAULT_LEEWAY,
    now: float | None = None,
    typ: Collection[str] | None = ACCESS_TOKEN_TYPES,
) -> dict[str, Any]:
    """Verify an access token and return its claims, or raise a :class:`TokenError`.

    `keys` finds the verification key of a `kid` (the issuer's JWKS, current and retired).
    `issuer` and `audience` are what the caller accepts; pass None only where the caller
    applies an equivalent check itself (identity's introspection checks `iss` through the
    issuer's own keys and does not restrict `aud`).
    """
    parts = _parts(token)
    header = _json_object(parts[0], "header")
    # Refuse on the header alone before any lookup: a forged `none` or HS256 token must not
    # even make a verifier refresh its keys.
    if header.get("alg") not in ALLOWED_ALGORITHMS:
        raise DisallowedAlgorithm(f"alg {header.get('alg')!r} is not accepted")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise UnknownKey("the token names no kid")
    key = await keys(kid)
    if key is None:
        raise UnknownKey("no key of this issuer has that kid")
    claims = _check_signature(parts, header, key, typ=typ)
    check_claims(claims, issuer=issuer, audience=audience, leeway=leeway, now=now)
    return claims
