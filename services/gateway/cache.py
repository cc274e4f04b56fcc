"""A small per-process cache whose entries expire, with one load in flight per key.

Every protected call looks up its school (and, once per token, its client) here; when an entry
expires under load, the callers that miss together share one PostgreSQL query instead of
queueing a query each on the pool.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    def __init__(self, ttl: float, *, negative_ttl: float | None = None, max_entries: int = 10_000):
        self._ttl = ttl
        self._negative_ttl = ttl if negative_ttl is None else negative_ttl
        self._max = max_entries
        self._data: dict[K, tuple[float, V]] = {}
        self._loading: dict[K, asyncio.Future[V]] = {}

    def peek(self, key: K) -> tuple[bool, V | None]:
        """(hit, value) without loading: the hot path's synchronous check."""
        hit = self._data.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return True, hit[1]
        return False, None

    def put(self, key: K, value: V) -> None:
        if len(self._data) >= self._max:
            # Evict the oldest insertion; dicts keep insertion order.
            self._data.pop(next(iter(self._data)))
        ttl = self._ttl if value is not None else self._negative_ttl
        self._data[key] = (time.monotonic() + ttl, value)

    def forget(self, key: K | None = None) -> None:
        if key is None:
            self._data.clear()
        else:
            self._data.pop(key, None)

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        found, value = self.peek(key)
        if found:
            return value  # type: ignore[return-value]
        pending = self._loading.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._loading[key] = future
        try:
            value = await load()
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            # Waiters re-raise it; mark it retrieved so a future nobody waited on stays quiet.
            future.exception()
            raise
        else:
            self.put(key, value)
            future.set_result(value)
            return value
        finally:
            self._loading.pop(key, None)

    def __len__(self) -> int:
        return len(self._data)
