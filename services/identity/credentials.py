"""Secrets identity hands out or checks: passwords, client secrets, opaque tokens.

Passwords are slow to check on purpose (argon2id). Client secrets and opaque tokens are 256-bit
random values, so a keyed SHA-256 (HMAC under SECRET_PEPPER) is enough to make a stolen table
useless, and it keeps the token endpoint fast.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

# RFC 9106's second recommended option (64 MiB, 3 passes), argon2id.
_hasher = PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=4)
# Checked against when the account does not exist, so a miss costs what a hit costs.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))

CLIENT_SECRET_PREFIX = "lcs_"
REFRESH_TOKEN_PREFIX = "lcr_"
REGISTRATION_TOKEN_PREFIX = "lcg_"
AUTHORIZATION_CODE_PREFIX = "lcc_"
SESSION_PREFIX = "lcx_"


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def password_needs_rehash(stored_hash: str) -> bool:
    return _hasher.check_needs_rehash(stored_hash)


def new_secret(prefix: str) -> str:
    """A 256-bit random value; the prefix makes leaked ones recognisable to secret scanners."""
    return prefix + secrets.token_urlsafe(32)


def new_client_id() -> str:
    return secrets.token_urlsafe(18)


def keyed_hash(pepper: bytes, value: str) -> bytes:
    return hmac.new(pepper, value.encode(), hashlib.sha256).digest()


def matches(pepper: bytes, value: str, stored: bytes | None) -> bool:
    if stored is None:
        return False
    return hmac.compare_digest(keyed_hash(pepper, value), stored)


def token_hash(value: str) -> bytes:
    """Lookup key for high-entropy tokens (codes, refresh tokens, sessions)."""
    return hashlib.sha256(value.encode()).digest()


def derive_secret(pepper: bytes, prefix: str, parent: str, purpose: str) -> str:
    """A token derived from another under the pepper: the same parent always gives the same one.

    Refresh rotation uses it so a retry inside the grace window gets the same successor
    without the successor being stored anywhere.
    """
    mac = hmac.new(pepper, f"{purpose}\x00{parent}".encode(), hashlib.sha256).digest()
    import base64

    return prefix + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
