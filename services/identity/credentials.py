"""Secrets identity hands out or checks: passwords, client secrets, opaque tokens.

Passwords are slow to check on purpose (argon2id). Client secrets and opaque tokens are 256-bit
random values, so a keyed SHA-256 (HMAC under SECRET_PEPPER) is enough to make a stolen table
useless, and it keeps the token endpoint fast.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from collections.abc import Sequence

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

# RFC 9106's second recommended option (64 MiB, 3 passes), argon2id.
_hasher = PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=4)
# Checked against when the account does not exist, so a miss costs what a hit costs. A fixed
# string, not hashed at import: importing this module would otherwise spend a full argon2 run
# (and its 64 MiB) in every process and CLI call. Its parameters must stay those of _hasher
# (a test holds them equal); the password behind it was random and is forgotten, and nothing
# it protects exists, so it is no secret. Replace it whenever _hasher's parameters change.
_DUMMY_HASH = (
    "$argon2id$v=19$m=65536,t=3,p=4$f4P+tC+8EuEf5NvrVpgN+A"
    "$ERwXuqnnYudny7JVKoasd981RuhX6CcRMVcc1lgLvnI"
)

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


class PasswordGate:
    """argon2 off the event loop, at most `limit` at once in the process.

    Each run holds the hasher's memory cost for its duration; unbounded, a flood of sign-ins
    would multiply it by however many arrive together. Bounding it here also keeps argon2
    from occupying every thread of the default executor, which other work (DNS lookups among
    it) shares. Callers beyond the limit wait their turn rather than fail.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._slots = asyncio.Semaphore(limit)

    async def verify(self, stored_hash: str | None, password: str) -> bool:
        async with self._slots:
            return await asyncio.to_thread(verify_password, stored_hash, password)

    async def hash(self, password: str) -> str:
        async with self._slots:
            return await asyncio.to_thread(hash_password, password)


def new_secret(prefix: str) -> str:
    """A 256-bit random value; the prefix makes leaked ones recognisable to secret scanners."""
    return prefix + secrets.token_urlsafe(32)


# What an id a person handles must not begin with: a leading '-' makes it an option to a
# command line (`--client -abc`) and a formula to a spreadsheet (the audit CSV export quotes
# it, so it no longer reads as the id), and a leading '_' is as easily lost or taken for markup.
_NOT_FIRST = ("-", "_")


def new_id(nbytes: int = 18) -> str:
    """A random id of `nbytes` bytes, base64url, for what people type, paste or pass on a command
    line (client ids): never beginning with '-' or '_'. A draw that would is drawn again, so
    the ids that remain are still uniform and lose only a sliver of one character's entropy."""
    while True:
        value = secrets.token_urlsafe(nbytes)
        if not value.startswith(_NOT_FIRST):
            return value


def new_client_id() -> str:
    return new_id(18)


def keyed_hash(pepper: bytes, value: str) -> bytes:
    return hmac.new(pepper, value.encode(), hashlib.sha256).digest()


def matches(pepper: bytes, value: str, stored: bytes | None) -> bool:
    if stored is None:
        return False
    return hmac.compare_digest(keyed_hash(pepper, value), stored)


def matching_pepper(peppers: Sequence[bytes], value: str, stored: bytes | None) -> bytes | None:
    """The pepper of `peppers` (SECRET_PEPPER, then SECRET_PEPPER_PREVIOUS during a rotation's
    overlap) under which `value` hashes to `stored`; None when none does. A caller that got
    the previous one stores the hash under the first again (rehash on use)."""
    for pepper in peppers:
        if matches(pepper, value, stored):
            return pepper
    return None


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
