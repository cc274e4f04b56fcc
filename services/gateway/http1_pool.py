"""A lean HTTP/1.1 client for the gateway's hot path: a protected GET, HEAD or OPTIONS call
without a request body.

aiohttp's ClientSession costs more CPU per request than every check of a protected call
together (request and response objects, header merging, tracing hooks, cookie and proxy
handling, timers, connector bookkeeping): measured on the bench, it was the largest share of
the gateway's CPU per call beyond what its checks need. These calls need none of that: a
request line and headers the gateway has already prepared, and an answer relayed as it is.
So they go over pooled keep-alive connections of asyncio streams with this small client;
calls with a body, other methods and every public route keep using aiohttp (proxy.py).

The answer's framing is the upstream's (RFC 9112 6.3): none for HEAD, 1xx, 204 and 304;
chunked when Transfer-Encoding ends in chunked; Content-Length; else until the connection
closes. A connection is reused only when its answer was read to the end under a known length
and neither side asked to close it. A kept connection the upstream closed while idle fails
before any byte of an answer; such a call (safe and without a body, so fine to send again,
RFC 9110 9.2.1) is retried once on a new connection.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_HEAD = 64 * 1024
# Idle connections older than this are closed rather than reused: under aiohttp's server
# keep-alive (75 s) and the pooled sessions' own (30 s).
IDLE_FOR = 30.0
MAX_IDLE = 256
# Safe methods only: sent again when a kept connection turns out to have been closed.
METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


# RFC 9110 5.1: a field name is a token (which also refuses obsolete line folding).
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class UpstreamProtocolError(Exception):
    """The upstream's answer is not HTTP/1.1 as this client reads it."""


class _Stale(Exception):
    """A reused connection was closed before any byte of the answer came."""


def _buffered(reader: asyncio.StreamReader) -> bool:
    """Bytes the upstream sent that no answer claimed (an unsolicited 408 before an idle close,
    a body longer than its Content-Length): read as the next call's answer, they would hand one
    caller's response to another. StreamReader has no public way to ask."""
    return bool(getattr(reader, "_buffer", b""))


@dataclass(slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = 0.0

    def usable(self, now: float) -> bool:
        return (
            now - self.idle_since < IDLE_FOR
            and not self.writer.is_closing()
            and not self.reader.at_eof()
            and not _buffered(self.reader)
        )

    def close(self) -> None:
        self.writer.transport.abort()


class Answer:
    """An upstream's answer: status line and headers read, the body still to be read."""

    __slots__ = (
        "_body_done",
        "_conn",
        "_keep",
        "_length",
        "_mode",
        "_pool",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self,
        pool: Pool,
        conn: _Connection,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        mode: str,
        length: int | None,
        keep: bool,
    ) -> None:
        self._pool = pool
        self._keep = keep and mode != "close"
        self._conn: _Connection | None = conn
        self.status = status
        self.reason = reason
        self.headers = headers
        self._mode = mode  # "none", "length", "chunked" or "close"
        self._length = length
        self._body_done = mode == "none"

    @property
    def content_length(self) -> int | None:
        return self._length if self._mode == "length" else (0 if self._mode == "none" else None)

    async def read(self) -> bytes:
        """The whole body (for answers of a known, small length)."""
        conn = self._conn
        if self._mode == "none" or conn is None:
            self._finish()
            return b""
        if self._mode != "length" or self._length is None:
            raise UpstreamProtocolError("read() needs a known length")
        body = await conn.reader.readexactly(self._length)
        self._body_done = True
        self._finish()
        return body

    async def chunks(self, size: int) -> AsyncIterator[bytes]:
        """The body piece by piece, as it comes (chunked encoding removed)."""
        conn = self._conn
        if conn is None or self._mode == "none":
            self._finish()
            return
        reader = conn.reader
        if self._mode == "length":
            left = self._length or 0
            while left:
                piece = await reader.read(min(size, left))
                if not piece:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(piece)
                yield piece
        elif self._mode == "chunked":
            while True:
                line = await reader.readuntil(b"\r\n")
                size_field = line.split(b";", 1)[0].strip()
                # Hex digits only: int(..., 16) would also take "0x1a", "+5" and "5_0".
                if not size_field or size_field.strip(b"0123456789abcdefABCDEF"):
                    raise UpstreamProtocolError("a bad chunk size")
                chunk = int(size_field, 16)
                if chunk < 0:
                    raise UpstreamProtocolError("a bad chunk size")
                if chunk == 0:
                    # Trailers (dropped, as the hop-by-hop Trailer header is) up to an empty line.
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass
                    break
                while chunk:
                    piece = await reader.read(min(size, chunk))
                    if not piece:
                        raise asyncio.IncompleteReadError(b"", chunk)
                    chunk -= len(piece)
                    yield piece
                if await reader.readexactly(2) != b"\r\n":
                    raise UpstreamProtocolError("a chunk does not end in CRLF")
        else:
            while piece := await reader.read(size):
                yield piece
        self._body_done = True
        self._finish()

    def _finish(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._body_done and self._keep and not _buffered(conn.reader):
            self._pool.release(conn)
        else:
            conn.close()

    def release(self) -> None:
        """Done with the answer: the connection goes back to the pool if it was read to the
        end, else it is closed (what is left of its answer must not reach another call)."""
        self._finish()


def _framing(
    method: str, status: int, fields: list[tuple[str, str]]
) -> tuple[str, int | None, bool]:
    """(mode, length, keep-alive) of an answer (RFC 9112 6.3 and 9.3)."""
    length: int | None = None
    chunked = False
    encoded = False
    keep = True
    for name, value in fields:
        low = name.lower()
        if low == "content-length":
            # Digits only: int() would also take "+5", "5_0" and spaces inside.
            digits = value.strip()
            if not digits.isascii() or not digits.isdigit():
                raise UpstreamProtocolError("a bad Content-Length")
            value_length = int(digits)
            if length is not None and length != value_length:
                raise UpstreamProtocolError("a bad Content-Length")
            length = value_length
        elif low == "transfer-encoding":
            encoded = True
            chunked = value.rsplit(",", 1)[-1].strip().lower() == "chunked"
        elif low == "connection" and "close" in (t.strip().lower() for t in value.split(",")):
            keep = False
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return "none", None, keep
    if encoded:
        # Both framings named: the answer is read as chunked (RFC 9112 6.3), but whoever sent
        # it may frame differently, so the connection is not used again.
        keep = keep and length is None
        return ("chunked", None, keep) if chunked else ("close", None, False)
    if length is not None:
        return "length", length, keep
    return "close", None, False


def _head(data: bytes) -> tuple[int, str, list[tuple[str, str]]]:
    lines = data[:-4].decode("utf-8", "surrogateescape").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise UpstreamProtocolError("not an HTTP/1.x status line")
    fields = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or _TOKEN.fullmatch(name) is None:
            raise UpstreamProtocolError("a malformed header line")
        fields.append((name, value.strip(" \t")))
    return int(code), reason, fields


class Pool:
    """Keep-alive connections to one upstream (http:// only) and the exchanges over them."""

    def __init__(self, url: str, *, connect_timeout: float, total_timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("the lean client speaks plain http only")
        self.host = self._host = parts.hostname
        self.port = self._port = parts.port or 80
        self._connect_timeout = connect_timeout
        self.total_timeout = total_timeout
        self._idle: deque[_Connection] = deque()
        self._closed = False

    async def _connect(self) -> _Connection:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self._host, self._port, limit=MAX_HEAD),
            self._connect_timeout,
        )
        return _Connection(reader, writer)

    def release(self, conn: _Connection) -> None:
        if self._closed or len(self._idle) >= MAX_IDLE:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    async def exchange(
        self, method: str, target: str, headers: Iterable[tuple[str, str]]
    ) -> Answer:
        """Send a request without a body and read the answer's head; the caller must read
        or release the Answer. OSError/TimeoutError when the upstream cannot be reached,
        UpstreamProtocolError or asyncio.IncompleteReadError when its answer is broken."""
        request = _request_bytes(method, target, headers)
        now = time.monotonic()
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.usable(now):
                try:
                    return await self._send(conn, method, request, reused=True)
                except _Stale:
                    break
            conn.close()
        conn = await self._connect()
        try:
            return await self._send(conn, method, request, reused=False)
        except _Stale:
            raise asyncio.IncompleteReadError(b"", None) from None

    async def _send(
        self, conn: _Connection, method: str, request: bytes, *, reused: bool
    ) -> Answer:
        try:
            conn.writer.write(request)
            reader = conn.reader
            while True:
                try:
                    data = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    if reused and not exc.partial:
                        raise _Stale from None
                    raise
                except ConnectionError:
                    if reused:
                        raise _Stale from None
                    raise
                except asyncio.LimitOverrunError:
                    raise UpstreamProtocolError("the answer's head is too large") from None
                reused = False
                status, reason, fields = _head(data)
                if 100 <= status < 200 and status != 101:
                    continue  # interim answers (100 Continue, 103 Early Hints) are not relayed
                if status == 101:
                    raise UpstreamProtocolError("protocol upgrades are not relayed")
                break
            mode, length, keep = _framing(method, status, fields)
            return Answer(self, conn, status, reason, fields, mode, length, keep)
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()


def _request_bytes(method: str, target: str, headers: Iterable[tuple[str, str]]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    count = 1
    for name, value in headers:
        lines.append(f"{name}: {value}\r\n")
        count += 1
    lines.append("\r\n")
    text = "".join(lines)
    # Every CR and LF is one of ours: a value or target holding one would split the request
    # (header injection), and NUL is never valid.
    if text.count("\r") != count + 1 or text.count("\n") != count + 1 or "\x00" in text:
        raise ValueError("a header or the target holds CR, LF or NUL")
    if target.count(" ") or method.count(" "):
        raise ValueError("the method or target holds a space")
    return text.encode("utf-8", "surrogateescape")
