"""What identity and webhooks share to refuse starting with secrets that are not the
database's: the error, a secret's check value, and the remedy each error names.

A check value is an HMAC under the secret of a fixed label: it says nothing about the secret,
yet differs for every other secret. Identity records one per secret in `secret_checks`
(services/identity/migrations/008_secret_checks.sql); other services compare against it.
"""

from __future__ import annotations

import hashlib
import hmac

from libs.common.config import ConfigError, Settings


class SecretMismatch(ConfigError):
    """A configured secret is not the one the database's data was made with."""


def check_value(variable: str, secret: bytes) -> bytes:
    return hmac.new(
        secret, b"loopwise-connect secret check\x00" + variable.encode(), hashlib.sha256
    ).digest()


def matching(variable: str, secrets: tuple[bytes, ...], recorded: bytes) -> bytes | None:
    """The one of `secrets` (a variable's configured values, during a rotation more than one)
    whose check value is `recorded`; None when none is."""
    for secret in secrets:
        if hmac.compare_digest(check_value(variable, secret), recorded):
            return secret
    return None


def remedy(settings: Settings, variable: str) -> str:
    path = settings.dev_secrets
    if path is not None:
        # Development: the secrets were generated into a file that `make clean` removes, while
        # the database outlived it (or another checkout's `make dev` made it).
        return (
            f"this database was made with other development secrets than {path} holds"
            " (`make clean` removes that file, another checkout has its own): put back the"
            " file it was made with; or let `make dev` start its development database afresh"
            f" (it does when {path} is new: remove it; never for a DATABASE_URL given); or set"
            " DATABASE_URL to another database"
        )
    return f"start with the {variable} this database was set up with"
