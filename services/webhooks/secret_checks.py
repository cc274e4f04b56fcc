"""Webhooks refuses to start with a KEY_ENCRYPTION_KEY that is not the database's.

Each subscription's signing secret is sealed under the key-encryption key (signing.seal). With
another key the service used to start and then fail every delivery's signing, for ever. It is
a configuration error, said at the start, naming the variable: before listening, exit status
2, as identity does (services/identity/secret_checks.py).

Two looks, either enough to refuse: the check value identity recorded for the key (so a wrong
key is caught even before the first subscription), and one stored secret per kek_id that must
open (so it is caught on a database identity has not recorded a value in). The check value
is never written here: identity owns it, and it is the one whose first start decides it.
During a rotation, any of KEY_ENCRYPTION_KEY and KEY_ENCRYPTION_KEYS_PREVIOUS will do for
either look (README "Key rotation").
"""

from __future__ import annotations

from cryptography.exceptions import InvalidTag

from libs.common.config import Settings
from libs.common.db import Executor
from libs.common.secret_checks import SecretMismatch, matching, remedy
from services.webhooks import signing
from services.webhooks.store import secret_checks as store

VARIABLE = "KEY_ENCRYPTION_KEY"

# Secrets tried per key-encryption key; a single damaged row among them does not stop a start.
_SAMPLES_PER_KEK = 3


async def _same_as_recorded(db: Executor, settings: Settings) -> None:
    recorded = await store.recorded_check_value(db, VARIABLE)
    if recorded is None:
        return
    keks = settings.key_encryption_keys
    if matching(VARIABLE, keks, recorded) is None:
        also = " (nor is KEY_ENCRYPTION_KEYS_PREVIOUS)" if len(keks) > 1 else ""
        raise SecretMismatch(
            VARIABLE,
            f"is not the key this database's secrets are sealed under{also};"
            f" {remedy(settings, VARIABLE)}",
        )


async def _subscription_secrets_open(db: Executor, settings: Settings) -> None:
    groups: dict[str, list[store.SealedSecret]] = {}
    for sample in await store.sealed_samples(db, _SAMPLES_PER_KEK):
        groups.setdefault(sample.kek_id, []).append(sample)
    keks = settings.key_encryption_keys
    for group in groups.values():
        if not any(_opens(kek, sample) for sample in group for kek in keks):
            raise SecretMismatch(
                VARIABLE,
                "does not open the webhook signing secrets stored in the database"
                f" ({group[0].subscriptions} subscriptions' are sealed under another key);"
                f" {remedy(settings, VARIABLE)}",
            )


def _opens(kek: bytes, sample: store.SealedSecret) -> bool:
    try:
        signing.unseal(kek, sample.subscription_id, sample.secret_enc)
    # A damaged row (too short to hold a nonce) is that row's trouble, as a wrong tag is.
    except (InvalidTag, ValueError):
        return False
    return True


async def verify(db: Executor, settings: Settings) -> None:
    """Raise SecretMismatch naming KEY_ENCRYPTION_KEY unless it is the database's."""
    await _same_as_recorded(db, settings)
    await _subscription_secrets_open(db, settings)
