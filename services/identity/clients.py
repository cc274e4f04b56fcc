"""OAuth clients: their metadata rules, creation, secrets, and authentication at the endpoints.

The same rules serve the admin pages, the CLI and dynamic client registration (RFC 7591), so
a client is valid or not whichever way it was made. Which redirect URIs may be registered, and
the loopback rule shared with origins, are redirect_uris.py's (RFC 8252).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg
import redis.asyncio as redis
from redis.exceptions import RedisError

from libs.common import scopes as catalogue
from libs.common import streams
from libs.common.config import Settings
from libs.common.db import Executor
from libs.common.errors import InvalidClientMetadata, InvalidRedirectUri
from libs.common.logging import get_logger
from libs.common.origins import normalise
from services.identity import credentials, store
from services.identity.redirect_uris import (
    is_loopback_host,
    refuse_ambiguous_authority,
    validate_redirect_uri,
)

log = get_logger(__name__)

GRANT_TYPES = ("authorization_code", "refresh_token", "client_credentials")
AUTH_METHODS = ("none", "client_secret_basic", "client_secret_post")


# What bad client metadata raises (RFC 7591 3.2.2), for the callers that answer it otherwise
# than as JSON (the admin pages, the CLI): registration lets the middleware answer it.
METADATA_ERRORS = (InvalidClientMetadata, InvalidRedirectUri)


def validate_origin(origin: str) -> str:
    parts = urlsplit(origin)
    refuse_ambiguous_authority(origin, parts.netloc, InvalidClientMetadata)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.path not in ("", "/"):
        raise InvalidClientMetadata(f"{origin!r} is not an origin")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise InvalidClientMetadata("http origins only on loopback")
    return normalise(f"{parts.scheme}://{parts.netloc}")


def validate_scopes(requested: Sequence[str], school: store.School | None) -> list[str]:
    """The scopes a client may register for: known, not admin, allowed by the school."""
    unknown = catalogue.unknown(requested)
    if unknown:
        raise InvalidClientMetadata(f"unknown scope {unknown[0]!r}")
    if any(s in catalogue.ADMIN_SCOPES for s in requested):
        raise InvalidClientMetadata("admin scopes are not available")
    if school is not None and school.allowed_scopes is not None:
        refused = [s for s in requested if s not in school.allowed_scopes]
        if refused:
            raise InvalidClientMetadata(f"the school does not allow {refused[0]!r}")
    return list(dict.fromkeys(requested)) or [catalogue.DEFAULT_SCOPE]


@dataclass(frozen=True, slots=True)
class NewClient:
    client: store.Client
    # Shown once, never stored: the caller must hand them over now.
    client_secret: str | None
    registration_access_token: str | None


async def create_client(
    pool: Executor,
    settings: Settings,
    *,
    school: store.School | None,
    name: str,
    redirect_uris: Sequence[str],
    public: bool = False,
    scopes: Sequence[str] = (),
    origins: Sequence[str] = (),
    grant_types: Sequence[str] | None = None,
    auth_method: str | None = None,
    created_via: str = "admin",
    first_party: bool = False,
    with_registration_token: bool = False,
    metadata: dict[str, object] | None = None,
) -> NewClient:
    name = name.strip()
    if not name or len(name) > 200:
        raise InvalidClientMetadata("client_name must be 1-200 characters")
    uris = [validate_redirect_uri(u) for u in redirect_uris]
    grants = list(grant_types or ("authorization_code", "refresh_token"))
    if any(g not in GRANT_TYPES for g in grants):
        raise InvalidClientMetadata("unsupported grant type")
    method = auth_method or ("none" if public else "client_secret_basic")
    if method not in AUTH_METHODS:
        raise InvalidClientMetadata("unsupported token_endpoint_auth_method")
    if method == "none" and "client_credentials" in grants:
        raise InvalidClientMetadata("client_credentials needs a confidential client")
    if "authorization_code" in grants and not uris:
        raise InvalidRedirectUri("at least one redirect URI is required")
    secret = None if method == "none" else credentials.new_secret(credentials.CLIENT_SECRET_PREFIX)
    registration_token = (
        credentials.new_secret(credentials.REGISTRATION_TOKEN_PREFIX)
        if with_registration_token
        else None
    )
    pepper = settings.secret_pepper
    client = await store.insert_client(
        pool,
        client_id=credentials.new_client_id(),
        school_id=school.id if school else None,
        name=name,
        token_endpoint_auth_method=method,
        secret_hash=credentials.keyed_hash(pepper, secret) if secret else None,
        redirect_uris=uris,
        allowed_origins=[validate_origin(o) for o in origins],
        scopes=validate_scopes(list(scopes), school),
        grant_types=grants,
        first_party=first_party,
        created_via=created_via,
        registration_token_hash=(
            credentials.keyed_hash(pepper, registration_token) if registration_token else None
        ),
        metadata=dict(metadata or {}),
    )
    return NewClient(client, secret, registration_token)


async def check_secret(
    pool: asyncpg.Pool,
    settings: Settings,
    client: store.Client,
    value: str,
    column: str = "secret_hash",
) -> bool:
    """Whether `value` is the client's secret (or, with `column="registration_token_hash"`,
    its registration access token), under SECRET_PEPPER or, during a rotation's overlap,
    SECRET_PEPPER_PREVIOUS; one that matched only under the previous pepper is hashed again
    under the new one, so it keeps working once the overlap ends."""
    stored: bytes | None = getattr(client, column)
    pepper = credentials.matching_pepper(settings.secret_peppers, value, stored)
    if pepper is None:
        return False
    if pepper != settings.secret_pepper and stored is not None:
        await store.rehash_client_secret(
            pool,
            client.id,
            column,
            old=stored,
            new=credentials.keyed_hash(settings.secret_pepper, value),
        )
    return True


async def rotate_secret(
    pool: asyncpg.Pool, redis_client: redis.Redis, settings: Settings, client: store.Client
) -> tuple[store.Client, str]:
    """A new secret; the old one stops working at every identity process on return."""
    if client.is_public:
        raise InvalidClientMetadata("a public client has no secret")
    secret = credentials.new_secret(credentials.CLIENT_SECRET_PREFIX)
    updated = await store.update_client(
        pool, client.id, secret_hash=credentials.keyed_hash(settings.secret_pepper, secret)
    )
    assert updated is not None
    await announce_change(redis_client, settings, client.id)
    return updated, secret


def belongs_to(client: store.Client, school_id: int | None) -> bool:
    """A school's client works only at that school; a platform client only on the platform."""
    return client.school_id == school_id


# Announcing changes ------------------------------------------------------------------------
# Every identity process reuses client rows for a few seconds (store.cached_client_by_id). A
# disable, a new secret or a deletion must hold at every process the moment its call answers,
# so each change is announced on `connect:clients` and every process drops the row on reading
# it; a process that cannot follow the stream reuses nothing.

# Announcements are read within a second of being made; this many is minutes of them.
CHANGES_MAXLEN = 10_000
# How long a follower's read blocks, and how much longer than that its answer may take before
# the process stops reusing rows.
FOLLOW_BLOCK_SECONDS = 1.0
FOLLOW_GRACE_SECONDS = 1.0


async def announce_change(redis_client: redis.Redis, settings: Settings, client_id: str) -> None:
    """Tell every identity process that the client changed. Call it once the change is
    committed (a row read before then is caught by the generation check, one read after is
    the new row) and before answering the call that made it."""
    store.forget_client(client_id)
    try:
        await streams.append(
            redis_client,
            settings.stream(streams.CLIENTS),
            {"client_id": client_id},
            maxlen=CHANGES_MAXLEN,
        )
    except RedisError:
        # The change stands; other processes see it when their entry expires, as before.
        log.warning("client_change_not_announced", client_id=client_id)


async def follow_changes(
    redis_client: redis.Redis, settings: Settings, stop: asyncio.Event
) -> None:
    """Drop cached clients as changes are announced, until `stop` is set. After any failure
    the follower starts again from the stream's newest entry with an empty cache, since what
    it missed meanwhile cannot be told."""
    stream = settings.stream(streams.CLIENTS)
    last: str | None = None
    delay = 0.2
    while not stop.is_set():
        try:
            if last is None:
                last = await streams.last_id(redis_client, stream)
                store.forget_client()
            else:
                entries = await streams.read_tail(
                    redis_client, stream, last, block_ms=round(FOLLOW_BLOCK_SECONDS * 1000)
                )
                for entry in entries:
                    client_id = entry.data.get("client_id")
                    store.forget_client(client_id if isinstance(client_id, str) else None)
                    last = entry.id
            store.client_changes_followed(
                time.monotonic() + FOLLOW_BLOCK_SECONDS + FOLLOW_GRACE_SECONDS
            )
            delay = 0.2
        except (RedisError, OSError, ValueError):  # ValueError: an entry that is not JSON
            store.client_changes_unfollowed()
            last = None
            log.warning("client_changes_follow_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 5.0)
    store.client_changes_unfollowed()


def reviewed(client: store.Client) -> bool:
    """Registered by a school admin, the CLI or an operator, so someone answerable vouched for
    its redirect URIs. A client that registered itself (RFC 7591) is reviewed by nobody: its
    redirect URIs may be anyone's, and the authorization endpoint must not send a browser
    there unasked (RFC 9700 4.11.2). Only an operator can mark a client first-party."""
    return client.created_via != "registration" or client.first_party
