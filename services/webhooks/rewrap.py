"""`keys rewrap`'s webhooks part: every subscription's signing secrets, the current and a
rotated-away one still honoured, sealed again under KEY_ENCRYPTION_KEY.

Idempotent (a secret already sealed under the key is left alone) and safe while webhooks
runs: each row is replaced only if its sealed values are still those read, and a sender
holding a delivery claimed with the old value opens it under the previous key, which every
process keeps configured until the rotation's last step.
"""

from __future__ import annotations

from uuid import UUID

from cryptography.exceptions import InvalidTag

from libs.common.config import Settings
from libs.common.db import Executor
from services.webhooks import signing
from services.webhooks.store import subscriptions as store

# Subscriptions read per statement: bounded memory however many there are.
BATCH = 500


def _resealed(
    settings: Settings, subscription_id: UUID, sealed: bytes | None
) -> tuple[bytes | None, bool]:
    """The value sealed under the newest key, and whether it had to change."""
    if sealed is None:
        return None, False
    key, opened_by = signing.unseal_any(settings.key_encryption_keys, subscription_id, sealed)
    if opened_by == settings.key_encryption_key:
        return sealed, False
    return signing.seal(settings.key_encryption_key, subscription_id, key), True


async def rewrap(db: Executor, settings: Settings) -> dict[str, int]:
    """How many subscriptions were re-sealed, already were, changed while this pass sealed
    them (raced: another pass takes them), and had a secret no configured key opens (left as
    they are, for an operator)."""
    newest_id = signing.kek_id(settings.key_encryption_key)
    counts = {"resealed": 0, "already": 0, "raced": 0, "unopenable": 0}
    after: UUID | None = None
    while rows := await store.sealed_secrets(db, after, BATCH):
        after = rows[-1].id
        for row in rows:
            try:
                current, current_changed = _resealed(settings, row.id, row.secret_enc)
                previous, previous_changed = _resealed(settings, row.id, row.previous_secret_enc)
            except (InvalidTag, ValueError):
                counts["unopenable"] += 1
                continue
            if not (current_changed or previous_changed or row.kek_id != newest_id):
                counts["already"] += 1
                continue
            assert current is not None
            changed = await store.reseal_secrets(
                db, row, secret_enc=current, previous_secret_enc=previous, kek_id=newest_id
            )
            # Lost to a rotation of the secret in between: the next pass takes its values.
            counts["resealed" if changed else "raced"] += 1
    return counts
