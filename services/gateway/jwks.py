"""Each issuer's published keys (RFC 7517), fetched from identity and cached per issuer.

A key set is fetched the first time an issuer's token is seen, refreshed in the background
when it is older than `ttl`, refreshed at once when identity announces a rotation on
`connect:keys`, and refreshed on an unknown `kid` at most once per `refresh_interval` per
issuer: a new key is published before it signs, so a miss is either a token signed by a key
published moments ago or a forgery, and forgeries must not turn into a flood of fetches.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from libs.common import jwt
from libs.common.logging import get_logger

log = get_logger(__name__)

Fetch = Callable[[str], Awaitable[dict[str, Any]]]
# An issuer whose keys could never be fetched is retried at most this often (seconds); calls in
# between are answered 503 at once instead of each waiting on an identity that is away.
RETRY_UNLOADED = 1.0


class JwksUnavailable(Exception):
    """No key set of the issuer could be had: the gateway cannot judge its tokens."""


@dataclass(slots=True)
class _Issuer:
    school_id: int | None
    keys: jwt.KeySet = field(default_factory=jwt.KeySet)
    loaded: bool = False
    fetched_at: float = 0.0
    last_attempt: float = float("-inf")
    generation: int = 0
    stale: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    background: asyncio.Task[None] | None = None


class JwksCache:
    def __init__(
        self,
        fetch: Fetch,
        *,
        ttl: float = 300.0,
        refresh_interval: float = 5.0,
        on_fetch: Callable[[str], None] | None = None,
    ) -> None:
        self._fetch = fetch
        self._ttl = ttl
        self._refresh_interval = refresh_interval
        self._on_fetch = on_fetch
        self._issuers: dict[str, _Issuer] = {}

    def lookup(self, issuer: str, school_id: int | None) -> jwt.KeyLookup:
        async def find(kid: str) -> jwt.VerificationKey | None:
            return await self.find(issuer, school_id, kid)

        return find

    def peek(self, issuer: str, kid: str) -> jwt.VerificationKey | None:
        """The key at once when the issuer's set is loaded, current and holds `kid`; None means
        "ask :meth:`find`", which fetches, refreshes and rate-limits refreshes as needed."""
        entry = self._issuers.get(issuer)
        if entry is None or not entry.loaded or entry.stale:
            return None
        if time.monotonic() - entry.fetched_at > self._ttl:
            return None
        return entry.keys.get(kid)

    async def find(
        self, issuer: str, school_id: int | None, kid: str
    ) -> jwt.VerificationKey | None:
        entry = self._issuers.get(issuer)
        if entry is None:
            entry = self._issuers[issuer] = _Issuer(school_id)
        now = time.monotonic()
        # A first fetch under way is waited for (its result is this call's too): calls that
        # came with it are not refused for keys it is about to have.
        fetching = entry.lock.locked()
        if entry.stale or (
            not entry.loaded and (fetching or now - entry.last_attempt >= RETRY_UNLOADED)
        ):
            await self._refresh(entry, issuer)
        if not entry.loaded:
            raise JwksUnavailable(issuer)
        elif now - entry.fetched_at > self._ttl:
            self._refresh_soon(entry, issuer)
        key = entry.keys.get(kid)
        if key is None and time.monotonic() - entry.last_attempt >= self._refresh_interval:
            await self._refresh(entry, issuer)
            key = entry.keys.get(kid)
        return key

    def invalidate(self, school_id: int | None) -> None:
        """Identity rotated this issuer's keys: refetch now, before its tokens arrive."""
        for issuer, entry in self._issuers.items():
            if entry.school_id == school_id and entry.loaded:
                entry.stale = True
                self._refresh_soon(entry, issuer)

    def _refresh_soon(self, entry: _Issuer, issuer: str) -> None:
        if entry.background is None or entry.background.done():
            entry.background = asyncio.create_task(self._refresh(entry, issuer))

    async def _refresh(self, entry: _Issuer, issuer: str) -> None:
        seen = entry.generation
        async with entry.lock:
            if entry.generation != seen:
                # Another caller refreshed while this one waited: use its result.
                return
            entry.last_attempt = time.monotonic()
            try:
                if self._on_fetch is not None:
                    self._on_fetch(issuer)
                document = await self._fetch(issuer)
                entry.keys = jwt.KeySet.from_jwks(document)
                entry.loaded = True
                entry.stale = False
                entry.fetched_at = time.monotonic()
            except Exception as exc:
                # Keep serving the keys we have: identity being briefly away must not stop
                # every token of the issuer. Not stale any more either: retrying on every call
                # would hammer an identity that is down; the unknown-kid refresh takes over.
                entry.stale = False
                log.warning("jwks_fetch_failed", issuer=issuer, error=type(exc).__name__)
            finally:
                entry.generation += 1

    async def close(self) -> None:
        tasks = [e.background for e in self._issuers.values() if e.background is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
