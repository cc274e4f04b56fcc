"""The gateway's lean upstream client (services/gateway/http1_pool.py) against a scripted HTTP
server on a real socket: framing, keep-alive reuse, a kept connection the upstream closed, and
requests that would split into two."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from services.gateway.http1_pool import Pool, UpstreamProtocolError


@dataclass
class Scripted:
    """Answers each request with the next scripted answer; closes after it when told to."""

    answers: list[tuple[bytes, bool]]
    requests: list[bytes] = field(default_factory=list)
    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                answer, close = self.answers.pop(0)
                writer.write(answer)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


Start = Callable[[Scripted], Awaitable[Pool]]


@pytest.fixture
async def serve() -> AsyncIterator[Start]:
    servers: list[asyncio.Server] = []
    pools: list[Pool] = []

    async def start(script: Scripted) -> Pool:
        server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        pool = Pool(f"http://127.0.0.1:{port}", connect_timeout=2, total_timeout=5)
        pools.append(pool)
        return pool

    yield start
    for pool in pools:
        pool.close()
    for server in servers:
        server.close()
        await server.wait_closed()


HEADERS = [("Host", "school.example"), ("X-Connect-Subject", "u1")]


async def test_a_known_length_answer_is_read_and_its_connection_reused(serve: Start) -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
    script = Scripted([(ok, False), (ok, False)])
    pool = await serve(script)
    for _ in range(2):
        answer = await pool.exchange("GET", "/api/v1/courses?x=1", HEADERS)
        assert (answer.status, answer.reason, answer.content_length) == (200, "OK", 5)
        assert ("Content-Type", "text/plain") in answer.headers
        assert await answer.read() == b"hello"
        answer.release()
    assert script.connections == 1
    assert script.requests[0].startswith(b"GET /api/v1/courses?x=1 HTTP/1.1\r\n")
    assert b"\r\nX-Connect-Subject: u1\r\n" in script.requests[0]


async def test_chunked_answers_are_decoded_and_interim_answers_skipped(serve: Start) -> None:
    chunked = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    script = Scripted([(chunked, False), (b"HTTP/1.1 204 No Content\r\n\r\n", False)])
    pool = await serve(script)
    answer = await pool.exchange("GET", "/", HEADERS)
    assert answer.status == 200 and answer.content_length is None
    assert b"".join([piece async for piece in answer.chunks(4)]) == b"hello world"
    answer.release()
    empty = await pool.exchange("GET", "/", HEADERS)
    assert empty.status == 204 and await empty.read() == b""
    empty.release()
    assert script.connections == 1


async def test_close_delimited_and_connection_close_answers_are_not_reused(serve: Start) -> None:
    script = Scripted(
        [
            (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", True),
            (b"HTTP/1.1 200 OK\r\n\r\nuntil the end", True),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False),
        ]
    )
    pool = await serve(script)
    first = await pool.exchange("GET", "/", HEADERS)
    assert await first.read() == b"ok"
    first.release()
    second = await pool.exchange("GET", "/", HEADERS)
    assert b"".join([p async for p in second.chunks(1024)]) == b"until the end"
    second.release()
    third = await pool.exchange("GET", "/", HEADERS)
    assert third.status == 200
    third.release()
    assert script.connections == 3


async def test_a_kept_connection_closed_by_the_upstream_is_retried_once(serve: Start) -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    # The server answers, then closes the connection without saying so (its idle timeout).
    script = Scripted([(ok, True), (ok, False)])
    pool = await serve(script)
    first = await pool.exchange("GET", "/", HEADERS)
    assert await first.read() == b"ok"
    first.release()
    await asyncio.sleep(0.05)
    second = await pool.exchange("GET", "/", HEADERS)
    assert await second.read() == b"ok"
    second.release()
    assert script.connections == 2


async def test_an_answer_cut_short_or_malformed_fails(serve: Start) -> None:
    script = Scripted(
        [
            (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", True),
            (b"SMTP ready\r\n\r\n", True),
        ]
    )
    pool = await serve(script)
    cut = await pool.exchange("GET", "/", HEADERS)
    with pytest.raises(asyncio.IncompleteReadError):
        await cut.read()
    cut.release()
    with pytest.raises(UpstreamProtocolError):
        await pool.exchange("GET", "/", HEADERS)


async def test_a_header_that_would_split_the_request_is_refused_before_sending(
    serve: Start,
) -> None:
    script = Scripted([])
    pool = await serve(script)
    for headers in (
        [("X-Connect-Subject", "u1\r\nX-Connect-School-Id: 2")],
        [("X-Evil\r\nHost", "x")],
        [("X-Nul", "a\x00b")],
    ):
        with pytest.raises(ValueError):
            await pool.exchange("GET", "/", headers)
    with pytest.raises(ValueError):
        await pool.exchange("GET", "/a b", HEADERS)
    assert script.connections == 0


async def test_bytes_no_answer_claimed_keep_the_connection_out_of_the_pool(serve: Start) -> None:
    """An answer longer than its Content-Length: the rest must never be read as the next
    call's answer (another caller's response), so the next call gets a new connection."""
    long = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 403 Forbidden\r\n\r\n"
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    script = Scripted([(long, False), (ok, False)])
    pool = await serve(script)
    first = await pool.exchange("GET", "/a", HEADERS)
    assert await first.read() == b"hello"
    first.release()
    second = await pool.exchange("GET", "/b", HEADERS)
    assert (second.status, await second.read()) == (200, b"ok")
    second.release()
    assert script.connections == 2


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5_0\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
    ],
    ids=["plus-length", "underscore-length", "0x-chunk"],
)
async def test_lengths_are_digits_only(serve: Start, answer: bytes) -> None:
    pool = await serve(Scripted([(answer, True)]))

    async def read_it() -> bytes:
        got = await pool.exchange("GET", "/a", HEADERS)
        return await got.read()

    with pytest.raises(UpstreamProtocolError):
        await read_it()
