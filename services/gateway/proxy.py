"""Forwarding a call upstream and its answer back, bodies streamed both ways.

One pooled keep-alive ClientSession per upstream. Requests keep their method, path and query
byte for byte, and their Host (identity resolves the school from it); hop-by-hop headers
(RFC 9110 7.6.1) are dropped both ways, redirects are never followed, cookies are never kept
by the gateway (Set-Cookie goes back to the caller untouched), and bodies are not decoded.

Protected calls also lose the caller's Authorization, Cookie and every `X-Connect-*` header,
and gain the verified identity (`X-Connect-*`) and the internal token that proves to the
resource service the identity came from a gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from libs.common import tracing
from libs.common.errors import json_response
from libs.common.logging import get_logger
from libs.common.web import answer_and_close
from services.gateway import http1_pool
from services.gateway.metrics import GatewayMetrics

log = get_logger(__name__)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Set by the gateway itself, never passed on from the caller.
_FORWARDING = frozenset(
    {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-real-ip"}
)
# A protected call's credentials are the gateway's business only: the token is verified here
# and its identity sent in X-Connect-*; the browser's cookies of the public origin (identity's
# session among them) must not reach a resource service.
_PROTECTED_DROP = frozenset({"authorization", "cookie", "x-request-id"})
IDENTITY_PREFIX = "x-connect-"
# Run before a streamed answer's status is sent: None to go on, or the answer to send instead.
BeforeSend = Callable[[int], Awaitable[web.StreamResponse | None]]
# The caller's Host is replaced by the forwarding one, never sent twice.
_PUBLIC_SKIP = HOP_BY_HOP | _FORWARDING | {"host"}
_PROTECTED_SKIP = _PUBLIC_SKIP | _PROTECTED_DROP
_NONE: frozenset[str] = frozenset()
# Answers up to this size are read whole and sent in one write; longer ones (or ones of
# unknown length) are streamed chunk by chunk.
SMALL_BODY = 256 * 1024
CHUNK = 64 * 1024


class Upstreams:
    """The pooled sessions, one per upstream name."""

    def __init__(
        self, urls: Mapping[str, str], *, connect_timeout: float, total_timeout: float
    ) -> None:
        self.urls = dict(urls)
        timeout = aiohttp.ClientTimeout(
            total=total_timeout, sock_connect=connect_timeout, connect=connect_timeout
        )
        self._sessions = {
            name: aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=0, keepalive_timeout=30, ttl_dns_cache=60, enable_cleanup_closed=True
                ),
                timeout=timeout,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                # Add nothing the caller did not send.
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            )
            for name in self.urls
        }
        # The lean client (http1_pool.py) for protected calls without a body, where it can.
        self.lean = {
            name: http1_pool.Pool(url, connect_timeout=connect_timeout, total_timeout=total_timeout)
            for name, url in self.urls.items()
            if urlsplit(url).scheme == "http"
        }

    def session(self, name: str) -> aiohttp.ClientSession:
        return self._sessions[name]

    async def close(self) -> None:
        for pool in self.lean.values():
            pool.close()
        for session in self._sessions.values():
            await session.close()


def _connection_named(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    values = headers.getall("Connection", ())
    if not values:
        return frozenset()
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


@dataclass(frozen=True, slots=True)
class Forwarding:
    """How the caller reached the gateway, as told to upstreams."""

    client_ip: str | None
    proto: str
    host: str


def upstream_request_headers(
    request: web.Request,
    forwarding: Forwarding,
    *,
    identity: Mapping[str, str] | None,
) -> CIMultiDict[str]:
    """The caller's headers as an upstream gets them; `identity` marks a protected call."""
    headers = request.headers
    named = _connection_named(headers) if "Connection" in headers else _NONE
    dropped = _PROTECTED_SKIP if identity is not None else _PUBLIC_SKIP
    # Collected as pairs and made into a multidict at once: one C call, not one per header.
    pairs = [
        (name, value)
        for name, value in headers.items()
        if (low := name.lower()) not in dropped
        and not low.startswith(IDENTITY_PREFIX)  # never let a caller claim an identity
        and low not in named
    ]
    pairs.append(("Host", forwarding.host))
    if forwarding.client_ip:
        pairs.append(("X-Forwarded-For", forwarding.client_ip))
    pairs.append(("X-Forwarded-Proto", forwarding.proto))
    pairs.append(("X-Forwarded-Host", forwarding.host))
    if identity is not None:
        pairs.extend(identity.items())
    return CIMultiDict(pairs)


def response_headers(
    upstream: aiohttp.ClientResponse,
    *,
    protected: bool,
    extra: Mapping[str, str] | None = None,
) -> CIMultiDict[str]:
    """The upstream's answer headers as the caller gets them, plus the gateway's `extra`
    (a `Vary` of the upstream's is extended, not replaced)."""
    headers = upstream.headers
    named = _connection_named(headers) if "Connection" in headers else _NONE
    return _answer_headers(headers.items(), named, protected=protected, extra=extra)


def _answer_headers(
    fields: Iterable[tuple[str, str]],
    named: frozenset[str],
    *,
    protected: bool,
    extra: Mapping[str, str] | None,
) -> CIMultiDict[str]:
    pairs = [
        (name, value)
        for name, value in fields
        if (low := name.lower()) not in HOP_BY_HOP
        and low not in named
        # CORS on the protected API is the gateway's decision alone (cors.py).
        and not (protected and low.startswith("access-control-"))
    ]
    out: CIMultiDict[str] = CIMultiDict(pairs)
    if extra:
        for name, value in extra.items():
            if name == "Vary" and "Vary" in out:
                out["Vary"] = f"{out['Vary']}, {value}"
            else:
                out[name] = value
    return out


def bad_gateway() -> web.Response:
    return json_response(
        {"error": "bad_gateway", "error_description": "The upstream service did not answer."},
        status=502,
    )


def upstream_timeout() -> web.Response:
    return json_response(
        {"error": "upstream_timeout", "error_description": "The upstream service took too long."},
        status=504,
    )


async def forward(
    request: web.Request,
    upstreams: Upstreams,
    upstream: str,
    headers: CIMultiDict[str],
    metrics: GatewayMetrics,
    *,
    protected: bool,
    extra: Mapping[str, str] | None = None,
    before_send: BeforeSend | None = None,
    max_body: int | None = None,
) -> web.StreamResponse:
    """Send the call to `upstream` and relay its answer; 502/504 JSON when it fails, 413 when
    the body passes `max_body` bytes (counted as it streams; the caller's connection closed).

    `before_send(status)` runs before an answer streamed as it comes sends its status; what it
    returns, if anything, is answered instead. An answer returned whole (not yet prepared) is
    left for the caller to send."""
    if protected and request.method in http1_pool.METHODS and not request.body_exists:
        lean = upstreams.lean.get(upstream)
        if lean is not None:
            return await _forward_lean(
                request, lean, upstream, headers, metrics, extra, before_send
            )
    url = URL(upstreams.urls[upstream] + request.raw_path, encoded=True)
    session = upstreams.session(upstream)
    data: Any = request.content if request.body_exists else None
    limit: _BodyLimit | None = None
    if max_body is not None and data is not None:
        length = request.content_length
        if length is not None and length > max_body:
            return await body_too_large(request)
        limit = data = _BodyLimit(request.content, max_body)
    started = time.perf_counter()
    try:
        upstream_response = await session.request(
            request.method, url, headers=headers, data=data, allow_redirects=False
        )
    except TimeoutError:
        if limit is not None and limit.exceeded:
            return await body_too_large(request)
        metrics.upstream_errors.labels(upstream, "timeout").inc()
        log.warning("upstream_timeout", upstream=upstream)
        return upstream_timeout()
    except aiohttp.ClientError as exc:
        if limit is not None and limit.exceeded:
            # The body passed the route's max_body on its way upstream; sending stopped there.
            return await body_too_large(request)
        metrics.upstream_errors.labels(upstream, "connect").inc()
        log.warning("upstream_failed", upstream=upstream, error=type(exc).__name__)
        return bad_gateway()
    if limit is not None and limit.exceeded:
        # The upstream answered before the body ended; what passed the limit is refused.
        upstream_response.release()
        return await body_too_large(request)
    metrics.upstream_answered(upstream, time.perf_counter() - started)
    try:
        out_headers = response_headers(upstream_response, protected=protected, extra=extra)
        status = upstream_response.status
        length = upstream_response.content_length
        if (
            request.method == "HEAD"
            or status in (204, 304)
            or (length is not None and length <= SMALL_BODY)
        ):
            try:
                body = await upstream_response.read()
            except TimeoutError:
                metrics.upstream_errors.labels(upstream, "timeout").inc()
                return upstream_timeout()
            except aiohttp.ClientError:
                metrics.upstream_errors.labels(upstream, "protocol").inc()
                return bad_gateway()
            answer = web.Response(
                body=body or None,
                status=status,
                reason=upstream_response.reason,
                headers=out_headers,
            )
            if limit is not None and not request.content.is_eof():
                # The upstream answered without reading the whole body (a refusal): stop
                # reading it here too, rather than take in the rest only to discard it.
                return await answer_and_close(request, answer)
            return answer
        if before_send is not None:
            instead = await before_send(status)
            if instead is not None:
                return instead
        return await _stream(request, upstream_response, out_headers, upstream, metrics)
    finally:
        upstream_response.release()


class _BodyLimit:
    """The caller's body as it streams upstream, stopped at the first byte past `limit`."""

    def __init__(self, content: aiohttp.StreamReader, limit: int) -> None:
        self.content = content
        self.limit = limit
        self.exceeded = False

    async def _chunks(self) -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in self.content.iter_chunked(CHUNK):
            seen += len(chunk)
            if seen > self.limit:
                self.exceeded = True
                raise BodyTooLarge
            yield chunk

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()


class BodyTooLarge(Exception):
    pass


async def body_too_large(request: web.Request) -> web.Response:
    response = json_response(
        {"error": "payload_too_large", "error_description": "The request body is too large."},
        status=413,
    )
    return await answer_and_close(request, response)


async def _stream(
    request: web.Request,
    upstream_response: aiohttp.ClientResponse,
    headers: CIMultiDict[str],
    upstream: str,
    metrics: GatewayMetrics,
) -> web.StreamResponse:
    response = web.StreamResponse(
        status=upstream_response.status, reason=upstream_response.reason, headers=headers
    )
    await response.prepare(request)
    chunks = upstream_response.content.iter_chunked(CHUNK)
    while True:
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            break
        except (TimeoutError, aiohttp.ClientError, asyncio.IncompleteReadError) as exc:
            # The status is already sent: the only honest signal left is to cut the
            # connection, so the caller sees a truncated answer, not a complete-looking one.
            metrics.upstream_errors.labels(upstream, "stream").inc()
            log.warning("upstream_stream_failed", upstream=upstream, error=type(exc).__name__)
            if request.transport is not None:
                request.transport.abort()
            return response
        try:
            await response.write(chunk)
        except ConnectionError:
            # The caller went away mid-answer: stop relaying; the upstream connection is
            # closed on release because its body was not read to the end.
            log.debug("caller_disconnected", upstream=upstream)
            return response
    await response.write_eof()
    return response


async def _forward_lean(
    request: web.Request,
    pool: http1_pool.Pool,
    name: str,
    headers: CIMultiDict[str],
    metrics: GatewayMetrics,
    extra: Mapping[str, str] | None,
    before_send: BeforeSend | None,
) -> web.StreamResponse:
    """forward() over the lean client: the same answers, errors and metrics."""
    started = time.perf_counter()
    deadline = time.monotonic() + pool.total_timeout
    answer: http1_pool.Answer | None = None
    body = b""
    # The lean client is no aiohttp session the instrumentation sees: its span, and the
    # `traceparent` naming it, are added here.
    span_scope: contextlib.AbstractContextManager[object | None] = (
        tracing.client_span(
            f"{request.method} {name}",
            headers,
            {
                "http.request.method": request.method,
                "server.address": pool.host,
                "server.port": pool.port,
                "url.full": f"http://{pool.host}:{pool.port}{request.raw_path}",
            },
        )
        if tracing.ENABLED
        else contextlib.nullcontext()
    )
    try:
        # One timeout for the head and a small body: the call's whole exchange.
        with span_scope as span:
            async with asyncio.timeout(pool.total_timeout):
                answer = await pool.exchange(request.method, request.raw_path, headers.items())
                metrics.upstream_answered(name, time.perf_counter() - started)
                if span is not None:
                    tracing.answered(span, answer.status)
                length = answer.content_length
                small = length is not None and length <= SMALL_BODY
                if small:
                    body = await answer.read()
    except TimeoutError:
        if answer is not None:
            answer.release()
        metrics.upstream_errors.labels(name, "timeout").inc()
        log.warning("upstream_timeout", upstream=name)
        return upstream_timeout()
    except (
        OSError,
        ValueError,
        http1_pool.UpstreamProtocolError,
        asyncio.IncompleteReadError,
    ) as exc:
        if answer is not None:
            answer.release()
        metrics.upstream_errors.labels(name, "connect" if answer is None else "protocol").inc()
        log.warning("upstream_failed", upstream=name, error=type(exc).__name__)
        return bad_gateway()
    except BaseException:
        # Cancelled (the caller went away): the connection is not left open unowned.
        if answer is not None:
            answer.release()
        raise
    try:
        fields = answer.headers
        named = _NONE
        for field, value in fields:
            if field.lower() == "connection":
                named = named | {t.strip().lower() for t in value.split(",") if t.strip()}
        out_headers = _answer_headers(fields, named, protected=True, extra=extra)
        if small:
            return web.Response(
                body=body or None, status=answer.status, reason=answer.reason, headers=out_headers
            )
        if before_send is not None:
            instead = await before_send(answer.status)
            if instead is not None:
                return instead
        return await _stream_lean(request, answer, out_headers, name, metrics, deadline)
    finally:
        answer.release()


def _loop_time(deadline: float) -> float:
    """A time.monotonic() deadline on the event loop's clock."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


async def _stream_lean(
    request: web.Request,
    answer: http1_pool.Answer,
    headers: CIMultiDict[str],
    name: str,
    metrics: GatewayMetrics,
    deadline: float,
) -> web.StreamResponse:
    response = web.StreamResponse(status=answer.status, reason=answer.reason, headers=headers)
    await response.prepare(request)
    try:
        async with asyncio.timeout_at(_loop_time(deadline)):
            async for chunk in answer.chunks(CHUNK):
                try:
                    await response.write(chunk)
                except ConnectionError:
                    # The caller went away mid-answer: stop relaying; the upstream
                    # connection is closed on release, its answer not read to the end.
                    log.debug("caller_disconnected", upstream=name)
                    return response
    except (
        TimeoutError,
        OSError,
        http1_pool.UpstreamProtocolError,
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
    ) as exc:
        # The status is already sent: the only honest signal left is to cut the connection,
        # so the caller sees a truncated answer, not a complete-looking one.
        metrics.upstream_errors.labels(name, "stream").inc()
        log.warning("upstream_stream_failed", upstream=name, error=type(exc).__name__)
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response
