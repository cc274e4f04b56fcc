"""A lean Redis connection for the one command every protected call sends.

redis-py costs more CPU per command than the rest of a protected call together (connection
pool checkout, argument encoding, a parser built for every reply type). The per-call guard is
always the same EVALSHA with the same shape of reply, and the audit's XADDs are all alike, so
they go over this instead: one long-lived connection, commands pipelined (Redis answers in
order, so each reply resolves the oldest waiter), the commands of one event-loop turn sent in
one write, replies parsed by a small RESP2 reader. Streams followers and readiness keep using
redis-py.

Failure is explicit: a lost connection fails every waiting call at once, a reply later than
`timeout` closes the connection (Redis answers in order, so the oldest waiter being late means
the link is stuck), and the next call reconnects. Callers treat the ConnectionError as "cannot
check", which the gateway answers 503 (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

from redis.asyncio.connection import SSLConnection, parse_url

from libs.common import marks_fence

CRLF = b"\r\n"


class RedisReplyError(Exception):
    """Redis answered with an error (`-ERR ...`, `-NOSCRIPT ...`)."""


class MarksNotRestored(ConnectionError):
    """The node runs under a run_id identity's marks pass has not recorded (it restarted, or a
    replica took over): a missing mark there does not mean "not revoked"."""


# How often a connection to a node not yet restored asks again.
FENCE_RECHECK = 0.2


def pack(*parts: bytes | str | int) -> bytes:
    """A RESP2 command array."""
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Incomplete(Exception):
    pass


def _parse(buffer: bytes | bytearray, pos: int) -> tuple[Any, int]:
    """One RESP2 reply at `pos`: (value, next position); _Incomplete when more is needed."""
    end = buffer.find(CRLF, pos)
    if end < 0:
        raise _Incomplete
    kind = buffer[pos]
    line = bytes(buffer[pos + 1 : end])
    nxt = end + 2
    if kind == 0x3A:  # ':' integer
        return int(line), nxt
    if kind == 0x2B:  # '+' simple string
        return line, nxt
    if kind == 0x2D:  # '-' error
        return RedisReplyError(line.decode(errors="replace")), nxt
    if kind == 0x24:  # '$' bulk string
        size = int(line)
        if size < 0:
            return None, nxt
        if len(buffer) < nxt + size + 2:
            raise _Incomplete
        return bytes(buffer[nxt : nxt + size]), nxt + size + 2
    if kind == 0x2A:  # '*' array
        count = int(line)
        if count < 0:
            return None, nxt
        items = []
        for _ in range(count):
            item, nxt = _parse(buffer, nxt)
            items.append(item)
        return items, nxt
    raise ConnectionError(f"unexpected reply type {chr(kind)!r}")


class _Batch:
    """The replies of a batch of commands, resolved together: one future, not one per reply."""

    __slots__ = ("replies", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.replies: list[Any] = []


Replies = list[Any] | ConnectionError
OnReplies = Callable[[Replies], None]


class _Callback:
    """A waiter that is a function, not a future: it is called with the replies (or the
    ConnectionError) in the turn of the loop that parsed them, with no task to wake first. The
    durable audit answers its calls from there (audit.py)."""

    __slots__ = ("_done", "_on_replies")

    def __init__(self, on_replies: OnReplies) -> None:
        self._on_replies = on_replies
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, value: Any) -> None:
        self._done = True
        self._on_replies(value)

    def set_exception(self, exc: BaseException) -> None:
        self._done = True
        self._on_replies(exc if isinstance(exc, ConnectionError) else ConnectionError(str(exc)))


_Waiter = asyncio.Future[Any] | _Callback


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        # (sent at, future or _Callback, None for one reply or the _Batch collecting several)
        self.waiters: deque[tuple[float, _Waiter, _Batch | None]] = deque()
        self._buffer = bytearray()
        self._outgoing: list[bytes] = []
        self.lost = asyncio.get_running_loop().create_future()
        # libs/common/marks_fence.py, per connection: a new run_id is a new connection. A
        # role change keeps both, so a Cluster client asks again after its slot map changes
        # (PipelinedRedis.recheck_fence).
        self.restored = False
        self.fence_checked = 0.0
        # The check in flight or last made: the calls arriving meanwhile share its answer.
        self.fence_check: asyncio.Future[bool] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        pos = 0
        waiters = self.waiters
        try:
            while pos < len(buffer):
                try:
                    value, pos = _parse(buffer, pos)
                except _Incomplete:
                    break
                if not waiters:
                    raise ConnectionError("a reply nobody asked for")
                _, future, batch = waiters[0]
                if batch is not None:
                    batch.replies.append(value)
                    if len(batch.replies) < batch.size:
                        continue
                    value = batch.replies
                waiters.popleft()
                if not future.done():
                    future.set_result(value)
        except (ConnectionError, ValueError) as exc:
            self.fail(ConnectionError(str(exc)))
            return
        del buffer[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionError("the Redis connection was lost"))

    def fail(self, exc: Exception) -> None:
        while self.waiters:
            _, future, _ = self.waiters.popleft()
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()
        if not self.lost.done():
            self.lost.set_result(None)

    @property
    def usable(self) -> bool:
        return not (self.transport is None or self.transport.is_closing() or self.lost.done())

    def send(self, command: bytes, batch: int | None = None) -> asyncio.Future[Any]:
        """Queue a command, or `batch` commands packed together (answered as one list)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self.usable:
            future.set_exception(ConnectionError("the Redis connection is closed"))
            return future
        self._send(command, future, None if batch is None else _Batch(batch))
        return future

    def send_calling(self, commands: bytes, count: int, on_replies: OnReplies) -> None:
        """Queue `count` packed commands whose replies (a list) go to `on_replies` as soon as
        they are parsed; the caller checked `usable`."""
        self._send(commands, _Callback(on_replies), _Batch(count))

    def _send(self, command: bytes, waiter: _Waiter, batch: _Batch | None) -> None:
        assert self.transport is not None
        idle = not self.waiters
        self.waiters.append((time.monotonic(), waiter, batch))
        if idle:
            # Nothing in flight: under light load, waiting for the end of the loop's turn
            # would only add whatever else runs in it to this call's latency.
            self.transport.write(command)
            return
        # Under load, commands sent in the same turn of the event loop leave in one write (one
        # syscall) at the end of the turn, and many calls share it.
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing.append(command)

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(outgoing))


class PipelinedRedis:
    """One pipelined connection to the Redis of a `redis://`, `rediss://` or `unix://` URL.

    `locate` finds the address to connect to each time (Sentinel: the master's). With `fence`,
    the key of the node's marks record (libs/common/marks_fence.py), :meth:`execute` raises
    MarksNotRestored on a connection to a node whose run identity's marks pass has not
    recorded yet (asked when connected, and again every FENCE_RECHECK until it holds)."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 1.0,
        locate: Callable[[], Awaitable[tuple[str, int]]] | None = None,
        fence: Callable[[], bytes | None] | None = None,
    ) -> None:
        self._options = parse_url(url)
        self._timeout = timeout
        self._locate = locate
        self._fence = fence
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None
        self._watchdog: asyncio.Task[None] | None = None

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        options = self._options
        if "path" in options:
            _, protocol = await asyncio.wait_for(
                loop.create_unix_connection(_Protocol, options["path"]), self._timeout
            )
        else:
            if self._locate is not None:
                options = {**options}
                options["host"], options["port"] = await self._locate()
            tls = (
                ssl.create_default_context()
                if options.get("connection_class") is SSLConnection
                else None
            )
            _, protocol = await asyncio.wait_for(
                loop.create_connection(
                    _Protocol, options.get("host", "127.0.0.1"), options.get("port", 6379), ssl=tls
                ),
                self._timeout,
            )
        setup = []
        if options.get("password"):
            credentials = [options["username"]] if options.get("username") else []
            setup.append(pack("AUTH", *credentials, options["password"]))
        if options.get("db"):
            setup.append(pack("SELECT", int(options["db"])))
        for command in setup:
            answer = await asyncio.wait_for(protocol.send(command), self._timeout)
            if isinstance(answer, RedisReplyError):
                protocol.fail(ConnectionError(str(answer)))
                raise ConnectionError(f"Redis refused the connection setup: {answer}")
        return protocol

    async def _connection(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and not protocol.lost.done():
            return protocol
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            protocol = self._protocol
            if protocol is None or protocol.lost.done():
                try:
                    protocol = await self._connect()
                except (OSError, TimeoutError) as exc:
                    raise ConnectionError(f"cannot reach Redis: {exc}") from None
                self._protocol = protocol
            if self._watchdog is None or self._watchdog.done():
                self._watchdog = asyncio.create_task(self._watch())
            return protocol

    async def _watch(self) -> None:
        """Close a connection whose oldest unanswered command is older than the timeout."""
        while True:
            await asyncio.sleep(min(0.25, self._timeout / 2))
            protocol = self._protocol
            if protocol is not None and protocol.waiters:
                sent_at, _, _ = protocol.waiters[0]
                if time.monotonic() - sent_at > self._timeout:
                    protocol.fail(ConnectionError("Redis did not answer in time"))

    async def execute(self, command: bytes) -> Any:
        """Send a packed command and return its reply; RedisReplyError for an error reply,
        ConnectionError when Redis cannot be reached or does not answer in time."""
        protocol = self._protocol
        if protocol is None or protocol.lost.done():
            protocol = await self._connection()
        if self._fence is not None and not protocol.restored:
            await self._check_fence(protocol)
        answer = await protocol.send(command)
        if isinstance(answer, RedisReplyError):
            raise answer
        return answer

    async def _check_fence(self, protocol: _Protocol) -> None:
        check = protocol.fence_check
        if check is None or (
            check.done() and time.monotonic() - protocol.fence_checked >= FENCE_RECHECK
        ):
            protocol.fence_checked = time.monotonic()
            check = protocol.fence_check = asyncio.ensure_future(self._ask_fence(protocol))
        # Shielded: one caller cancelled does not cancel the answer the others wait for.
        if not await asyncio.shield(check):
            raise MarksNotRestored("revocation marks not restored on this Redis node yet")

    async def _ask_fence(self, protocol: _Protocol) -> bool:
        assert self._fence is not None
        key = self._fence()
        if key is None:
            return True  # a node that serves no slot of the map: a redirection (ASK) only
        answer = await protocol.send(pack(b"EVAL", marks_fence.STATE, b"1", key))
        if isinstance(answer, RedisReplyError):
            # MOVED: the record asked for is not on this node (the map is stale), so nothing
            # says this node's marks are restored.
            raise MarksNotRestored(f"revocation marks record unreadable: {answer}")
        run_id, recorded = answer
        protocol.restored = bool(run_id) and run_id == recorded
        return protocol.restored

    def recheck_fence(self) -> None:
        """Ask the node's record again before the next command (its role may have changed)."""
        protocol = self._protocol
        if protocol is not None:
            protocol.restored = False
            protocol.fence_check = None

    async def execute_unfenced(self, command: bytes) -> Any:
        """:meth:`execute` for a command that reads no marks (CLUSTER SLOTS): never fenced."""
        protocol = self._protocol
        if protocol is None or protocol.lost.done():
            protocol = await self._connection()
        answer = await protocol.send(command)
        if isinstance(answer, RedisReplyError):
            raise answer
        return answer

    async def execute_many(self, commands: list[bytes]) -> list[Any]:
        """Send packed commands pipelined; their replies in order (errors as values). Fenced
        as :meth:`execute` is (the Cluster's guard calls come this way)."""
        protocol = self._protocol
        if protocol is None or protocol.lost.done():
            protocol = await self._connection()
        if self._fence is not None and not protocol.restored:
            await self._check_fence(protocol)
        if not commands:
            return []
        replies: list[Any] = await protocol.send(b"".join(commands), len(commands))
        return replies

    def send_now(self, commands: bytes, count: int, on_replies: OnReplies) -> bool:
        """Send `count` packed commands now, from code that cannot wait (no task, no turn of
        the loop in between): True when they went, their replies (a list, errors as values)
        or the ConnectionError to come to `on_replies` in the turn that parses them. False
        when no connection is ready to take them now (none yet, lost, or a fence not yet
        passed): the caller goes the awaitable way (:meth:`execute_many`), which connects."""
        protocol = self._protocol
        if protocol is None or not protocol.usable:
            return False
        if self._fence is not None and not protocol.restored:
            return False
        protocol.send_calling(commands, count, on_replies)
        return True

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None
