"""Refused calls and the audit trail at the gateway (contract 13, Hardening), on real sockets.

A call refused for scope (403) is charged to the client's rate limit, still answered 403 (the
order of section 6 stays), so a token cannot make unlimited audited refusals. And the audit
trail fails closed: a protected call whose record the gateway's buffer cannot take is answered
503 and never reaches the upstream, counted in `gateway_audit_refused_total`; once the buffer
drains, calls are served again, each with its record.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from libs.common import redis_client, streams
from libs.common.config import Settings
from services.identity import audit, keys, store
from tests.support import base_url, without_handler_cancellation
from tests.test_gateway import _token
from tests.test_gateway_support import (
    World,
    access_claims,
    echo_upstream,
    extra_gateway,
    make_world,
    mint,
    user_grant,
)

__all__ = ["echo_upstream"]

pytestmark = [pytest.mark.usefixtures("echo_upstream"), pytest.mark.timeout(120)]

# A client's limit small enough to drain in a few calls: a burst of 6, one call per 10 s back.
PER_MINUTE = 6


@pytest.fixture(scope="module")
def keyring(pool: Any, gateway_settings: Settings) -> keys.KeyRing:
    return keys.KeyRing(pool, gateway_settings)


async def _call(
    http: Any,
    base: str,
    world: World,
    token: str,
    method: str = "GET",
    path: str = "/api/v1/courses",
    request_id: str | None = None,
) -> tuple[int, Any, Any]:
    headers = {"Host": world.host, "Authorization": f"Bearer {token}"}
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    body = None if method in ("GET", "DELETE") else {}
    async with http.request(method, base + path, headers=headers, json=body) as resp:
        text = await resp.text()
        decoded = orjson.loads(text) if text and resp.content_type == "application/json" else text
        return resp.status, resp.headers, decoded


async def _limited_world(pool: Any, settings: Settings, port: int, label: str) -> World:
    world = await make_world(pool, settings, label, port)
    await store.update_client(pool, world.client.id, rate_limit_per_minute=PER_MINUTE)
    return world


# Refusals for scope are charged -----------------------------------------------------------------

# Calls an `openid`-only token is refused for: routes and methods of the default route table,
# one of them with an any-of scope list (the appearance: appearance:read or school:read).
REFUSED = [
    ("GET", "/api/v1/courses", "courses:read"),
    ("POST", "/api/v1/members", "students:write"),
    ("GET", "/api/v1/settings/appearance", "appearance:read school:read"),
    ("DELETE", "/api/v1/courses/3", "courses:write"),
    ("PATCH", "/api/v1/members/7", "students:write"),
]


async def _drain_with_refusals(
    http: Any, base: str, world: World, openid: str, calls: list[tuple[str, str, str]]
) -> None:
    """Sends `calls` one after another: each is 403 naming its scope, and spends the bucket."""
    remaining = []
    for method, path, scope in calls:
        status, headers, body = await _call(http, base, world, openid, method, path)
        assert status == 403, (method, path, body)
        assert body["error"] == "insufficient_scope"
        assert f'scope="{scope}"' in headers["WWW-Authenticate"]
        remaining.append(int(headers["RateLimit-Remaining"]))
    assert remaining == list(range(PER_MINUTE - 1, PER_MINUTE - 1 - len(calls), -1))


@pytest.mark.parametrize(("method", "path", "scope"), REFUSED)
async def test_scope_refusals_spend_the_clients_bucket(
    gateway_url: str,
    http: Any,
    pool: Any,
    gateway_settings: Settings,
    gateway_port: int,
    keyring: keys.KeyRing,
    method: str,
    path: str,
    scope: str,
) -> None:
    """An openid-only token's refusals, all alike, drain its client's bucket: the client's next
    in-scope call is 429, while the refused token keeps getting 403 (scope before rate)."""
    world = await _limited_world(pool, gateway_settings, gateway_port, "refusals")
    openid = await _token(keyring, gateway_settings, pool, world, "openid")
    reader = await _token(keyring, gateway_settings, pool, world, "courses:read")
    await _drain_with_refusals(http, gateway_url, world, openid, [(method, path, scope)] * 6)

    status, headers, body = await _call(http, gateway_url, world, reader)
    assert status == 429, body
    assert body["error"] == "rate_limited"
    assert 1 <= int(headers["Retry-After"]) <= 10
    # The order of section 6 stays: out of scope is 403 even with the bucket empty.
    status, headers, _ = await _call(http, gateway_url, world, openid, method, path)
    assert status == 403
    assert headers["RateLimit-Remaining"] == "0"
    # Another client of the school has a bucket of its own.
    other_grant = await user_grant(pool, world, ["courses:read"], client_id=world.other.id)
    other = await mint(
        keyring,
        world.school.id,
        access_claims(
            gateway_settings, world, other_grant, "courses:read", client_id=world.other.id
        ),
    )
    assert (await _call(http, gateway_url, world, other))[0] == 200


async def test_mixed_refusals_drain_the_bucket_without_a_revocation_lease(
    http: Any,
    pool: Any,
    gateway_settings: Settings,
    gateway_env: dict[str, str],
    gateway_port: int,
    gateway_identity_url: str,
    keyring: keys.KeyRing,
) -> None:
    """The same with every call asking Redis (no lease, so no blocks of calls), refusals of
    different routes and methods in turn, and an in-scope call among them counted too."""
    world = await _limited_world(pool, gateway_settings, gateway_port, "nolease")
    openid = await _token(keyring, gateway_settings, pool, world, "openid")
    reader = await _token(keyring, gateway_settings, pool, world, "courses:read")
    async with extra_gateway(gateway_env, GATEWAY_REVOCATION_LEASE="0") as base:
        await _drain_with_refusals(http, base, world, openid, REFUSED[:3])
        status, headers, _ = await _call(http, base, world, reader)
        assert status == 200
        assert headers["RateLimit-Remaining"] == "2"
        await _drain_with_refusals(http, base, world, openid, [])
        for method, path, _ in REFUSED[3:]:
            assert (await _call(http, base, world, openid, method, path))[0] == 403
        status, _, body = await _call(http, base, world, reader)
        assert status == 429, body


async def test_concurrent_refusals_are_each_charged(
    gateway_url: str,
    http: Any,
    pool: Any,
    gateway_settings: Settings,
    gateway_port: int,
    keyring: keys.KeyRing,
) -> None:
    """Refusals sent at once (the gateway asking Redis for one block while the rest wait)
    are charged one each, no more, no less."""
    world = await _limited_world(pool, gateway_settings, gateway_port, "race")
    openid = await _token(keyring, gateway_settings, pool, world, "openid")
    reader = await _token(keyring, gateway_settings, pool, world, "courses:read")
    # The school's keys fetched first, by a call of another client (another bucket).
    other_grant = await user_grant(pool, world, ["courses:read"], client_id=world.other.id)
    other = await mint(
        keyring,
        world.school.id,
        access_claims(
            gateway_settings, world, other_grant, "courses:read", client_id=world.other.id
        ),
    )
    assert (await _call(http, gateway_url, world, other))[0] == 200
    answers = await asyncio.gather(
        *(_call(http, gateway_url, world, openid, m, p) for m, p, _ in REFUSED[:4])
    )
    assert [status for status, _, _ in answers] == [403] * 4, answers
    statuses = [(await _call(http, gateway_url, world, reader))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]


# The audit trail fails closed -------------------------------------------------------------------


@dataclass
class Upstream:
    """A school API stand-in that notes every call it receives (by the gateway's request id)
    and holds calls to `/hold` paths (every call, with `hold_all`) until released."""

    received: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    holding: int = 0
    hold_all: bool = False

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(request.headers.get("X-Request-Id", ""))
        if self.hold_all or request.path.endswith("/hold"):
            self.holding += 1
            try:
                await self.release.wait()
            finally:
                self.holding -= 1
        return web.json_response({"path": request.path, "items": []})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


@asynccontextmanager
async def recording_upstream(
    aiohttp_server: AiohttpServer,
) -> AsyncIterator[tuple[Upstream, str]]:
    """An Upstream served for the block; calls it still holds are released at its end."""
    upstream = Upstream()
    server = await aiohttp_server(upstream.app(), access_log=None, shutdown_timeout=2)
    try:
        async with without_handler_cancellation(server):
            yield upstream, base_url(server)
    finally:
        upstream.release.set()


class AuditLink:
    """A TCP proxy in front of Redis for one gateway: everything passes, but the connections
    that write the audit trail (those that have sent an XADD) can be stopped, as by a Redis
    that no longer answers them ("hold": their writes wait) or that they cannot reach ("cut":
    each is closed as soon as it writes), and let through again.

    In front of a Redis Cluster (TEST_REDIS_URL=redis+cluster://...) it listens once per node,
    and the node addresses Redis hands out (CLUSTER SLOTS, MOVED, ASK) are rewritten to the
    link's, so every connection the gateway makes goes through it."""

    def __init__(self, redis_url: str) -> None:
        target = redis_client.parse(redis_url)
        self._cluster = target.kind == "cluster"
        if self._cluster:
            self._upstreams = list(target.nodes)
            self._db = ""
        else:
            parts = urlsplit(redis_url)
            self._upstreams = [(parts.hostname or "127.0.0.1", parts.port or 6379)]
            self._db = parts.path or "/0"
        self.mode = "pass"
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.stopped = 0  # audit writes held or cut
        self._servers: list[asyncio.Server] = []
        # Upstream port -> the link's port in front of it.
        self._ports: dict[int, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self._ports.values())
        if self._cluster:
            return f"redis+cluster://{hosts}"
        return f"redis://{hosts}{self._db}"

    def stop(self, mode: str) -> None:
        assert mode in ("hold", "cut")
        self.mode = mode
        self._flowing.clear()

    def resume(self) -> None:
        self.mode = "pass"
        self._flowing.set()

    async def start(self) -> None:
        for host, port in self._upstreams:

            async def accept(
                reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter,
                upstream: tuple[str, int] = (host, port),
            ) -> None:
                await self._accept(reader, writer, upstream)

            server = await asyncio.start_server(accept, "127.0.0.1", 0)
            self._servers.append(server)
            self._ports[port] = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.resume()
        for server in self._servers:
            server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: tuple[str, int],
    ) -> None:
        up_reader, up_writer = await asyncio.open_connection(*upstream)
        self._writers += [writer, up_writer]
        # The names of the commands sent and not yet answered (a Cluster's replies are read).
        asked: collections.deque[bytes] | None = collections.deque() if self._cluster else None
        self._spawn(self._outgoing(reader, up_writer, writer, asked))
        self._spawn(self._pipe(up_reader, writer, asked))

    async def _outgoing(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: asyncio.StreamWriter,
        asked: collections.deque[bytes] | None,
    ) -> None:
        audit_connection = False
        pending = bytearray()
        try:
            while data := await reader.read(65536):
                audit_connection = audit_connection or b"XADD" in data
                if audit_connection and self.mode == "cut":
                    self.stopped += 1
                    client.close()
                    return
                if audit_connection and self.mode == "hold":
                    self.stopped += 1
                    await self._flowing.wait()
                if asked is not None:
                    pending += data
                    for raw in _resp_values(pending):
                        asked.append(_command_name(raw))
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        asked: collections.deque[bytes] | None,
    ) -> None:
        pending = bytearray()
        try:
            while data := await reader.read(65536):
                if asked is not None:
                    pending += data
                    data = b"".join(self._readdressed(raw, asked) for raw in _resp_values(pending))
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def _readdressed(self, raw: bytes, asked: collections.deque[bytes]) -> bytes:
        """One reply of a Cluster node, naming the link's ports instead of the nodes'."""
        if raw.startswith(b">"):
            return raw  # a RESP3 push: no command of ours asked for it
        command = asked.popleft() if asked else b""
        if command == b"CLUSTER SLOTS":
            # Ports are integers above any slot number (16383): only node ports match.
            for real, ours in self._ports.items():
                raw = raw.replace(b":%d\r\n" % real, b":%d\r\n" % ours)
            return raw
        if raw.startswith((b"-MOVED ", b"-ASK ")):
            kind, slot, where = raw[1:-2].decode().split(" ", 2)
            host, _, port = where.rpartition(":")
            return f"-{kind} {slot} {host}:{self._ports.get(int(port), port)}\r\n".encode()
        return raw


def _command_name(raw: bytes) -> bytes:
    """`CLUSTER SLOTS`, `XADD`, ...: the first two words of a packed command, upper case."""
    words = raw.split(b"\r\n")[2:5:2]
    return b" ".join(words).upper() if words[0].upper() == b"CLUSTER" else words[0].upper()


def _resp_values(buffer: bytearray) -> Iterator[bytes]:
    """The complete RESP2/RESP3 values at the start of `buffer`, each as its bytes, removed."""
    pos = 0
    while pos < len(buffer):
        end = _resp_end(buffer, pos)
        if end is None:
            break
        yield bytes(buffer[pos:end])
        pos = end
    del buffer[:pos]


def _resp_end(buffer: bytearray, pos: int) -> int | None:
    """Where the value at `pos` ends; None when it is not all there yet."""
    line_end = buffer.find(b"\r\n", pos)
    if line_end < 0:
        return None
    kind, header, nxt = buffer[pos : pos + 1], buffer[pos + 1 : line_end], line_end + 2
    if kind in (b"$", b"=", b"!"):  # bulk, verbatim, bulk error
        size = int(header)
        if size < 0:
            return nxt
        return nxt + size + 2 if len(buffer) >= nxt + size + 2 else None
    if kind in (b"*", b"~", b">", b"%", b"|"):  # array, set, push, map, attribute
        count = int(header)
        items = 2 * count if kind in (b"%", b"|") else max(count, 0)
        for _ in range(items):
            end = _resp_end(buffer, nxt)
            if end is None:
                return None
            nxt = end
        # An attribute comes before the value it describes: one value with it.
        return _resp_end(buffer, nxt) if kind == b"|" else nxt
    return nxt  # + - : _ # , ( : one line


@pytest.fixture
async def audit_link(settings: Settings) -> AsyncIterator[AuditLink]:
    link = AuditLink(settings.redis_url)
    await link.start()
    yield link
    await link.close()


async def gateway_metric(http: Any, base: str, name: str) -> float:
    async with http.get(base + "/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


async def buffer_empty(http: Any, base: str, timeout: float = 10) -> None:
    """Until the gateway's audit buffer holds nothing (gateway_audit_buffer_used is 0)."""
    deadline = time.monotonic() + timeout
    while await gateway_metric(http, base, "gateway_audit_buffer_used") != 0:
        assert time.monotonic() < deadline, "the audit buffer did not drain"
        await asyncio.sleep(0.02)


async def _records(redis: Any, settings: Settings, request_ids: set[str]) -> dict[str, Any]:
    """The audit stream's records of these request ids (the run's stream keeps every entry)."""
    found: dict[str, Any] = {}
    for _, fields in await redis.xrange(settings.stream(streams.AUDIT)):
        for record in audit.records_of(orjson.loads(fields[b"data"])):
            rid = (record.get("detail") or {}).get("request_id")
            if rid in request_ids:
                found[rid] = record
    return found


async def _until_recorded(
    redis: Any, settings: Settings, request_ids: set[str], timeout: float = 10
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        found = await _records(redis, settings, request_ids)
        if len(found) == len(request_ids) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)


async def _served_again(
    http: Any,
    base: str,
    world: World,
    token: str,
    ids: Iterator[str],
    served: list[str],
    refused: list[str],
    timeout: float = 10,
) -> None:
    """Calls (as a client honouring Retry-After would, only sooner) until one is served."""
    deadline = time.monotonic() + timeout
    while True:
        rid = next(ids)
        status, _, body = await _call(http, base, world, token, request_id=rid)
        if status == 200:
            served.append(rid)
            return
        assert status == 503, body
        refused.append(rid)
        assert time.monotonic() < deadline, "calls were not served again"
        await asyncio.sleep(0.05)


def _assert_unavailable(status: int, headers: Any, body: Any) -> None:
    """The answer to a call the gateway will not serve without room for its audit record:
    503 temporarily_unavailable, to be tried again in a second."""
    assert status == 503, body
    assert body["error"] == "temporarily_unavailable"
    assert headers["Retry-After"] == "1"


def _ids(label: str) -> Iterator[str]:
    prefix = f"{label}-{secrets.token_hex(4)}"
    n = 0
    while True:
        n += 1
        yield f"{prefix}-{n}"


async def test_calls_in_progress_hold_their_records_place_and_a_full_buffer_refuses(
    http: Any,
    pool: Any,
    redis: Any,
    gateway_settings: Settings,
    gateway_env: dict[str, str],
    gateway_port: int,
    gateway_identity_url: str,
    keyring: keys.KeyRing,
    aiohttp_server: AiohttpServer,
) -> None:
    """GATEWAY_AUDIT_BUFFER=2 with Redis well: two calls held at the upstream hold both places,
    so a third call, served or refused for scope alike, is 503 and never reaches the upstream;
    once they answer, calls are served again, each with its record."""
    world = await make_world(pool, gateway_settings, "auditfull", gateway_port)
    token = await _token(keyring, gateway_settings, pool, world, "courses:read")
    openid = await _token(keyring, gateway_settings, pool, world, "openid")
    ids = _ids("held")
    async with (
        recording_upstream(aiohttp_server) as (upstream, upstream_url),
        extra_gateway(
            gateway_env,
            GATEWAY_AUDIT_MODE="buffered",
            GATEWAY_AUDIT_BUFFER="2",
            SCHOOL_API_URL=upstream_url,
        ) as base,
    ):
        # One call first, recorded and written out: the school's keys are fetched and the
        # buffer is empty again.
        served = [next(ids)]
        assert (await _call(http, base, world, token, request_id=served[0]))[0] == 200
        assert await _until_recorded(redis, gateway_settings, set(served))
        await buffer_empty(http, base)
        before = await gateway_metric(http, base, "gateway_audit_refused_total")

        served += [next(ids), next(ids)]
        held = [
            asyncio.ensure_future(
                _call(http, base, world, token, path="/api/v1/courses/hold", request_id=rid)
            )
            for rid in served[1:]
        ]
        try:
            for _ in range(200):
                if upstream.holding == 2:
                    break
                await asyncio.sleep(0.02)
            assert upstream.holding == 2
            assert await gateway_metric(http, base, "gateway_audit_buffer_used") == 2

            # Served or refused for scope alike: an in-scope read, a write, an openid token.
            attempts = [
                ("GET", "/api/v1/courses", token),
                ("POST", "/api/v1/courses", token),
                ("GET", "/api/v1/courses", openid),
            ]
            refused = [next(ids) for _ in attempts]
            for rid, (method, path, t) in zip(refused, attempts, strict=True):
                status, headers, body = await _call(http, base, world, t, method, path, rid)
                _assert_unavailable(status, headers, body)
            assert await gateway_metric(http, base, "gateway_audit_refused_total") == before + 3
            assert upstream.received == served  # none of the refused calls got there
        finally:
            upstream.release.set()
            answers = await asyncio.gather(*held, return_exceptions=True)
        assert [a[0] for a in answers if isinstance(a, tuple)] == [200, 200]
        # Their records fill the buffer until the next flush writes them out.
        await _served_again(http, base, world, token, ids, served, refused)
        status, _, _ = await _call(http, base, world, openid, request_id=next(ids))
        assert status == 403
        assert upstream.received == served
        found = await _until_recorded(redis, gateway_settings, set(served))
        assert set(found) == set(served)
        assert {rid: found[rid]["status"] for rid in served} == dict.fromkeys(served, 200)
        assert not await _records(redis, gateway_settings, set(refused))


@pytest.mark.parametrize("mode", ["hold", "cut"])
async def test_with_the_audit_redis_away_the_buffer_fills_then_calls_are_refused_until_it_drains(
    mode: str,
    http: Any,
    pool: Any,
    redis: Any,
    gateway_settings: Settings,
    gateway_env: dict[str, str],
    gateway_port: int,
    gateway_identity_url: str,
    keyring: keys.KeyRing,
    audit_link: AuditLink,
    aiohttp_server: AiohttpServer,
) -> None:
    """Redis stops taking the gateway's audit writes, not answering them or not reachable for
    them (the checks still pass: only the audit connection is stopped): the buffer
    (GATEWAY_AUDIT_BUFFER=4) fills with the records of the calls served meanwhile, then every
    protected call is 503 and reaches no upstream, counted; when Redis takes them again the
    buffer drains, calls are served, and every served call has its record."""
    world = await make_world(pool, gateway_settings, "auditheld", gateway_port)
    token = await _token(keyring, gateway_settings, pool, world, "courses:read")
    ids = _ids("link")
    async with (
        recording_upstream(aiohttp_server) as (upstream, upstream_url),
        extra_gateway(
            gateway_env,
            GATEWAY_AUDIT_MODE="buffered",
            GATEWAY_AUDIT_BUFFER="4",
            SCHOOL_API_URL=upstream_url,
            REDIS_URL=audit_link.url,
        ) as base,
    ):
        # A first call opens the audit connection (the link learns which it is).
        first = next(ids)
        status, _, body = await _call(http, base, world, token, request_id=first)
        assert status == 200, body
        assert await _until_recorded(redis, gateway_settings, {first})
        await buffer_empty(http, base)
        before = await gateway_metric(http, base, "gateway_audit_refused_total")

        audit_link.stop(mode)
        served = [first]
        refused: list[str] = []

        async def calls(n: int) -> None:
            for _ in range(n):
                rid = next(ids)
                status, headers, body = await _call(http, base, world, token, request_id=rid)
                if status == 200:
                    served.append(rid)
                    continue
                _assert_unavailable(status, headers, body)
                refused.append(rid)

        # Four records fit, then every call is refused, before and after the gateway tried to
        # write them out.
        await calls(6)
        assert len(served) == 1 + 4, (served, refused)
        for _ in range(100):
            if audit_link.stopped:
                break
            await asyncio.sleep(0.02)
        assert audit_link.stopped
        await calls(4)
        assert len(served) == 1 + 4, (served, refused)
        assert len(refused) == 6
        assert await gateway_metric(http, base, "gateway_audit_refused_total") == before + 6
        assert upstream.received == served
        assert not await _records(redis, gateway_settings, set(served[1:]))

        audit_link.resume()
        await _served_again(http, base, world, token, ids, served, refused)
        assert upstream.received == served
        found = await _until_recorded(redis, gateway_settings, set(served))
        assert set(found) == set(served)
        assert all(found[rid]["status"] == 200 for rid in served)
        assert not await _records(redis, gateway_settings, set(refused))


# Durable mode (GATEWAY_AUDIT_MODE=durable): an answer waits for its record -----------------------


async def test_in_durable_mode_every_answer_has_its_record_on_the_stream_when_it_arrives(
    http: Any,
    pool: Any,
    redis: Any,
    gateway_settings: Settings,
    gateway_env: dict[str, str],
    gateway_port: int,
    gateway_identity_url: str,
    keyring: keys.KeyRing,
) -> None:
    """Served (200) or refused with a record (403), and concurrent or one by one: when the
    answer reaches the caller, its record is already an entry of connect:audit (buffered mode
    writes it a flush interval later)."""
    world = await make_world(pool, gateway_settings, "durable", gateway_port)
    reader = await _token(keyring, gateway_settings, pool, world, "courses:read")
    openid = await _token(keyring, gateway_settings, pool, world, "openid")
    ids = _ids("durable")
    async with extra_gateway(gateway_env, GATEWAY_AUDIT_MODE="durable") as base:

        async def call_and_look(token: str, expected: int) -> None:
            rid = next(ids)
            status, _, body = await _call(http, base, world, token, request_id=rid)
            assert status == expected, body
            found = await _records(redis, gateway_settings, {rid})
            assert rid in found, f"the {status} answer came before its record"
            assert found[rid]["status"] == expected

        for _ in range(5):
            await call_and_look(reader, 200)
            await call_and_look(openid, 403)
        await asyncio.gather(*(call_and_look(reader, 200) for _ in range(12)))


@pytest.mark.parametrize("mode", ["hold", "cut"])
async def test_in_durable_mode_a_call_whose_record_cannot_be_written_is_answered_503(
    mode: str,
    http: Any,
    pool: Any,
    redis: Any,
    gateway_settings: Settings,
    gateway_env: dict[str, str],
    gateway_port: int,
    gateway_identity_url: str,
    keyring: keys.KeyRing,
    audit_link: AuditLink,
    aiohttp_server: AiohttpServer,
) -> None:
    """Redis stops taking the audit writes: no call is answered 200 (the upstream may have
    served it, and its record is kept and written once Redis takes writes again), and then
    calls are served again, each with its record."""
    world = await make_world(pool, gateway_settings, f"durable{mode}", gateway_port)
    token = await _token(keyring, gateway_settings, pool, world, "courses:read")
    ids = _ids("dlink")
    async with (
        recording_upstream(aiohttp_server) as (upstream, upstream_url),
        extra_gateway(
            gateway_env,
            GATEWAY_AUDIT_MODE="durable",
            SCHOOL_API_URL=upstream_url,
            REDIS_URL=audit_link.url,
        ) as base,
    ):
        first = next(ids)
        assert (await _call(http, base, world, token, request_id=first))[0] == 200
        assert await _records(redis, gateway_settings, {first})

        audit_link.stop(mode)
        unanswered = [next(ids) for _ in range(3)]
        for rid in unanswered:
            status, headers, body = await _call(http, base, world, token, request_id=rid)
            _assert_unavailable(status, headers, body)
        # They reached the upstream before their records could be written.
        assert upstream.received == [first, *unanswered]
        assert not await _records(redis, gateway_settings, set(unanswered))

        audit_link.resume()
        served = [first]
        await _served_again(http, base, world, token, ids, served, unanswered)
        assert upstream.received == [*served[:1], *unanswered, *served[1:]]
        found = await _until_recorded(redis, gateway_settings, {*served, *unanswered})
        assert set(found) == {*served, *unanswered}
