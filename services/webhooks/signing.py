"""Standard Webhooks signatures and the signing secrets behind them.

A secret is `whsec_` + standard base64 of 32 random bytes; the HMAC key is those bytes. The
signed content is `{webhook-id}.{webhook-timestamp}.{body}` and the header value is
`v1,<base64 HMAC-SHA256>`, several space-separated while a rotated-away secret is still
honoured. Secrets are stored sealed (AES-256-GCM under the key-encryption key), bound to
their subscription through the associated data.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable, Sequence
from uuid import UUID

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from libs.common import sealing

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32


def new_secret() -> tuple[str, bytes]:
    """A fresh secret: what the client is shown once, and the key bytes it stands for."""
    key = secrets.token_bytes(SECRET_BYTES)
    return SECRET_PREFIX + base64.b64encode(key).decode(), key


def kek_id(kek: bytes) -> str:
    """Names the key-encryption key a row was sealed with, without revealing it."""
    return hashlib.sha256(b"loopwise-connect webhooks kek id\x00" + kek).hexdigest()[:16]


def seal(kek: bytes, subscription_id: UUID, key: bytes) -> bytes:
    nonce = os.urandom(12)
    # The subscription id is the associated data: a sealed secret copied onto another
    # subscription's row does not open.
    return nonce + AESGCM(kek).encrypt(nonce, key, subscription_id.bytes)


def unseal(kek: bytes, subscription_id: UUID, sealed: bytes) -> bytes:
    return AESGCM(kek).decrypt(sealed[:12], sealed[12:], subscription_id.bytes)


def unseal_any(keks: Sequence[bytes], subscription_id: UUID, sealed: bytes) -> tuple[bytes, bytes]:
    """Open under whichever configured key sealed it: the key bytes and the key-encryption key
    that opened them (InvalidTag when none did). A subscription's previous secret may be
    sealed under an older key than its `kek_id` names (a rotation of the secret keeps the
    sealed value as it was), so every key is tried, not only the one the row names."""
    return sealing.open_with_any(keks, lambda kek: unseal(kek, subscription_id, sealed))


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    content = b"%s.%d.%s" % (msg_id.encode(), timestamp, body)
    digest = hmac.new(key, content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(keys: Iterable[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value: one signature per live secret, newest first."""
    return " ".join(sign(key, msg_id, timestamp, body) for key in keys)


class KeyCache:
    """Unsealed keys by sealed value: AES-GCM per delivery is cheap, but not free at 2k/s."""

    def __init__(self, keks: Sequence[bytes], size: int = 4096) -> None:
        self._keks = tuple(keks)
        self._size = size
        self._keys: dict[bytes, bytes] = {}

    def key(self, subscription_id: UUID, sealed: bytes) -> bytes:
        cache_key = subscription_id.bytes + sealed
        found = self._keys.get(cache_key)
        if found is None:
            found = unseal_any(self._keks, subscription_id, sealed)[0]
            if len(self._keys) >= self._size:
                self._keys.pop(next(iter(self._keys)))
            self._keys[cache_key] = found
        return found
