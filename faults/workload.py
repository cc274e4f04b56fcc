"""Steady, bounded load on the public origin, every call written to the ledger.

Four kinds of traffic run side by side for the whole suite, each paced (a loop waits out the
rest of its period, so a fault that makes calls slow never makes them pile up):

- protected reads, `GET /api/v1/courses`, by several loops, each with a token of its own
  grant, every call with an `X-Request-Id` of ours (the audit trail is checked by it);
- school API writes (a course created, then updated) that commit events; a webhook
  subscription of the write grant sends `course.created` and `course.updated` to the receiver;
- a refresh-token chain, refreshed twice a second (a refused refresh is retried with the
  same token: that is what a client does, and what the grace window is for);
- revocations: every few seconds a new grant from a real code exchange, its token used
  continuously by a loop of its own, revoked through RFC 7009 after a second, and used
  on for a while after the revoke answered: those later calls must all be 401.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import orjson

from faults import ledger
from faults.ledger import Call, Revocation
from faults.world import World, mint_code, post_form
from libs.common.logging import get_logger

log = get_logger(__name__)

SUBSCRIBED = ("course.created", "course.updated")
TIMEOUT = aiohttp.ClientTimeout(total=5)


@dataclass(frozen=True, slots=True)
class Pace:
    """Calls per second of each loop, and how many read loops."""

    readers: int = 4
    read_rate: float = 12.0
    write_rate: float = 3.0
    refresh_rate: float = 2.0
    doomed_rate: float = 25.0
    revoke_every: float = 3.0
    use_before_revoke: float = 0.8
    use_after_revoke: float = 1.2


class Workload:
    def __init__(
        self, world: World, pool: asyncpg.Pool, receiver_url: str, run: str, pace: Pace
    ) -> None:
        self.world = world
        self.pool = pool
        self.receiver_url = receiver_url
        self.pace = pace
        self.calls: list[Call] = []
        self.revocations: list[Revocation] = []
        self.subscription_id = ""
        self._run = run
        self._ids = itertools.count(1)
        # Calls in progress, by request id (or a key of ours): when each started.
        self._in_flight: dict[str, float] = {}
        self._ended = asyncio.Event()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._http: aiohttp.ClientSession | None = None
        self._read_tokens: list[str] = []
        self._write_token = ""
        self._refresh_token = ""

    # -- set-up ----------------------------------------------------------------------------

    async def start(self) -> None:
        # One connection per call in flight, none kept between the loops' calls beyond the
        # pool: a load balancer reload or a killed gateway closes idle keep-alives.
        self._http = aiohttp.ClientSession(
            timeout=TIMEOUT, connector=aiohttp.TCPConnector(limit=0, force_close=False)
        )
        self._read_tokens = [
            (await self._exchange())["access_token"] for _ in range(self.pace.readers)
        ]
        self._write_token = (await self._exchange())["access_token"]
        self._refresh_token = (await self._exchange())["refresh_token"]
        status, body = await self._json(
            "POST",
            "/api/v1/webhooks",
            self._write_token,
            {"url": f"{self.receiver_url}/hook/faults", "event_types": list(SUBSCRIBED)},
        )
        if status != 201:
            raise RuntimeError(f"subscribing the receiver answered {status}: {body}")
        self.subscription_id = str(body["id"])
        loops: list[Awaitable[None]] = [
            *(self._reads(token) for token in self._read_tokens),
            self._writes(),
            self._refreshes(),
            self._revocations(),
        ]
        self._tasks = [asyncio.create_task(self._logged(loop)) for loop in loops]

    async def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._http is not None:
            await self._http.close()

    # -- one call --------------------------------------------------------------------------

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self._http is not None, "start() first"
        return self._http

    def request_id(self) -> str:
        return f"flt-{self._run}-{next(self._ids)}"

    async def _call(
        self,
        kind: str,
        method: str,
        path: str,
        token: str,
        body: dict[str, Any] | None = None,
        grant: str | None = None,
    ) -> tuple[Call, bytes]:
        rid = self.request_id()
        headers = self.world.headers(token, **{"X-Request-Id": rid})
        started = self._begin(rid)
        raw = b""
        try:
            async with self.http.request(
                method, self.world.public_url + path, headers=headers, json=body
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError):
            status = 0
        finally:
            del self._in_flight[rid]
            self._ended.set()
        call = Call(kind, started, time.monotonic(), status, rid, grant)
        self.calls.append(call)
        return call, raw

    def _begin(self, key: str) -> float:
        started = self._in_flight[key] = time.monotonic()
        return started

    async def settled(self, before: float) -> None:
        """Until every call started before `before` has ended (and so is in `calls`): a
        window is scored on all of its calls, the slow ones too."""
        while any(started < before for started in self._in_flight.values()):
            self._ended.clear()
            await self._ended.wait()

    async def _json(
        self, method: str, path: str, token: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        call, raw = await self._call(ledger.WRITE, method, path, token, body)
        try:
            answer = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError:
            answer = {}
        return call.status, answer if isinstance(answer, dict) else {}

    async def _form(
        self, kind: str, path: str, form: dict[str, str]
    ) -> tuple[Call, dict[str, Any]]:
        key = f"form-{next(self._ids)}"
        started = self._begin(key)
        try:
            status, body = await post_form(self.http, self.world, path, form)
        finally:
            del self._in_flight[key]
            self._ended.set()
        call = Call(kind, started, time.monotonic(), status)
        self.calls.append(call)
        return call, body

    async def _exchange(self) -> dict[str, Any]:
        """A new grant's tokens. A refused exchange is retried with the same code (the client
        cannot know whether it was redeemed); a code that no longer redeems gets a new one."""
        while True:
            try:
                form = await mint_code(self.pool, self.world)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await asyncio.sleep(0.5)  # the suite's own database access waits out a fault
                continue
            for _ in range(20):
                call, body = await self._form(ledger.EXCHANGE, "/v1/oauth/token", form)
                if call.status == 200:
                    return body
                if not ledger.refused(call.status):
                    break
                await asyncio.sleep(0.25)

    async def _logged(self, loop: Awaitable[None]) -> None:
        """A loop that fails is a harness bug: said loudly, and the run goes on without it."""
        try:
            await loop
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("faults_workload_loop_failed")

    async def _paced(self, rate: float, step: Callable[[], Awaitable[None]]) -> None:
        period = 1.0 / rate
        due = time.monotonic()
        while not self._stop.is_set():
            await step()
            due = max(due + period, time.monotonic())
            await asyncio.sleep(due - time.monotonic())

    # -- the loops -------------------------------------------------------------------------

    async def _reads(self, token: str) -> None:
        async def step() -> None:
            await self._call(ledger.API, "GET", "/api/v1/courses?limit=5", token)

        await self._paced(self.pace.read_rate, step)

    async def _writes(self) -> None:
        n = itertools.count(1)
        last_id: int | None = None

        async def step() -> None:
            nonlocal last_id
            i = next(n)
            if last_id is not None and i % 2 == 0:
                await self._json(
                    "PATCH",
                    f"/api/v1/courses/{last_id}",
                    self._write_token,
                    {"title": f"Fault suite course {i} (revised)"},
                )
                return
            status, body = await self._json(
                "POST",
                "/api/v1/courses",
                self._write_token,
                {"title": f"Fault suite course {i}", "description": "Written under faults."},
            )
            if status == 201 and isinstance(body.get("id"), int):
                last_id = body["id"]

        await self._paced(self.pace.write_rate, step)

    async def _refreshes(self) -> None:
        async def step() -> None:
            form = {
                "grant_type": "refresh_token",
                "refresh_token": self._refresh_token,
                "client_id": self.world.app_id,
            }
            call, body = await self._form(ledger.REFRESH, "/v1/oauth/token", form)
            if call.status == 200:
                self._refresh_token = body["refresh_token"]
            elif not ledger.refused(call.status):
                # The chain is gone (the ledger counts this `refresh:4xx` as unexpected).
                log.warning("faults_refresh_chain_broken", status=call.status)
                self._refresh_token = (await self._exchange())["refresh_token"]

        await self._paced(self.pace.refresh_rate, step)

    async def _revocations(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            tokens = await self._exchange()
            grant = f"g{next(self._ids)}"
            user = asyncio.create_task(self._doomed(tokens["access_token"], grant))
            try:
                await asyncio.sleep(self.pace.use_before_revoke)
                form = {"token": tokens["access_token"], "client_id": self.world.app_id}
                # A refused try may still have revoked (its answer lost): 401s count as
                # expected from the first try on, successes as late from the 200 on.
                sent = time.monotonic()
                while True:
                    call, _ = await self._form(ledger.REVOKE, "/v1/oauth/revoke", form)
                    if call.status == 200:
                        self.revocations.append(Revocation(grant, sent, call.ended))
                        break
                    await asyncio.sleep(0.25)
                await asyncio.sleep(self.pace.use_after_revoke)
            finally:
                user.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await user
            await asyncio.sleep(max(0.0, began + self.pace.revoke_every - time.monotonic()))

    async def _doomed(self, token: str, grant: str) -> None:
        async def step() -> None:
            await self._call(ledger.DOOMED, "GET", "/api/v1/courses?limit=1", token, grant=grant)

        await self._paced(self.pace.doomed_rate, step)
