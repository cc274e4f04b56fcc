"""PKCE, Proof Key for Code Exchange (RFC 7636): both halves in one place.

The authorization request carries a `code_challenge` (`check_challenge`); the token request
proves it knew the secret behind it with the `code_verifier` (`verifier_matches`). Every code
flow here uses PKCE, public and confidential clients alike (OAuth 2.0 Security BCP 2.1.1), and
only with S256:

    RFC 7636 4.2: "If the client is capable of using "S256", it MUST use "S256", as "S256" is
    Mandatory To Implement (MTI) on the server."

    RFC 7636 7.2: "Clients MUST NOT downgrade to "plain" after trying the "S256" method."
"""

from __future__ import annotations

import hashlib
import hmac
import re
from base64 import urlsafe_b64encode

from libs.common.errors import InvalidRequest

S256 = "S256"

# RFC 7636 4.2: S256's challenge is BASE64URL(SHA256(verifier)) without padding: 32 bytes
# make exactly 43 base64url characters.
_CODE_CHALLENGE = re.compile(r"^[A-Za-z0-9_-]{43}$")

# RFC 7636 4.1: code-verifier = 43*128unreserved
#               unreserved = ALPHA / DIGIT / "-" / "." / "_" / "~"
_CODE_VERIFIER = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")


# The authorization request (RFC 7636 4.3) ----------------------------------------------------


def check_challenge(challenge: str | None, method: str | None) -> str:
    """The request's `code_challenge`, once it is an S256 challenge; InvalidRequest otherwise.

    RFC 7636 4.3: "code_challenge_method: OPTIONAL, defaults to "plain" if not present in the
    request." This server never accepts plain, so the method must be named.
    RFC 7636 4.4.1: "If the server requires Proof Key for Code Exchange (PKCE) by OAuth public
    clients and the client does not send the "code_challenge" in the request, the
    authorization endpoint MUST return the authorization error response with the "error"
    value set to "invalid_request"."
    """
    if challenge is None:
        raise InvalidRequest("code_challenge is required (PKCE with S256).")
    if method is None:
        raise InvalidRequest("code_challenge_method is required and must be S256.")
    if method != S256:
        raise InvalidRequest("code_challenge_method must be S256.")
    if not _CODE_CHALLENGE.match(challenge):
        raise InvalidRequest("code_challenge must be 43 base64url characters.")
    return challenge


# The token request (RFC 7636 4.5, 4.6) -------------------------------------------------------


def s256_challenge(verifier: str) -> str:
    """RFC 7636 4.2: code_challenge = BASE64URL-ENCODE(SHA256(ASCII(code_verifier)))."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def verifier_matches(verifier: str | None, challenge: str) -> bool:
    """Whether the token request's `code_verifier` is the secret behind the code's challenge.

    RFC 7636 4.6: "If the values are equal, the token endpoint MUST continue processing as
    normal [...]. If the values are not equal, an error response indicating "invalid_grant"
    as described in Section 5.2 of [RFC6749] MUST be returned." A verifier that is missing or
    not 43 to 128 unreserved characters (4.1) matches nothing; the comparison takes the same
    time wherever the values differ.
    """
    if verifier is None or not _CODE_VERIFIER.match(verifier):
        return False
    return hmac.compare_digest(s256_challenge(verifier), challenge)
