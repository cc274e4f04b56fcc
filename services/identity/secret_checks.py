"""Identity refuses to start with secrets that are not the database's own.

A KEY_ENCRYPTION_KEY other than the one the signing keys were sealed under used to show only
as a 500 on every token request (the keys would not open), for ever; a SECRET_PEPPER other than
the one client secrets were hashed under, as every client failing to authenticate. Both are
configuration errors, and the start is where to say so, naming the variable: before listening,
exit status 2, as for any other bad variable (libs/common/config.py).

The key-encryption key must open the stored signing keys that sign or will sign. Besides, each
secret's check value (an HMAC under the secret of a fixed label: it says nothing about the
secret) is recorded by the first process to use the database and compared by every later one,
so a pepper mismatch is caught as well, and of two processes starting at once on an empty
database with different keys, one refuses rather than both sealing keys under their own.
"""

from __future__ import annotations

import hmac

from cryptography.exceptions import InvalidTag

from libs.common.config import Settings
from libs.common.db import Executor
from libs.common.secret_checks import SecretMismatch, check_value, remedy
from services.identity import keys
from services.identity.store import secret_checks as store

__all__ = ["SecretMismatch", "check_value", "verify"]

# Keys tried per key-encryption key; a single damaged row among them does not stop a start.
_SAMPLES_PER_KEK = 3


async def _signing_keys_open(db: Executor, settings: Settings) -> None:
    samples = await store.sealed_samples(db, _SAMPLES_PER_KEK)
    groups: dict[str, list[store.SealedSample]] = {}
    for sample in samples:
        groups.setdefault(sample.kek_id, []).append(sample)
    kek = settings.key_encryption_key
    for group in groups.values():
        if not any(_opens(kek, sample) for sample in group):
            raise SecretMismatch(
                "KEY_ENCRYPTION_KEY",
                "does not open the signing keys stored in the database"
                f" ({group[0].keys} that sign or will sign are sealed under another key);"
                f" {remedy(settings, 'KEY_ENCRYPTION_KEY')}",
            )


def _opens(kek: bytes, sample: store.SealedSample) -> bool:
    try:
        keys.unseal(kek, sample.kid, sample.private_key_enc)
    except InvalidTag:
        return False
    return True


async def _same_as_recorded(db: Executor, settings: Settings, variable: str, secret: bytes) -> None:
    mine = check_value(variable, secret)
    recorded = await store.recorded_check_value(db, variable, mine)
    if not hmac.compare_digest(mine, recorded):
        what = {
            "KEY_ENCRYPTION_KEY": "the key this database's signing keys are sealed under",
            "SECRET_PEPPER": "the pepper this database's client secrets and tokens are hashed with",
        }[variable]
        raise SecretMismatch(variable, f"is not {what}; {remedy(settings, variable)}")


async def verify(db: Executor, settings: Settings) -> None:
    """Raise SecretMismatch, naming the variable, unless both secrets are the database's."""
    await _signing_keys_open(db, settings)
    await _same_as_recorded(db, settings, "KEY_ENCRYPTION_KEY", settings.key_encryption_key)
    await _same_as_recorded(db, settings, "SECRET_PEPPER", settings.secret_pepper)
