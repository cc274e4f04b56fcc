"""Opening what was sealed under any of the configured key-encryption keys.

Identity's signing keys and webhooks' signing secrets are sealed (AES-256-GCM) under
KEY_ENCRYPTION_KEY. During a rotation, KEY_ENCRYPTION_KEYS_PREVIOUS still open what they
sealed until `keys rewrap` has sealed it again under the new key; a value sealed under none of
them does not open (InvalidTag), as before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cryptography.exceptions import InvalidTag


def open_with_any(keks: Sequence[bytes], open_one: Callable[[bytes], bytes]) -> tuple[bytes, bytes]:
    """`open_one(kek)` under each key in turn, the sealing key first (what almost everything
    is sealed under, and all of it after a rewrap): the plaintext and the key that opened it.
    A wrong key costs one failed tag check, a few microseconds."""
    for kek in keks:
        try:
            return open_one(kek), kek
        except InvalidTag:
            continue
    raise InvalidTag()
