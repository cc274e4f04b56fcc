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

During a rotation (README "Key rotation") more than one value of a secret is configured: the
stored keys must each open under one of KEY_ENCRYPTION_KEY and KEY_ENCRYPTION_KEYS_PREVIOUS,
and the recorded check value must be that of one of them (of SECRET_PEPPER or
SECRET_PEPPER_PREVIOUS). The key's record moves to the new key when `keys rewrap` has sealed
everything under it; the pepper's when an identity starts with the new pepper and the record
is the previous one's, the overlap having begun.
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag

from libs.common.config import Settings
from libs.common.db import Executor
from libs.common.secret_checks import SecretMismatch, check_value, matching, remedy
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
    keks = settings.key_encryption_keys
    also = ", nor does any of KEY_ENCRYPTION_KEYS_PREVIOUS" if len(keks) > 1 else ""
    for group in groups.values():
        if not any(_opens(kek, sample) for sample in group for kek in keks):
            raise SecretMismatch(
                "KEY_ENCRYPTION_KEY",
                f"does not open the signing keys stored in the database{also}"
                f" ({group[0].keys} that sign or will sign are sealed under another key);"
                f" {remedy(settings, 'KEY_ENCRYPTION_KEY')}",
            )


def _opens(kek: bytes, sample: store.SealedSample) -> bool:
    try:
        keys.unseal(kek, sample.kid, sample.private_key_enc)
    except InvalidTag:
        return False
    return True


async def _same_as_recorded(
    db: Executor, settings: Settings, variable: str, secrets: tuple[bytes, ...]
) -> bytes:
    """The configured value of `variable` whose check value the database records (the first
    one, the sealing key or the pepper in use, is recorded on an empty database)."""
    mine = check_value(variable, secrets[0])
    recorded = await store.recorded_check_value(db, variable, mine)
    matched = matching(variable, secrets, recorded)
    if matched is None:
        what = {
            "KEY_ENCRYPTION_KEY": "the key this database's signing keys are sealed under",
            "SECRET_PEPPER": "the pepper this database's client secrets and tokens are hashed with",
        }[variable]
        others = {"KEY_ENCRYPTION_KEY": "KEY_ENCRYPTION_KEYS_PREVIOUS"}.get(
            variable, f"{variable}_PREVIOUS"
        )
        also = f" (nor is {others})" if len(secrets) > 1 else ""
        raise SecretMismatch(variable, f"is not {what}{also}; {remedy(settings, variable)}")
    return matched


async def verify(db: Executor, settings: Settings) -> None:
    """Raise SecretMismatch, naming the variable, unless both secrets are the database's."""
    await _signing_keys_open(db, settings)
    await _same_as_recorded(db, settings, "KEY_ENCRYPTION_KEY", settings.key_encryption_keys)
    pepper = await _same_as_recorded(db, settings, "SECRET_PEPPER", settings.secret_peppers)
    if pepper != settings.secret_pepper:
        # The overlap began: from now on this database's pepper is the new one, so once
        # SECRET_PEPPER_PREVIOUS is dropped, a process still given only the old one refuses.
        await record_newest(db, "SECRET_PEPPER", pepper, settings.secret_pepper)


async def record_newest(db: Executor, variable: str, old: bytes, new: bytes) -> None:
    """Move `variable`'s recorded check value from `old`'s to `new`'s, unless another
    process moved it already (compare and set)."""
    await store.move_check_value(
        db, variable, check_value(variable, old), check_value(variable, new)
    )


async def recorded_key(db: Executor, settings: Settings) -> bytes | None:
    """The configured key-encryption key the database records (verify has passed, so one is)."""
    recorded = await store.recorded_check_value(
        db, "KEY_ENCRYPTION_KEY", check_value("KEY_ENCRYPTION_KEY", settings.key_encryption_key)
    )
    return matching("KEY_ENCRYPTION_KEY", settings.key_encryption_keys, recorded)
